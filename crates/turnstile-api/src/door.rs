//! The proxy's `turnstile` subsystem: the one door for clients. Requests and
//! responses are JSON objects, each in a frame of a 4-byte big-endian length
//! and the JSON bytes; one response per request, in order.
//!
//! Who may ask what: an anonymous connection (SSH `none` authentication as
//! [`ANONYMOUS_USER`]) only `cluster_info`; a password-authenticated one also
//! `login`; a certificate-authenticated one `cluster_info`, `ls` and `login`
//! (a renewal for its own user).

use serde::{Deserialize, Serialize};

use crate::labels::Labels;

pub const SUBSYSTEM: &str = "turnstile";

/// The SSH user name of an anonymous connection that only asks for the
/// cluster's public trust material (first contact).
pub const ANONYMOUS_USER: &str = "-turnstile-cluster-info";

/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DoorRequest {
    /// The cluster's name, TLS CA and host CA with its endorsement.
    ClusterInfo,
    /// A certificate for `public_key`.
    Login {
        public_key: String,
        #[serde(default)]
        ttl_seconds: u64,
        /// For whom; defaults to the authenticated user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// The nodes the user may reach.
    Ls,
    /// Recordings the user may see.
    RecordingsLs {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default)]
        since_ms: i64,
    },
    /// Bytes of a recording.
    RecordingChunk {
        sid: String,
        offset: u64,
        length: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_name: String,
    pub tls_ca_pem: String,
    pub host_ca: Vec<String>,
    /// Base64 of the TLS CA's signature over the host CA statement.
    pub host_ca_endorsement: String,
    /// The proxy host CA (absent from proxies older than it).
    #[serde(default)]
    pub proxy_ca: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedCert {
    pub certificate: String,
    pub valid_before: u64,
    pub principals: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    pub addr: String,
    pub labels: Labels,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordingEntry {
    pub sid: String,
    pub user: String,
    pub login: String,
    pub node: String,
    pub start_ms: i64,
    pub stop_ms: i64,
    pub size: u64,
    /// live, uploading, complete or failed.
    pub status: String,
    pub parts: u32,
    /// Why the recording failed, if it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub failure: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum DoorResponse {
    ClusterInfo(ClusterInfo),
    Login(IssuedCert),
    Ls { nodes: Vec<NodeEntry> },
    Recordings { recordings: Vec<RecordingEntry> },
    Chunk { data_base64: String, total: u64 },
    Error { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the {1} allowed")]
    TooLarge(usize, usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let json = serde_json::to_vec(message).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// Takes one complete frame off the front of `buf`, if there is one.
pub fn decode<T: for<'de> Deserialize<'de>>(buf: &mut Vec<u8>) -> Result<Option<T>, FrameError> {
    decode_within(buf, MAX_FRAME)
}

/// [`decode`], refusing frames longer than `max` (at most [`MAX_FRAME`]).
pub fn decode_within<T: for<'de> Deserialize<'de>>(
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<T>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let max = max.min(MAX_FRAME);
    if len > max {
        return Err(FrameError::TooLarge(len, max));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let parsed =
        serde_json::from_slice(&buf[4..4 + len]).map_err(|e| FrameError::Malformed(e.to_string()));
    buf.drain(..4 + len);
    parsed.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let req = DoorRequest::Login {
            public_key: "ssh-ed25519 AAAA".into(),
            ttl_seconds: 60,
            user: None,
        };
        let bytes = encode(&req);
        let mut buf = Vec::new();
        for b in &bytes[..bytes.len() - 1] {
            buf.push(*b);
            assert!(decode::<DoorRequest>(&mut buf).unwrap().is_none());
        }
        buf.push(*bytes.last().unwrap());
        assert_eq!(decode::<DoorRequest>(&mut buf).unwrap(), Some(req));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        assert!(matches!(
            decode::<DoorRequest>(&mut huge),
            Err(FrameError::TooLarge(..))
        ));
        let mut junk = encode(&serde_json::json!({"type": "rm_rf"}));
        assert!(matches!(
            decode::<DoorRequest>(&mut junk),
            Err(FrameError::Malformed(_))
        ));
    }
}

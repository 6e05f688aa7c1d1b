//! The words of session recording that every part shares: the cluster's
//! recording mode, a role's recording policy, and byte sizes as operators
//! write them (`10GiB`, `4MiB`). Parsed once, here; nothing else compares
//! mode strings.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Where and how sessions are recorded (`auth_service.session_recording`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RecordingMode {
    /// The node records to its spool; an uploader ships it to auth.
    #[default]
    Node,
    /// The node streams events live to auth; nothing touches its disk.
    NodeSync,
    /// The proxy terminates sessions and records them to its spool.
    Proxy,
    /// The proxy terminates sessions and streams events live to auth.
    ProxySync,
    /// No output is recorded; session start and end are still audited.
    Off,
}

impl RecordingMode {
    pub const ALL: [RecordingMode; 5] = [
        RecordingMode::Node,
        RecordingMode::NodeSync,
        RecordingMode::Proxy,
        RecordingMode::ProxySync,
        RecordingMode::Off,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RecordingMode::Node => "node",
            RecordingMode::NodeSync => "node-sync",
            RecordingMode::Proxy => "proxy",
            RecordingMode::ProxySync => "proxy-sync",
            RecordingMode::Off => "off",
        }
    }

    /// The proxy records (and nodes refuse sessions that bypass it).
    pub fn at_proxy(self) -> bool {
        matches!(self, RecordingMode::Proxy | RecordingMode::ProxySync)
    }

    /// Events stream live to auth instead of through the recorder's spool.
    pub fn is_sync(self) -> bool {
        matches!(self, RecordingMode::NodeSync | RecordingMode::ProxySync)
    }

    /// Session output is recorded at all.
    pub fn records_output(self) -> bool {
        self != RecordingMode::Off
    }

    fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl fmt::Display for RecordingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a recording mode; use one of {names}", names = RecordingMode::names())]
pub struct ParseModeError(pub String);

impl FromStr for RecordingMode {
    type Err = ParseModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| ParseModeError(s.to_string()))
    }
}

impl Serialize for RecordingMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RecordingMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// What happens to a session whose recording cannot be written (Teleport's
/// role option `record_session: {ssh: strict | best_effort}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingPolicy {
    /// The session ends (or does not start): nothing escapes recording.
    #[default]
    Strict,
    /// The session goes on unrecorded, with a warning and an audit event.
    BestEffort,
}

impl RecordingPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingPolicy::Strict => "strict",
            RecordingPolicy::BestEffort => "best_effort",
        }
    }
}

/// A number of bytes as written in config: `10GiB`, `512MiB`, `64KiB`,
/// `1GB`, or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (write it like 10GiB, 512MiB or 64KiB)")]
pub struct ParseSizeError {
    input: String,
    reason: &'static str,
}

impl ByteSize {
    pub fn parse(input: &str) -> Result<Self, ParseSizeError> {
        let err = |reason| ParseSizeError {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let value: u64 = s[..digits].parse().map_err(|_| err("number too large"))?;
        let unit: u64 = match s[digits..].trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => {
                return Err(err(
                    "unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)",
                ));
            }
        };
        value
            .checked_mul(unit)
            .map(ByteSize)
            .ok_or_else(|| err("too large"))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if b >= size {
                return if b.is_multiple_of(size) {
                    write!(f, "{}{unit}", b / size)
                } else {
                    write!(f, "{:.1}{unit}", b as f64 / size as f64)
                };
            }
        }
        write!(f, "{b}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 10GiB, 512MiB or 64KiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ByteSize(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_once_and_name_the_choices() {
        for m in RecordingMode::ALL {
            assert_eq!(m.as_str().parse::<RecordingMode>().unwrap(), m);
        }
        let err = "always".parse::<RecordingMode>().unwrap_err().to_string();
        assert!(
            err.contains("node-sync") && err.contains("\"always\""),
            "{err}"
        );
        assert!(RecordingMode::ProxySync.at_proxy() && RecordingMode::ProxySync.is_sync());
        assert!(!RecordingMode::Off.records_output());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("10GiB").unwrap().0, 10 << 30);
        assert_eq!(ByteSize::parse("4MiB").unwrap().0, 4 << 20);
        assert_eq!(ByteSize::parse("1GB").unwrap().0, 1_000_000_000);
        assert_eq!(ByteSize::parse("512").unwrap().0, 512);
        assert!(ByteSize::parse("10 gigs").is_err());
        assert!(ByteSize::parse("GiB").is_err());
        assert_eq!(ByteSize(10 << 30).to_string(), "10GiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1.5GiB");
    }
}

//! `storage.audit_sessions_uri` as operators write it, parsed once and
//! checked (every refusal names the option and the fix), and the store it
//! opens:
//!
//! - `file:///dir`
//! - `s3://bucket[/prefix][?region=…&endpoint=…&virtual_hosted=true&sse=aws:kms&sse_kms_key_id=…]`
//! - `azblob://container[/prefix]?account=…[&endpoint=…]`
//! - `gs://bucket[/prefix][?endpoint=…&min_part=…&max_parts=…]`
//!
//! Credentials come from each cloud's standard environment variables (and
//! files, and instance metadata where `object_store` supports them).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::gcs::{ComposedParts, GcsJson};
use super::{FileStore, ObjectUploadStore, UploadStore};

/// The smallest part S3 accepts (but for the last).
pub const S3_MIN_PART: usize = 5 << 20;
/// Blocks of Azure block blobs: any size; this many bytes keeps a blob's
/// 50,000 blocks above 190 GiB.
pub const AZURE_MIN_PART: usize = 4 << 20;
/// Parts of GCS uploads (part objects joined by compose). An object is made
/// of at most 1,024 components, so this many bytes allows 8 GiB a recording
/// object.
pub const GCS_MIN_PART: usize = 8 << 20;
/// The most parts of one multipart upload S3 takes.
pub const S3_MAX_PARTS: u32 = 10_000;
/// The most committed blocks of one Azure block blob.
pub const AZURE_MAX_PARTS: u32 = 50_000;
/// The most components of one composed GCS object.
pub const GCS_MAX_PARTS: u32 = 1_024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUri {
    File { dir: PathBuf },
    S3(S3Options),
    Azure(AzureOptions),
    Gcs(GcsOptions),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsOptions {
    /// The URI as written, without its query.
    pub uri: String,
    pub bucket: String,
    pub prefix: String,
    /// The JSON API's address when not Google's (an emulator).
    pub endpoint: Option<String>,
    pub min_part: usize,
    /// Parts of one object, at most [`GCS_MAX_PARTS`]; a recording with more
    /// goes on in a continuation object.
    pub max_parts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureOptions {
    /// The URI as written, without its query.
    pub uri: String,
    pub container: String,
    pub prefix: String,
    pub account: String,
    /// The blob service's URL (Azurite, a sovereign cloud); plain HTTP only
    /// if it says `http://`.
    pub endpoint: Option<String>,
    pub min_part: usize,
}

/// `location?query` split, the query's pairs decoded.
fn split_query(uri: &str, rest: &str) -> Result<(String, Vec<(String, String)>), String> {
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).map_err(|e| format!("{uri:?}: {key}: {e}"))?;
        pairs.push((key.to_string(), value));
    }
    Ok((location.to_string(), pairs))
}

/// An object-store URI's parts: `scheme://name[/prefix][?query]`.
struct Located {
    /// The URI as written, without its query or a trailing slash.
    uri: String,
    name: String,
    prefix: String,
    query: Vec<(String, String)>,
}

/// Splits what follows `scheme://`; `what` is the name's kind (bucket,
/// container) and `example` the URI shown when it is missing.
fn locate(
    uri: &str,
    scheme: &str,
    rest: &str,
    what: &str,
    example: &str,
) -> Result<Located, String> {
    let (location, query) = split_query(uri, rest)?;
    let (name, prefix) = location.split_once('/').unwrap_or((&location, ""));
    if name.is_empty() {
        return Err(format!("{uri:?}: no {what}; write {example}"));
    }
    Ok(Located {
        uri: format!("{scheme}://{}", location.trim_end_matches('/')),
        name: name.to_string(),
        prefix: prefix.trim_matches('/').to_string(),
        query,
    })
}

fn endpoint_option(uri: &str, value: String) -> Result<String, String> {
    if value.starts_with("https://") || value.starts_with("http://") {
        Ok(value)
    } else {
        Err(format!(
            "{uri:?}: endpoint {value:?} must start with https:// (or http:// for a store without TLS)"
        ))
    }
}

fn min_part_option(uri: &str, value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= 1024)
        .ok_or_else(|| format!("{uri:?}: min_part is a number of bytes, at least 1024"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    /// The URI as written, without its query.
    pub uri: String,
    pub bucket: String,
    pub prefix: String,
    pub region: Option<String>,
    /// A custom endpoint (an S3-compatible store); plain HTTP only if it says `http://`.
    pub endpoint: Option<String>,
    /// Virtual-hosted-style addressing; path style by default, as S3-compatible stores want.
    pub virtual_hosted: bool,
    /// Server-side encryption with this KMS key, only when asked for.
    pub sse_kms_key_id: Option<String>,
    /// Parts of at least this many bytes (tests lower it on stores that allow it).
    pub min_part: usize,
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl StoreUri {
    pub fn parse(uri: &str) -> Result<Self, String> {
        if let Some(path) = uri.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{uri:?}: a file URI needs an absolute directory: file:///var/lib/turnstile/records"
                ));
            }
            return Ok(StoreUri::File {
                dir: PathBuf::from(path),
            });
        }
        if let Some(rest) = uri.strip_prefix("s3://") {
            let at = locate(uri, "s3", rest, "bucket", "s3://bucket/prefix")?;
            let query = at.query;
            let mut o = S3Options {
                uri: at.uri,
                bucket: at.name,
                prefix: at.prefix,
                region: None,
                endpoint: None,
                virtual_hosted: false,
                sse_kms_key_id: None,
                min_part: S3_MIN_PART,
            };
            let mut sse = None;
            for (key, value) in query {
                match key.as_str() {
                    "region" => o.region = Some(value),
                    "endpoint" => o.endpoint = Some(endpoint_option(uri, value)?),
                    "virtual_hosted" => {
                        o.virtual_hosted = match value.as_str() {
                            "true" => true,
                            "false" => false,
                            _ => {
                                return Err(format!(
                                    "{uri:?}: virtual_hosted is true or false, not {value:?}"
                                ));
                            }
                        }
                    }
                    "sse" => sse = Some(value),
                    "sse_kms_key_id" => o.sse_kms_key_id = Some(value),
                    "min_part" => o.min_part = min_part_option(uri, &value)?,
                    other => {
                        return Err(format!(
                            "{uri:?}: unknown option {other:?}; known: region, endpoint, virtual_hosted, sse, sse_kms_key_id, min_part"
                        ));
                    }
                }
            }
            match (sse.as_deref(), &o.sse_kms_key_id) {
                (None, None) => {}
                (Some("aws:kms"), Some(_)) => {}
                (Some("aws:kms"), None) => {
                    return Err(format!("{uri:?}: sse=aws:kms needs sse_kms_key_id=KEY"));
                }
                (None, Some(_)) => {
                    return Err(format!("{uri:?}: sse_kms_key_id needs sse=aws:kms"));
                }
                (Some(other), _) => {
                    return Err(format!(
                        "{uri:?}: sse={other:?} is not supported; use sse=aws:kms with sse_kms_key_id, or leave it out (the bucket's default encryption applies)"
                    ));
                }
            }
            return Ok(StoreUri::S3(o));
        }
        if let Some(rest) = uri.strip_prefix("azblob://") {
            let at = locate(
                uri,
                "azblob",
                rest,
                "container",
                "azblob://container/prefix?account=NAME",
            )?;
            let query = at.query;
            let mut o = AzureOptions {
                uri: at.uri,
                container: at.name,
                prefix: at.prefix,
                account: String::new(),
                endpoint: None,
                min_part: AZURE_MIN_PART,
            };
            for (key, value) in query {
                match key.as_str() {
                    "account" => o.account = value,
                    "endpoint" => o.endpoint = Some(endpoint_option(uri, value)?),
                    "min_part" => o.min_part = min_part_option(uri, &value)?,
                    other => {
                        return Err(format!(
                            "{uri:?}: unknown option {other:?}; known: account, endpoint, min_part"
                        ));
                    }
                }
            }
            if o.account.is_empty() {
                return Err(format!("{uri:?}: no storage account; add ?account=NAME"));
            }
            return Ok(StoreUri::Azure(o));
        }
        if let Some(rest) = uri.strip_prefix("gs://") {
            let at = locate(uri, "gs", rest, "bucket", "gs://bucket/prefix")?;
            let query = at.query;
            let mut o = GcsOptions {
                uri: at.uri,
                bucket: at.name,
                prefix: at.prefix,
                endpoint: None,
                min_part: GCS_MIN_PART,
                max_parts: GCS_MAX_PARTS,
            };
            for (key, value) in query {
                match key.as_str() {
                    "endpoint" => o.endpoint = Some(endpoint_option(uri, value)?),
                    "min_part" => o.min_part = min_part_option(uri, &value)?,
                    "max_parts" => {
                        o.max_parts = value
                            .parse::<u32>()
                            .ok()
                            .filter(|n| (2..=GCS_MAX_PARTS).contains(n))
                            .ok_or_else(|| {
                                format!(
                                    "{uri:?}: max_parts is a number of parts from 2 to {GCS_MAX_PARTS} (GCS composes at most {GCS_MAX_PARTS} components into one object)"
                                )
                            })?
                    }
                    other => {
                        return Err(format!(
                            "{uri:?}: unknown option {other:?}; known: endpoint, min_part, max_parts"
                        ));
                    }
                }
            }
            return Ok(StoreUri::Gcs(o));
        }
        Err(format!(
            "{uri:?}: not a recording store this build knows; write file:///dir, s3://bucket/prefix, gs://bucket/prefix or azblob://container/prefix?account=NAME"
        ))
    }
}

/// Retries bounded so that a store that is down surfaces within seconds.
fn retries() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(5),
    }
}

fn client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(60))
}

/// Opens the store a URI names (no request is made: see `UploadStore::check`).
pub fn open(uri: &StoreUri, file_min_part: usize) -> Result<Arc<dyn UploadStore>, String> {
    match uri {
        StoreUri::File { dir } => Ok(Arc::new(
            FileStore::new(dir, file_min_part).map_err(|e| e.to_string())?,
        )),
        StoreUri::S3(o) => {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(&o.bucket)
                .with_virtual_hosted_style_request(o.virtual_hosted)
                .with_retry(retries())
                .with_client_options(client_options());
            if let Some(region) = &o.region {
                b = b.with_region(region);
            }
            if let Some(endpoint) = &o.endpoint {
                b = b
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            if let Some(key) = &o.sse_kms_key_id {
                b = b.with_sse_kms_encryption(key);
            }
            let store = b.build().map_err(|e| format!("{}: {e}", o.uri))?;
            Ok(Arc::new(
                ObjectUploadStore::new(&o.uri, Arc::new(store), &o.prefix, o.min_part)
                    .with_max_parts(S3_MAX_PARTS),
            ))
        }
        StoreUri::Azure(o) => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_account(&o.account)
                .with_container_name(&o.container)
                .with_retry(retries())
                .with_client_options(client_options());
            if let Some(endpoint) = &o.endpoint {
                b = b
                    .with_endpoint(endpoint.clone())
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            let store = b.build().map_err(|e| format!("{}: {e}", o.uri))?;
            Ok(Arc::new(
                ObjectUploadStore::new(&o.uri, Arc::new(store), &o.prefix, o.min_part)
                    .with_max_parts(AZURE_MAX_PARTS),
            ))
        }
        StoreUri::Gcs(o) => {
            // object_store's builder finds the credentials: GOOGLE_SERVICE_ACCOUNT
            // (a key file), GOOGLE_SERVICE_ACCOUNT_KEY, GOOGLE_APPLICATION_CREDENTIALS,
            // gcloud's application-default credentials, or the metadata server.
            let credentials = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&o.bucket)
                .with_retry(retries())
                .with_client_options(client_options())
                .build()
                .map_err(|e| format!("{}: {e}", o.uri))?
                .credentials()
                .clone();
            let json = Arc::new(
                GcsJson::new(&o.bucket, o.endpoint.as_deref(), credentials)
                    .map_err(|e| format!("{}: {e}", o.uri))?,
            );
            let prefix = object_store::path::Path::from(o.prefix.as_str());
            let parts = Arc::new(ComposedParts::new(json.clone(), &prefix));
            Ok(Arc::new(
                ObjectUploadStore::with_parts(&o.uri, json, parts, &o.prefix, o.min_part)
                    .with_max_parts(o.max_parts),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_uris_parse_and_bad_ones_say_why() {
        let StoreUri::S3(o) = StoreUri::parse(
            "s3://recs/prod/sessions/?region=eu-west-1&endpoint=http%3A%2F%2F127.0.0.1%3A9000",
        )
        .unwrap() else {
            panic!("s3 expected")
        };
        assert_eq!(o.bucket, "recs");
        assert_eq!(o.prefix, "prod/sessions");
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(!o.virtual_hosted);
        assert_eq!(o.uri, "s3://recs/prod/sessions");
        for (uri, says) in [
            ("s3://", "no bucket"),
            ("s3://b?regoin=x", "unknown option \"regoin\""),
            ("s3://b?endpoint=minio:9000", "must start with https://"),
            ("s3://b?sse=AES256", "not supported"),
            ("s3://b?sse=aws:kms", "needs sse_kms_key_id"),
            ("s3://b?virtual_hosted=yes", "true or false"),
            ("file://relative", "absolute"),
            (
                "ftp://x",
                "write file:///dir, s3://bucket/prefix, gs://bucket/prefix or azblob://",
            ),
            ("azblob://c/p", "no storage account"),
            ("gs://", "no bucket"),
            ("gs://b/p?region=x", "unknown option \"region\""),
            ("gs://b?endpoint=localhost:1", "must start with https://"),
            ("gs://b?max_parts=1025", "from 2 to 1024"),
            ("gs://b?max_parts=1", "from 2 to 1024"),
            ("azblob://?account=a", "no container"),
            ("azblob://c?account=a&region=x", "unknown option \"region\""),
        ] {
            let err = StoreUri::parse(uri).unwrap_err();
            assert!(err.contains(says), "{uri}: {err}");
        }
        assert_eq!(
            StoreUri::parse("file:///var/rec").unwrap(),
            StoreUri::File {
                dir: "/var/rec".into()
            }
        );
    }
}

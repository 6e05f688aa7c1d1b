//! Recordings in Google Cloud Storage. GCS has no multipart upload that can
//! be resumed from saved part ids (object_store's uses the XML API's, which
//! keeps no state we can hand to another auth server), so a recording is
//! written as Teleport's GCS backend writes it: each part is an object of its
//! own under `<prefix>/parts/<upload>/`, and completion joins them with
//! compose, at most 32 sources a call, in rounds, then deletes them.
//!
//! Requests go to the JSON API (the emulator used in tests serves nothing
//! else for listing, metadata and deletion; compose exists only there), with
//! object_store's credentials: service-account files and keys,
//! application-default credentials, or the instance's metadata server.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use object_store::MultipartId;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{PutPayload, PutResult};
use serde::Deserialize;

use super::object::Blobs;

/// GCS accepts at most this many sources in one compose request.
pub const COMPOSE_MAX_SOURCES: usize = 32;
const STORE: &str = "GCS";
const ATTEMPTS: u32 = 3;

/// One bucket through the JSON API.
pub struct GcsJson {
    http: reqwest::Client,
    /// `https://storage.googleapis.com` or an emulator's address.
    base: reqwest::Url,
    bucket: String,
    credentials: object_store::gcp::GcpCredentialProvider,
}

impl std::fmt::Debug for GcsJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsJson")
            .field("base", &self.base.as_str())
            .field("bucket", &self.bucket)
            .finish()
    }
}

fn generic(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: e.into(),
    }
}

#[derive(Deserialize)]
struct ObjectResource {
    name: String,
    /// A decimal string in the JSON API (a number from some emulators).
    size: serde_json::Value,
}

#[derive(Deserialize)]
struct ObjectList {
    #[serde(default)]
    items: Vec<ObjectResource>,
    #[serde(rename = "nextPageToken")]
    next_page_token: Option<String>,
}

impl ObjectResource {
    fn size(&self) -> object_store::Result<u64> {
        match &self.size {
            serde_json::Value::String(s) => s.parse().ok(),
            serde_json::Value::Number(n) => n.as_u64(),
            _ => None,
        }
        .ok_or_else(|| generic(format!("{}: size {} is not a number", self.name, self.size)))
    }
}

impl GcsJson {
    /// `endpoint`: the service's address when not Google's own (an
    /// emulator); plain HTTP only if it says `http://`.
    pub fn new(
        bucket: &str,
        endpoint: Option<&str>,
        credentials: object_store::gcp::GcpCredentialProvider,
    ) -> Result<Self, String> {
        let base = endpoint.unwrap_or("https://storage.googleapis.com");
        let base = reqwest::Url::parse(base).map_err(|e| format!("endpoint {base:?}: {e}"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .https_only(base.scheme() == "https")
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            base,
            bucket: bucket.to_string(),
            credentials,
        })
    }

    /// `<base>/<api>/b/<bucket>/o[/<object>][/<verb>]`, each name one
    /// percent-encoded path segment.
    fn url(&self, api: &str, object: Option<&Path>, verb: Option<&str>) -> reqwest::Url {
        let mut url = self.base.clone();
        {
            let mut segments = url.path_segments_mut().expect("an http(s) URL has a path");
            segments.pop_if_empty();
            segments.extend(api.split('/'));
            segments.extend(["b", self.bucket.as_str(), "o"]);
            if let Some(object) = object {
                segments.push(object.as_ref());
            }
            if let Some(verb) = verb {
                segments.push(verb);
            }
        }
        url
    }

    /// Sends a request with a bearer token, retrying connection failures,
    /// 429 and 5xx a bounded number of times (the whole within seconds).
    /// `NotFound` for a 404; any other failure names the status and GCS's
    /// message.
    async fn send(
        &self,
        what: &Path,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> object_store::Result<reqwest::Response> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let token = self.credentials.get_credential().await?;
            let mut request = make();
            if !token.bearer.is_empty() {
                request = request.bearer_auth(&token.bearer);
            }
            let retry = match request.send().await {
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                    let message = answer(r).await;
                    return Err(object_store::Error::NotFound {
                        path: what.to_string(),
                        source: message.into(),
                    });
                }
                Ok(r) => {
                    let again = r.status().is_server_error()
                        || r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    let message = answer(r).await;
                    if !again || attempt >= ATTEMPTS {
                        return Err(generic(message));
                    }
                    message
                }
                Err(e) => {
                    let message = format!("{}: {e}", self.base);
                    if attempt >= ATTEMPTS || !(e.is_connect() || e.is_timeout()) {
                        return Err(generic(message));
                    }
                    message
                }
            };
            tracing::debug!(%what, attempt, error = %retry, "GCS request failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff *= 4;
            attempt += 1;
        }
    }

    async fn metadata(&self, path: &Path) -> object_store::Result<ObjectResource> {
        let url = self.url("storage/v1", Some(path), None);
        let r = self.send(path, || self.http.get(url.clone())).await?;
        r.json().await.map_err(generic)
    }

    /// Joins `sources` (at most 32, in order) into `destination`.
    async fn compose(&self, destination: &Path, sources: &[String]) -> object_store::Result<()> {
        if sources.len() > COMPOSE_MAX_SOURCES {
            return Err(generic(format!(
                "{} sources in one compose: GCS takes at most {COMPOSE_MAX_SOURCES}",
                sources.len()
            )));
        }
        let body = serde_json::json!({
            "sourceObjects": sources.iter().map(|name| serde_json::json!({"name": name})).collect::<Vec<_>>(),
            "destination": {"contentType": "application/octet-stream"},
        });
        let url = self.url("storage/v1", Some(destination), Some("compose"));
        self.send(destination, || self.http.post(url.clone()).json(&body))
            .await
            .map(drop)
    }
}

/// The status and GCS's own message (`error.message` in its JSON), or the
/// body as it came.
async fn answer(r: reqwest::Response) -> String {
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    let message: String = message.trim().chars().take(500).collect();
    if message.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {message}")
    }
}

#[async_trait]
impl Blobs for GcsJson {
    async fn put(&self, path: &Path, data: Vec<u8>) -> object_store::Result<()> {
        let mut url = self.url("upload/storage/v1", None, None);
        url.query_pairs_mut()
            .append_pair("uploadType", "media")
            .append_pair("name", path.as_ref());
        let data = bytes::Bytes::from(data);
        self.send(path, || {
            self.http
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(data.clone())
        })
        .await
        .map(drop)
    }

    async fn size(&self, path: &Path) -> object_store::Result<u64> {
        self.metadata(path).await?.size()
    }

    async fn read(&self, path: &Path, range: Range<u64>) -> object_store::Result<Vec<u8>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let mut url = self.url("storage/v1", Some(path), None);
        url.query_pairs_mut().append_pair("alt", "media");
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let r = self
            .send(path, || {
                self.http
                    .get(url.clone())
                    .header(reqwest::header::RANGE, &header)
            })
            .await?;
        let body = r.bytes().await.map_err(generic)?;
        if body.len() as u64 != range.end - range.start {
            return Err(generic(format!(
                "{path}: asked for {} bytes at {}, got {}",
                range.end - range.start,
                range.start,
                body.len()
            )));
        }
        Ok(body.to_vec())
    }

    async fn delete(&self, path: &Path) -> object_store::Result<()> {
        let url = self.url("storage/v1", Some(path), None);
        self.send(path, || self.http.delete(url.clone()))
            .await
            .map(drop)
    }

    async fn list(&self, prefix: &Path) -> object_store::Result<Vec<(Path, u64)>> {
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut url = self.url("storage/v1", None, None);
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("prefix", &format!("{prefix}/"));
                if let Some(token) = &page {
                    q.append_pair("pageToken", token);
                }
            }
            let r = self.send(prefix, || self.http.get(url.clone())).await?;
            let list: ObjectList = r.json().await.map_err(generic)?;
            for item in &list.items {
                out.push((Path::from(item.name.as_str()), item.size()?));
            }
            match list.next_page_token {
                Some(token) if !token.is_empty() => page = Some(token),
                _ => return Ok(out),
            }
        }
    }
}

/// Multipart uploads made of part objects joined by compose.
#[derive(Debug)]
pub struct ComposedParts {
    json: Arc<GcsJson>,
    /// `<prefix>/parts`: an upload's parts are `<upload>/<index>` under it.
    parts: Path,
}

impl ComposedParts {
    pub fn new(json: Arc<GcsJson>, prefix: &Path) -> Self {
        Self {
            json,
            parts: prefix.clone().join("parts"),
        }
    }

    fn dir(&self, id: &MultipartId) -> object_store::Result<Path> {
        super::check_id("upload id", id).map_err(generic)?;
        Ok(self.parts.clone().join(id.as_str()))
    }

    async fn delete_all(&self, dir: &Path) -> object_store::Result<()> {
        let listed = self.json.list(dir).await?;
        futures::stream::iter(listed)
            .map(|(path, _)| async move {
                match self.json.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(8)
            .try_collect::<()>()
            .await
    }
}

#[async_trait]
impl MultipartStore for ComposedParts {
    async fn create_multipart(&self, _path: &Path) -> object_store::Result<MultipartId> {
        // Nothing to ask GCS: the id names the folder of the part objects.
        Ok(uuid::Uuid::new_v4().to_string())
    }

    async fn put_part(
        &self,
        _path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let part = self.dir(id)?.join(format!("{part_idx:05}"));
        let bytes: Vec<u8> = data.iter().flat_map(|b| b.iter().copied()).collect();
        self.json.put(&part, bytes).await?;
        Ok(PartId {
            content_id: part.to_string(),
        })
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let dir = self.dir(id)?;
        let mut sources: Vec<String> = parts.into_iter().map(|p| p.content_id).collect();
        if let Some(foreign) = sources.iter().find(|s| !s.starts_with(&format!("{dir}/"))) {
            return Err(generic(format!(
                "part {foreign:?} is not one of upload {id}'s"
            )));
        }
        // Rounds of at most 32 sources each until one call can make the object.
        let mut round = 0;
        while sources.len() > COMPOSE_MAX_SOURCES {
            round += 1;
            let mut next = Vec::new();
            for (i, group) in sources.chunks(COMPOSE_MAX_SOURCES).enumerate() {
                let joined = dir.clone().join(format!("round{round}-{i:05}"));
                self.json.compose(&joined, group).await?;
                next.push(joined.to_string());
            }
            sources = next;
        }
        if sources.is_empty() {
            self.json.put(path, Vec::new()).await?;
        } else {
            self.json.compose(path, &sources).await?;
        }
        if let Err(e) = self.delete_all(&dir).await {
            tracing::warn!(upload = %id, error = %e, "cannot delete the part objects of a completed upload");
        }
        Ok(PutResult {
            e_tag: None,
            version: None,
            extensions: Default::default(),
        })
    }

    async fn abort_multipart(&self, _path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.delete_all(&self.dir(id)?).await
    }
}

//! Who is asking: the session cookie (looked up with auth on every request,
//! so a session ended anywhere is ended here), and the checks on requests
//! that change something: the `Origin` must be this console's and the CSRF
//! token the session's.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use turnstile_api::rpc::proto;

use crate::Shared;

pub(crate) const COOKIE: &str = "turnstile_session";
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";

/// A refusal: its status and what the page shows.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// An answer of auth's about who the user is (a sign-in, a session):
    /// a refusal is 401, and the page asks to sign in.
    pub fn from_sign_in(s: &tonic::Status) -> Self {
        match s.code() {
            tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::NotFound => Self::new(StatusCode::UNAUTHORIZED, s.message()),
            _ => Self::from_status(s),
        }
    }

    /// An answer of auth's to a signed-in user's request, as the page should
    /// see it (a refusal is 403: the user stays signed in).
    pub fn from_status(s: &tonic::Status) -> Self {
        let status = match s.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
            tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                return Self::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the proxy cannot reach auth: {}", s.message()),
                );
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, s.message())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// The session token in the request's cookies.
pub(crate) fn token_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// The signed-in user's session, as auth says it is now.
pub(crate) async fn signed_in(
    shared: &Shared,
    headers: &HeaderMap,
) -> Result<(String, proto::WebSession), Refusal> {
    let token =
        token_of(headers).ok_or_else(|| Refusal::new(StatusCode::UNAUTHORIZED, "not signed in"))?;
    let session = shared
        .view
        .client()
        .get_web_session(proto::WebSessionRequest {
            token: token.clone(),
        })
        .await
        .map_err(|s| Refusal::from_sign_in(&s))?
        .into_inner();
    Ok((token, session))
}

/// Refuses a request that does not come from a page of this console: its
/// `Origin` must name the host the request was sent to, over HTTPS.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if host.is_empty() || origin != format!("https://{host}") {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!(
                "refused: the request comes from {}, not from this console",
                if origin.is_empty() {
                    "no origin"
                } else {
                    origin
                }
            ),
        ));
    }
    Ok(())
}

/// Refuses a state-changing request without the session's CSRF token.
pub(crate) fn csrf(headers: &HeaderMap, session: &proto::WebSession) -> Result<(), Refusal> {
    let sent = headers
        .get(CSRF_HEADER)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    csrf_value(sent, session)
}

/// Refuses `sent` unless it is the session's CSRF token.
pub(crate) fn csrf_value(sent: &str, session: &proto::WebSession) -> Result<(), Refusal> {
    let expected = session.csrf_token.as_bytes();
    let matches = sent.len() == expected.len()
        && sent
            .as_bytes()
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !matches || expected.is_empty() {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "refused: the request lacks this session's CSRF token (X-CSRF-Token); reload the page",
        ));
    }
    Ok(())
}

/// The cookie that carries `token` until `max_age` seconds from now.
pub(crate) fn cookie(token: &str, max_age: i64) -> String {
    format!("{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}")
}

/// The cookie that ends it in the browser.
pub(crate) fn cleared_cookie() -> String {
    cookie("", 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; turnstile_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(token_of(&h).as_deref(), Some("abc"));
        h.insert(header::COOKIE, "a=1".parse().unwrap());
        assert_eq!(token_of(&h), None);
    }

    #[test]
    fn only_this_consoles_origin_passes() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:3080".parse().unwrap());
        assert!(same_origin(&h).is_err(), "no origin");
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(same_origin(&h).is_err());
        h.insert(header::ORIGIN, "http://127.0.0.1:3080".parse().unwrap());
        assert!(same_origin(&h).is_err(), "not HTTPS");
        h.insert(header::ORIGIN, "https://127.0.0.1:3080".parse().unwrap());
        assert!(same_origin(&h).is_ok());
    }

    #[test]
    fn the_cookie_is_http_only_secure_and_strict() {
        let c = cookie("t", 60);
        for part in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Max-Age=60",
            "Path=/",
        ] {
            assert!(c.contains(part), "{c}");
        }
    }
}

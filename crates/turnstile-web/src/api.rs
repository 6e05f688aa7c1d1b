//! The console's routes: the page and its assets, and the JSON API.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use turnstile_api::rpc::proto;

use crate::Shared;
use crate::assets;
use crate::session::{self, Refusal};

/// What every response carries: no inline script, nothing from elsewhere,
/// never framed. (Inline styles are allowed: xterm.js writes its own at run
/// time; scripts never are.)
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; \
frame-ancestors 'none'";

#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    peer: SocketAddr,
}

pub(crate) fn router(shared: Arc<Shared>, peer: SocketAddr) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/nodes", get(nodes))
        .route("/api/terminal", get(terminal))
        .route("/api/recordings", get(recordings))
        .route("/api/audit", get(audit))
        .route("/api/audit/export", get(audit_export))
        .route("/api/recordings/{sid}/asciicast", get(recording))
        .fallback(not_found)
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(Ctx { shared, peer })
}

async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn index() -> Response {
    assets::serve("index.html")
}

async fn asset(Path(name): Path<String>) -> Response {
    assets::serve(&name)
}

async fn not_found() -> Response {
    Refusal::new(StatusCode::NOT_FOUND, "no such page").into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

/// Who the user is, and what the page offers them (auth decides again on
/// every request).
async fn me_json(shared: &Shared, session: &proto::WebSession) -> serde_json::Value {
    let may_read_audit = shared
        .view
        .role_set(&session.roles)
        .await
        .is_ok_and(|r| r.may_read_audit());
    json!({
        "user": session.user,
        "roles": session.roles,
        "logins": session.logins,
        "csrf_token": session.csrf_token,
        "expires_unix": session.expires_unix,
        "idle_timeout_seconds": session.idle_timeout_seconds,
        "may_read_audit": may_read_audit,
    })
}

async fn login(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Json(form): Json<LoginForm>,
) -> Result<Response, Refusal> {
    session::same_origin(&headers)?;
    if form.user.is_empty() || form.user.len() > 256 || form.password.len() > 1024 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "give a user name and a password",
        ));
    }
    let session = ctx
        .shared
        .view
        .client()
        .create_web_session(turnstile_api::auth_channel::with_affinity(
            proto::CreateWebSessionRequest {
                user: form.user.clone(),
                password: form.password,
                client_addr: ctx.peer.to_string(),
                idle_timeout_seconds: ctx.shared.idle_timeout.as_secs(),
            },
            &form.user,
        ))
        .await
        .map_err(|s| Refusal::from_sign_in(&s))?
        .into_inner();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut response = Json(me_json(&ctx.shared, &session).await).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::cookie(
            &session.token,
            (session.expires_unix - now).max(1),
        ))
        .map_err(|_| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "bad session token"))?,
    );
    Ok(response)
}

async fn logout(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, Refusal> {
    session::same_origin(&headers)?;
    let (token, session) = session::signed_in(&ctx.shared, &headers).await?;
    session::csrf(&headers, &session)?;
    ctx.shared
        .view
        .client()
        .delete_web_session(proto::WebSessionRequest { token })
        .await
        .map_err(|s| Refusal::from_status(&s))?;
    let mut response = Json(json!({ "signed_out": session.user })).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::cleared_cookie()).expect("a plain cookie"),
    );
    Ok(response)
}

async fn me(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, Refusal> {
    let (_, session) = session::signed_in(&ctx.shared, &headers).await?;
    Ok(Json(me_json(&ctx.shared, &session).await).into_response())
}

async fn nodes(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, Refusal> {
    let (_, session) = session::signed_in(&ctx.shared, &headers).await?;
    let nodes = ctx
        .shared
        .view
        .visible_nodes(&session.roles)
        .await
        .map_err(|e| Refusal::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let nodes: Vec<_> = nodes
        .into_iter()
        .map(|n| json!({ "name": n.name, "addr": n.addr, "labels": n.labels, "id": n.id }))
        .collect();
    Ok(Json(json!({ "nodes": nodes })).into_response())
}

/// Opens a terminal: a WebSocket upgrade from this console's page (its
/// `Origin`) by a signed-in user, carrying the session's CSRF token.
async fn terminal(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(q): Query<crate::terminal::TerminalQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, Refusal> {
    session::same_origin(&headers)?;
    let (token, session) = session::signed_in(&ctx.shared, &headers).await?;
    session::csrf_value(&q.csrf, &session)?;
    let shared = ctx.shared.clone();
    let peer = ctx.peer;
    Ok(upgrade.max_message_size(1 << 20).on_upgrade(move |socket| {
        crate::terminal::run(shared, peer, token, session.user, q, socket)
    }))
}

async fn recordings(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(q): Query<crate::recordings::ListQuery>,
) -> Result<Response, Refusal> {
    let (token, _) = session::signed_in(&ctx.shared, &headers).await?;
    Ok(Json(crate::recordings::list(&ctx.shared, &token, q).await?).into_response())
}

#[derive(Deserialize)]
struct RecordingQuery {
    /// `1` (or `true`): as a file to save.
    #[serde(default)]
    download: String,
}

/// A recording as asciicast v2: for the player, or as a file.
async fn recording(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(sid): Path<String>,
    Query(q): Query<RecordingQuery>,
) -> Result<Response, Refusal> {
    let (token, _) = session::signed_in(&ctx.shared, &headers).await?;
    let cast = crate::recordings::asciicast(&ctx.shared, &token, &sid).await?;
    let mut response = cast.into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-asciicast"),
    );
    if matches!(q.download.as_str(), "1" | "true")
        && let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{sid}.cast\""))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

async fn audit(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(q): Query<crate::audit::AuditQuery>,
) -> Result<Response, Refusal> {
    let (token, _) = session::signed_in(&ctx.shared, &headers).await?;
    Ok(Json(crate::audit::page(&ctx.shared, &token, q).await?).into_response())
}

/// The whole search as JSON Lines, as a file.
async fn audit_export(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(q): Query<crate::audit::AuditQuery>,
) -> Result<Response, Refusal> {
    let (token, _) = session::signed_in(&ctx.shared, &headers).await?;
    let lines = crate::audit::export(&ctx.shared, &token, q).await?;
    let mut response = lines.into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"turnstile-audit.jsonl\""),
    );
    Ok(response)
}

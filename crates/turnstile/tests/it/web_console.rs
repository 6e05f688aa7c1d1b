//! The web console, as a browser and an attacker's page meet it: HTTPS with
//! the proxy's self-signed certificate, sign-in with a password, a session
//! cookie kept in the backend, CSRF and Origin checks, and the pages driven
//! in a real Chromium.

use std::path::PathBuf;

use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};
use serde_json::Value;

use crate::support::{ClusterSpec, TEST_LOGIN, TestCluster, text};

const PASSWORD: &str = "correct horse battery";

async fn console() -> TestCluster {
    let c = TestCluster::start_with(ClusterSpec {
        proxy_extra: "  web_listen_addr: 127.0.0.1:0\n  web_idle_timeout: 10m\n".into(),
        ..Default::default()
    })
    .await;
    // Not root: root's shell start-up on this kind of machine runs
    // `pyenv rehash`, and a session cut in the middle of it leaves a lock
    // that hangs every later root login.
    c.add_user("alice", "access", TEST_LOGIN).await;
    c.set_password("alice", PASSWORD).await;
    c
}

/// An HTTPS client that trusts the console's self-signed certificate and
/// nothing else, calling from `from`.
fn client_from(c: &TestCluster, from: std::net::IpAddr) -> reqwest::Client {
    let pem = std::fs::read(c.data_dir().join("web/web_cert.pem")).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .local_address(from)
        .build()
        .unwrap()
}

fn client(c: &TestCluster) -> reqwest::Client {
    client_from(c, std::net::IpAddr::from([127, 0, 0, 1]))
}

/// Signs alice in: her session cookie and the session's CSRF token.
async fn signed_in(c: &TestCluster, http: &reqwest::Client) -> (String, String) {
    let ok = login(c, http, PASSWORD).await;
    let cookie = session_cookie(&ok);
    let csrf = ok.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    (cookie, csrf)
}

/// A WebSocket upgrade of `/api/terminal` for alice on the node, from a
/// page of `origin`, carrying `csrf`.
fn terminal_upgrade(
    c: &TestCluster,
    http: &reqwest::Client,
    cookie: &str,
    origin: &str,
    csrf: &str,
) -> reqwest::RequestBuilder {
    http.get(format!(
        "{}/api/terminal?node={}&login={TEST_LOGIN}&csrf={csrf}",
        base(c),
        c.node_name
    ))
    .header(COOKIE, cookie)
    .header(ORIGIN, origin)
    .header("connection", "Upgrade")
    .header("upgrade", "websocket")
    .header("sec-websocket-version", "13")
    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
}

fn base(c: &TestCluster) -> String {
    format!(
        "https://{}",
        c.web_addr.as_deref().expect("the web console")
    )
}

async fn login(c: &TestCluster, http: &reqwest::Client, password: &str) -> reqwest::Response {
    http.post(format!("{}/api/login", base(c)))
        .header(ORIGIN, base(c))
        .json(&serde_json::json!({ "user": "alice", "password": password }))
        .send()
        .await
        .unwrap()
}

/// The session cookie a response sets, as a `Cookie` header value.
fn session_cookie(r: &reqwest::Response) -> String {
    let set = r
        .headers()
        .get(SET_COOKIE)
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_string();
    for part in ["HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(set.contains(part), "{set}");
    }
    set.split(';').next().unwrap().to_string()
}

async fn me(c: &TestCluster, http: &reqwest::Client, cookie: &str) -> (u16, Value) {
    let r = http
        .get(format!("{}/api/me", base(c)))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_csrf_origin_and_the_end_of_sessions_over_https() {
    let c = console().await;
    let http = client(&c);

    // The page: strict CSP, no inline script.
    let page = http.get(base(&c)).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let scripts = csp
        .split(';')
        .find(|d| d.trim().starts_with("script-src"))
        .unwrap_or_default();
    assert_eq!(scripts.trim(), "script-src 'self'", "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!page.text().await.unwrap().contains("<script>"));

    // A wrong password is refused like `turnstile login` refuses it.
    let wrong = login(&c, &http, "wrong password").await;
    assert_eq!(wrong.status().as_u16(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "wrong user name or password");
    // A sign-in posted from another site's page is refused.
    let forged = http
        .post(format!("{}/api/login", base(&c)))
        .header(ORIGIN, "https://evil.example")
        .json(&serde_json::json!({ "user": "alice", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 403);

    let ok = login(&c, &http, PASSWORD).await;
    assert_eq!(ok.status().as_u16(), 200);
    let cookie = session_cookie(&ok);
    let body: Value = ok.json().await.unwrap();
    let csrf = body["csrf_token"].as_str().unwrap().to_string();
    assert_eq!(body["user"], "alice");
    let (status, who) = me(&c, &http, &cookie).await;
    assert_eq!((status, who["user"].as_str()), (200, Some("alice")));
    let nodes: Value = http
        .get(format!("{}/api/nodes", base(&c)))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(nodes["nodes"][0]["name"], "web1", "{nodes}");

    // Signing out without the CSRF token is refused, and changes nothing.
    let logout = |csrf: Option<&str>| {
        let mut r = http
            .post(format!("{}/api/logout", base(&c)))
            .header(ORIGIN, base(&c))
            .header(COOKIE, &cookie);
        if let Some(t) = csrf {
            r = r.header("x-csrf-token", t);
        }
        r.send()
    };
    let refused = logout(None).await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("CSRF"), "{body}");
    assert_eq!(me(&c, &http, &cookie).await.0, 200);
    let refused = logout(Some("not-the-token")).await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let done = logout(Some(&csrf)).await.unwrap();
    assert_eq!(done.status().as_u16(), 200);
    let (status, body) = me(&c, &http, &cookie).await;
    assert_eq!(status, 401, "{body}");

    // Removing the user ends a signed-in session.
    let cookie = session_cookie(&login(&c, &http, PASSWORD).await);
    assert_eq!(me(&c, &http, &cookie).await.0, 200);
    c.admin_ok(&["users", "rm", "alice"]).await;
    let (status, body) = me(&c, &http, &cookie).await;
    assert_eq!(status, 401, "{body}");

    // Every sign-in attempt is audited.
    let events = crate::support::audit_events(&c.data_dir(), Some("user.login")).await;
    let web: Vec<_> = events.iter().filter(|e| e["method"] == "web").collect();
    assert_eq!(web.len(), 3, "{web:?}");
    assert_eq!(web[0]["success"], false);
}

/// `node SCRIPT` with playwright-core from the test tools, pointed at the
/// installed Chromium, given the console of `c` (its address, alice's
/// password, the node, the binary and data dir for `admin`, where
/// screenshots go) and `extra`; returns its output, failing the test if it
/// failed.
pub(crate) async fn browser(c: &TestCluster, script: &str, extra: &[(&str, String)]) -> String {
    let tools = std::env::var("TURNSTILE_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/turnstile-test-tools")
        });
    let modules = tools.join("node/node_modules");
    assert!(
        modules.join("playwright-core").exists()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "playwright-core or chromium is missing; run scripts/test.sh, which installs them"
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/web")
        .join(script);
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(&path)
        .env("NODE_PATH", &modules)
        .env("CONSOLE_URL", base(c))
        .env("CONSOLE_USER", "alice")
        .env("CONSOLE_PASSWORD", PASSWORD)
        .env("CONSOLE_NODE", &c.node_name)
        .env("SCREENSHOTS", screenshots())
        .env("TURNSTILE_BIN", crate::support::BIN)
        .env("TURNSTILE_DATA", c.data_dir());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output())
        .await
        .expect("the browser script finished within two minutes")
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn screenshots() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/web-console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_signs_in_finds_a_node_and_signs_out_in_a_real_browser() {
    let c = console().await;
    let out = browser(&c, "sign_in.cjs", &[]).await;
    assert!(out.contains("signed out"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_in_the_page_runs_a_real_session_on_the_node() {
    let c = console().await;
    let out = browser(&c, "terminal.cjs", &[]).await;
    assert!(out.contains("terminal works"), "{out}");
    // The session was a real one: the node audited it for alice.
    let starts = crate::support::audit_events(&c.data_dir(), Some("session.start")).await;
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(starts.iter().all(|e| e["user"] == "alice"), "{starts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_terminal_over_max_connections_is_refused_with_the_limit_message() {
    let c = console().await;
    c.create_role(
        "one-connection",
        &crate::session_control::limited_role("one-connection", 1, 10),
    )
    .await;
    c.admin_ok(&["users", "update", "alice", "--roles", "one-connection"])
        .await;
    let out = browser(&c, "terminal.cjs", &[("TERMINAL_TEST", "limit".into())]).await;
    assert!(
        out.contains("too many concurrent ssh connections for user \"alice\" (max=1)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_is_found_played_and_seeked_in_the_page() {
    let c = console().await;
    let id = c.sign("alice").await;
    let out = c
        .ssh(
            &id,
            &[
                "-t",
                &c.node_name,
                "for i in $(seq 1 20); do echo mark-$i; sleep 1; done",
            ],
        )
        .await;
    assert!(
        text(&out.stdout).contains("mark-20"),
        "{}",
        text(&out.stderr)
    );
    // The recording, once uploaded, as the console lists it.
    let http = client(&c);
    let cookie = session_cookie(&login(&c, &http, PASSWORD).await);
    let found = std::sync::Mutex::new(String::new());
    crate::support::poll_until(std::time::Duration::from_secs(20), || {
        let http = &http;
        let cookie = &cookie;
        let c = &c;
        let found = &found;
        async move {
            let list: Value = http
                .get(format!("{}/api/recordings", base(c)))
                .header(COOKIE, cookie)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match list["recordings"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["status"] == "complete"))
            {
                Some(r) => {
                    *found.lock().unwrap() = r["sid"].as_str().unwrap().to_string();
                    true
                }
                None => false,
            }
        }
    })
    .await
    .expect("a complete recording");
    let sid = found.into_inner().unwrap();
    let out = browser(&c, "player.cjs", &[("RECORDING_SID", sid)]).await;
    assert!(out.contains("player works"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_read_by_those_its_rule_allows_with_filters_paging_and_export() {
    let c = console().await;
    let id = c.sign("alice").await;
    let out = c.ssh(&id, &[&c.node_name, "true"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let http = client(&c);
    assert_eq!(login(&c, &http, "wrong password").await.status(), 401);
    let cookie = session_cookie(&login(&c, &http, PASSWORD).await);
    let root = base(&c);
    let get = |path: String| {
        let http = &http;
        let cookie = &cookie;
        let root = &root;
        async move {
            let r = http
                .get(format!("{root}{path}"))
                .header(COOKIE, cookie)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    // Without a role rule allowing `event` `list`: refused, and told why.
    let (_, me) = get("/api/me".into()).await;
    assert!(me.contains("\"may_read_audit\":false"), "{me}");
    let (status, body) = get("/api/audit".into()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("role rule allowing event list"), "{body}");

    c.create_role(
        "auditor",
        "kind: role\nversion: v3\nmetadata:\n  name: auditor\nspec:\n  allow:\n    rules:\n    - resources: [event]\n      verbs: [list]\n",
    )
    .await;
    c.admin_ok(&["users", "update", "alice", "--roles", "access,auditor"])
        .await;
    let (_, me) = get("/api/me".into()).await;
    assert!(me.contains("\"may_read_audit\":true"), "{me}");

    // Paging one event at a time walks every login, oldest first.
    let mut after = String::new();
    let mut seen = Vec::new();
    loop {
        let (status, body) =
            get(format!("/api/audit?event=user.login&limit=1&after={after}")).await;
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 1);
        seen.extend(events.iter().cloned());
        after = page["next"].as_str().unwrap_or_default().to_string();
        if after.is_empty() {
            break;
        }
    }
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.iter().all(|e| e["event"] == "user.login"));
    // The export holds the same, as JSON Lines.
    let (status, lines) = get("/api/audit/export?event=user.login".into()).await;
    assert_eq!(status, 200);
    let exported: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported, seen);
    // The node filter keeps what the node wrote.
    let (_, body) = get(format!("/api/audit?node={}", c.node_name)).await;
    let page: Value = serde_json::from_str(&body).unwrap();
    let events = page["events"].as_array().unwrap();
    let node_id = turnstile_ssh::identity::load_or_create_host_id(&c.data_dir()).unwrap();
    assert!(
        events.iter().any(|e| e["event"] == "session.start"),
        "{events:?}"
    );
    assert!(events.iter().all(|e| e["server_id"] == node_id.as_str()));

    let out = browser(&c, "audit.cjs", &[]).await;
    assert!(out.contains("audit works"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_upgrade_from_another_origin_or_without_the_token_is_refused() {
    let c = console().await;
    let http = client(&c);
    let (cookie, csrf) = signed_in(&c, &http).await;
    let upgrade =
        |origin: &str, csrf: &str| terminal_upgrade(&c, &http, &cookie, origin, csrf).send();
    let r = upgrade("https://evil.example", &csrf).await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = upgrade(&base(&c), "wrong").await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = upgrade(&base(&c), &csrf).await.unwrap();
    assert_eq!(r.status().as_u16(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_ends_a_signed_in_web_session() {
    let c = console().await;
    let http = client(&c);
    let cookie = session_cookie(&login(&c, &http, PASSWORD).await);
    assert_eq!(me(&c, &http, &cookie).await.0, 200);
    c.admin_ok(&["locks", "add", "--user", "alice", "--message", "incident 7"])
        .await;
    let (status, body) = me(&c, &http, &cookie).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("incident 7"),
        "{body}"
    );
    // Removing the lock does not bring the session back.
    let locks = c.admin_ok(&["locks", "ls", "--format", "json"]).await;
    let lock: Value = serde_json::from_str(locks.lines().next().unwrap()).unwrap();
    c.admin_ok(&["locks", "rm", lock["id"].as_str().unwrap()])
        .await;
    assert_eq!(me(&c, &http, &cookie).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_terminal_is_known_by_the_browsers_address() {
    let c = console().await;
    // The "browser" calls from 127.0.0.2; the proxy reaches its own door
    // from 127.0.0.1.
    let http = client_from(&c, std::net::IpAddr::from([127, 0, 0, 2]));
    let (cookie, csrf) = signed_in(&c, &http).await;
    let r = terminal_upgrade(&c, &http, &cookie, &base(&c), &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 101);
    let _socket = r.upgrade().await.unwrap();
    // `admin sessions ls` shows the live connection under the browser's
    // address, as the node heard it from the proxy.
    let seen = std::sync::Mutex::new(String::new());
    let listed = crate::support::poll_until(std::time::Duration::from_secs(15), || {
        let c = &c;
        let seen = &seen;
        async move {
            let out = c.admin_ok(&["sessions", "ls", "--format", "json"]).await;
            *seen.lock().unwrap() = out.clone();
            out.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|t| {
                    t["addr.remote"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("127.0.0.2:"))
                })
        }
    })
    .await;
    assert!(listed.is_ok(), "{}", seen.lock().unwrap());
}

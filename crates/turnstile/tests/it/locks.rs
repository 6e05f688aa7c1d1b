//! Access that can be taken away, tried with the real OpenSSH client: locks,
//! removed users and narrowed roles end live sessions (through the proxy and
//! straight at the node) within the bound and refuse new ones; sessions end
//! by themselves after `client_idle_timeout` and at certificate expiry.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::support::{ClusterSpec, TestCluster, audit_events, openssh, run, text};

/// Locks and user changes reach nodes and proxies within this (the issue's
/// 10 s; the test clusters refresh their view every second).
const BOUND: Duration = Duration::from_secs(10);

fn fast_view() -> ClusterSpec {
    ClusterSpec {
        global_extra: "  view_refresh_interval: 1s\n".into(),
        ..ClusterSpec::default()
    }
}

/// How a test reaches the node.
#[derive(Clone, Copy, Debug)]
enum Path2 {
    Proxy,
    Direct,
}

fn ssh_args(c: &TestCluster, id: &Path, login: &str, how: Path2, command: &str) -> Vec<String> {
    let config = format!("{}.ssh_config", id.display());
    let mut args: Vec<String> = [
        "-F",
        &config,
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match how {
        Path2::Proxy => args.push(format!("{login}@{}", c.node_name)),
        Path2::Direct => {
            let (host, port) = c.node_addr.rsplit_once(':').unwrap();
            args.extend(["-p".into(), port.into(), format!("{login}@{host}")]);
        }
    }
    args.push(command.into());
    args
}

/// An OpenSSH session that has printed its first line.
struct Live {
    child: tokio::process::Child,
    how: Path2,
}

async fn start_session(c: &TestCluster, id: &Path, login: &str, how: Path2, command: &str) -> Live {
    let args = ssh_args(c, id, login, how, command);
    let mut child = tokio::process::Command::new(openssh())
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut first = String::new();
    let mut reader = BufReader::new(stdout);
    tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut first))
        .await
        .unwrap_or_else(|_| panic!("the {how:?} session did not start"))
        .unwrap();
    if first.is_empty() {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
        panic!("the {how:?} session ended before it started: {err}");
    }
    // Keep reading so the session never blocks on a full pipe.
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink).await;
    });
    Live { child, how }
}

/// Waits for the session to end within `bound`; returns its exit code and
/// what it printed on standard error.
async fn ended_within(mut s: Live, bound: Duration) -> (Option<i32>, String) {
    let started = Instant::now();
    let mut stderr = s.child.stderr.take().unwrap();
    let status = tokio::time::timeout(bound, s.child.wait())
        .await
        .unwrap_or_else(|_| panic!("the {:?} session still runs after {bound:?}", s.how))
        .unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).await.unwrap();
    eprintln!("{:?} session ended after {:?}", s.how, started.elapsed());
    (status.code(), err)
}

async fn try_command(c: &TestCluster, id: &Path, login: &str, how: Path2) -> (bool, String) {
    let args = ssh_args(c, id, login, how, "echo in");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(openssh(), &args, None).await;
    (
        out.status.success() && text(&out.stdout) == "in\n",
        text(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_ends_live_sessions_both_ways_and_refuses_new_ones_until_removed() {
    let c = TestCluster::start_with(fast_view()).await;
    c.add_user("dave", "access", "root").await;
    c.add_user("erin", "access", "root").await;
    let dave = c.sign("dave").await;
    let erin = c.sign("erin").await;
    let mut sessions = Vec::new();
    for how in [Path2::Proxy, Path2::Direct] {
        sessions.push(start_session(&c, &dave, "root", how, "echo started; sleep 60").await);
    }
    let bystander = start_session(&c, &erin, "root", Path2::Direct, "echo started; sleep 60").await;

    let out = c
        .admin_ok(&[
            "locks",
            "add",
            "--user",
            "dave",
            "--message",
            "incident 42: call the SOC",
        ])
        .await;
    assert!(
        out.contains("lock ") && out.contains("user \"dave\""),
        "{out}"
    );
    for s in sessions {
        let how = s.how;
        let (code, err) = ended_within(s, BOUND).await;
        assert_eq!(code, Some(255), "{how:?}: {err}");
        assert!(err.contains("incident 42: call the SOC"), "{how:?}: {err}");
    }
    for how in [Path2::Proxy, Path2::Direct] {
        let (ok, err) = try_command(&c, &dave, "root", how).await;
        assert!(!ok, "{how:?}: a locked user got in");
        assert!(err.contains("incident 42"), "{how:?}: {err}");
    }
    // Another user is untouched.
    let (ok, err) = try_command(&c, &erin, "root", Path2::Proxy).await;
    assert!(ok, "{err}");

    let listed = c.admin_ok(&["locks", "ls", "--format", "json"]).await;
    let lock: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(lock["target"]["user"], "dave");
    let id = lock["id"].as_str().unwrap().to_string();
    c.admin_ok(&["locks", "rm", &id]).await;
    let back = crate::support::poll_until(BOUND, || async {
        try_command(&c, &dave, "root", Path2::Direct).await.0
    })
    .await;
    assert!(
        back.is_ok(),
        "dave was still refused after the lock was removed"
    );

    // The lock, its removal and the ended connections are in the audit log.
    let data = c.data_dir();
    assert_eq!(audit_events(&data, Some("lock.created")).await.len(), 1);
    assert_eq!(audit_events(&data, Some("lock.deleted")).await.len(), 1);
    let disconnects = audit_events(&data, Some("client.disconnect")).await;
    assert!(
        disconnects
            .iter()
            .filter(|e| e["user"] == "dave"
                && e["reason"].as_str().unwrap_or("").contains("incident 42"))
            .count()
            >= 2,
        "{disconnects:?}"
    );
    let denied = audit_events(&data, Some("auth")).await;
    assert!(
        denied
            .iter()
            .any(|e| e["user"] == "dave" && e["code"] == "T3007W"),
        "{denied:?}"
    );
    drop(bystander);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_login_locks_cover_only_their_target() {
    let c = TestCluster::start_with(fast_view()).await;
    let login = crate::support::test_login();
    c.add_user("dave", "access", &format!("root,{login}")).await;
    let dave = c.sign("dave").await;
    let as_root = start_session(&c, &dave, "root", Path2::Direct, "echo started; sleep 60").await;
    let as_test = start_session(&c, &dave, login, Path2::Direct, "echo started; sleep 60").await;
    c.admin_ok(&["locks", "add", "--login", "root", "--ttl", "1h"])
        .await;
    let (code, err) = ended_within(as_root, BOUND).await;
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("login \"root\""), "{err}");
    let (ok, _) = try_command(&c, &dave, login, Path2::Proxy).await;
    assert!(ok, "a lock on login root stopped another login");

    c.admin_ok(&["locks", "add", "--node", &c.node_name.to_uppercase()])
        .await;
    let (code, err) = ended_within(as_test, BOUND).await;
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("node"), "{err}");
    let (ok, err) = try_command(&c, &dave, login, Path2::Proxy).await;
    assert!(!ok);
    assert!(err.contains("access is locked"), "{err}");
    // The text form of the audit log says where and what.
    let found = crate::support::poll_until(BOUND, || async {
        let out = c.admin_ok(&["audit", "search", "--event", "exec"]).await;
        out.lines().any(|l| {
            l.contains(" exec ")
                && l.contains("node=web1")
                && l.contains("command=\"echo started; sleep 60\"")
                && l.contains("user=dave")
        })
    })
    .await;
    assert!(
        found.is_ok(),
        "{}",
        c.admin_ok(&["audit", "search", "--event", "exec"]).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_user_or_narrowing_roles_binds_live_certificates() {
    let c = TestCluster::start_with(fast_view()).await;
    let login = crate::support::test_login();
    c.create_role(
        "as-root",
        "kind: role\nversion: v3\nmetadata:\n  name: as-root\nspec:\n  allow:\n    logins: [root]\n",
    )
    .await;
    c.create_role(
        "as-test",
        &format!("kind: role\nversion: v3\nmetadata:\n  name: as-test\nspec:\n  allow:\n    logins: [{login}]\n"),
    )
    .await;
    c.add_user("erin", "as-root,as-test", "").await;
    let erin = c.sign("erin").await;
    let root = start_session(&c, &erin, "root", Path2::Proxy, "echo started; sleep 60").await;
    let test = start_session(&c, &erin, login, Path2::Direct, "echo started; sleep 60").await;

    // Narrowed: the root session ends, the other login keeps working on the same certificate.
    c.admin_ok(&["users", "update", "erin", "--roles", "as-test"])
        .await;
    let (code, err) = ended_within(root, BOUND).await;
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("\"root\""), "{err}");
    let (ok, err) = try_command(&c, &erin, "root", Path2::Direct).await;
    assert!(!ok, "the old certificate's wider role still works");
    assert!(err.contains("root"), "{err}");
    let (ok, err) = try_command(&c, &erin, login, Path2::Proxy).await;
    assert!(ok, "{err}");

    // Removed: everything ends, and the certificate opens nothing.
    c.admin_ok(&["users", "rm", "erin"]).await;
    let (code, err) = ended_within(test, BOUND).await;
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("no longer exists"), "{err}");
    for how in [Path2::Proxy, Path2::Direct] {
        let (ok, err) = try_command(&c, &erin, login, how).await;
        assert!(!ok, "{how:?}: a removed user got in");
        assert!(err.contains("no longer exists"), "{how:?}: {err}");
    }
    // Re-added with a narrower role: the old certificate still gets only that.
    c.add_user("erin", "as-test", "").await;
    let (ok, _) = try_command(&c, &erin, "root", Path2::Proxy).await;
    assert!(!ok, "re-adding a user revived the old certificate's role");
    let data = c.data_dir();
    for event in ["user.create", "user.update", "user.delete"] {
        let events = audit_events(&data, Some(event)).await;
        assert!(
            events.iter().any(|e| e["target"] == "erin"),
            "{event}: {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_ends_and_output_alone_is_not_activity() {
    let c = TestCluster::start_with(fast_view()).await;
    c.create_role(
        "idle",
        "kind: role\nversion: v3\nmetadata:\n  name: idle\nspec:\n  options:\n    client_idle_timeout: 3s\n  allow:\n    logins: [root]\n",
    )
    .await;
    c.add_user("ivan", "idle", "").await;
    let ivan = c.sign("ivan").await;
    let chatty = start_session(
        &c,
        &ivan,
        "root",
        Path2::Direct,
        "echo started; while true; do echo tick; sleep 0.2; done",
    )
    .await;
    let (code, err) = ended_within(chatty, BOUND).await;
    assert_eq!(code, Some(255), "{err}");
    assert!(
        err.contains("no input for 3s (client_idle_timeout)"),
        "{err}"
    );

    // Typing keeps a session alive past the timeout.
    let mut typing = start_session(
        &c,
        &ivan,
        "root",
        Path2::Proxy,
        "echo started; cat >/dev/null",
    )
    .await;
    let mut stdin = typing.child.stdin.take().unwrap();
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(b"key\n").await.unwrap();
        stdin.flush().await.unwrap();
        assert!(
            typing.child.try_wait().unwrap().is_none(),
            "a typing user was ended as idle"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Then silence ends it.
    let (code, err) = ended_within(typing, BOUND).await;
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("client_idle_timeout"), "{err}");
    let events = audit_events(&c.data_dir(), Some("client.disconnect")).await;
    assert!(events.iter().any(|e| {
        e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("client_idle_timeout")
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_certificate_expires_with_disconnect_expired_cert() {
    let c = TestCluster::start_with(ClusterSpec {
        auth_extra: "  disconnect_expired_cert: true\n".into(),
        ..fast_view()
    })
    .await;
    c.add_user("kim", "access", "root").await;
    let out = c.dir.path().join("id-kim-short");
    c.admin_ok(&[
        "sign",
        "--user",
        "kim",
        "--ttl",
        "5s",
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    let mut sessions = Vec::new();
    for how in [Path2::Proxy, Path2::Direct] {
        sessions.push(start_session(&c, &out, "root", how, "echo started; sleep 60").await);
    }
    for s in sessions {
        let how = s.how;
        let (code, err) = ended_within(s, BOUND).await;
        assert_eq!(code, Some(255), "{how:?}: {err}");
        assert!(err.contains("expired"), "{how:?}: {err}");
    }
}

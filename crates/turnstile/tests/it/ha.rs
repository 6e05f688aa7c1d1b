//! Several auth servers sharing one etcd, as separate processes of the real
//! binary with a real etcd and s3s-fs for the recordings: every auth server
//! serves the whole cluster, and nodes and proxies attached to all of them
//! go on through the death of one.

use std::path::Path;
use std::time::Duration;

use turnstile_auth::audit_log::testing::PostgresServer;
use turnstile_auth::backend::etcd::testing::EtcdServer;

use crate::cluster::{
    Dirs, PROXY_SERVICE, admin, admin_with_stdin, node_names, node_service, token,
};
use crate::object_stores::{S3Server, SECRET_KEY, aws_env};
use crate::recording::{play, plays_back_whole, wait_complete};
use crate::support::{
    BIN, Proc, client, free_port, poll_until, run, spawn_turnstile, stderr_of, text,
};

/// The shared parts of a cluster of auth servers: etcd, an object store for
/// recordings, PostgreSQL for the audit log.
struct Shared {
    etcd: EtcdServer,
    _s3: S3Server,
    postgres: PostgresServer,
    recordings: String,
}

impl Shared {
    async fn start(dirs: &Dirs) -> Self {
        let etcd = EtcdServer::start().await;
        let s3 = S3Server::s3s_fs(&dirs.path("s3"), free_port()).await;
        let postgres = PostgresServer::start();
        Self {
            etcd,
            recordings: s3.uri("recordings"),
            _s3: s3,
            postgres,
        }
    }

    /// An auth server's config; `extra`: more `auth_service` lines.
    fn auth_yaml(&self, data: &Path, extra: &str) -> String {
        format!(
            "turnstile:\n  data_dir: {}\n  storage:\n    type: etcd\n    peers: [\"{}\"]\n    prefix: /ha\n    audit_sessions_uri: \"{}\"\n    audit_events_uri: \"{}\"\nauth_service:\n  listen_addr: 127.0.0.1:0\n  cluster_name: prod\n{extra}",
            data.display(),
            self.etcd.url(),
            self.recordings,
            self.postgres.uri(),
        )
    }
}

/// A process joining with `token`, attached to every auth server in `auths`.
/// Its poll of the cluster is the slowest allowed (10 s): what it learns
/// sooner, it learns from the watch.
fn attached_to_all(data: &Path, auths: &[String], token: &str, pin: &str, service: &str) -> String {
    let list: Vec<String> = auths.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "turnstile:\n  data_dir: {}\n  auth_servers: [{}]\n  join_token: {token}\n  ca_pin: {pin}\n  view_refresh_interval: 10s\n{}{service}",
        data.display(),
        list.join(", "),
        crate::cluster::MANY_FROM_ONE_ADDRESS,
    )
}

/// A proxy and a node (web1), joined with tokens auth-a and auth-b made,
/// each attached to every auth server in `auths`; waits until both auth
/// servers list the node. Returns them and the proxy's address.
async fn attach_proxy_and_node(dirs: &Dirs, auths: &[String], pin: &str) -> (Proc, Proc, String) {
    let (a_data, b_data) = (dirs.path("auth-a"), dirs.path("auth-b"));
    let (t, _) = token(&a_data, "proxy", "10m").await;
    let proxy = Proc::start(&dirs.config(
        "proxy",
        &attached_to_all(&dirs.path("proxy"), auths, &t, pin, PROXY_SERVICE),
    ))
    .await;
    let proxy_addr = proxy.field("proxy");
    let web1 = node_attached_to(dirs, "web1", "dev", auths, "auth-b", pin).await;
    poll_until(Duration::from_secs(20), || async {
        node_names(&b_data).await.contains(&"web1".to_string())
    })
    .await
    .expect("both auth servers list the node");
    (proxy, web1, proxy_addr)
}

/// A node `name` (label env=`env`), joined with a token from the auth
/// server whose data is `token_from`, attached to `auths` only; waits until
/// auth-a lists it.
async fn node_attached_to(
    dirs: &Dirs,
    name: &str,
    env: &str,
    auths: &[String],
    token_from: &str,
    pin: &str,
) -> Proc {
    let (t, _) = token(&dirs.path(token_from), "node", "10m").await;
    let node = Proc::start(&dirs.config(
        name,
        &attached_to_all(&dirs.path(name), auths, &t, pin, &node_service(name, env)),
    ))
    .await;
    poll_until(Duration::from_secs(20), || async {
        node_names(&dirs.path("auth-a"))
            .await
            .contains(&name.to_string())
    })
    .await
    .unwrap_or_else(|_| panic!("{name} registers"));
    node
}

/// `turnstile ssh web1 -- command` from `home`, again until it succeeds;
/// fails the test with `what` and the last error after `within`.
async fn ssh_succeeds_within(
    home: &Path,
    command: &str,
    within: Duration,
    what: &str,
) -> std::process::Output {
    let deadline = std::time::Instant::now() + within;
    loop {
        let out = client(home, &["ssh", "web1", "--", command], None).await;
        if out.status.success() {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {}",
            text(&out.stderr)
        );
    }
}

/// alice, limited to two connections (so every session needs auth for its
/// slot), her role made through auth-b and her user through auth-a; logged
/// in through the proxy. Returns her home.
async fn alice_logs_in(dirs: &Dirs, proxy_addr: &str, pin: &str) -> std::path::PathBuf {
    let (a_data, b_data) = (dirs.path("auth-a"), dirs.path("auth-b"));
    let role = dirs.path("limited.yaml");
    std::fs::write(
        &role,
        "kind: role\nversion: v3\nmetadata:\n  name: limited\nspec:\n  options:\n    max_connections: 2\n  allow:\n    logins: ['{{internal.logins}}']\n",
    )
    .unwrap();
    admin(&b_data, &["roles", "create", "-f", role.to_str().unwrap()]).await;
    admin_with_stdin(
        &a_data,
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "limited",
            "--logins",
            "root",
            "--password-stdin",
        ],
        b"correct horse battery\n",
    )
    .await;
    let home = dirs.path("home");
    let out = client(
        &home,
        &[
            "login",
            "--proxy",
            proxy_addr,
            "--user",
            "alice",
            "--ca-pin",
            pin,
            "--password-stdin",
        ],
        Some(b"correct horse battery\n"),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    home
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_servers_on_one_etcd_are_equal_and_a_dead_one_is_passed_over() {
    let dirs = Dirs::new();
    let mut shared = Shared::start(&dirs).await;
    let env = aws_env(SECRET_KEY);
    let (a_data, b_data) = (dirs.path("auth-a"), dirs.path("auth-b"));
    // The first start of two auth servers at once: one set of CAs.
    let a_config = dirs.config("auth-a", &shared.auth_yaml(&a_data, ""));
    let b_config = dirs.config(
        "auth-b",
        &shared.auth_yaml(&b_data, "  locking_mode: strict\n"),
    );
    let (a, b) = tokio::join!(
        Proc::start_env(&a_config, &env),
        Proc::start_env(&b_config, &env)
    );
    let pin = a.field("CA pin");
    assert_eq!(
        b.field("CA pin"),
        pin,
        "both serve the CAs the first start made"
    );
    let b_addr = b.field("auth");

    // A setting given live survives the start of an auth server whose file
    // does not set it; one whose file sets it sets it again.
    admin(&a_data, &["config", "set", "client_idle_timeout", "15m"]).await;
    let a = {
        a.stop().await;
        Proc::start_env(&a_config, &env).await
    };
    let shown = admin(&b_data, &["config", "get"]).await;
    assert!(
        shown.contains("15m") && shown.contains("strict"),
        "restarting auth-a kept what it does not set:\n{shown}"
    );
    let auths = vec![a.field("auth"), b_addr];

    let (_proxy, _web1, proxy_addr) = attach_proxy_and_node(&dirs, &auths, &pin).await;
    let home = alice_logs_in(&dirs, &proxy_addr, &pin).await;

    // db1 is attached to auth-a alone. A lock placed through auth-b ends
    // alice's session there within 2 s (its poll is every 10 s: only the
    // watch, through etcd, can tell it that soon).
    let _db1 = node_attached_to(&dirs, "db1", "prod", &auths[..1], "auth-a", &pin).await;
    let mut held = spawn_turnstile(&["ssh", "db1", "--", "echo started; cat"], Some(&home));
    let _stdin = held.stdin.take();
    let mut held_out = tokio::io::BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut held_out, &mut line)
        .await
        .unwrap();
    assert_eq!(line, "started\n", "{}", stderr_of(&mut held).await);
    admin(
        &b_data,
        &["locks", "add", "--user", "alice", "--message", "incident 7"],
    )
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(2), held.wait()).await;
    assert!(
        ended.is_ok(),
        "a lock placed through auth-b ends the session on db1 within 2 s"
    );
    let stderr = stderr_of(&mut held).await;
    assert!(stderr.contains("incident 7"), "{stderr}");
    let listed = admin(&a_data, &["locks", "ls", "--format", "json"]).await;
    let lock: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    admin(&a_data, &["locks", "rm", lock["id"].as_str().unwrap()]).await;
    // The lock's removal through auth-a reaches the proxy and web1 as soon.
    let out = ssh_succeeds_within(
        &home,
        "echo $TURNSTILE_SESSION_ID",
        Duration::from_secs(2),
        "still locked 2 s after the lock was removed",
    )
    .await;
    let identity = home.join("keys/prod/alice");
    wait_complete(&identity, text(&out.stdout).trim()).await;

    // auth-a dies. Limited sessions (whose slots only auth gives) work
    // again once the node and proxy pass over it, and are recorded through
    // auth-b.
    a.kill9().await;
    let after = ssh_succeeds_within(
        &home,
        "echo $TURNSTILE_SESSION_ID; head -c 300000 /dev/urandom | base64",
        Duration::from_secs(10),
        "a limited session still fails with one auth server dead",
    )
    .await;
    let sid = text(&after.stdout).lines().next().unwrap().to_string();
    wait_complete(&identity, &sid).await;
    let played = play(&identity, &sid, "text").await;
    assert!(
        played == after.stdout,
        "the recording made through auth-b plays back"
    );
    assert!(node_names(&b_data).await.contains(&"web1".to_string()));

    // etcd stops. A user without limits keeps working from the caches of
    // proxy and node; a limited one is refused with the reason; both work
    // again once etcd is back, with nothing restarted.
    let bob = dirs.path("bob");
    admin(
        &b_data,
        &[
            "users", "add", "bob", "--roles", "access", "--logins", "root",
        ],
    )
    .await;
    admin(
        &b_data,
        &[
            "sign",
            "--user",
            "bob",
            "--proxy",
            &proxy_addr,
            "--out",
            bob.to_str().unwrap(),
        ],
    )
    .await;
    let bob_id = bob.to_str().unwrap().to_string();
    let bob_ssh = || async {
        run(
            BIN,
            &["ssh", "-i", &bob_id, "web1", "--", "echo", "bob"],
            None,
        )
        .await
    };
    let alice_ssh = || client(&home, &["ssh", "web1", "--", "echo", "alice"], None);
    poll_until(Duration::from_secs(20), || async {
        text(&bob_ssh().await.stdout) == "bob\n"
    })
    .await
    .expect("bob works once proxy and node know him");
    shared.etcd.stop().await;
    let out = bob_ssh().await;
    assert_eq!(text(&out.stdout), "bob\n", "{}", text(&out.stderr));
    let out = alice_ssh().await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a limited session without etcd");
    assert!(
        stderr.contains("cannot take a connection slot for user \"alice\"")
            && stderr.contains(&format!("etcd ({}) did not answer", shared.etcd.url())),
        "the refusal says why: {stderr}"
    );
    shared.etcd.restart().await;
    poll_until(Duration::from_secs(20), || async {
        text(&alice_ssh().await.stdout) == "alice\n"
    })
    .await
    .expect("limited sessions work again once etcd is back");
    drop(b);
}

/// `node-sync` recordings stream to auth-a and auth-b in turn; auth-a dies
/// mid-session. Every session goes on, and its recording, resumed through
/// auth-b, plays back byte for byte with `ei` running without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sync_streams_move_to_another_auth_server_and_lose_nothing() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let dirs = Dirs::new();
    let shared = Shared::start(&dirs).await;
    let env = aws_env(SECRET_KEY);
    let sync = "  session_recording: node-sync\n";
    let a = Proc::start_env(
        &dirs.config("auth-a", &shared.auth_yaml(&dirs.path("auth-a"), sync)),
        &env,
    )
    .await;
    let b = Proc::start_env(
        &dirs.config("auth-b", &shared.auth_yaml(&dirs.path("auth-b"), sync)),
        &env,
    )
    .await;
    let pin = a.field("CA pin");
    let auths = [a.field("auth"), b.field("auth")];
    let (_proxy, _web1, proxy_addr) = attach_proxy_and_node(&dirs, &auths, &pin).await;
    let home = alice_logs_in(&dirs, &proxy_addr, &pin).await;

    // Two sessions at once (alice's limit): their streams take turns over
    // the auth servers, so one streams to auth-a.
    let script = "echo sid=$TURNSTILE_SESSION_ID; i=0; while [ $i -lt 120 ]; do echo line-$i; i=$((i+1)); sleep 0.03; done";
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut child = spawn_turnstile(&["ssh", "web1", "--", script], Some(&home));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next_line().await.unwrap().unwrap();
        let sid = first.trim_start_matches("sid=").to_string();
        sessions.push((child, lines, sid, format!("{first}\n")));
    }
    for (_, lines, _, shown) in &mut sessions {
        while !shown.contains("line-20\n") {
            shown.push_str(&lines.next_line().await.unwrap().unwrap());
            shown.push('\n');
        }
    }
    let on_a = a.stderr();
    assert!(
        sessions.iter().any(|(_, _, sid, _)| on_a
            .lines()
            .any(|l| l.contains("recording stream opened") && l.contains(sid.as_str()))),
        "a session streams to auth-a before it dies:\n{on_a}"
    );
    let sids_started: Vec<String> = sessions.iter().map(|(_, _, sid, _)| sid.clone()).collect();
    a.kill9().await;
    // The slots stay held (they are in etcd) and are released at the end.
    let b_data = dirs.path("auth-b");
    let slots = || async {
        admin(&b_data, &["semaphores", "ls", "--format", "json"])
            .await
            .lines()
            .count()
    };
    assert_eq!(slots().await, 2, "both sessions keep their slots");
    let identity = home.join("keys/prod/alice");
    for (mut child, mut lines, sid, mut shown) in sessions {
        while let Some(line) = lines.next_line().await.unwrap() {
            shown.push_str(&line);
            shown.push('\n');
        }
        let status = child.wait().await.unwrap();
        let stderr = stderr_of(&mut child).await;
        assert!(status.success(), "the session went on: {stderr}");
        assert!(shown.contains("line-119\n"), "{shown}");
        plays_back_whole(&identity, &sid, &shown).await;
    }
    poll_until(Duration::from_secs(10), || async { slots().await == 0 })
        .await
        .expect("the slots are released when the sessions end");
    // Every session's events are in PostgreSQL, once each, whichever auth
    // server they reached: both auth servers read the one log.
    poll_until(Duration::from_secs(30), || async {
        let ends = admin(
            &b_data,
            &[
                "audit",
                "search",
                "--event",
                "session.end",
                "--format",
                "json",
            ],
        )
        .await;
        ends.lines().count() == 2
    })
    .await
    .expect("both sessions' ends reach the audit log");
    let starts = admin(
        &b_data,
        &[
            "audit",
            "search",
            "--event",
            "session.start",
            "--format",
            "json",
        ],
    )
    .await;
    let mut logged: Vec<String> = starts
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["sid"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    logged.sort();
    let mut expected = sids_started;
    expected.sort();
    assert_eq!(logged, expected, "each session's start is in the log once");
    drop(b);
}

/// Forty clients race for three slots, half through web1 (attached to
/// auth-a alone) and half through db1 (attached to auth-b and to an auth
/// server that is not there): exactly
/// three get in, since both auth servers take slots by compare-and-swap on
/// the one etcd. Then PostgreSQL stops and starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_exact_across_auth_servers() {
    use crate::session_control::{exactly_three, limited_role, race_on, release};
    let dirs = Dirs::new();
    let mut shared = Shared::start(&dirs).await;
    let env = aws_env(SECRET_KEY);
    let (a_data, b_data) = (dirs.path("auth-a"), dirs.path("auth-b"));
    let a = Proc::start_env(&dirs.config("auth-a", &shared.auth_yaml(&a_data, "")), &env).await;
    let b = Proc::start_env(&dirs.config("auth-b", &shared.auth_yaml(&b_data, "")), &env).await;
    let pin = a.field("CA pin");
    let (a_addr, b_addr) = (a.field("auth"), b.field("auth"));
    let (_proxy, _web1, proxy_addr) =
        attach_proxy_and_node(&dirs, std::slice::from_ref(&a_addr), &pin).await;
    // db1's first auth server is one that is not there: it joins through
    // the next, and its calls pass over the missing one.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let _db1 = node_attached_to(
        &dirs,
        "db1",
        "prod",
        &[nowhere, b_addr.clone()],
        "auth-b",
        &pin,
    )
    .await;
    let role = dirs.path("three.yaml");
    std::fs::write(&role, limited_role("three", 3, 0)).unwrap();
    admin(&a_data, &["roles", "create", "-f", role.to_str().unwrap()]).await;
    admin(
        &b_data,
        &[
            "users", "add", "alice", "--roles", "three", "--logins", "root",
        ],
    )
    .await;
    let id = dirs.path("alice");
    let id = id.to_str().unwrap();
    admin(
        &a_data,
        &[
            "sign",
            "--user",
            "alice",
            "--proxy",
            &proxy_addr,
            "--out",
            id,
        ],
    )
    .await;
    let outcomes = race_on(&["web1", "db1"], 40, vec!["-i".into(), id.into()], vec![]).await;
    let holders = exactly_three(outcomes);
    let slots = || async {
        admin(&b_data, &["semaphores", "ls", "--format", "json"])
            .await
            .lines()
            .count()
    };
    assert_eq!(slots().await, 3);
    release(holders).await;
    poll_until(Duration::from_secs(5), || async { slots().await == 0 })
        .await
        .expect("closed connections free their slots");

    // PostgreSQL stops. Sessions go on; their events wait in the node's
    // queue and reach the log once it is back, with nothing restarted.
    shared.postgres.stop();
    let out = run(
        BIN,
        &["ssh", "-i", id, "web1", "--", "echo $TURNSTILE_SESSION_ID"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sid = text(&out.stdout).trim().to_string();
    let ended = |data: std::path::PathBuf, sid: String| async move {
        let out = run(
            BIN,
            &[
                "admin",
                "audit",
                "search",
                "--event",
                "session.end",
                "--format",
                "json",
                "--data-dir",
                data.to_str().unwrap(),
            ],
            None,
        )
        .await;
        out.status.success() && text(&out.stdout).contains(&sid)
    };
    assert!(
        !ended(a_data.clone(), sid.clone()).await,
        "nothing is written while PostgreSQL is down"
    );
    shared.postgres.restart();
    poll_until(Duration::from_secs(30), || {
        ended(a_data.clone(), sid.clone())
    })
    .await
    .expect("the session's events reach the log once PostgreSQL is back");
}

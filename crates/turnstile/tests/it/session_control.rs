//! Concurrent session control as users meet it: exact limits under races,
//! slots freed the moment a connection closes, max_sessions with OpenSSH
//! multiplexing, slots of crashed nodes expiring, and auth outages.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cluster::{Cluster, admin};
use crate::support::{
    BIN, ClusterSpec, Proc, TestCluster, client, openssh, poll_until, run, spawn_turnstile, text,
};

pub(crate) fn limited_role(name: &str, max_connections: u32, max_sessions: u32) -> String {
    format!(
        "kind: role\nversion: v3\nmetadata:\n  name: {name}\nspec:\n  options:\n    max_connections: {max_connections}\n    max_sessions: {max_sessions}\n  allow:\n    logins: ['{{{{internal.logins}}}}']\n"
    )
}

/// What happened to one of many clients started at once.
pub(crate) enum Outcome {
    /// Connected and holding the session open.
    Holding(tokio::process::Child),
    /// Exited without connecting.
    Refused { code: Option<i32>, stderr: String },
}

/// Starts `n` `turnstile ssh` clients at once, each holding its session open
/// (`cat` waits on the open stdin) once it has printed `connected`.
async fn race(n: usize, identity_args: Vec<String>, env: Vec<(String, String)>) -> Vec<Outcome> {
    race_on(&["web1"], n, identity_args, env).await
}

/// `n` clients at once, each to the next of `nodes` in turn.
pub(crate) async fn race_on(
    nodes: &[&str],
    n: usize,
    identity_args: Vec<String>,
    env: Vec<(String, String)>,
) -> Vec<Outcome> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut args = vec!["ssh".to_string()];
        args.extend(identity_args.iter().cloned());
        args.extend([
            nodes[i % nodes.len()].to_string(),
            "--".into(),
            "echo connected; cat".into(),
        ]);
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            let mut child = tokio::process::Command::new(BIN)
                .args(&args)
                .envs(env)
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
            let first = tokio::time::timeout(Duration::from_secs(90), out.next_line())
                .await
                .expect("each client connects or is refused within 90s");
            if matches!(first, Ok(Some(ref l)) if l == "connected") {
                return Outcome::Holding(child);
            }
            let mut stderr = String::new();
            use tokio::io::AsyncReadExt;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await
                .unwrap();
            let code = child.wait().await.unwrap().code();
            Outcome::Refused { code, stderr }
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    outcomes
}

/// Checks 3 of 40 hold and 37 were told why; returns the holders.
pub(crate) fn exactly_three(outcomes: Vec<Outcome>) -> Vec<tokio::process::Child> {
    let mut holders = Vec::new();
    let mut refused = 0;
    for o in outcomes {
        match o {
            Outcome::Holding(c) => holders.push(c),
            Outcome::Refused { code, stderr } => {
                assert_eq!(code, Some(255), "{stderr}");
                assert!(
                    stderr
                        .contains("too many concurrent ssh connections for user \"alice\" (max=3)"),
                    "{stderr}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((holders.len(), refused), (3, 37));
    holders
}

async fn lease_count(admin_args: &[&str]) -> usize {
    let mut all = vec!["admin", "semaphores", "ls", "--format", "json"];
    all.extend_from_slice(admin_args);
    let out = run(BIN, &all, None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().count()
}

pub(crate) async fn release(holders: Vec<tokio::process::Child>) {
    for mut c in holders {
        drop(c.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), c.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
    }
}

async fn limit_events(admin_args: &[&str], kind: &str) -> Vec<serde_json::Value> {
    let mut all = vec![
        "admin",
        "audit",
        "search",
        "--event",
        "sessctl.limit",
        "--format",
        "json",
    ];
    all.extend_from_slice(admin_args);
    let out = run(BIN, &all, None).await;
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["sessctl_kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_racers_three_slots_in_process_on_the_memory_backend() {
    let c = TestCluster::start_with(ClusterSpec {
        storage: "memory",
        global_extra: crate::cluster::MANY_FROM_ONE_ADDRESS.into(),
        ..Default::default()
    })
    .await;
    c.create_role("three", &limited_role("three", 3, 0)).await;
    c.add_user("alice", "three", "root").await;
    let id = c.sign("alice").await;
    let outcomes = race(40, vec!["-i".into(), id.to_str().unwrap().into()], vec![]).await;
    let holders = exactly_three(outcomes);
    let data = c.data_dir();
    let admin_args = ["--data-dir", data.to_str().unwrap()];
    assert_eq!(lease_count(&admin_args).await, 3);
    poll_until(Duration::from_secs(20), || async {
        limit_events(&admin_args, "connection").await.len() == 37
    })
    .await
    .expect("37 sessctl.limit events");
    let event = &limit_events(&admin_args, "connection").await[0];
    assert_eq!(event["code"], "T1006W");
    assert_eq!(event["max"], 3);
    assert_eq!(event["login"], "root");
    assert_eq!(event["proto"], "ssh");
    assert!(
        event["addr.remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    release(holders).await;
    poll_until(Duration::from_secs(5), || async {
        lease_count(&admin_args).await == 0
    })
    .await
    .expect("closed connections free their slots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_racers_three_slots_through_the_real_binary_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = crate::support::one_process_config(dir.path(), "web1");
    let p = Proc::start(&config).await;
    let admin_args = ["--data-dir", data.to_str().unwrap()];
    admin(
        &data,
        &[
            "roles",
            "create",
            "-f",
            write_role(dir.path(), "three", 3, 0).to_str().unwrap(),
        ],
    )
    .await;
    admin(
        &data,
        &[
            "users", "add", "alice", "--roles", "three", "--logins", "root",
        ],
    )
    .await;
    let id = dir.path().join("alice");
    admin(
        &data,
        &["sign", "--user", "alice", "--out", id.to_str().unwrap()],
    )
    .await;
    let outcomes = race(40, vec!["-i".into(), id.to_str().unwrap().into()], vec![]).await;
    let holders = exactly_three(outcomes);
    assert_eq!(lease_count(&admin_args).await, 3);
    let sessions = run(
        BIN,
        &[
            "admin",
            "sessions",
            "ls",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert_eq!(
        text(&sessions.stdout)
            .lines()
            .filter(|l| l.starts_with("alice"))
            .count(),
        3
    );
    release(holders).await;
    poll_until(Duration::from_secs(5), || async {
        lease_count(&admin_args).await == 0
    })
    .await
    .expect("closed connections free their slots");
    p.stop().await;
}

fn write_role(
    dir: &Path,
    name: &str,
    max_connections: u32,
    max_sessions: u32,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, limited_role(name, max_connections, max_sessions)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_frees_its_slot_at_once_a_hundred_times() {
    let c = TestCluster::start().await;
    c.create_role("one", &limited_role("one", 1, 0)).await;
    c.add_user("alice", "one", "root").await;
    let id = c.sign("alice").await;
    let semaphores = c.authority();
    for round in 0..100 {
        let out = c.ssh(&id, &["web1", "true"]).await;
        assert!(out.status.success(), "round {round}: {}", text(&out.stderr));
        let started = Instant::now();
        poll_until(Duration::from_secs(1), || async {
            semaphores
                .semaphores()
                .list("connection")
                .await
                .unwrap()
                .is_empty()
        })
        .await
        .unwrap_or_else(|_| {
            panic!("round {round}: the slot was still held 1s after the session ended")
        });
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_multiplexing_counts_one_connection_and_max_sessions_channels() {
    let c = TestCluster::start().await;
    c.create_role("limited", &limited_role("limited", 1, 2))
        .await;
    c.add_user("alice", "limited", "root").await;
    let id = c.sign("alice").await;
    let cfg = format!("{}.ssh_config", id.display());
    let control = c.dir.path().join("ctl.sock");
    let control_opt = format!("ControlPath={}", control.display());
    let base = [
        "-F",
        cfg.as_str(),
        "-o",
        "BatchMode=yes",
        "-o",
        control_opt.as_str(),
    ];

    let mut master = tokio::process::Command::new(openssh())
        .args(base)
        .args(["-o", "ControlMaster=yes", "-N", "web1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    poll_until(Duration::from_secs(20), || async {
        let mut args = base.to_vec();
        args.extend(["-O", "check", "web1"]);
        run(openssh(), &args, None).await.status.success()
    })
    .await
    .expect("the control master is up");

    // Two sessions at once through the one connection.
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut child = tokio::process::Command::new(openssh())
            .args(base)
            .args(["web1", "echo started; exec sleep 60"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), out.next_line())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(line.as_deref(), Some("started"));
        sessions.push(child);
    }
    let semaphores = c.authority();
    assert_eq!(
        semaphores
            .semaphores()
            .list("connection")
            .await
            .unwrap()
            .len(),
        1,
        "one connection, one slot"
    );

    // A third channel is refused with the reason. OpenSSH's mux client then
    // falls back to a connection of its own, which max_connections refuses;
    // the master prints the channel refusal.
    let mut args = base.to_vec();
    args.extend(["web1", "echo should-not-run"]);
    let out = run(openssh(), &args, None).await;
    assert!(text(&out.stdout).is_empty());
    assert_ne!(out.status.code(), Some(0));
    let mut master_err = master.stderr.take().unwrap();
    let mut seen = String::new();
    let wanted =
        "administratively prohibited: too many session channels for user \"alice\" (max=2)";
    tokio::time::timeout(Duration::from_secs(20), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        while !seen.contains(wanted) {
            let n = master_err.read(&mut buf).await.unwrap();
            assert!(n > 0, "master stderr closed: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the master never printed the refusal: {seen}"));

    // A second connection (not multiplexed) is refused by max_connections.
    let out = c.ssh(&id, &["web1", "echo", "should-not-run"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr)
            .contains("too many concurrent ssh connections for user \"alice\" (max=1)")
    );

    let data = c.data_dir();
    let admin_args = ["--data-dir", data.to_str().unwrap()];
    poll_until(Duration::from_secs(20), || async {
        !limit_events(&admin_args, "session").await.is_empty()
    })
    .await
    .expect("a sessctl.limit event of kind session");
    let event = &limit_events(&admin_args, "session").await[0];
    assert_eq!(event["max"], 2);
    assert_eq!(event["user"], "alice");

    for mut s in sessions {
        let _ = s.kill().await;
    }
    let mut args = base.to_vec();
    args.extend(["-O", "exit", "web1"]);
    run(openssh(), &args, None).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), master.wait()).await;
    poll_until(Duration::from_secs(5), || async {
        semaphores
            .semaphores()
            .list("connection")
            .await
            .unwrap()
            .is_empty()
    })
    .await
    .expect("the master's slot is freed when it exits");
}

/// Alice, limited to one connection, logged in with her password.
async fn alice_with_one_slot(c: &Cluster) {
    let data = c.auth_data();
    let role = write_role(c.dirs.path("").as_path(), "single", 1, 0);
    admin(&data, &["roles", "create", "-f", role.to_str().unwrap()]).await;
    crate::cluster::admin_with_stdin(
        &data,
        &[
            "users",
            "add",
            "alice",
            "--roles",
            "single",
            "--logins",
            "root",
            "--password-stdin",
        ],
        b"correct horse battery\n",
    )
    .await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The user's profile identity, for the library client.
fn profile_identity(c: &Cluster, user: &str) -> turnstile::identity_file::LoadedIdentity {
    turnstile::identity_file::read(&c.home().join(format!("keys/prod/{user}"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_cluster_wide_and_a_crashed_nodes_slot_expires() {
    let mut c = Cluster::start_with("  session_control_timeout: 3s\n").await;
    let data = c.auth_data();
    alice_with_one_slot(&c).await;

    // A session on web1 blocks db1.
    let identity = profile_identity(&c, "alice");
    let holding = turnstile_ssh::client::connect_via_proxy(
        &c.proxy_addr,
        "web1",
        "root",
        &identity.credentials,
        &identity.trust,
    )
    .await
    .unwrap();
    let out = c.ssh(&["db1", "true"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains(
            "too many concurrent ssh connections for user \"alice\" (max=1); held on web1 since 20"
        ),
        "{}",
        text(&out.stderr)
    );
    drop(holding);
    let admin_args = ["--data-dir", data.to_str().unwrap()];
    poll_until(Duration::from_secs(5), || async {
        lease_count(&admin_args).await == 0
    })
    .await
    .expect("released");

    // db1 holds the slot and crashes: the slot frees itself after the timeout.
    let _holding = turnstile_ssh::client::connect_via_proxy(
        &c.proxy_addr,
        "db1",
        "root",
        &identity.credentials,
        &identity.trust,
    )
    .await
    .unwrap();
    assert_eq!(lease_count(&admin_args).await, 1);
    let killed = Instant::now();
    c.db1.take().unwrap().kill9().await;
    assert_eq!(
        lease_count(&admin_args).await,
        1,
        "not freed before the timeout"
    );
    poll_until(Duration::from_secs(15), || async {
        lease_count(&admin_args).await == 0
    })
    .await
    .expect("the crashed node's slot expires");
    assert!(
        killed.elapsed() >= Duration::from_secs(1),
        "freed by expiry, not at once"
    );
    let out = c.ssh(&["web1", "echo", "free again"]).await;
    assert_eq!(text(&out.stdout), "free again\n", "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_kill_9_frees_its_slots_at_once_and_admins_free_them_by_hand() {
    // The default timeout: a slot a crashed node held would last two minutes.
    let mut c = Cluster::start().await;
    let data = c.auth_data();
    alice_with_one_slot(&c).await;
    let identity = profile_identity(&c, "alice");
    let admin_args = ["--data-dir", data.to_str().unwrap()];
    let _held = turnstile_ssh::client::connect_via_proxy(
        &c.proxy_addr,
        "db1",
        "root",
        &identity.credentials,
        &identity.trust,
    )
    .await
    .unwrap();
    assert_eq!(lease_count(&admin_args).await, 1);
    c.db1.take().unwrap().kill9().await;
    let restarted = crate::support::Proc::start(&c.dirs.path("db1.yaml")).await;
    poll_until(Duration::from_secs(5), || async {
        lease_count(&admin_args).await == 0
    })
    .await
    .expect("the restarted node frees its previous run's slot at once");
    let out = c.ssh(&["db1", "echo", "back"]).await;
    assert_eq!(text(&out.stdout), "back\n", "{}", text(&out.stderr));

    // A slot whose node is gone for good is freed by hand.
    let _held = turnstile_ssh::client::connect_via_proxy(
        &c.proxy_addr,
        "web1",
        "root",
        &identity.credentials,
        &identity.trust,
    )
    .await
    .unwrap();
    c.web1.take().unwrap().kill9().await;
    let listed = crate::cluster::admin(&data, &["semaphores", "ls", "--format", "json"]).await;
    let lease: serde_json::Value = serde_json::from_str(listed.trim()).unwrap();
    let id = lease["lease_id"].as_str().unwrap();
    let out = crate::cluster::admin(&data, &["semaphores", "rm", id]).await;
    assert!(
        out.contains("freed the slot of user \"alice\" held on web1"),
        "{out}"
    );
    assert_eq!(lease_count(&admin_args).await, 0);
    let out = c.ssh(&["db1", "echo", "free"]).await;
    assert_eq!(text(&out.stdout), "free\n", "{}", text(&out.stderr));
    let mut all = vec!["admin", "semaphores", "rm", id];
    all.extend_from_slice(&admin_args);
    let out = run(BIN, &all, None).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("semaphores ls"),
        "{}",
        text(&out.stderr)
    );
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_auth_outage_limited_sessions_last_until_their_lease_expires() {
    let mut c = Cluster::start_with("  session_control_timeout: 3s\n").await;
    let data = c.auth_data();
    let dir = c.dirs.path("");
    admin(
        &data,
        &[
            "roles",
            "create",
            "-f",
            write_role(&dir, "single", 1, 0).to_str().unwrap(),
        ],
    )
    .await;
    admin(
        &data,
        &[
            "roles",
            "create",
            "-f",
            write_role(&dir, "onesession", 0, 1).to_str().unwrap(),
        ],
    )
    .await;
    for (user, role) in [
        ("alice", "single"),
        ("bob", "access"),
        ("carol", "onesession"),
    ] {
        crate::cluster::admin_with_stdin(
            &data,
            &[
                "users",
                "add",
                user,
                "--roles",
                role,
                "--logins",
                "root",
                "--password-stdin",
            ],
            b"correct horse battery\n",
        )
        .await;
    }
    let homes: Vec<_> = ["alice", "bob", "carol"]
        .iter()
        .map(|u| c.dirs.path(&format!("home-{u}")))
        .collect();
    for (user, home) in ["alice", "bob", "carol"].iter().zip(&homes) {
        let out = client(
            home,
            &[
                "login",
                "--proxy",
                &c.proxy_addr,
                "--user",
                user,
                "--ca-pin",
                &c.pin,
                "--password-stdin",
            ],
            Some(b"correct horse battery\n"),
        )
        .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        // Each works once, so proxy and node have seen their roles.
        let out = client(home, &["ssh", "web1", "true"], None).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    // Alice holds a limited session open.
    let mut alice = spawn_turnstile(
        &["ssh", "web1", "--", "echo connected; cat"],
        Some(&homes[0]),
    );
    // Kept open: `cat` holds the session until the node closes it.
    let _alice_stdin = alice.stdin.take().unwrap();
    let mut out = BufReader::new(alice.stdout.take().unwrap()).lines();
    assert_eq!(out.next_line().await.unwrap().as_deref(), Some("connected"));

    c.auth.take().unwrap().stop().await;
    let outage = Instant::now();
    // Meanwhile: a limited user cannot connect, an unlimited one can.
    let out = client(&homes[0], &["ssh", "web1", "true"], None).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("the auth service is unreachable"),
        "{}",
        text(&out.stderr)
    );
    let out = client(&homes[1], &["ssh", "web1", "echo", "unlimited"], None).await;
    assert_eq!(text(&out.stdout), "unlimited\n", "{}", text(&out.stderr));
    // A max_sessions refusal needs no auth; its event waits for auth to return.
    let carol = turnstile::identity_file::read(&homes[2].join("keys/prod/carol")).unwrap();
    let conn = turnstile_ssh::client::connect_via_proxy(
        &c.proxy_addr,
        "web1",
        "root",
        &carol.credentials,
        &carol.trust,
    )
    .await
    .unwrap();
    let _first = conn.handle.channel_open_session().await.unwrap();
    assert!(
        conn.handle.channel_open_session().await.is_err(),
        "a second channel is over max_sessions=1"
    );

    // The node closes alice's session once her lease has expired, and says why.
    let status = tokio::time::timeout(Duration::from_secs(20), alice.wait())
        .await
        .expect("the session is closed after the lease expires")
        .unwrap();
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    alice
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    let lived = outage.elapsed();
    assert!(
        lived >= Duration::from_secs(1),
        "it survived for a while, not {lived:?} ({status:?}): {stderr}"
    );
    assert_eq!(status.code(), Some(255));
    assert!(
        stderr.contains("connection slot of user \"alice\" expired"),
        "{stderr}"
    );

    // Auth returns: carol's event arrives; nothing was lost.
    c.auth = Some(Proc::start(&c.dirs.config("auth-again", &c.auth_again_yaml())).await);
    let admin_args = ["--data-dir", data.to_str().unwrap()];
    poll_until(Duration::from_secs(30), || async {
        limit_events(&admin_args, "session")
            .await
            .iter()
            .any(|e| e["user"] == "carol")
    })
    .await
    .expect("the buffered sessctl.limit event reaches the audit log");
}

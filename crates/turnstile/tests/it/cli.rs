//! The real binary as an operator meets it: `turnstile start` prints where
//! everything is and stops cleanly on SIGTERM; bad config and role files are
//! refused naming the field; refused changes leave stored data alone.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{BIN, TestCluster, openssh, run, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_prints_the_ready_block_serves_users_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = crate::support::one_process_config(dir.path(), "box1");
    let mut child = tokio::process::Command::new(BIN)
        .args(["start", "--config", config.to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            banner.push_str(&line);
            banner.push('\n');
            if line == "turnstile is ready" {
                break;
            }
        }
    })
    .await
    .expect("turnstile start gets ready");
    assert!(banner.contains("CA pin   sha256:"), "{banner}");
    assert!(banner.contains("turnstile admin users add"), "{banner}");
    assert!(banner.contains("node name box1"), "{banner}");
    assert!(!banner.contains(":0 "), "real ports are printed: {banner}");

    let data_flag = data.to_str().unwrap();
    let admin = |args: &[&str]| {
        let mut all = vec!["admin"];
        all.extend_from_slice(args);
        all.extend(["--data-dir", data_flag]);
        all.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let add = admin(&[
        "users", "add", "alice", "--roles", "access", "--logins", "root",
    ]);
    let out = run(
        BIN,
        &add.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = dir.path().join("alice");
    let sign = admin(&["sign", "--user", "alice", "--out", id.to_str().unwrap()]);
    let out = run(
        BIN,
        &sign.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Nodes register right after start; poll until the proxy can route.
    let mut ok = false;
    for _ in 0..100 {
        let out = run(
            BIN,
            &["ssh", "-i", id.to_str().unwrap(), "box1", "echo", "up"],
            None,
        )
        .await;
        if text(&out.stdout) == "up\n" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "turnstile ssh reaches the node");
    let cfg = format!("{}.ssh_config", id.display());
    let out = run(
        openssh(),
        &["-F", &cfg, "-o", "BatchMode=yes", "box1", "echo openssh"],
        None,
    )
    .await;
    assert_eq!(text(&out.stdout), "openssh\n", "{}", text(&out.stderr));

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops within 20s of SIGTERM")
        .unwrap();
    assert!(status.success(), "clean exit: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_refused_naming_key_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(
        &config,
        "turnstile:\n  data_dir: /tmp/x\nssh_service:\n  node_nme: web1\n",
    )
    .unwrap();
    let out = run(BIN, &["start", "--config", config.to_str().unwrap()], None).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown field `node_nme`"), "{stderr}");
    assert!(stderr.contains("line 4 column 3"), "{stderr}");

    std::fs::write(&config, "auth_service:\n  session_control_timeout: -5s\n").unwrap();
    let out = run(BIN, &["start", "--config", config.to_str().unwrap()], None).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("session_control_timeout"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_roles_are_refused_and_change_nothing() {
    let c = TestCluster::start().await;
    c.create_role(
        "dev",
        "kind: role\nversion: v3\nmetadata:\n  name: dev\nspec:\n  options:\n    max_connections: 2\n  allow:\n    logins: [ubuntu]\n",
    )
    .await;
    let before = c.admin_ok(&["roles", "ls", "--format", "json"]).await;
    let cases = [
        (
            "spec:\n  options:\n    max_connections: -1\n",
            "spec.options.max_connections",
        ),
        (
            "spec:\n  options:\n    max_sessions: 2.5\n",
            "spec.options.max_sessions",
        ),
        (
            "spec:\n  allow:\n    lgins: [root]\n",
            "unknown field `lgins`",
        ),
        (
            "spec:\n  allow:\n    logins: [\"{{external.x}}\"]\n",
            "spec.allow.logins[0]",
        ),
    ];
    for (spec, needle) in cases {
        let path = c.dir.path().join("bad-role.yaml");
        std::fs::write(
            &path,
            format!("kind: role\nversion: v3\nmetadata:\n  name: dev\n{spec}"),
        )
        .unwrap();
        let out = c
            .admin(&["roles", "create", "-f", path.to_str().unwrap(), "--force"])
            .await;
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains(needle),
            "{needle}: {}",
            text(&out.stderr)
        );
    }
    // Creating over an existing role without --force is refused too.
    let path = c.dir.path().join("dup.yaml");
    std::fs::write(&path, "kind: role\nversion: v3\nmetadata:\n  name: dev\n").unwrap();
    let out = c
        .admin(&["roles", "create", "-f", path.to_str().unwrap()])
        .await;
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        c.admin_ok(&["roles", "ls", "--format", "json"]).await,
        before
    );

    // Teleport settings Turnstile does not implement are accepted with a warning.
    std::fs::write(&path, "kind: role\nversion: v3\nmetadata:\n  name: agent\nspec:\n  options:\n    permit_x11_forwarding: true\n").unwrap();
    let out = c
        .admin(&["roles", "create", "-f", path.to_str().unwrap()])
        .await;
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("spec.options.permit_x11_forwarding"),
        "{}",
        text(&out.stderr)
    );
}

/// `turnstile admin … | head -1`: when the reader goes away, a command ends
/// quietly (it panicked on the broken pipe, exit 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_ends_a_command_quietly() {
    let c = TestCluster::start().await;
    c.admin_ok(&[
        "users", "add", "dave", "--roles", "access", "--logins", "root",
    ])
    .await;
    let data = c.data_dir();
    for args in [["users", "ls"], ["roles", "ls"]] {
        let mut child = tokio::process::Command::new(BIN)
            .arg("admin")
            .args(args)
            .args(["--data-dir", data.to_str().unwrap()])
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The reader is gone before the command prints its first line.
        drop(child.stdout.take());
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "admin {args:?}: {:?}: {stderr}",
            out.status
        );
    }
}

/// `admin users ls`'s entry of `name`.
async fn user(c: &TestCluster, name: &str) -> serde_json::Value {
    let out = c.admin_ok(&["users", "ls", "--format", "json"]).await;
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|u| u["user"] == name)
        .unwrap()
}

/// A user added without logins is fixed in place with `users update`
/// (the only fix was `rm` and add again); what is not given stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_update_changes_roles_or_logins_and_keeps_the_rest() {
    let c = TestCluster::start().await;
    c.admin_ok(&["users", "add", "bob", "--roles", "access"])
        .await;
    c.admin_ok(&["users", "update", "bob", "--logins", "root,bob"])
        .await;
    let bob = user(&c, "bob").await;
    assert_eq!(bob["logins"], serde_json::json!(["root", "bob"]));
    assert_eq!(bob["roles"], serde_json::json!(["access"]));
    // The user can now be signed for and log in as root.
    let id = c.sign("bob").await;
    let out = c.ssh(&id, &["root@web1", "--", "echo", "in"]).await;
    assert_eq!(text(&out.stdout), "in\n", "{}", text(&out.stderr));

    for (args, says) in [
        (
            vec!["users", "update", "bob"],
            "give --roles ROLE,… or --logins LOGIN,…",
        ),
        (
            vec!["users", "update", "nobody", "--logins", "root"],
            "there is no user \"nobody\"",
        ),
        (
            vec!["users", "update", "bob", "--roles", ""],
            "at least one role",
        ),
    ] {
        let out = c.admin(&args).await;
        assert!(
            !out.status.success() && text(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        user(&c, "bob").await["logins"],
        serde_json::json!(["root", "bob"])
    );
}

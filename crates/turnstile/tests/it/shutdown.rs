//! Stopping a node that users are on, with the real binary and OpenSSH:
//! SIGTERM tells them, lets their sessions finish within `shutdown_grace`,
//! then ends the rest; every session's audit events reach the log first.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::cluster::admin;
use crate::support::{Proc, audit_log_files, openssh, poll_until, run};

struct OneBox {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    config: String,
    proc: Proc,
}

async fn one_box(global_extra: &str) -> OneBox {
    let dir = tempfile::tempdir().unwrap();
    let path = crate::support::one_process_config(dir.path(), "web1");
    if !global_extra.is_empty() {
        let yaml = std::fs::read_to_string(&path).unwrap();
        let yaml = yaml.replacen("turnstile:\n", &format!("turnstile:\n{global_extra}"), 1);
        std::fs::write(&path, yaml).unwrap();
    }
    let proc = Proc::start(&path).await;
    let data = dir.path().join("data");
    admin(
        &data,
        &[
            "users", "add", "alice", "--roles", "access", "--logins", "root",
        ],
    )
    .await;
    let id = dir.path().join("alice");
    admin(
        &data,
        &["sign", "--user", "alice", "--out", id.to_str().unwrap()],
    )
    .await;
    let config = format!("{}.ssh_config", id.display());
    let b = OneBox {
        _dir: dir,
        data,
        config,
        proc,
    };
    poll_until(Duration::from_secs(20), || async {
        ssh(&b, "true").await.status.success()
    })
    .await
    .expect("the node answers through the proxy");
    b
}

async fn ssh(b: &OneBox, command: &str) -> std::process::Output {
    run(
        openssh(),
        &["-F", &b.config, "-o", "BatchMode=yes", "web1", command],
        None,
    )
    .await
}

/// Starts `command` over OpenSSH and waits for its first line; the handle
/// gives what it printed after that.
async fn started(
    b: &OneBox,
    command: &str,
) -> (tokio::process::Child, tokio::task::JoinHandle<String>) {
    let mut child = tokio::process::Command::new(openssh())
        .args(["-F", &b.config, "-o", "BatchMode=yes", "web1", command])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    tokio::time::timeout(Duration::from_secs(20), out.read_line(&mut line))
        .await
        .expect("the session starts")
        .unwrap();
    assert_eq!(line, "started\n");
    let rest = tokio::spawn(async move {
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest).await;
        rest
    });
    (child, rest)
}

async fn finish(mut child: tokio::process::Child, bound: Duration) -> (Option<i32>, String) {
    let mut err = child.stderr.take().unwrap();
    let status = tokio::time::timeout(bound, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the session still runs after {bound:?}"))
        .unwrap();
    let mut stderr = String::new();
    err.read_to_string(&mut stderr).await.unwrap();
    (status.code(), stderr)
}

/// The `exec` and `session.end` events of the session that ran `command`.
fn session_events(data: &std::path::Path, command: &str) -> (bool, bool) {
    let events = audit_log_files(data);
    let Some(exec) = events
        .iter()
        .find(|e| e["event"] == "exec" && e["command"].as_str() == Some(command))
    else {
        return (false, false);
    };
    let sid = exec["sid"].clone();
    let end = events
        .iter()
        .any(|e| e["event"] == "session.end" && e["sid"] == sid);
    (true, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_session_finish_and_its_audit_events_arrive() {
    let b = one_box("").await;
    let command = "echo started; sleep 2; echo done";
    let (session, output) = started(&b, command).await;
    b.proc.terminate();
    // Stopping means accepting nothing new.
    let refused = poll_until(Duration::from_secs(5), || async {
        !ssh(&b, "true").await.status.success()
    })
    .await;
    assert!(refused.is_ok(), "a stopping node still takes new sessions");
    let (code, stderr) = finish(session, Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "the session was cut: {stderr}");
    assert_eq!(output.await.unwrap(), "done\n");
    assert!(
        stderr.contains("this node is shutting down; your session ends in 30s"),
        "{stderr}"
    );
    let OneBox { data, proc, .. } = b;
    let status = proc.exited_within(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        session_events(&data, command),
        (true, true),
        "the session's exec and session.end must reach the log before exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_grace_the_rest_end_with_a_reason_and_are_audited() {
    let b = one_box("  shutdown_grace: 1s\n").await;
    let command = "echo started; sleep 60";
    let (session, _) = started(&b, command).await;
    b.proc.terminate();
    let (code, stderr) = finish(session, Duration::from_secs(15)).await;
    assert_eq!(code, Some(255), "{stderr}");
    assert!(stderr.contains("your session ends in 1s"), "{stderr}");
    assert!(
        stderr.contains("shut down: its shutdown_grace of 1s passed"),
        "{stderr}"
    );
    let OneBox { data, proc, .. } = b;
    let status = proc.exited_within(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(session_events(&data, command), (true, true));
}

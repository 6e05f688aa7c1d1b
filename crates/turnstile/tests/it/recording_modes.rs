//! The recording pipeline as operators meet it in each mode: `node-sync`
//! streaming live with nothing on the node's disk, surviving an auth restart
//! and ending sessions when auth acknowledges nothing; crashes of the proxy;
//! file transfers recorded at the proxy; recordings that cannot be written
//! ending sessions (or warning, under `best_effort`); spool bounds; memory
//! that returns to idle after bulk sessions.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::cluster::{Cluster, PROXY_SERVICE, joining_yaml};
use crate::recording::{as_user, counting_session, play, wait_complete};
use crate::support::{
    ClusterSpec, Proc, TestCluster, audit_events, openssh, poll_until, run, spawn_turnstile,
    stderr_of, text,
};

/// Bytes of the files under `dir`.
fn tree_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => tree_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Files under `dir` whose name contains `needle`.
fn files_named(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(files_named(&path, needle));
            } else if e.file_name().to_string_lossy().contains(needle) {
                out.push(path);
            }
        }
    }
    out
}

/// Parts in a stored recording (its part headers' magic).
fn parts_in(rec: &[u8]) -> usize {
    rec.windows(8)
        .filter(|w| *w == turnstile_recording::part::MAGIC)
        .count()
}

/// `turnstile ssh` through the cluster's profile, as a child process.
fn spawn_ssh(home: &Path, args: &[&str]) -> tokio::process::Child {
    let mut all = vec!["ssh"];
    all.extend_from_slice(args);
    spawn_turnstile(&all, Some(home))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sync_streams_incompressible_output_without_touching_the_nodes_disk() {
    let c = Cluster::start_with("  session_recording: node-sync\n").await;
    c.add_alice().await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let node_data = c.dirs.path("web1");
    let before = tree_size(&node_data);

    let mut session = spawn_ssh(
        &c.home(),
        &[
            "web1",
            "--",
            "echo $TURNSTILE_SESSION_ID; head -c 67108864 /dev/urandom",
        ],
    );
    let mut stdout = session.stdout.take().unwrap();
    let reading = tokio::spawn(async move {
        let mut all = Vec::new();
        stdout.read_to_end(&mut all).await.unwrap();
        all
    });
    // While the session runs, nothing of it appears under the node's data dir.
    let mut largest = before;
    let exit = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break status;
        }
        let spool = node_data.join("spool");
        let spooled: Vec<_> = std::fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| e.path())
            .collect();
        assert!(spooled.is_empty(), "node-sync wrote {spooled:?}");
        largest = largest.max(tree_size(&node_data));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stdout = reading.await.unwrap();
    assert!(exit.success(), "{exit:?}");
    largest = largest.max(tree_size(&node_data));
    assert!(
        largest < before + (1 << 20),
        "the node's data dir grew by {} bytes during the session",
        largest - before
    );
    assert!(stdout.len() > 64 << 20, "{} bytes", stdout.len());
    let sid = text(&stdout[..36]);
    let identity = c.home().join("keys/prod/alice");
    wait_complete(&identity, &sid).await;
    let rec = std::fs::read(c.auth_data().join(format!("records/{sid}.rec"))).unwrap();
    assert!(parts_in(&rec) >= 3, "only {} parts", parts_in(&rec));
    let played = play(&identity, &sid, "text").await;
    assert!(
        played == stdout,
        "{} bytes played, {} printed",
        played.len(),
        stdout.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sync_sessions_go_on_through_an_auth_restart_and_lose_nothing() {
    let mut c = Cluster::start_with("  session_recording: node-sync\n").await;
    c.add_alice().await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut session = spawn_ssh(
        &c.home(),
        &[
            "web1",
            "--",
            "echo sid=$TURNSTILE_SESSION_ID; i=0; while [ $i -lt 160 ]; do echo line-$i; i=$((i+1)); sleep 0.03; done",
        ],
    );
    let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let sid = first.trim_start_matches("sid=").to_string();
    let mut shown = format!("{first}\n");
    while !shown.contains("line-30\n") {
        shown.push_str(&lines.next_line().await.unwrap().unwrap());
        shown.push('\n');
    }
    // Auth dies mid-session and comes back on the same address.
    c.auth.take().unwrap().kill9().await;
    c.auth = Some(Proc::start(&c.dirs.config("auth-again", &c.auth_again_yaml())).await);
    while let Some(line) = lines.next_line().await.unwrap() {
        shown.push_str(&line);
        shown.push('\n');
    }
    let status = session.wait().await.unwrap();
    let stderr = stderr_of(&mut session).await;
    assert!(status.success(), "the session went on: {stderr}");
    assert!(shown.contains("line-159\n"), "{shown}");
    let identity = c.home().join("keys/prod/alice");
    crate::recording::plays_back_whole(&identity, &sid, &shown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sync_ends_the_session_when_auth_acknowledges_nothing() {
    let mut c = Cluster::start_with("  session_recording: node-sync\n").await;
    c.restart_web1("  recording:\n    sync_ack_timeout: 3s\n")
        .await;
    c.add_alice().await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut session = spawn_ssh(
        &c.home(),
        &["web1", "--", "while true; do echo tick; sleep 0.1; done"],
    );
    let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("tick"));
    c.auth.take().unwrap().stop().await;
    let stopped = Instant::now();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let status = tokio::time::timeout(Duration::from_secs(30), session.wait())
        .await
        .expect("the session ends")
        .unwrap();
    let ended_after = stopped.elapsed();
    let stderr = stderr_of(&mut session).await;
    assert_eq!(status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains(
            "session ended: its recording cannot be written: auth has acknowledged nothing for 3s"
        ),
        "{stderr}"
    );
    assert!(
        ended_after >= Duration::from_secs(2) && ended_after < Duration::from_secs(15),
        "ended {ended_after:?} after auth stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_session_loses_no_output_older_than_a_second() {
    let mut c = Cluster::start_with("  session_recording: proxy\n").await;
    c.add_alice().await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (mut session, _lines, sid, last) = counting_session(&c, 60).await;
    c.proxy.crash().await;
    let _ = session.kill().await;
    // Back on the same address, the proxy ships what it spooled.
    let yaml = joining_yaml(
        &c.dirs.path("proxy"),
        &c.auth_addr,
        None,
        &c.pin,
        &PROXY_SERVICE.replace("127.0.0.1:0", &c.proxy_addr),
    );
    c.proxy = Proc::start(&c.dirs.config("proxy-again", &yaml)).await;
    let identity = c.home().join("keys/prod/alice");
    wait_complete(&identity, &sid).await;
    let played = text(&play(&identity, &sid, "text").await);
    // Lines come every 50 ms: twenty lines is one second.
    for i in 0..=(last - 20) {
        assert!(
            played.contains(&format!("line-{i}\n")),
            "line-{i} (of {last}) was lost:\n{played}"
        );
    }
}

/// Every recording of the cluster's user, complete, as JSON objects.
async fn recordings(id: &Path) -> Vec<serde_json::Value> {
    let out = as_user(id, &["recordings", "ls", "--format", "json"]).await;
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_and_scp_uploads_are_recorded_in_proxy_and_proxy_sync_modes() {
    for mode in ["proxy", "proxy-sync"] {
        let c = TestCluster::start_with(ClusterSpec {
            auth_extra: format!("  session_recording: {mode}\n"),
            ..Default::default()
        })
        .await;
        c.add_user("alice", "access", "root").await;
        let id = c.sign("alice").await;
        let cfg = format!("{}.ssh_config", id.display());
        let local = c.dir.path().join("upload.bin");
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(&local, &payload).unwrap();
        let remote = tempfile::tempdir().unwrap();
        let target = |name: &str| remote.path().join(name).display().to_string();

        let batch = c.dir.path().join("batch");
        std::fs::write(
            &batch,
            format!("put {} {}\n", local.display(), target("by-sftp")),
        )
        .unwrap();
        let sftp = run(
            "/usr/bin/sftp",
            &[
                "-F",
                &cfg,
                "-o",
                "BatchMode=yes",
                "-b",
                batch.to_str().unwrap(),
                "web1",
            ],
            None,
        )
        .await;
        assert!(
            sftp.status.success(),
            "{mode}: sftp: {}",
            text(&sftp.stderr)
        );
        // scp speaks SFTP by default; -O is the legacy protocol (an exec of `scp -t`).
        for (name, protocol) in [("by-scp", "-s"), ("by-scp-O", "-O")] {
            let scp = run(
                "/usr/bin/scp",
                &[
                    protocol,
                    "-F",
                    &cfg,
                    "-o",
                    "BatchMode=yes",
                    local.to_str().unwrap(),
                    &format!("web1:{}", target(name)),
                ],
                None,
            )
            .await;
            assert!(
                scp.status.success(),
                "{mode}: scp {protocol}: {}",
                text(&scp.stderr)
            );
        }
        for name in ["by-sftp", "by-scp", "by-scp-O"] {
            assert_eq!(
                std::fs::read(target(name)).unwrap(),
                payload,
                "{mode}: {name}"
            );
        }

        // Three sessions recorded: two sftp subsystems and one scp command,
        // each with the bytes it carried counted.
        let listed = poll_recordings(&id, 3).await;
        let (mut subsystems, mut commands) = (0, 0);
        for rec in &listed {
            let sid = rec["sid"].as_str().unwrap();
            wait_complete(&id, sid).await;
            let events: Vec<serde_json::Value> = text(&play(&id, sid, "json").await)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let start = &events[0];
            assert_eq!(start["event"], "session.start");
            let data = events
                .iter()
                .find(|e| e["event"] == "session.data")
                .unwrap_or_else(|| panic!("{mode}: no session.data in {events:?}"));
            assert!(
                data["rx"].as_u64().unwrap() >= payload.len() as u64,
                "{mode}: {data}"
            );
            if start["subsystem"] == "sftp" {
                subsystems += 1;
                assert!(
                    !events.iter().any(|e| e["event"] == "print"),
                    "{mode}: the sftp protocol is counted, not recorded as output"
                );
            } else if events.iter().any(|e| {
                e["event"] == "exec" && e["command"].as_str().unwrap().starts_with("scp -t")
            }) {
                commands += 1;
            }
        }
        assert_eq!((subsystems, commands), (2, 1), "{mode}: {listed:?}");
        // And audited, at the proxy, as they started.
        let started = audit_events(&c.data_dir(), Some("session.start")).await;
        assert_eq!(
            started.iter().filter(|e| e["subsystem"] == "sftp").count(),
            2,
            "{mode}: {started:?}"
        );
    }
}

async fn poll_recordings(id: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = recordings(id).await;
        if listed.len() >= n {
            return listed;
        }
        assert!(
            Instant::now() < deadline,
            "{n} recordings expected, got {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const LENIENT_ROLE: &str = "kind: role\nversion: v3\nmetadata:\n  name: lenient\nspec:\n  options:\n    record_session:\n      ssh: best_effort\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_whose_spool_cannot_be_created_ends_sessions_unless_best_effort() {
    let c = TestCluster::start_with(ClusterSpec {
        auth_extra: "  session_recording: proxy\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    c.create_role("lenient", LENIENT_ROLE).await;
    c.add_user("bob", "access,lenient", "root").await;
    let alice = c.sign("alice").await;
    let bob = c.sign("bob").await;
    // The spool's directory is gone, and a file stands where it was.
    let spool = c.data_dir().join("proxy-spool");
    std::fs::remove_dir_all(&spool).unwrap();
    std::fs::write(&spool, b"not a directory").unwrap();

    let out = c.ssh(&alice, &["web1", "--", "echo", "escaped"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("session ended: its recording cannot be written: spool "),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("escaped"));
    // OpenSSH users read the same.
    let cfg = format!("{}.ssh_config", alice.display());
    let out = run(
        openssh(),
        &["-F", &cfg, "-o", "BatchMode=yes", "web1", "echo escaped"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(255));
    assert!(!text(&out.stdout).contains("escaped"));
    assert!(
        text(&out.stderr).contains("its recording cannot be written"),
        "{}",
        text(&out.stderr)
    );

    let out = c.ssh(&bob, &["web1", "--", "echo", "allowed"]).await;
    assert_eq!(text(&out.stdout), "allowed\n", "{}", text(&out.stderr));
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("warning: this session is not recorded: spool "),
        "{}",
        text(&out.stderr)
    );
    let failed = audit_events(&c.data_dir(), Some("recording.failed")).await;
    let actions: Vec<(&str, &str)> = failed
        .iter()
        .map(|e| (e["user"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert!(actions.contains(&("alice", "session ended")), "{failed:?}");
    assert!(
        actions.contains(&("bob", "session continued unrecorded")),
        "{failed:?}"
    );
    assert!(
        failed
            .iter()
            .all(|e| e["code"].as_str().unwrap().starts_with("T2010"))
    );
    // Listed as failed, with why; there is nothing to play of alice's.
    let listed = crate::recording::as_user(&alice, &["recordings", "ls", "--format", "json"]).await;
    let entry: serde_json::Value = text(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|v: &serde_json::Value| v["user"] == "alice")
        .expect("the refused session is listed");
    assert_eq!(entry["status"], "failed", "{entry}");
    assert!(
        entry["failure"].as_str().unwrap().starts_with("spool "),
        "{entry}"
    );
    let out = crate::recording::as_user(&alice, &["play", entry["sid"].as_str().unwrap()]).await;
    assert!(
        text(&out.stderr).contains("was not recorded: spool "),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_at_its_size_bound_refuses_new_sessions() {
    let c = TestCluster::start_with(ClusterSpec {
        global_extra: "  recording:\n    spool_max_size: 1MiB\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    // A session holds 2 MiB in the spool while it runs.
    let mut holder = spawn_turnstile(
        &[
            "ssh",
            "-i",
            id.to_str().unwrap(),
            "web1",
            "--",
            "head -c 1572864 /dev/urandom | base64; echo held; cat",
        ],
        None,
    );
    let _stdin = holder.stdin.take().unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    while lines.next_line().await.unwrap().as_deref() != Some("held") {}
    let spool = c.data_dir().join("spool");
    poll_until(Duration::from_secs(10), || async {
        tree_size(&spool) >= 1 << 20
    })
    .await
    .expect("the spool holds the session");

    let out = c.ssh(&id, &["web1", "--", "echo", "refused"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(!text(&out.stdout).contains("refused"));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("its recording cannot be written: the recording spool is full")
            && stderr.contains("spool_max_size is 1MiB"),
        "{stderr}"
    );
}

/// A tmpfs of `size` mounted at `dir` for a test; unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount (util-linux) runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root; run scripts/test.sh as root"
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_ends_a_running_session_and_the_free_space_floor_refuses_new_ones() {
    let mount = std::sync::Arc::new(std::sync::Mutex::new(None));
    let slot = mount.clone();
    let c = TestCluster::start_with(ClusterSpec {
        // No floor, so the disk really fills; the smallest memory buffer, so
        // that the session cannot run to its end in memory before the spool
        // writer meets the full disk (as it could on a loaded machine).
        global_extra: "  recording:\n    spool_min_free: 0\n    buffer_per_session: 1MiB\n    buffer_per_process: 1MiB\n".into(),
        prepare: Some(Box::new(move |data: &Path| {
            *slot.lock().unwrap() = Some(Mount::tmpfs(&data.join("spool"), "512k"));
        })),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let out = c
        .ssh(
            &id,
            &[
                "web1",
                "--",
                "head -c 40000000 /dev/urandom | base64; echo done",
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(255));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("session ended: its recording cannot be written:")
            && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(
        // A line of its own: base64 of random bytes holds "done" in one
        // run in ten.
        !text(&out.stdout).lines().any(|line| line == "done"),
        "the session did not run to its end"
    );
    // At most what the memory buffer (1 MiB) and the spool (512 KiB) held.
    assert!(
        out.stdout.len() < 2 << 20,
        "{} bytes of 8 MB reached the user past a full spool",
        out.stdout.len()
    );
    drop(c);

    // With the default floor (1 GiB free), such a disk refuses sessions at once.
    let slot = mount.clone();
    let c = TestCluster::start_with(ClusterSpec {
        prepare: Some(Box::new(move |data: &Path| {
            *slot.lock().unwrap() = Some(Mount::tmpfs(&data.join("spool"), "512k"));
        })),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let out = c.ssh(&id, &["web1", "--", "echo", "refused"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("free, below spool_min_free (1GiB)"),
        "{}",
        text(&out.stderr)
    );
    drop(c);
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_near_idle_after_bulk_sessions() {
    let c = Cluster::start().await;
    c.add_alice().await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let identity = c.home().join("keys/prod/alice");
    // Warm: one small recorded session.
    let out = c.ssh(&["web1", "--", "echo $TURNSTILE_SESSION_ID"]).await;
    wait_complete(&identity, text(&out.stdout).trim()).await;
    let procs = [
        ("auth", c.auth.as_ref().unwrap()),
        ("proxy", &c.proxy),
        ("web1", c.web1.as_ref().unwrap()),
    ];
    let idle: Vec<u64> = procs.iter().map(|(_, p)| p.rss()).collect();
    for _ in 0..3 {
        let mut session = spawn_ssh(
            &c.home(),
            &[
                "web1",
                "--",
                "echo $TURNSTILE_SESSION_ID; head -c 150000000 /dev/urandom | base64",
            ],
        );
        let mut lines = BufReader::new(session.stdout.take().unwrap());
        let mut sid = String::new();
        lines.read_line(&mut sid).await.unwrap();
        tokio::io::copy(&mut lines, &mut tokio::io::sink())
            .await
            .unwrap();
        assert!(session.wait().await.unwrap().success());
        wait_complete(&identity, sid.trim()).await;
    }
    let bound = 64 << 20;
    let settled = poll_until(Duration::from_secs(30), || async {
        procs
            .iter()
            .zip(&idle)
            .all(|((_, p), idle)| p.rss() <= idle + bound)
    })
    .await;
    let report: Vec<String> = procs
        .iter()
        .zip(&idle)
        .map(|((name, p), idle)| {
            format!("{name}: idle {} MiB, now {} MiB", idle >> 20, p.rss() >> 20)
        })
        .collect();
    eprintln!("RSS after three 200 MB sessions: {report:?}");
    assert!(
        settled.is_ok(),
        "RSS did not return within 64 MiB of idle: {report:?}"
    );
    // The spool emptied too.
    assert!(files_named(&c.dirs.path("web1").join("spool"), ".events").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_sync_modes_a_killed_recorder_loses_no_output_older_than_a_second() {
    for mode in ["node-sync", "proxy-sync"] {
        let mut c = Cluster::start_with(&format!(
            "  session_recording: {mode}\n  upload_grace_period: 2s\n"
        ))
        .await;
        c.add_alice().await;
        let out = c.login("correct horse battery").await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (mut session, _lines, sid, last) = counting_session(&c, 60).await;
        // The recorder dies; nothing of the session was on its disk, and it
        // does not come back: auth has what it acknowledged.
        if mode == "node-sync" {
            c.web1.take().unwrap().kill9().await;
        } else {
            c.proxy.crash().await;
            // Back (empty-handed) so the user can list and play.
            let yaml = joining_yaml(
                &c.dirs.path("proxy"),
                &c.auth_addr,
                None,
                &c.pin,
                &PROXY_SERVICE.replace("127.0.0.1:0", &c.proxy_addr),
            );
            c.proxy = Proc::start(&c.dirs.config("proxy-again", &yaml)).await;
        }
        let _ = session.kill().await;
        let identity = c.home().join("keys/prod/alice");
        wait_complete(&identity, &sid).await;
        let played = text(&play(&identity, &sid, "text").await);
        for i in 0..=(last - 20) {
            assert!(
                played.contains(&format!("line-{i}\n")),
                "{mode}: line-{i} (of {last}) was lost:\n{played}"
            );
        }
    }
}

/// `GET PATH` on `addr`; the status line and the body.
async fn http_get(addr: &str, path: &str) -> (String, String) {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The value of one sample in a Prometheus text exposition.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_a_live_session_and_its_bytes_growing() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::support::one_process_config(dir.path(), "web1");
    let yaml = std::fs::read_to_string(&config).unwrap().replace(
        "turnstile:\n",
        "turnstile:\n  metrics_listen_addr: 127.0.0.1:0\n",
    );
    std::fs::write(&config, yaml).unwrap();
    let p = Proc::start(&config).await;
    let url = p.field("metrics");
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let data = dir.path().join("data");
    crate::cluster::admin(
        &data,
        &[
            "users", "add", "alice", "--roles", "access", "--logins", "root",
        ],
    )
    .await;
    let id = dir.path().join("alice");
    crate::cluster::admin(
        &data,
        &["sign", "--user", "alice", "--out", id.to_str().unwrap()],
    )
    .await;
    let mut session = spawn_turnstile(
        &[
            "ssh",
            "-i",
            id.to_str().unwrap(),
            "web1",
            "--",
            "while true; do echo tick-tock; sleep 0.05; done",
        ],
        None,
    );
    let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next_line().await.unwrap().as_deref(),
        Some("tick-tock")
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let live = r#"turnstile_sessions_live{mode="node"}"#;
    let (status, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(sample(&body, live), 1.0, "{body}");
    let before = sample(&body, "turnstile_recorded_bytes_total");
    poll_until(Duration::from_secs(20), || async {
        sample(
            &http_get(&addr, "/metrics").await.1,
            "turnstile_recorded_bytes_total",
        ) > before
    })
    .await
    .expect("recorded bytes grow while the session prints");
    let (_, body) = http_get(&addr, "/metrics").await;
    assert_eq!(
        sample(&body, "turnstile_recording_streams_open"),
        1.0,
        "{body}"
    );
    let _ = session.kill().await;
    poll_until(Duration::from_secs(20), || async {
        sample(&http_get(&addr, "/metrics").await.1, live) == 0.0
    })
    .await
    .expect("the session is gone from the gauge when it ends");
    assert_eq!(http_get(&addr, "/").await.0, "HTTP/1.1 404 Not Found");
    p.stop().await;
}

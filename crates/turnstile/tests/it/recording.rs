//! Session recording as users and auditors meet it: sessions recorded by the
//! node and played back byte for byte, resizes in the events, `off` mode,
//! crashes of the node mid-session, a corrupt spool, a 100 MiB session,
//! asciicast export checked with asciinema, and who may read what.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::cluster::{Cluster, admin, joining_yaml, node_service};
use crate::support::{
    BIN, Proc, TestCluster, audit_events, poll_until, run, spawn_turnstile, text,
};

fn id_arg(id: &Path) -> String {
    id.to_str().unwrap().to_string()
}

/// `turnstile ARGS -i IDENTITY` through the real binary.
pub(crate) async fn as_user(id: &Path, args: &[&str]) -> std::process::Output {
    let id = id_arg(id);
    // The identity goes right after the subcommand: after `ssh NODE` it would
    // be part of the remote command.
    let at = if args[0] == "recordings" { 2 } else { 1 };
    let mut all: Vec<&str> = args[..at].to_vec();
    all.extend(["-i", id.as_str()]);
    all.extend_from_slice(&args[at..]);
    run(BIN, &all, None).await
}

/// Waits until the session's recording is complete.
pub(crate) async fn wait_complete(id: &Path, sid: &str) {
    poll_until(Duration::from_secs(60), || async {
        let out = as_user(id, &["recordings", "ls", "--format", "json"]).await;
        text(&out.stdout).lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["sid"] == sid && v["status"] == "complete"
        })
    })
    .await
    .unwrap_or_else(|_| panic!("the recording of {sid} never completed"));
}

/// Waits for the recording of `sid`, then checks it plays back as `shown`
/// byte for byte, its `ei` run 0.. without a gap, and it ends with
/// `session.end`: nothing lost, nothing twice.
pub(crate) async fn plays_back_whole(id: &Path, sid: &str, shown: &str) {
    wait_complete(id, sid).await;
    let played = text(&play(id, sid, "text").await);
    assert_eq!(played, shown, "played back byte for byte, nothing twice");
    let events: Vec<serde_json::Value> = text(&play(id, sid, "json").await)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        events.iter().enumerate().all(|(i, e)| e["ei"] == i),
        "ei runs 0.. without a gap"
    );
    assert_eq!(events.last().unwrap()["event"], "session.end");
}

pub(crate) async fn play(id: &Path, sid: &str, format: &str) -> Vec<u8> {
    let out = as_user(id, &["play", sid, "--format", format]).await;
    assert!(out.status.success(), "play: {}", text(&out.stderr));
    out.stdout
}

/// Runs `command` on web1 and returns (sid, everything it printed, the sid
/// line first).
pub(crate) async fn recorded_exec(c: &TestCluster, id: &Path, command: &str) -> (String, Vec<u8>) {
    let script = format!("echo $TURNSTILE_SESSION_ID; {command}");
    let out = c.ssh(id, &["web1", "--", &script]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sid = text(&out.stdout[..37.min(out.stdout.len())])
        .trim()
        .to_string();
    (sid, out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_session_plays_back_byte_for_byte() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let (sid, stdout) = recorded_exec(&c, &id, "seq 1 20000; printf 'bin\\001\\377ary'").await;
    wait_complete(&id, &sid).await;
    let played = play(&id, &sid, "text").await;
    assert!(
        played == stdout,
        "{} bytes played, {} printed",
        played.len(),
        stdout.len()
    );
    let events: Vec<serde_json::Value> = text(&play(&id, &sid, "json").await)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"session.start"));
    assert!(
        kinds.ends_with(&["exec", "session.data", "session.end"]),
        "{kinds:?}"
    );
    assert!(events.iter().enumerate().all(|(i, e)| e["ei"] == i));
    // Non-print events went to the audit log too.
    let logged = audit_events(&c.data_dir(), None).await;
    for event in ["session.start", "exec", "session.end", "session.upload"] {
        assert!(
            logged
                .iter()
                .any(|v| v["event"] == event && v["sid"] == sid.as_str()),
            "no {event} for {sid} in the audit log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_session_with_a_resize_plays_back() {
    let login = crate::support::test_login();
    let c = TestCluster::start().await;
    c.add_user("alice", "access", login).await;
    let id = c.sign("alice").await;
    let (pty, pts) = pty_process::open().unwrap();
    pty.resize(pty_process::Size::new(24, 80)).unwrap();
    let mut child = pty_process::Command::new(BIN)
        .args(["ssh", "-i", &id_arg(&id), &format!("{login}@web1")])
        .env("TERM", "xterm")
        .kill_on_drop(true)
        .spawn(pts)
        .unwrap();
    let (mut reader, mut writer) = pty.into_split();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let collector = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let wait_for = |needle: &'static str| {
        let seen = seen.clone();
        async move {
            poll_until(Duration::from_secs(20), || async {
                String::from_utf8_lossy(&seen.lock().unwrap()).contains(needle)
            })
            .await
            .unwrap_or_else(|_| panic!("never saw {needle}"));
        }
    };
    writer
        .write_all(b"echo sid=$TURNSTILE_SESSION_ID; echo marker-$((40+2))\r")
        .await
        .unwrap();
    wait_for("marker-42").await;
    writer.resize(pty_process::Size::new(40, 100)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        writer.write_all(b"stty size\r").await.unwrap();
        if poll_until(Duration::from_secs(2), || async {
            String::from_utf8_lossy(&seen.lock().unwrap()).contains("40 100")
        })
        .await
        .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the resize never arrived");
    }
    writer.write_all(b"exit\r").await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), collector).await;
    let screen = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let sid = screen
        .split("sid=")
        .nth(2)
        .or_else(|| screen.split("sid=").nth(1))
        .map(|s| s.chars().take(36).collect::<String>())
        .unwrap();
    let sid = screen
        .split("sid=")
        .filter_map(|s| uuid::Uuid::parse_str(&s.chars().take(36).collect::<String>()).ok())
        .map(|u| u.to_string())
        .next()
        .unwrap_or(sid);
    wait_complete(&id, &sid).await;
    let played = play(&id, &sid, "text").await;
    let played_text = String::from_utf8_lossy(&played);
    assert!(played_text.contains("marker-42"), "{played_text}");
    assert!(played_text.contains("40 100"), "{played_text}");
    // The terminal (raw mode: no output processing) saw exactly what was
    // recorded, after its own echo of what was typed before raw mode began.
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.ends_with(&played),
        "{} bytes played, {} seen",
        played.len(),
        seen.len()
    );
    let json = text(&play(&id, &sid, "json").await);
    assert!(
        json.lines()
            .any(|l| l.contains("\"event\":\"resize\"") && l.contains("\"size\":\"100:40\"")),
        "{json}"
    );
    assert!(
        json.contains("\"size\":\"80:24\""),
        "session.start has the first size"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_mode_records_no_output_but_audits_start_and_end() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let out = c
        .admin(&["config", "set", "session_recording", "off"])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let refused = c
        .admin(&["config", "set", "session_recording", "sometimes"])
        .await;
    assert!(
        text(&refused.stderr).contains("session_recording"),
        "{}",
        text(&refused.stderr)
    );
    // Recorders read the mode when a session starts, cached for a few seconds.
    let data = c.data_dir();
    let mut unrecorded = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while unrecorded.is_none() {
        assert!(Instant::now() < deadline, "off mode never took effect");
        let (sid, _) = recorded_exec(&c, &id, "printf '%s-%s' secret output").await;
        poll_until(Duration::from_secs(10), || async {
            audit_events(&data, Some("session.end"))
                .await
                .iter()
                .any(|e| e["sid"] == sid.as_str())
        })
        .await
        .expect("session.end is audited in every mode");
        let listed = as_user(&id, &["recordings", "ls", "--format", "json"]).await;
        if !text(&listed.stdout).contains(&sid) {
            unrecorded = Some(sid);
        }
    }
    let sid = unrecorded.unwrap();
    let log = audit_events(&data, None).await;
    assert!(
        log.iter()
            .any(|e| e["sid"] == sid.as_str() && e["event"] == "session.start")
    );
    assert!(!log.iter().any(|e| e.to_string().contains("secret-output")));
    let spool_files = std::fs::read_dir(data.join("spool")).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(&sid)
    });
    assert_eq!(spool_files.count(), 0);
}

pub(crate) type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// A session on web1 printing `line-N` every 50 ms, read until line `until`.
/// Returns the client, its output (kept open), the sid and the last line read.
pub(crate) async fn counting_session(
    c: &Cluster,
    until: u64,
) -> (tokio::process::Child, Lines, String, u64) {
    let mut session = spawn_turnstile(
        &[
            "ssh",
            "web1",
            "--",
            "echo sid=$TURNSTILE_SESSION_ID; i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.05; done",
        ],
        Some(&c.home()),
    );
    let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
    let mut next = async || match lines.next_line().await.unwrap() {
        Some(line) => line,
        None => panic!(
            "the session ended early: {}",
            crate::support::stderr_of(&mut session).await
        ),
    };
    let sid = next().await.trim_start_matches("sid=").to_string();
    let mut last = 0;
    while last < until {
        last = next().await.trim_start_matches("line-").parse().unwrap();
    }
    (session, lines, sid, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_session_loses_no_output_older_than_a_second() {
    let mut c = Cluster::start().await;
    c.add_alice().await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // About three seconds of output, then the node dies.
    let (mut session, _lines, sid, last) = counting_session(&c, 60).await;
    c.web1.take().unwrap().kill9().await;
    let _ = session.kill().await;
    // Restarted, the node ships what it spooled.
    let config = c.dirs.config(
        "web1-restarted",
        &joining_yaml(
            &c.dirs.path("web1"),
            &c.auth_addr,
            None,
            &c.pin,
            &node_service("web1", "dev"),
        ),
    );
    c.web1 = Some(Proc::start(&config).await);
    let identity = c.home().join("keys/prod/alice");
    wait_complete(&identity, &sid).await;
    let played = text(&play(&identity, &sid, "text").await);
    // Lines come every 50 ms: twenty lines is one second.
    let older = last - 20;
    for i in 0..=older {
        assert!(
            played.contains(&format!("line-{i}\n")),
            "line-{i} (of {last}) was lost:\n{played}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_spool_file_is_quarantined_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spool = data.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let sid = uuid::Uuid::new_v4().to_string();
    std::fs::write(
        spool.join(format!("{sid}.events")),
        b"\xff\xff\xff\xff this is not a recording",
    )
    .unwrap();
    let config = crate::support::one_process_config(dir.path(), "web1");
    let p = Proc::start(&config).await;
    poll_until(Duration::from_secs(20), || async {
        spool.join(format!("corrupt/{sid}.error")).exists()
    })
    .await
    .expect("the file is moved aside with a note");
    assert!(spool.join(format!("corrupt/{sid}.events")).exists());
    assert!(!spool.join(format!("{sid}.events")).exists());
    let note = std::fs::read_to_string(spool.join(format!("corrupt/{sid}.error"))).unwrap();
    assert!(note.contains("damaged at byte 0"), "{note}");
    // Logged once, and the node still records new sessions.
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
    let out = as_user(&id, &["ssh", "web1", "echo", "fine"]).await;
    assert_eq!(text(&out.stdout), "fine\n");
    assert_eq!(
        p.stderr().matches("moved aside").count(),
        1,
        "{}",
        p.stderr()
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_mib_session_is_stored_in_parts_and_plays_back_identically() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let (sid, stdout) = recorded_exec(&c, &id, "head -c 78643200 /dev/urandom | base64").await;
    assert!(stdout.len() > 100 << 20, "{} bytes", stdout.len());
    wait_complete(&id, &sid).await;
    let rec = std::fs::read(c.data_dir().join(format!("records/{sid}.rec"))).unwrap();
    let parts = rec
        .windows(8)
        .filter(|w| *w == turnstile_recording::part::MAGIC)
        .count();
    assert!(parts > 10, "only {parts} parts");
    let played = play(&id, &sid, "text").await;
    assert!(
        played == stdout,
        "{} bytes played, {} shown",
        played.len(),
        stdout.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_their_own_sessions_and_auditors_see_all() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    c.add_user("bob", "access", "root").await;
    c.create_role(
        "auditor",
        "kind: role\nversion: v3\nmetadata:\n  name: auditor\nspec:\n  allow:\n    rules:\n    - resources: [session]\n      verbs: [list, read]\n",
    )
    .await;
    c.add_user("carol", "access,auditor", "root").await;
    let alice = c.sign("alice").await;
    let bob = c.sign("bob").await;
    let carol = c.sign("carol").await;
    let (sid, _) = recorded_exec(&c, &alice, "echo alice-secret").await;
    wait_complete(&alice, &sid).await;

    let listed = as_user(&bob, &["recordings", "ls", "--format", "json"]).await;
    assert!(!text(&listed.stdout).contains(&sid));
    let out = as_user(&bob, &["play", &sid, "--format", "text"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("belongs to user \"alice\""),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("alice-secret"));

    let listed = as_user(
        &carol,
        &["recordings", "ls", "--user", "alice", "--format", "json"],
    )
    .await;
    assert!(text(&listed.stdout).contains(&sid));
    assert!(text(&play(&carol, &sid, "text").await).contains("alice-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_not_yet_uploaded_says_so_and_exports_check_with_asciinema() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let mut running = spawn_turnstile(
        &[
            "ssh",
            "-i",
            &id_arg(&id),
            "web1",
            "--",
            "echo sid=$TURNSTILE_SESSION_ID; echo cast-marker; cat",
        ],
        None,
    );
    let stdin = running.stdin.take().unwrap();
    let mut lines = BufReader::new(running.stdout.take().unwrap()).lines();
    let sid = lines
        .next_line()
        .await
        .unwrap()
        .unwrap()
        .trim_start_matches("sid=")
        .to_string();
    poll_until(Duration::from_secs(20), || async {
        text(
            &as_user(&id, &["recordings", "ls", "--format", "json"])
                .await
                .stdout,
        )
        .contains(&sid)
    })
    .await
    .expect("the session is listed while it runs");
    let listed = text(
        &as_user(&id, &["recordings", "ls", "--format", "json"])
            .await
            .stdout,
    );
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&sid) && l.contains("\"status\":\"live\"")),
        "{listed}"
    );
    let out = as_user(&id, &["play", &sid, "--format", "text"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("not uploaded yet"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("part(s) stored"),
        "{}",
        text(&out.stderr)
    );
    drop(stdin);
    running.wait().await.unwrap();
    wait_complete(&id, &sid).await;

    let cast = c.dir.path().join("session.cast");
    let out = as_user(
        &id,
        &[
            "recordings",
            "export",
            &sid,
            "--format",
            "asciicast",
            "-o",
            cast.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let header: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&cast)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["version"], 2);
    // asciinema cat wants a terminal.
    let asciinema = "/usr/bin/asciinema";
    assert!(
        Path::new(asciinema).exists(),
        "asciinema is missing; run scripts/test.sh, which installs it"
    );
    let (pty, pts) = pty_process::open().unwrap();
    let mut cat = pty_process::Command::new(asciinema)
        .args(["cat", cast.to_str().unwrap()])
        .kill_on_drop(true)
        .spawn(pts)
        .unwrap();
    let mut shown = Vec::new();
    let mut reader = pty;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf).await {
            if n == 0 {
                break;
            }
            shown.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let status = tokio::time::timeout(Duration::from_secs(10), cat.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "asciinema cat: {}",
        String::from_utf8_lossy(&shown)
    );
    assert!(String::from_utf8_lossy(&shown).contains("cast-marker"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_records_at_the_proxy_and_nodes_refuse_direct_sessions() {
    use russh::ChannelMsg;
    let c = TestCluster::start_with(crate::support::ClusterSpec {
        auth_extra: "  session_recording: proxy\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;

    // An interactive session with a resize, through the proxy.
    let identity = turnstile::identity_file::read(&id).unwrap();
    let conn = turnstile_ssh::client::connect_via_proxy(
        &c.proxy_addr,
        "web1",
        "root",
        &identity.credentials,
        &identity.trust,
    )
    .await
    .unwrap();
    let mut ch = conn.handle.channel_open_session().await.unwrap();
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    ch.request_shell(true).await.unwrap();
    ch.data(&b"echo sid=$TURNSTILE_SESSION_ID; echo marker-$((1+1))\n"[..])
        .await
        .unwrap();
    let mut seen = String::new();
    let mut resized = false;
    let mut exited = false;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(30), ch.wait())
        .await
        .expect("the session answers")
    {
        match msg {
            ChannelMsg::Data { data } => {
                seen.push_str(&String::from_utf8_lossy(&data));
                if seen.contains("marker-2") && !resized {
                    resized = true;
                    ch.window_change(100, 40, 0, 0).await.unwrap();
                    ch.data(&b"stty size; exit\n"[..]).await.unwrap();
                }
            }
            ChannelMsg::ExitStatus { .. } => exited = true,
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    assert!(exited, "{seen}");
    let sid = seen
        .split("sid=")
        .filter_map(|s| uuid::Uuid::parse_str(&s.chars().take(36).collect::<String>()).ok())
        .next()
        .expect("TURNSTILE_SESSION_ID is the recorded sid")
        .to_string();
    wait_complete(&id, &sid).await;
    let played = text(&play(&id, &sid, "text").await);
    assert!(
        played.contains("marker-2") && played.contains("40 100"),
        "{played}"
    );
    let json = text(&play(&id, &sid, "json").await);
    assert!(
        json.lines()
            .any(|l| l.contains("\"event\":\"resize\"") && l.contains("100:40")),
        "{json}"
    );

    // The OpenSSH client through the proxy is recorded the same way.
    let cfg = format!("{}.ssh_config", id.display());
    let out = run(
        crate::support::openssh(),
        &[
            "-F",
            &cfg,
            "-o",
            "BatchMode=yes",
            "web1",
            "echo openssh-recorded",
        ],
        None,
    )
    .await;
    assert_eq!(
        text(&out.stdout),
        "openssh-recorded\n",
        "{}",
        text(&out.stderr)
    );

    // Straight to the node, nothing would be recorded: refused.
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    let out = run(
        crate::support::openssh(),
        &[
            "-F",
            &cfg,
            "-o",
            "BatchMode=yes",
            "-p",
            port,
            host,
            "echo escaped",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("sessions are recorded by the proxy"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());

    // One recorder per session: the node audits no session.start of its own.
    let started = audit_events(&c.data_dir(), Some("session.start")).await;
    assert_eq!(
        started.iter().filter(|e| e["sid"] == sid.as_str()).count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_the_completer_gave_up_continues_the_recording() {
    let mut c = Cluster::start_with("  upload_grace_period: 2s\n").await;
    c.add_alice().await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (mut session, _lines, sid, last) = counting_session(&c, 40).await;
    c.web1.take().unwrap().kill9().await;
    let _ = session.kill().await;
    // Auth completes the abandoned upload with what it has...
    let identity = c.home().join("keys/prod/alice");
    wait_complete(&identity, &sid).await;
    // ...and the node, back later, appends what its spool still held.
    let config = c.dirs.config(
        "web1-back",
        &joining_yaml(
            &c.dirs.path("web1"),
            &c.auth_addr,
            None,
            &c.pin,
            &node_service("web1", "dev"),
        ),
    );
    c.web1 = Some(Proc::start(&config).await);
    let spool = c.dirs.path("web1").join("spool");
    poll_until(Duration::from_secs(30), || async {
        !std::fs::read_dir(&spool)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(&sid))
    })
    .await
    .expect("the node ships its spool and deletes it");
    wait_complete(&identity, &sid).await;
    let played = text(&play(&identity, &sid, "text").await);
    for i in 0..=(last - 20) {
        assert!(
            played.contains(&format!("line-{i}\n")),
            "line-{i} (of {last}) was lost"
        );
    }
    // Each line once: the continuation repeats nothing.
    assert_eq!(played.matches("line-1\n").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_resizes_cost_no_other_users_events_and_the_last_size_is_kept() {
    use russh::ChannelMsg;
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    c.add_user("bob", "access", "root").await;
    let alice = c.sign("alice").await;
    let bob = c.sign("bob").await;
    let identity = turnstile::identity_file::read(&alice).unwrap();
    let conn = turnstile_ssh::client::connect_via_proxy(
        &c.proxy_addr,
        "web1",
        "root",
        &identity.credentials,
        &identity.trust,
    )
    .await
    .unwrap();
    let ch = conn.handle.channel_open_session().await.unwrap();
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    ch.request_shell(true).await.unwrap();
    // Read all along: a client that stops reading stops its connection.
    let (mut rd, wr) = ch.split();
    let reader = tokio::spawn(async move {
        let mut seen = String::new();
        while let Some(msg) = tokio::time::timeout(Duration::from_secs(120), rd.wait())
            .await
            .expect("the session answers")
        {
            match msg {
                ChannelMsg::Data { data } => seen.push_str(&String::from_utf8_lossy(&data)),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        seen
    });
    for i in 0..100_000u32 {
        wr.window_change(80 + i % 100, 24 + i % 50, 0, 0)
            .await
            .unwrap();
    }
    wr.window_change(123, 45, 0, 0).await.unwrap();
    // Bob works while alice floods.
    let (bob_sid, _) = recorded_exec(&c, &bob, "echo bob-was-here").await;
    wr.data(&b"echo sid=$TURNSTILE_SESSION_ID; stty size; exit\n"[..])
        .await
        .unwrap();
    let seen = reader.await.unwrap();
    assert!(
        seen.contains("45 123"),
        "the shell has the last size: {seen}"
    );
    let sid = seen
        .split("sid=")
        .filter_map(|s| uuid::Uuid::parse_str(&s.chars().take(36).collect::<String>()).ok())
        .next()
        .expect("the sid")
        .to_string();
    let data = c.data_dir();
    poll_until(Duration::from_secs(30), || async {
        let ends = audit_events(&data, Some("session.end")).await;
        [&sid, &bob_sid]
            .iter()
            .all(|s| ends.iter().any(|e| e["sid"] == **s))
    })
    .await
    .expect("both sessions' ends reach the audit log");
    let bob_exec = audit_events(&data, Some("exec")).await;
    assert!(
        bob_exec.iter().any(|e| e["sid"] == bob_sid.as_str()),
        "bob's exec is in the log"
    );
    let resizes = audit_events(&data, Some("resize")).await;
    let alice_resizes = resizes.iter().filter(|e| e["sid"] == sid.as_str()).count();
    assert!(
        alice_resizes < 1_000,
        "{alice_resizes} resize events for 100,000 window changes"
    );
    wait_complete(&alice, &sid).await;
    let json = text(&play(&alice, &sid, "json").await);
    let last = json
        .lines()
        .rfind(|l| l.contains("\"event\":\"resize\""))
        .expect("a resize is recorded");
    assert!(
        last.contains("123:45"),
        "the recording ends with the last size: {last}"
    );
}

//! Port and agent forwarding, X11, environment and file transfers, with the
//! real OpenSSH client (and a real `ssh-agent`), through the proxy and
//! straight to the node: allowed or refused by the roles, and audited.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::{
    ClusterSpec, TEST_LOGIN, TestCluster, audit_events, echo_server, free_port, openssh,
    poll_until, run, text,
};

const BOUND: Duration = Duration::from_secs(15);

fn ssh_args<'a>(config: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-F",
        config,
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
    ];
    args.extend_from_slice(rest);
    args
}

/// Sends a line through `stream` and reads it back.
async fn echoes(stream: &mut tokio::net::TcpStream) -> bool {
    if stream.write_all(b"ping\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"ping\n"
}

/// The `event` events of `user`, once at least `n` of them are logged (or
/// what there is after the bound).
async fn port_events(c: &TestCluster, event: &str, user: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let found: Vec<serde_json::Value> = audit_events(&c.data_dir(), Some(event))
            .await
            .into_iter()
            .filter(|e| e["user"] == user)
            .collect();
        if found.len() >= n || std::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const NO_PORTS: &str = "kind: role\nversion: v3\nmetadata:\n  name: noports\nspec:\n  options:\n    port_forwarding: false\n  allow:\n    logins: [root]\n";

/// A user whose only role forbids port forwarding, and one whose roles
/// allow it (a role leaving it unset allows it, whatever another says).
async fn users(c: &TestCluster) -> (String, String) {
    c.create_role("noports", NO_PORTS).await;
    c.admin_ok(&[
        "users",
        "add",
        "alice",
        "--roles",
        "access,noports",
        "--logins",
        "root",
    ])
    .await;
    c.admin_ok(&[
        "users", "add", "bob", "--roles", "noports", "--logins", "root",
    ])
    .await;
    let alice = c.sign("alice").await;
    let bob = c.sign("bob").await;
    (
        format!("{}.ssh_config", alice.display()),
        format!("{}.ssh_config", bob.display()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_forwards_follow_the_roles_through_the_proxy_and_straight_to_the_node() {
    let c = TestCluster::start().await;
    let (alice, bob) = users(&c).await;
    let echo = echo_server().await;
    let target = format!("127.0.0.1:{echo}");
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    let direct = format!("root@{host}");
    // `-W` through the proxy and straight to the node.
    for (how, extra) in [
        ("through the proxy", vec!["web1"]),
        ("straight to the node", vec!["-p", port, direct.as_str()]),
    ] {
        let mut args = ssh_args(&alice, &["-W", &target]);
        args.extend(&extra);
        let out = run(openssh(), &args, Some(b"ping\n")).await;
        assert_eq!(text(&out.stdout), "ping\n", "{how}: {}", text(&out.stderr));
        let mut args = ssh_args(&bob, &["-W", &target]);
        args.extend(&extra);
        let out = run(openssh(), &args, Some(b"ping\n")).await;
        assert_eq!(text(&out.stdout), "", "{how}");
        assert!(
            text(&out.stderr).contains("port forwarding is not allowed for user \"bob\""),
            "{how}: {}",
            text(&out.stderr)
        );
    }

    // `-L` and `-D` (a SOCKS5 request by hand).
    let (l_port, d_port) = (free_port(), free_port());
    let l_spec = format!("127.0.0.1:{l_port}:{target}");
    let d_spec = format!("127.0.0.1:{d_port}");
    let mut ssh = tokio::process::Command::new(openssh())
        .args(ssh_args(
            &alice,
            &["-N", "-L", &l_spec, "-D", &d_spec, "web1"],
        ))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    poll_until(BOUND, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", l_port))
            .await
            .is_ok()
    })
    .await
    .expect("the -L forward never came up");
    let mut local = tokio::net::TcpStream::connect(("127.0.0.1", l_port))
        .await
        .unwrap();
    assert!(echoes(&mut local).await, "-L does not echo");
    let mut socks = tokio::net::TcpStream::connect(("127.0.0.1", d_port))
        .await
        .unwrap();
    socks.write_all(&[5, 1, 0]).await.unwrap();
    let mut hello = [0u8; 2];
    socks.read_exact(&mut hello).await.unwrap();
    assert_eq!(hello, [5, 0]);
    let mut connect = vec![5, 1, 0, 1, 127, 0, 0, 1];
    connect.extend_from_slice(&echo.to_be_bytes());
    socks.write_all(&connect).await.unwrap();
    let mut answer = [0u8; 10];
    socks.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[1], 0, "the SOCKS connect failed: {answer:?}");
    assert!(echoes(&mut socks).await, "-D does not echo");
    ssh.start_kill().unwrap();

    // Each forward is in the audit log with both ends, allowed or refused.
    let allowed = port_events(&c, "port", "alice", 4).await;
    assert!(allowed.len() >= 4, "{allowed:?}");
    for e in &allowed {
        assert_eq!(e["code"], "T3003I", "{e}");
        assert_eq!(e["addr"], target, "{e}");
        assert_eq!(e["kind"], "local", "{e}");
        assert!(
            e["originator"].is_string() && e["addr.remote"].is_string(),
            "{e}"
        );
    }
    let refused = port_events(&c, "port", "bob", 2).await;
    assert_eq!(refused.len(), 2, "{refused:?}");
    for e in &refused {
        assert_eq!(e["code"], "T3003E", "{e}");
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("port_forwarding: false"),
            "{e}"
        );
    }
}

/// Reads the client's stderr until it names the port a `-R 0:…` got.
async fn allocated_port(ssh: &mut tokio::process::Child) -> u16 {
    let stderr = ssh.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("Allocated port ") {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("the client never said which port it got");
    };
    tokio::time::timeout(BOUND, read).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_forwards_listen_on_the_node_s_loopback_when_the_roles_allow() {
    let c = TestCluster::start().await;
    let (alice, bob) = users(&c).await;
    let echo = echo_server().await;
    let spec = format!("0.0.0.0:0:127.0.0.1:{echo}");
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    let direct = format!("root@{host}");
    for (how, extra) in [
        ("through the proxy", vec!["web1"]),
        ("straight to the node", vec!["-p", port, direct.as_str()]),
    ] {
        let mut args = ssh_args(
            &alice,
            &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &spec],
        );
        args.extend(&extra);
        let mut ssh = tokio::process::Command::new(openssh())
            .args(&args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let got = allocated_port(&mut ssh).await;
        // Asked for every address, it listens on loopback (no gateway_ports).
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", got))
            .await
            .unwrap_or_else(|e| panic!("{how}: nothing listens on {got}: {e}"));
        assert!(echoes(&mut conn).await, "{how}: -R does not echo");
        ssh.start_kill().unwrap();
        let _ = ssh.wait().await;

        let mut args = ssh_args(&bob, &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &spec]);
        args.extend(&extra);
        let out = run(openssh(), &args, None).await;
        assert_eq!(out.status.code(), Some(255), "{how}");
        assert!(
            text(&out.stderr).contains("remote port forwarding failed"),
            "{how}: {}",
            text(&out.stderr)
        );
    }
    let allowed = port_events(&c, "port", "alice", 2).await;
    assert_eq!(allowed.len(), 2, "{allowed:?}");
    for e in &allowed {
        assert_eq!(e["kind"], "remote", "{e}");
        assert!(e["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
    }
    let refused = port_events(&c, "port", "bob", 2).await;
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|e| e["code"] == "T3003E"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_proxy_mode_forwards_go_through_the_proxy_and_are_refused_straight_to_the_node() {
    let c = TestCluster::start_with(ClusterSpec {
        auth_extra: "  session_recording: proxy\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let config = format!("{}.ssh_config", id.display());
    let echo = echo_server().await;
    let target = format!("127.0.0.1:{echo}");
    let out = run(
        openssh(),
        &ssh_args(&config, &["-W", &target, "web1"]),
        Some(b"ping\n"),
    )
    .await;
    assert_eq!(text(&out.stdout), "ping\n", "{}", text(&out.stderr));
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    let direct = format!("root@{host}");
    let out = run(
        openssh(),
        &ssh_args(&config, &["-W", &target, "-p", port, &direct]),
        Some(b"ping\n"),
    )
    .await;
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("recorded by the proxy: connect through it"),
        "{}",
        text(&out.stderr)
    );
    let events = port_events(&c, "port", "alice", 2).await;
    assert!(
        events.iter().any(|e| e["code"] == "T3003I")
            && events.iter().any(|e| e["code"] == "T3003E"),
        "{events:?}"
    );
}

/// A running `ssh-agent` holding one key, stopped on drop.
struct Agent {
    child: std::process::Child,
    sock: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = std::process::Command::new("ssh-agent")
            .args(["-D", "-a"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "ssh-agent never listened"
            );
            std::thread::yield_now();
        }
        let key = dir.path().join("key");
        let made = std::process::Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "agent-key-for-test",
                "-f",
            ])
            .arg(&key)
            .status()
            .unwrap();
        assert!(made.success());
        let added = std::process::Command::new("ssh-add")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &sock)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(added.success());
        Self {
            child,
            sock,
            _dir: dir,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const AGENT_ROLE: &str = "kind: role\nversion: v3\nmetadata:\n  name: agents\nspec:\n  options:\n    forward_agent: true\n  allow:\n    logins: ['{{internal.logins}}']\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_forwarding_follows_forward_agent_with_a_socket_of_the_login() {
    for mode in ["node", "proxy"] {
        let c = TestCluster::start_with(ClusterSpec {
            auth_extra: format!("  session_recording: {mode}\n"),
            ..Default::default()
        })
        .await;
        c.create_role("agents", AGENT_ROLE).await;
        c.add_user("alice", "access,agents", TEST_LOGIN).await;
        c.add_user("bob", "access", TEST_LOGIN).await;
        let agent = Agent::start();
        let alice = format!("{}.ssh_config", c.sign("alice").await.display());
        let bob = format!("{}.ssh_config", c.sign("bob").await.display());
        let script = "echo sock=$SSH_AUTH_SOCK; stat -c owner=%U \"$SSH_AUTH_SOCK\"; ssh-add -l";
        let run_agent = |config: &str| {
            let config = config.to_string();
            let sock = agent.sock.clone();
            async move {
                tokio::process::Command::new(openssh())
                    .args(ssh_args(&config, &["-A", "web1", script]))
                    .env("SSH_AUTH_SOCK", sock)
                    .stdin(Stdio::null())
                    .output()
                    .await
                    .unwrap()
            }
        };
        let out = run_agent(&alice).await;
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("agent-key-for-test"),
            "{mode}: {stdout}\n{}",
            text(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("owner={TEST_LOGIN}")),
            "{mode}: {stdout}"
        );
        // The socket is gone with the connection.
        let sock = stdout
            .lines()
            .find_map(|l| l.strip_prefix("sock="))
            .unwrap()
            .to_string();
        let gone = poll_until(BOUND, || {
            let sock = sock.clone();
            async move { !std::path::Path::new(&sock).exists() }
        })
        .await;
        assert!(gone.is_ok(), "{mode}: {sock} outlived the connection");

        let out = run_agent(&bob).await;
        assert!(
            text(&out.stdout).contains("sock=\n"),
            "{mode}: {}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stderr).contains(
                "agent forwarding is not allowed for user \"bob\": none of their roles sets forward_agent: true"
            ),
            "{mode}: {}",
            text(&out.stderr)
        );
        let ok = port_events(&c, "agent.forward", "alice", 1).await;
        assert_eq!(ok[0]["code"], "TST03I", "{mode}: {ok:?}");
        let refused = port_events(&c, "agent.forward", "bob", 1).await;
        assert_eq!(refused[0]["code"], "TST03W", "{mode}: {refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x11_forwarding_is_refused_with_a_message() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let config = format!("{}.ssh_config", c.sign("alice").await.display());
    let out = tokio::process::Command::new(openssh())
        .args(ssh_args(&config, &["-X", "web1", "echo ran"]))
        .env("DISPLAY", "127.0.0.1:42")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "ran\n", "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("X11 forwarding is not supported by Turnstile"),
        "{}",
        text(&out.stderr)
    );
    let events = port_events(&c, "x11-forward", "alice", 1).await;
    assert_eq!(events[0]["code"], "T3008W", "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_env_says_which_variables_the_client_may_set() {
    let c = TestCluster::start_with(ClusterSpec {
        node_extra: "  accept_env: [LANG, 'FOO*']\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    let config = format!("{}.ssh_config", c.sign("alice").await.display());
    let out = run(
        openssh(),
        &ssh_args(
            &config,
            &[
                "-o",
                "SetEnv=FOOBAR=yes LC_ALL=C.UTF-8 TURNSTILE_SESSION_ID=forged",
                "web1",
                "echo foo=${FOOBAR:-unset} lc=${LC_ALL:-unset} sid=$TURNSTILE_SESSION_ID",
            ],
        ),
        None,
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("foo=yes lc=unset sid="),
        "{stdout}{}",
        text(&out.stderr)
    );
    assert!(!stdout.contains("forged"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_transfers_are_audited_even_when_nothing_is_recorded() {
    let c = TestCluster::start_with(ClusterSpec {
        auth_extra: "  session_recording: \"off\"\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", TEST_LOGIN).await;
    let config = format!("{}.ssh_config", c.sign("alice").await.display());
    let local = tempfile::tempdir().unwrap();
    let upload = local.path().join("up.bin");
    let mut data = vec![0u8; 100_000];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut data)
        .unwrap();
    std::fs::write(&upload, &data).unwrap();
    let remote = format!("/tmp/turnstile-sftp-{}", uuid::Uuid::new_v4());
    let batch = local.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "mkdir {remote}\nput {up} {remote}/a.bin\nget {remote}/a.bin {down}\nrename {remote}/a.bin {remote}/b.bin\nrm {remote}/b.bin\n",
            up = upload.display(),
            down = local.path().join("down.bin").display(),
        ),
    )
    .unwrap();
    let out = run(
        "sftp",
        &[
            "-F",
            &config,
            "-o",
            "BatchMode=yes",
            "-b",
            batch.to_str().unwrap(),
            "web1",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "sftp: {}", text(&out.stderr));
    assert_eq!(std::fs::read(local.path().join("down.bin")).unwrap(), data);
    let target = format!("web1:{remote}/c.bin");
    let out = run(
        "scp",
        &[
            "-F",
            &config,
            "-o",
            "BatchMode=yes",
            upload.to_str().unwrap(),
            &target,
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "scp: {}", text(&out.stderr));

    let events = port_events(&c, "sftp", "alice", 8).await;
    let find = |action: &str, path: &str| {
        events
            .iter()
            .filter(|e| e["action"] == action && e["path"] == path)
            .cloned()
            .collect::<Vec<_>>()
    };
    let a = format!("{remote}/a.bin");
    let b = format!("{remote}/b.bin");
    assert_eq!(find("mkdir", &remote).len(), 1, "{events:#?}");
    let closes = find("close", &a);
    assert!(
        closes
            .iter()
            .any(|e| e["bytes_written"] == 100_000 && e["flags"] == "write"),
        "{closes:?}"
    );
    assert!(
        closes
            .iter()
            .any(|e| e["bytes_read"] == 100_000 && e["flags"] == "read"),
        "{closes:?}"
    );
    let renamed = find("rename", &a);
    assert_eq!(renamed.len(), 1, "{events:#?}");
    assert_eq!(renamed[0]["new_path"], b);
    assert_eq!(renamed[0]["code"], "TS016I");
    assert_eq!(find("remove", &b).len(), 1, "{events:#?}");
    let scp = find("close", &format!("{remote}/c.bin"));
    assert!(
        scp.iter().any(|e| e["bytes_written"] == 100_000),
        "scp's upload: {events:#?}"
    );
    for e in &events {
        assert_eq!(e["login"], TEST_LOGIN, "{e}");
        assert!(e["sid"].is_string(), "{e}");
    }
    let _ = std::fs::remove_dir_all(&remote);
}

//! The stock OpenSSH client with an identity from `turnstile admin sign`:
//! through the proxy with the written ssh_config, with `ssh -J`, and straight
//! to the node.

use crate::support::{TestCluster, openssh, run, text};

pub(crate) fn base_args(config: &str) -> Vec<&str> {
    vec![
        "-F",
        config,
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_with_the_written_config_goes_through_the_proxy() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let config = format!("{}.ssh_config", id.display());
    let mut args = base_args(&config);
    args.extend(["web1", "echo via-proxy; exit 4"]);
    let out = run(openssh(), &args, None).await;
    assert_eq!(
        text(&out.stdout),
        "via-proxy\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_dash_j_names_the_proxy_explicitly() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let config = format!("{}.ssh_config", id.display());
    let jump = format!("alice@{}", c.proxy_addr);
    let mut args = base_args(&config);
    args.extend([
        "-J",
        &jump,
        "root@web1",
        "hostname >/dev/null && echo jumped",
    ]);
    let out = run(openssh(), &args, None).await;
    assert_eq!(
        text(&out.stdout),
        "jumped\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_named_in_capitals_is_reached_as_openssh_lower_cases_it() {
    let c = TestCluster::start_with(crate::support::ClusterSpec {
        node_name: "VM".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let config = format!("{}.ssh_config", id.display());
    let jump = format!("alice@{}", c.proxy_addr);
    for host in ["root@VM", "root@vm"] {
        let mut args = base_args(&config);
        args.extend(["-J", &jump, host, "echo jumped"]);
        let out = run(openssh(), &args, None).await;
        assert_eq!(
            text(&out.stdout),
            "jumped\n",
            "{host}: {}",
            text(&out.stderr)
        );
    }
    let out = c.ssh(&id, &["root@vm", "echo", "turnstile"]).await;
    assert_eq!(text(&out.stdout), "turnstile\n", "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_straight_to_the_node_checks_its_host_certificate() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let config = format!("{}.ssh_config", id.display());
    let (host, port) = c.node_addr.rsplit_once(':').unwrap();
    let mut args = base_args(&config);
    args.extend(["-p", port, host, "echo direct"]);
    let out = run(openssh(), &args, None).await;
    assert_eq!(
        text(&out.stdout),
        "direct\n",
        "stderr: {}",
        text(&out.stderr)
    );

    // The same node under a name its host certificate does not carry is refused.
    let mut args = base_args(&config);
    let alias = format!("HostKeyAlias=not-{}", c.node_name);
    args.extend(["-o", &alias, "-p", port, host, "echo should-not-run"]);
    let out = run(openssh(), &args, None).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stdout).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_sshd_trusting_the_user_ca_accepts_the_certificate() {
    let login = crate::support::test_login();
    let sshd = "/usr/sbin/sshd";
    assert!(
        std::path::Path::new(sshd).exists(),
        "sshd is missing; run scripts/test.sh, which installs openssh-server"
    );
    let c = TestCluster::start().await;
    c.add_user("alice", "access", login).await;
    let id = c.sign("alice").await;
    let dir = c.dir.path();
    let ca = dir.join("user_ca.pub");
    std::fs::write(&ca, c.authority().user_ca().public_key_openssh()).unwrap();
    let host_key = dir.join("sshd_host_key");
    let out = run(
        "/usr/bin/ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            host_key.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sshd_config = dir.join("sshd_config");
    std::fs::write(
        &sshd_config,
        format!(
            "HostKey {}\nTrustedUserCAKeys {}\nUsePAM no\nPidFile none\nStrictModes no\n\
PasswordAuthentication no\nKbdInteractiveAuthentication no\nAuthorizedKeysFile none\n",
            host_key.display(),
            ca.display()
        ),
    )
    .unwrap();
    // sshd in inetd mode on the ssh client's stdio: no port at all.
    let proxy_command = format!("ProxyCommand={sshd} -i -f {}", sshd_config.display());
    let cert = format!("CertificateFile={}-cert.pub", id.display());
    let target = format!("{login}@stock-sshd");
    let out = run(
        openssh(),
        &[
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            &proxy_command,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            id.to_str().unwrap(),
            "-o",
            &cert,
            &target,
            "id -un",
        ],
        None,
    )
    .await;
    assert_eq!(
        text(&out.stdout).trim(),
        login,
        "stderr: {}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sees_the_users_address_not_the_proxys() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    // Leave from 127.0.0.2: the proxy sees that address, and reaches the node
    // from 127.0.0.1 itself.
    let config = c.dir.path().join("from-127.0.0.2.ssh_config");
    std::fs::write(
        &config,
        format!(
            "BindAddress 127.0.0.2\nInclude {}.ssh_config\n",
            id.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let mut args = base_args(&config);
    args.extend(["web1", "echo $SSH_CLIENT"]);
    let out = run(openssh(), &args, None).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("127.0.0.2 "),
        "SSH_CLIENT {stdout:?}, stderr {}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_the_node_does_not_accept_are_ignored_as_sshd_does() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let config = format!("{}.ssh_config", id.display());
    for how in ["proxy", "direct"] {
        let (host, port) = c.node_addr.rsplit_once(':').unwrap();
        let mut args = base_args(&config);
        args.extend([
            "-o",
            "SetEnv=FOO=x LANG=C.UTF-8 TURNSTILE_SESSION_ID=00000000-0000-0000-0000-000000000000",
        ]);
        if how == "direct" {
            args.extend(["-p", port, host]);
        } else {
            args.push("web1");
        }
        args.push("echo foo=${FOO:-unset} lang=$LANG; exit 3");
        let out = run(openssh(), &args, None).await;
        assert_eq!(
            text(&out.stdout),
            "foo=unset lang=C.UTF-8\n",
            "{how}: {}",
            text(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(3), "{how}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_whose_target_hangs_times_out_without_holding_up_the_connection() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = TestCluster::start_with(crate::support::ClusterSpec {
        node_extra: "  connect_timeout: 2s\n".into(),
        ..Default::default()
    })
    .await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let config = format!("{}.ssh_config", id.display());
    // A listener that never accepts, its queue filled: a connect to it hangs.
    let full = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let full_port = full.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..300 {
        match std::net::TcpStream::connect_timeout(
            &full.local_addr().unwrap(),
            Duration::from_millis(100),
        ) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    // An echo server that answers.
    let echo_port = crate::support::echo_server().await;
    let free_port = crate::support::free_port;
    let (hang_local, echo_local) = (free_port(), free_port());
    let hang_spec = format!("127.0.0.1:{hang_local}:127.0.0.1:{full_port}");
    let echo_spec = format!("127.0.0.1:{echo_local}:127.0.0.1:{echo_port}");
    let mut args = base_args(&config);
    args.extend(["-N", "-L", &hang_spec, "-L", &echo_spec, "web1"]);
    let mut ssh = tokio::process::Command::new(openssh())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let up = crate::support::poll_until(Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", echo_local))
            .await
            .is_ok()
    })
    .await;
    assert!(up.is_ok(), "the forwards never came up");
    let started = Instant::now();
    let mut hanging = tokio::net::TcpStream::connect(("127.0.0.1", hang_local))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another channel on the same connection works meanwhile.
    let mut answered = tokio::net::TcpStream::connect(("127.0.0.1", echo_local))
        .await
        .unwrap();
    answered.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(1), answered.read_exact(&mut buf))
        .await
        .expect("a second channel is not held up by a hanging connect")
        .unwrap();
    assert_eq!(&buf, b"ping");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The hanging one is refused after about the timeout.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), hanging.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the hanging forward was never refused");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    ssh.start_kill().unwrap();
    let mut err = String::new();
    ssh.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(err.contains("timed out after 2s"), "{err}");
    drop(fillers);
}

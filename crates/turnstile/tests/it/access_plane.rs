//! `turnstile ssh` through the proxy: commands, exit status, standard streams,
//! the session id, and sessions running as an unprivileged login.

use crate::support::{TestCluster, test_login, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_command_through_the_proxy_with_its_exit_status() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;

    let out = c
        .ssh(
            &id,
            &[
                "root@web1",
                "--",
                "echo out; echo err >&2; echo $TURNSTILE_SESSION_ID; exit 3",
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("out"));
    let sid = lines.next().expect("session id line");
    assert!(
        uuid::Uuid::parse_str(sid).is_ok(),
        "TURNSTILE_SESSION_ID {sid:?} is a UUID"
    );
    assert_eq!(text(&out.stderr), "err\n");

    // Without LOGIN@ the user's first login is used.
    let out = c.ssh(&id, &["web1", "id", "-un"]).await;
    assert_eq!(text(&out.stdout).trim(), "root");
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_input_reaches_the_command() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let input = "line one\nline two\n".repeat(2000);
    let out = crate::support::run(
        crate::support::BIN,
        &["ssh", "-i", id.to_str().unwrap(), "web1", "--", "wc", "-l"],
        Some(input.as_bytes()),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "4000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_as_the_login_with_its_home_and_groups() {
    let login = test_login();
    let c = TestCluster::start().await;
    c.add_user("bob", "access", login).await;
    let id = c.sign("bob").await;
    let out = c
        .ssh(
            &id,
            &[
                &format!("{login}@web1"),
                "--",
                "id -un; id -u; echo $HOME; pwd; echo $USER",
            ],
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pw = nix::unistd::User::from_name(login).unwrap().unwrap();
    let expected = format!(
        "{login}\n{}\n{}\n{}\n{login}\n",
        pw.uid,
        pw.dir.display(),
        pw.dir.display()
    );
    assert_eq!(text(&out.stdout), expected);
    // Privileges really dropped: root's files are out of reach.
    let out = c
        .ssh(&id, &[&format!("{login}@web1"), "cat", "/etc/shadow"])
        .await;
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lists_what_was_created() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root,alice").await;
    let users = c.admin_ok(&["users", "ls", "--format", "json"]).await;
    let user: serde_json::Value = serde_json::from_str(users.lines().next().unwrap()).unwrap();
    assert_eq!(user["user"], "alice");
    assert_eq!(user["logins"], serde_json::json!(["root", "alice"]));
    let nodes = c.admin_ok(&["nodes", "ls"]).await;
    assert!(
        nodes.contains("web1") && nodes.contains("env=dev"),
        "{nodes}"
    );
    let roles = c.admin_ok(&["roles", "ls"]).await;
    assert!(roles.contains("access"), "{roles}");
    c.admin_ok(&["users", "rm", "alice"]).await;
    assert!(c.admin_ok(&["users", "ls"]).await.lines().count() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_is_clean_except_lang_and_the_session_id() {
    let login = test_login();
    let c = TestCluster::start().await;
    c.add_user("alice", "access", login).await;
    let id = c.sign("alice").await;
    let mut cmd = tokio::process::Command::new(crate::support::BIN);
    cmd.args([
        "ssh",
        "-i",
        id.to_str().unwrap(),
        &format!("{login}@web1"),
        "--",
    ])
    .arg("echo $LANG ${SECRET_TOKEN:-unset} $PATH; echo $SSH_CLIENT")
    .env("LANG", "C.UTF-8")
    .env("SECRET_TOKEN", "leaked")
    .stdin(std::process::Stdio::null());
    let out = cmd.output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some("C.UTF-8 unset /usr/local/bin:/usr/bin:/bin:/usr/games")
    );
    // SSH_CLIENT is set as sshd sets it: address, port, the node's port.
    let ssh_client = lines.next().unwrap();
    let node_port = c.node_addr.rsplit_once(':').unwrap().1;
    assert!(ssh_client.starts_with("127.0.0.1 "), "{ssh_client}");
    assert!(
        ssh_client.ends_with(&format!(" {node_port}")),
        "{ssh_client}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_by_a_signal_exits_255_and_says_so() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
    let out = c.ssh(&id, &["web1", "--", "kill -TERM $$"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("killed by signal TERM"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_from_the_client_reach_the_remote_process() {
    use russh::{ChannelMsg, Sig};
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let id = c.sign("alice").await;
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
    let mut channel = conn.handle.channel_open_session().await.unwrap();
    channel.exec(true, "echo started; sleep 60").await.unwrap();
    let mut started = false;
    let mut signalled = None;
    while let Some(msg) = tokio::time::timeout(std::time::Duration::from_secs(30), channel.wait())
        .await
        .expect("the session answers")
    {
        match msg {
            ChannelMsg::Data { data } if data.starts_with(b"started") => {
                started = true;
                channel.signal(Sig::INT).await.unwrap();
            }
            ChannelMsg::ExitSignal { signal_name, .. } => signalled = Some(signal_name),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    assert!(started);
    assert!(matches!(signalled, Some(Sig::INT)), "{signalled:?}");
}

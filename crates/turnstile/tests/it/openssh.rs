//! The stock OpenSSH client with an identity from `turnstile admin sign`:
//! through the proxy with the written ssh_config, with `ssh -J`, and straight
//! to the node.

use crate::support::{TestCluster, openssh, run, text};

fn base_args<'a>(config: &'a str) -> Vec<&'a str> {
    vec!["-F", config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
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
    assert_eq!(text(&out.stdout), "via-proxy\n", "stderr: {}", text(&out.stderr));
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
    args.extend(["-J", &jump, "root@web1", "hostname >/dev/null && echo jumped"]);
    let out = run(openssh(), &args, None).await;
    assert_eq!(text(&out.stdout), "jumped\n", "stderr: {}", text(&out.stderr));
    assert!(out.status.success());
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
    assert_eq!(text(&out.stdout), "direct\n", "stderr: {}", text(&out.stderr));

    // The same node under a name its host certificate does not carry is refused.
    let mut args = base_args(&config);
    let alias = format!("HostKeyAlias=not-{}", c.node_name);
    args.extend(["-o", &alias, "-p", port, host, "echo should-not-run"]);
    let out = run(openssh(), &args, None).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stdout).is_empty());
}

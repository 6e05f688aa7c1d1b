//! Connection slots and connect latency, against OpenSSH.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use russh::ChannelMsg;
use turnstile::config;
use turnstile::process::launch;
use turnstile_api::identity::SystemRole;
use turnstile_api::role::Role;
use turnstile_api::rpc::proto;
use turnstile_ssh::cluster_view::auth_client;
use turnstile_ssh::identity::{TlsIdentity, generate_ed25519};

use crate::common::{OPENSSH_OPTIONS, sshd_base_config};

/// Auth, proxy and node in one process on port 0, data in `dir/data`.
fn one_process_config(
    dir: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let data = dir.join("data");
    let config = dir.join("bench.yaml");
    std::fs::write(
        &config,
        format!(
            "turnstile:\n  data_dir: {}\n{}auth_service:\n  listen_addr: 127.0.0.1:0\nproxy_service:\n  listen_addr: 127.0.0.1:0\nssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: bench\n",
            data.display(),
            crate::common::MANY_CLIENTS,
        ),
    )?;
    Ok((data, config))
}

/// One acquire and release by contender `i`: (time to acquire, time for both).
type PairFn = Arc<
    dyn Fn(
            usize,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = anyhow::Result<(Duration, Duration)>> + Send>,
        > + Send
        + Sync,
>;

/// What `race_pairs` measured.
struct Row {
    pairs: usize,
    acquire: Summary,
    pair: Summary,
    per_second: f64,
}

/// `contenders` tasks at once, each running `pair` `per` times in a row.
async fn race_pairs(contenders: usize, per: usize, pair: PairFn) -> anyhow::Result<Row> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..contenders {
        let pair = pair.clone();
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(per);
            for _ in 0..per {
                times.push(pair(i).await?);
            }
            Ok::<_, anyhow::Error>(times)
        }));
    }
    let (mut acquire, mut both) = (Vec::new(), Vec::new());
    for t in tasks {
        for (a, p) in t.await?? {
            acquire.push(a);
            both.push(p);
        }
    }
    let elapsed = start.elapsed();
    let pairs = both.len();
    Ok(Row {
        pairs,
        acquire: summarize(acquire),
        pair: summarize(both),
        per_second: pairs as f64 / elapsed.as_secs_f64(),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

struct Summary {
    p50: Duration,
    p99: Duration,
}

fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    Summary {
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
    }
}

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, config_path) = one_process_config(dir.path())?;
    let running = launch(config::load(Some(&config_path), None)?).await?;
    let authority = running.authority.clone().context("auth runs here")?;
    let auth_addr = running.auth_addr.context("auth address")?.to_string();
    let proxy_addr = running.proxy_public_addr.clone().context("proxy address")?;

    // The node's own identity: what a node pays for every slot.
    let node_tls = TlsIdentity::load(&data, SystemRole::Node)?.context("node identity")?;
    let client = auth_client(&auth_addr, &node_tls)?;

    println!(
        "Connection slots on one user's semaphore (SQLite, WAL, synchronous=NORMAL), from the node over gRPC/mTLS"
    );
    println!(
        "{:>11}  {:>8}  {:>14}  {:>14}  {:>14}  {:>14}  {:>12}",
        "contenders",
        "pairs",
        "acquire p50 ms",
        "acquire p99 ms",
        "acq+rel p50 ms",
        "acq+rel p99 ms",
        "pairs/s"
    );
    for contenders in [1usize, 16, 64] {
        let per = (2000 / contenders).max(40);
        let client = client.clone();
        let pair: PairFn = Arc::new(move |_| {
            let mut c = client.clone();
            Box::pin(async move {
                let t0 = Instant::now();
                let lease = c
                    .acquire_semaphore(proto::AcquireSemaphoreRequest {
                        kind: "connection".into(),
                        name: "bench-user".into(),
                        max: contenders as u32,
                        ttl_ms: 120_000,
                        login: "root".into(),
                        remote_addr: "127.0.0.1:1".into(),
                        holder_name: "bench".into(),
                    })
                    .await?
                    .into_inner();
                let acquired = t0.elapsed();
                c.cancel_semaphore(proto::CancelSemaphoreRequest {
                    kind: "connection".into(),
                    name: "bench-user".into(),
                    lease_id: lease.lease_id,
                })
                .await?;
                Ok((acquired, t0.elapsed()))
            })
        });
        let row = race_pairs(contenders, per, pair).await?;
        println!(
            "{:>11}  {:>8}  {:>14}  {:>14}  {:>14}  {:>14}  {:>12.0}",
            contenders,
            row.pairs,
            ms(row.acquire.p50),
            ms(row.acquire.p99),
            ms(row.pair.p50),
            ms(row.pair.p99),
            row.per_second
        );
    }

    // Connection latency: a limited user takes a slot on every connection.
    let mut limited = Role::new("limited");
    limited.spec.options.max_connections = Some(1000);
    limited.spec.allow.logins = Some(vec!["{{internal.logins}}".into()]);
    authority.upsert_role(limited, true).await?;
    let login = std::env::var("BENCH_LOGIN").unwrap_or_else(|_| "root".into());
    for (user, role) in [("free", "access"), ("capped", "limited")] {
        authority
            .upsert_user(
                turnstile_auth::authority::UserRecord {
                    name: user.into(),
                    roles: vec![role.into()],
                    logins: vec![login.clone()],
                    password_hash: None,
                    created_unix: 0,
                },
                true,
            )
            .await?;
    }
    let host_ca = turnstile_ssh::client::Trust {
        host_ca: vec![authority.host_ca().public_key().clone()],
        proxy_ca: vec![authority.proxy_ca().public_key().clone()],
    };
    const CONNECTIONS: usize = 60;
    println!();
    println!(
        "Connect through the proxy and run `true` ({CONNECTIONS} sequential connections, login {login})"
    );
    println!("{:<44}  {:>8}  {:>8}", "client / user", "p50 ms", "p99 ms");
    let mut p50s = Vec::new();
    for user in ["free", "capped"] {
        let key = Arc::new(generate_ed25519());
        let issued = authority
            .generate_user_cert(user, key.public_key(), Duration::from_secs(3600))
            .await?;
        let creds = turnstile_ssh::client::UserCredentials {
            key: key.clone(),
            certificate: issued.certificate,
        };
        let mut samples = Vec::new();
        for _ in 0..CONNECTIONS {
            let t0 = Instant::now();
            let conn = turnstile_ssh::client::connect_via_proxy(
                &proxy_addr,
                "bench",
                &login,
                &creds,
                &host_ca,
            )
            .await?;
            let mut ch = conn.handle.channel_open_session().await?;
            ch.exec(true, "true").await?;
            while let Some(msg) = ch.wait().await {
                if let ChannelMsg::ExitStatus { .. } = msg {
                    break;
                }
            }
            samples.push(t0.elapsed());
        }
        let s = summarize(samples);
        p50s.push(s.p50);
        let label = if user == "free" {
            "turnstile client, no limit"
        } else {
            "turnstile client, max_connections (slot)"
        };
        println!("{label:<44}  {:>8}  {:>8}", ms(s.p50), ms(s.p99));
    }
    println!(
        "{:<44}  {:>8}",
        "added by the slot (p50)",
        ms(p50s[1].saturating_sub(p50s[0]))
    );

    // OpenSSH's client through the proxy, and OpenSSH end to end.
    if std::path::Path::new("/usr/bin/ssh").exists() {
        let id = dir.path().join("free");
        let out = std::process::Command::new(std::env::current_exe()?.with_file_name("turnstile"))
            .args([
                "admin",
                "sign",
                "--user",
                "free",
                "--out",
                id.to_str().unwrap_or_default(),
                "--data-dir",
                data.to_str().unwrap_or_default(),
            ])
            .output();
        if out.as_ref().is_ok_and(|o| o.status.success()) {
            let cfg = format!("{}.ssh_config", id.display());
            let s = time_command(
                CONNECTIONS,
                "/usr/bin/ssh",
                &["-F", &cfg, "-o", "BatchMode=yes", "bench", "true"],
            )?;
            println!(
                "{:<44}  {:>8}  {:>8}",
                "OpenSSH client via the proxy, no limit",
                ms(s.p50),
                ms(s.p99)
            );
            if let Some(s) = openssh_baseline(dir.path(), &id, &login, CONNECTIONS)? {
                println!(
                    "{:<44}  {:>8}  {:>8}",
                    "OpenSSH client to OpenSSH sshd (baseline)",
                    ms(s.p50),
                    ms(s.p99)
                );
            }
        } else {
            println!(
                "(OpenSSH rows skipped: run from target/release so `turnstile` is next to this binary)"
            );
        }
    }
    running.stop().await?;
    backend_slots().await
}

/// Slot acquire and release straight on each backend (no gRPC): SQLite,
/// etcd with one auth server, and etcd with two auth servers (two
/// processes' worth of backend clients and semaphores): two users' slots,
/// each user's on one server as nodes and proxies route them (by
/// affinity), and one user's semaphore changed through both servers in
/// turn, as while a failover moves a user's calls.
async fn backend_slots() -> anyhow::Result<()> {
    use turnstile_api::clock::SystemClock;
    use turnstile_auth::backend::etcd::testing::EtcdServer;
    use turnstile_auth::backend::{Backend, EtcdBackend, SqliteBackend};
    use turnstile_auth::semaphores::{LeaseRequest, Semaphores};

    println!();
    println!("Connection slots straight on the backend (no gRPC)");
    println!(
        "{:<52}  {:>11}  {:>8}  {:>14}  {:>14}  {:>14}  {:>14}  {:>10}",
        "backend",
        "contenders",
        "pairs",
        "acquire p50 ms",
        "acquire p99 ms",
        "acq+rel p50 ms",
        "acq+rel p99 ms",
        "pairs/s"
    );
    let dir = tempfile::tempdir()?;
    let clock: Arc<dyn turnstile_api::clock::Clock> = Arc::new(SystemClock);
    let sqlite: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&dir.path().join("b.sqlite"))?);
    let etcd = EtcdServer::start().await;
    let settings = etcd.settings("/bench");
    let etcd_a: Arc<dyn Backend> = Arc::new(EtcdBackend::connect(&settings)?);
    let etcd_b: Arc<dyn Backend> = Arc::new(EtcdBackend::connect(&settings)?);
    let two = vec![
        Arc::new(Semaphores::new(etcd_a.clone(), clock.clone())),
        Arc::new(Semaphores::new(etcd_b, clock.clone())),
    ];
    // (label, servers, users): contender i takes user i % users's slot
    // through server i % servers.
    let setups: Vec<(&str, Vec<Arc<Semaphores>>, usize)> = vec![
        (
            "SQLite, one user",
            vec![Arc::new(Semaphores::new(sqlite, clock.clone()))],
            1,
        ),
        (
            "etcd, one auth server, one user",
            vec![Arc::new(Semaphores::new(etcd_a, clock.clone()))],
            1,
        ),
        ("etcd, two auth servers, two users (routed)", two.clone(), 2),
        ("etcd, two auth servers on one user (failover)", two, 1),
    ];
    for (setup, (label, servers, users)) in setups.into_iter().enumerate() {
        for contenders in [1usize, 16, 64] {
            let per = (1000 / contenders).max(20);
            let servers = servers.clone();
            let pair: PairFn = Arc::new(move |i| {
                let semaphores = servers[i % servers.len()].clone();
                let name = format!("bench-{setup}-{contenders}-{}", i % users);
                Box::pin(async move {
                    let t0 = Instant::now();
                    let lease = semaphores
                        .acquire(&LeaseRequest {
                            kind: "connection".into(),
                            name: name.clone(),
                            max: contenders as u32,
                            ttl: Duration::from_secs(120),
                            holder: "bench".into(),
                            holder_name: "bench".into(),
                            login: "root".into(),
                            remote_addr: "127.0.0.1:1".into(),
                        })
                        .await?;
                    let acquired = t0.elapsed();
                    semaphores
                        .cancel("connection", &name, &lease.lease_id, Some("bench"))
                        .await?;
                    Ok((acquired, t0.elapsed()))
                })
            });
            let row = race_pairs(contenders, per, pair).await?;
            println!(
                "{:<52}  {:>11}  {:>8}  {:>14}  {:>14}  {:>14}  {:>14}  {:>10.0}",
                label,
                contenders,
                row.pairs,
                ms(row.acquire.p50),
                ms(row.acquire.p99),
                ms(row.pair.p50),
                ms(row.pair.p99),
                row.per_second
            );
        }
    }
    Ok(())
}

/// A file of about `size` bytes: `seed` repeated.
fn time_command(n: usize, program: &str, args: &[&str]) -> anyhow::Result<Summary> {
    let mut samples = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let status = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            bail!("{program} {args:?} failed: {status}");
        }
        samples.push(t0.elapsed());
    }
    Ok(summarize(samples))
}

/// A private sshd in inetd mode (spawned per connection, as sshd forks per
/// connection anyway) trusting the cluster's user CA.
fn openssh_baseline(
    dir: &std::path::Path,
    id: &std::path::Path,
    login: &str,
    n: usize,
) -> anyhow::Result<Option<Summary>> {
    if !std::path::Path::new("/usr/sbin/sshd").exists() {
        return Ok(None);
    }
    let base = sshd_base_config(dir, id)?;
    let config = dir.join("sshd_config");
    std::fs::write(&config, &base)?;
    let proxy_command = format!("ProxyCommand=/usr/sbin/sshd -i -f {}", config.display());
    let cert_file = format!("CertificateFile={}-cert.pub", id.display());
    let target = format!("{login}@baseline");
    let mut args = OPENSSH_OPTIONS.to_vec();
    args.extend([
        "-o",
        &proxy_command,
        "-i",
        id.to_str().unwrap_or_default(),
        "-o",
        &cert_file,
        &target,
        "true",
    ]);
    let s = time_command(n, "/usr/bin/ssh", &args);
    Ok(s.ok())
}

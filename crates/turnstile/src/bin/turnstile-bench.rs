//! Benchmarks that print a table: `turnstile-bench semaphores`.
//!
//! Starts a one-process cluster (auth on SQLite, proxy, node) on loopback in
//! a temporary directory and measures, from the node's side of the gRPC API
//! (its own TLS identity, so every number includes the RPC to auth):
//! - connection-slot acquire and acquire+release latency, and throughput, with
//!   1, 16 and 64 contenders on one user's semaphore;
//! - the time to connect and run `true` for a user with `max_connections`
//!   against one without, with Turnstile's client and with OpenSSH, next to
//!   OpenSSH's own sshd as a baseline.
#![forbid(unsafe_code)]

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

/// Auth, proxy and node in one process on port 0, data in `dir/data`.
fn one_process_config(
    dir: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let data = dir.join("data");
    let config = dir.join("bench.yaml");
    std::fs::write(
        &config,
        format!(
            "turnstile:\n  data_dir: {}\nauth_service:\n  listen_addr: 127.0.0.1:0\nproxy_service:\n  listen_addr: 127.0.0.1:0\nssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: bench\n",
            data.display()
        ),
    )?;
    Ok((data, config))
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let what = std::env::args().nth(1).unwrap_or_default();
    match what.as_str() {
        "semaphores" => {}
        "recording" => return recording_bench().await,
        _ => bail!("usage: turnstile-bench semaphores|recording"),
    }
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
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..contenders {
            let mut c = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut acquire = Vec::with_capacity(per);
                let mut pair = Vec::with_capacity(per);
                for _ in 0..per {
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
                    let t1 = Instant::now();
                    c.cancel_semaphore(proto::CancelSemaphoreRequest {
                        kind: "connection".into(),
                        name: "bench-user".into(),
                        lease_id: lease.lease_id,
                    })
                    .await?;
                    acquire.push(t1 - t0);
                    pair.push(t0.elapsed());
                }
                Ok::<_, tonic::Status>((acquire, pair))
            }));
        }
        let (mut acquire, mut pair) = (Vec::new(), Vec::new());
        for t in tasks {
            let (a, p) = t.await??;
            acquire.extend(a);
            pair.extend(p);
        }
        let elapsed = start.elapsed();
        let n = pair.len();
        let a = summarize(acquire);
        let p = summarize(pair);
        println!(
            "{:>11}  {:>8}  {:>14}  {:>14}  {:>14}  {:>14}  {:>12.0}",
            contenders,
            n,
            ms(a.p50),
            ms(a.p99),
            ms(p.p50),
            ms(p.p99),
            n as f64 / elapsed.as_secs_f64()
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
    let host_ca = vec![authority.host_ca().public_key().clone()];
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
    Ok(())
}

/// A file of about `size` bytes: `seed` repeated.
fn repeated_file(path: &std::path::Path, seed: &[u8], size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    anyhow::ensure!(!seed.is_empty(), "empty seed for {}", path.display());
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut written = 0u64;
    while written < size {
        f.write_all(seed)?;
        written += seed.len() as u64;
    }
    f.flush()?;
    Ok(())
}

/// A `turnstile start` of the release binary with its own config, ready.
struct Service {
    child: std::process::Child,
    banner: String,
}

impl Service {
    fn start(name: &str, bin: &std::path::Path, config: &std::path::Path) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let log = std::fs::File::create(config.with_extension("log"))?;
        let mut child = std::process::Command::new(bin)
            .args(["start", "--config", config.to_str().unwrap_or_default()])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut banner = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            banner.push_str(&line);
            banner.push('\n');
            if line == "turnstile is ready" {
                return Ok(Self { child, banner });
            }
        }
        bail!(
            "{name} did not start; see {}",
            config.with_extension("log").display()
        )
    }

    /// The value after `label` in the ready block.
    fn field(&self, label: &str) -> anyhow::Result<String> {
        self.banner
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(label).map(str::trim_start))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .with_context(|| format!("no {label} in {}", self.banner))
    }

    fn cpu(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    fn rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn turnstile_ok(bin: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(bin).args(args).output()?;
    if !out.status.success() {
        bail!(
            "turnstile {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args` with stdout to /dev/null; returns the seconds it
/// took and what it wrote to stderr.
fn timed(program: &str, args: &[&str]) -> anyhow::Result<(f64, String)> {
    let t0 = Instant::now();
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()?;
    let secs = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("{program} {args:?} failed: {stderr}");
    }
    Ok((secs, stderr))
}

/// CPU seconds (user and system) a process used, with those of its children
/// it waited for (sshd's sessions, the benchmark's clients).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After "pid (comm) ": state is field 3; utime, stime, cutime, cstime are 14-17.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect();
    fields.iter().sum::<f64>() / 100.0
}

/// A free loopback port (for sshd, which cannot report the one it took).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Bulk output through `turnstile ssh` in each recording mode, against
/// OpenSSH direct to a plain sshd, on a cluster of separate processes.
async fn recording_bench() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let size: u64 = std::env::var("BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let login = std::env::var("BENCH_LOGIN").unwrap_or_else(|_| {
        if nix::unistd::User::from_name("turnstile-test")
            .ok()
            .flatten()
            .is_some()
        {
            "turnstile-test".into()
        } else {
            "root".into()
        }
    });
    let bin = std::env::current_exe()?.with_file_name("turnstile");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run scripts/bench.sh",
        bin.display()
    );
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    // Inputs, readable by the login: base64 of random bytes, a real build log repeated.
    let base64 = dir.path().join("base64.txt");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} /dev/urandom | base64 > {}",
            size / 4 * 3,
            base64.display()
        ))
        .status()?;
    anyhow::ensure!(status.success(), "cannot make the base64 input");
    let log_seed_path =
        std::env::var("BENCH_BUILD_LOG").unwrap_or_else(|_| "target/bench-build.log".into());
    let log_seed = std::fs::read(&log_seed_path)
        .with_context(|| format!("the build log {log_seed_path} (scripts/bench.sh writes it)"))?;
    let build_log = dir.path().join("build.log");
    repeated_file(&build_log, &log_seed, size)?;
    for f in [&base64, &build_log] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644))?;
    }

    // Auth, a proxy and a node, each its own process, joined with tokens.
    let path = |name: &str| dir.path().join(name);
    std::fs::write(
        path("auth.yaml"),
        format!(
            "turnstile:\n  data_dir: {}\nauth_service:\n  listen_addr: 127.0.0.1:0\n  cluster_name: bench\n",
            path("auth").display()
        ),
    )?;
    let auth = Service::start("auth", &bin, &path("auth.yaml"))?;
    let auth_addr = auth.field("auth")?;
    let pin = auth.field("CA pin")?;
    let auth_data = path("auth");
    let admin = |args: &[&str]| {
        let mut all = vec!["admin"];
        all.extend_from_slice(args);
        all.extend(["--data-dir", auth_data.to_str().unwrap_or_default()]);
        turnstile_ok(&bin, &all)
    };
    let token = |kind: &str| -> anyhow::Result<String> {
        let out = admin(&["tokens", "add", "--type", kind, "--format", "json"])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        v["token"].as_str().map(str::to_string).context("token")
    };
    let joining = |name: &str, token: &str, service: &str| -> anyhow::Result<std::path::PathBuf> {
        let config = path(&format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "turnstile:\n  data_dir: {}\n  auth_servers: [\"{auth_addr}\"]\n  join_token: {token}\n  ca_pin: {pin}\n{service}",
                path(name).display()
            ),
        )?;
        Ok(config)
    };
    let proxy = Service::start(
        "proxy",
        &bin,
        &joining(
            "proxy",
            &token("proxy")?,
            "proxy_service:\n  listen_addr: 127.0.0.1:0\n",
        )?,
    )?;
    let proxy_addr = proxy.field("proxy")?;
    let node = Service::start(
        "node",
        &bin,
        &joining(
            "node",
            &token("node")?,
            "ssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: bench\n",
        )?,
    )?;
    admin(&[
        "users", "add", "bench", "--roles", "access", "--logins", &login,
    ])?;
    let id = path("bench-id");
    admin(&[
        "sign",
        "--user",
        "bench",
        "--out",
        id.to_str().unwrap_or_default(),
        "--proxy",
        &proxy_addr,
    ])?;
    // Nodes see a new node in their view within a refresh.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin(&["nodes", "ls"])?.contains("bench") {
        anyhow::ensure!(Instant::now() < deadline, "the node never registered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // OpenSSH's sshd, listening, trusting the cluster's user CA.
    let sshd = openssh_sshd(dir.path(), &id)?;

    println!(
        "Bulk output (`cat` of {} MiB) to the client's /dev/null: Turnstile through its proxy (auth, proxy, node \
         separate processes) in each recording mode, and OpenSSH direct to a plain sshd; login {login}; \
         zstd level {}; {runs} run(s) of each, taken in turn. MB/s is the median; cost is the median of each \
         run against the off run before it, with its range; RSS (MiB) is the largest seen after a run.",
        size >> 20,
        turnstile_recording::part::ZSTD_LEVEL
    );
    println!(
        "{:<20}  {:<22}  {:>8}  {:>22}  {:>9}  {:>8}  {:>17}  {:>27}",
        "input",
        "path",
        "MB/s",
        "cost vs off",
        "x OpenSSH",
        "stored",
        "RSS auth/prx/node",
        "CPU s/GiB auth/prx/node/cli"
    );
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // `off` first: the others are measured against it.
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "node,node-sync,proxy".into());
    let mut modes: Vec<&str> = modes
        .split(',')
        .filter(|m| !m.is_empty() && *m != "off")
        .collect();
    modes.insert(0, "off");
    for m in &modes {
        m.parse::<turnstile_api::recording::RecordingMode>()?;
    }
    let modes = modes;
    for (name, file) in [
        ("base64 of random", &base64),
        ("build log, repeated", &build_log),
    ] {
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let mut costs: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        let mut stored = vec![0.0f64; modes.len()];
        let mut rss = vec![[0.0f64; 3]; modes.len()];
        // auth, proxy, node, client: CPU seconds per GiB, averaged over runs.
        let mut cpu = vec![[0.0f64; 4]; modes.len()];
        let mut openssh_cpu = 0.0f64;
        let mut openssh = Vec::new();
        let command = format!("echo $TURNSTILE_SESSION_ID >&2; cat {}", file.display());
        for _ in 0..runs {
            for (m, mode) in modes.iter().enumerate() {
                admin(&["config", "set", "session_recording", mode])?;
                // Recorders read the mode from a view refreshed every 5 s.
                tokio::time::sleep(Duration::from_secs(6)).await;
                let cpu_before: Vec<f64> = [
                    auth.cpu(),
                    proxy.cpu(),
                    node.cpu(),
                    cpu_secs(std::process::id()),
                ]
                .to_vec();
                let (secs, stderr) = timed(
                    bin.to_str().unwrap_or_default(),
                    &[
                        "ssh",
                        "-i",
                        id.to_str().unwrap_or_default(),
                        "bench",
                        "--",
                        &command,
                    ],
                )?;
                let rate = size as f64 / secs / 1e6;
                rates[m].push(rate);
                if m > 0 {
                    costs[m].push((1.0 - rate / rates[0][rates[0].len() - 1]) * 100.0);
                    // The next run starts once this recording is stored.
                    let sid = stderr.lines().next().unwrap_or_default().trim().to_string();
                    let rec = auth_data.join(format!("records/{sid}.rec"));
                    let deadline = Instant::now() + Duration::from_secs(600);
                    while !rec.exists() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let len = std::fs::metadata(&rec).map(|m| m.len()).unwrap_or(0);
                    stored[m] = len as f64 / size as f64;
                }
                for (i, s) in [&auth, &proxy, &node].iter().enumerate() {
                    rss[m][i] = rss[m][i].max(s.rss_mib());
                }
                // CPU of the whole session, its upload included, per GiB.
                let cpu_after = [
                    auth.cpu(),
                    proxy.cpu(),
                    node.cpu(),
                    cpu_secs(std::process::id()),
                ];
                let gib = size as f64 / (1u64 << 30) as f64;
                for i in 0..4 {
                    cpu[m][i] += (cpu_after[i] - cpu_before[i]) / gib / runs as f64;
                }
            }
            if let Some(Sshd { port, cert, child }) = &sshd {
                let before = cpu_secs(child.id()) + cpu_secs(std::process::id());
                let (secs, _) = timed(
                    "/usr/bin/ssh",
                    &[
                        "-F",
                        "/dev/null",
                        "-o",
                        "BatchMode=yes",
                        "-o",
                        "StrictHostKeyChecking=no",
                        "-o",
                        "UserKnownHostsFile=/dev/null",
                        "-o",
                        "LogLevel=ERROR",
                        "-o",
                        "IdentitiesOnly=yes",
                        "-i",
                        id.to_str().unwrap_or_default(),
                        "-o",
                        cert,
                        "-p",
                        &port.to_string(),
                        &format!("{login}@127.0.0.1"),
                        &format!("cat {}", file.display()),
                    ],
                )?;
                openssh.push(size as f64 / secs / 1e6);
                let gib = size as f64 / (1u64 << 30) as f64;
                openssh_cpu += (cpu_secs(child.id()) + cpu_secs(std::process::id()) - before)
                    / gib
                    / runs as f64;
            }
        }
        let direct = if openssh.is_empty() {
            f64::NAN
        } else {
            median(&mut openssh)
        };
        for (m, mode) in modes.iter().enumerate() {
            let rate = median(&mut rates[m]);
            let cost = if m == 0 {
                "-".to_string()
            } else {
                let (low, high) = costs[m]
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), &c| (l.min(c), h.max(c)));
                format!("{:.1}% ({low:.1}..{high:.1})", median(&mut costs[m]))
            };
            let stored = if m == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", stored[m])
            };
            let c = cpu[m];
            println!(
                "{name:<20}  {:<22}  {rate:>8.1}  {cost:>22}  {:>9.2}  {stored:>8}  {:>17}  {:>27}",
                format!("turnstile, {mode}"),
                rate / direct,
                format!("{:.0}/{:.0}/{:.0}", rss[m][0], rss[m][1], rss[m][2]),
                format!(
                    "{:.1} = {:.1}/{:.1}/{:.1}/{:.1}",
                    c.iter().sum::<f64>(),
                    c[0],
                    c[1],
                    c[2],
                    c[3]
                )
            );
        }
        println!(
            "{name:<20}  {:<22}  {direct:>8.1}  {:>22}  {:>9.2}  {:>8}  {:>17}  {:>27}",
            "OpenSSH direct",
            "-",
            1.0,
            "-",
            "-",
            format!("{openssh_cpu:.1} (sshd+client)")
        );
    }
    drop(sshd);
    Ok(())
}

/// The lines of a private sshd's config: a fresh host key, the cluster's
/// user CA (read off the identity's certificate) trusted, no PAM.
fn sshd_base_config(dir: &std::path::Path, id: &std::path::Path) -> anyhow::Result<String> {
    let host_key = dir.join("sshd_host_key");
    if !host_key.exists() {
        std::process::Command::new("/usr/bin/ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .status()?;
    }
    let ca = dir.join("user_ca.pub");
    let cert = std::fs::read_to_string(format!("{}-cert.pub", id.display()))?;
    let parsed = russh::keys::Certificate::from_openssh(cert.trim())?;
    let ca_line = russh::keys::PublicKey::new(parsed.signature_key().clone(), "").to_openssh()?;
    std::fs::write(&ca, ca_line)?;
    Ok(format!(
        "HostKey {}\nTrustedUserCAKeys {}\nUsePAM no\nPidFile none\nStrictModes no\nAuthorizedKeysFile none\n",
        host_key.display(),
        ca.display()
    ))
}

/// A private sshd listening on loopback, trusting the cluster's user CA.
struct Sshd {
    child: std::process::Child,
    port: u16,
    /// `CertificateFile=…` for the client.
    cert: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssh_sshd(dir: &std::path::Path, id: &std::path::Path) -> anyhow::Result<Option<Sshd>> {
    if !std::path::Path::new("/usr/sbin/sshd").exists() {
        println!("(OpenSSH rows skipped: no /usr/sbin/sshd)");
        return Ok(None);
    }
    let base = sshd_base_config(dir, id)?;
    let port = free_port()?;
    let config = dir.join("sshd_listen_config");
    std::fs::write(
        &config,
        format!("Port {port}\nListenAddress 127.0.0.1\n{base}"),
    )?;
    let _ = std::fs::create_dir_all("/run/sshd");
    let child = std::process::Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f", config.to_str().unwrap_or_default()])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let sshd = Sshd {
        child,
        port,
        cert: format!("CertificateFile={}-cert.pub", id.display()),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "sshd did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some(sshd))
}

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
    let s = time_command(
        n,
        "/usr/bin/ssh",
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
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            id.to_str().unwrap_or_default(),
            "-o",
            &cert_file,
            &target,
            "true",
        ],
    );
    Ok(s.ok())
}

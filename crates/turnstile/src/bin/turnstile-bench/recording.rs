//! Bulk output in each recording mode, against OpenSSH.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::common::*;

pub async fn run() -> anyhow::Result<()> {
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

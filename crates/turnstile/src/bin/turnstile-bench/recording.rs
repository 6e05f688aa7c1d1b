//! Bulk output in each recording mode, against OpenSSH.

use anyhow::Context;

use crate::common::*;

/// Bulk output through `turnstile ssh` in each recording mode, and in
/// `node-sync` to each S3 server of `BENCH_STORES`, against OpenSSH direct to
/// a plain sshd, on clusters of separate processes.
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
    let login = bench_login();
    let bin = turnstile_bin()?;
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
    // One cluster recording to files; one more per S3 server, in node-sync.
    let files = Cluster::start(&bin, dir.path(), "files", &login, &Store::default(), "").await?;
    let stores = std::env::var("BENCH_STORES").unwrap_or_else(|_| "moto,s3s-fs".into());
    let mut servers = Vec::new();
    let mut remote = Vec::new();
    for kind in stores.split(',').filter(|s| !s.is_empty()) {
        let server = S3Server::start(kind).await?;
        let cluster = Cluster::start(&bin, dir.path(), kind, &login, &server.store, "").await?;
        cluster.set_mode("node-sync").await?;
        servers.push(server);
        remote.push((kind.to_string(), cluster));
    }
    // (label, cluster, mode to set before each run)
    let mut rows: Vec<(String, &Cluster, Option<&str>)> = modes
        .iter()
        .map(|m| (format!("turnstile, {m}"), &files, Some(*m)))
        .collect();
    for (kind, cluster) in &remote {
        rows.push((format!("node-sync to {kind}"), cluster, None));
    }

    // OpenSSH's sshd, listening, trusting the cluster's user CA.
    let sshd = openssh_sshd(dir.path(), &files.id)?;

    println!(
        "Bulk output (`cat` of {} MiB) to the client's /dev/null: Turnstile through its proxy (auth, proxy, node \
         separate processes) in each recording mode, node-sync to S3 servers on loopback, and OpenSSH direct \
         to a plain sshd; login {login}; zstd level {}; {runs} run(s) of each, taken in turn. MB/s is the \
         median; cost is the median of each run against the off run before it, with its range; RSS (MiB) is \
         the largest seen after a run.",
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
    let gib = size as f64 / (1u64 << 30) as f64;
    for (name, file) in [
        ("base64 of random", &base64),
        ("build log, repeated", &build_log),
    ] {
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
        let mut costs: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
        let mut stored = vec![0.0f64; rows.len()];
        let mut rss = vec![[0.0f64; 3]; rows.len()];
        // auth, proxy, node, client: CPU seconds per GiB, averaged over runs.
        let mut cpu = vec![[0.0f64; 4]; rows.len()];
        let mut openssh_cpu = 0.0f64;
        let mut openssh = Vec::new();
        let command = format!("echo $TURNSTILE_SESSION_ID >&2; cat {}", file.display());
        for _ in 0..runs {
            for (r, (_, cluster, mode)) in rows.iter().enumerate() {
                if let Some(mode) = mode {
                    cluster.set_mode(mode).await?;
                }
                let before = cluster.cpu();
                let client_before = cpu_secs(std::process::id());
                let (secs, stderr) = timed(
                    bin.to_str().unwrap_or_default(),
                    &[
                        "ssh",
                        "-i",
                        cluster.id.to_str().unwrap_or_default(),
                        "bench",
                        "--",
                        &command,
                    ],
                )?;
                let rate = size as f64 / secs / 1e6;
                rates[r].push(rate);
                if r > 0 {
                    costs[r].push((1.0 - rate / rates[0][rates[0].len() - 1]) * 100.0);
                    // The next run starts once this recording is stored.
                    let sid = stderr.lines().next().unwrap_or_default().trim().to_string();
                    let len = cluster.wait_recorded(&sid).await?;
                    stored[r] = len as f64 / size as f64;
                }
                let now = cluster.rss_mib();
                for i in 0..3 {
                    rss[r][i] = rss[r][i].max(now[i]);
                }
                // CPU of the whole session, its upload included, per GiB.
                let after = cluster.cpu();
                for i in 0..3 {
                    cpu[r][i] += (after[i] - before[i]) / gib / runs as f64;
                }
                cpu[r][3] += (cpu_secs(std::process::id()) - client_before) / gib / runs as f64;
            }
            if let Some(Sshd { port, cert, child }) = &sshd {
                let before = cpu_secs(child.id()) + cpu_secs(std::process::id());
                let port = port.to_string();
                let target = format!("{login}@127.0.0.1");
                let remote = format!("cat {}", file.display());
                let mut args = OPENSSH_OPTIONS.to_vec();
                args.extend([
                    "-i",
                    files.id.to_str().unwrap_or_default(),
                    "-o",
                    cert,
                    "-p",
                    &port,
                    &target,
                    &remote,
                ]);
                let (secs, _) = timed("/usr/bin/ssh", &args)?;
                openssh.push(size as f64 / secs / 1e6);
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
        for (r, (label, _, _)) in rows.iter().enumerate() {
            let rate = median(&mut rates[r]);
            let cost = if r == 0 {
                "-".to_string()
            } else {
                let (low, high) = costs[r]
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), &c| (l.min(c), h.max(c)));
                format!("{:.1}% ({low:.1}..{high:.1})", median(&mut costs[r]))
            };
            let stored = if r == 0 {
                "-".to_string()
            } else {
                format!("{:.3}", stored[r])
            };
            let c = cpu[r];
            println!(
                "{name:<20}  {label:<22}  {rate:>8.1}  {cost:>22}  {:>9.2}  {stored:>8}  {:>17}  {:>27}",
                rate / direct,
                format!("{:.0}/{:.0}/{:.0}", rss[r][0], rss[r][1], rss[r][2]),
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
    drop(rows);
    drop(remote);
    drop(servers);
    Ok(())
}

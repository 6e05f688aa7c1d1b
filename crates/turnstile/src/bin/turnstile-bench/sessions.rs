//! Many interactive sessions at once: `BENCH_SESSIONS` (default 1,000)
//! sessions, each a PTY running `cat` to which the client types a line of
//! 511 characters every 100 ms for `BENCH_SECONDS` (default 60), so the
//! terminal prints about 1 KiB a tick (the echo and cat's copy). Through
//! Turnstile (auth, proxy and node, separate processes) in each recording
//! mode of `BENCH_MODES` (default node,node-sync), and against OpenSSH's
//! sshd under the same load. One client process holds every session (russh
//! clients on one runtime), so the client does not weigh on the machine as
//! 1,000 `ssh` processes would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use russh::ChannelMsg;
use turnstile_ssh::client::UserCredentials;

use crate::common::*;

const TICK: Duration = Duration::from_millis(100);
const LINE: usize = 511;

/// Where sessions go.
#[derive(Clone)]
enum Target {
    Turnstile {
        proxy: String,
        trust: turnstile_ssh::client::Trust,
    },
    Sshd {
        port: u16,
    },
}

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    failed: AtomicUsize,
    finished: AtomicUsize,
    bytes: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn fail(&self, e: impl std::fmt::Display) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| e.to_string());
    }
}

/// Either connection kind, kept whole (the proxy hop lives in it).
enum Connection {
    ViaProxy(turnstile_ssh::client::NodeConnection),
    Direct(turnstile_ssh::client::Connected),
}

impl Connection {
    fn handle(&self) -> &russh::client::Handle<turnstile_ssh::client::HostChecker> {
        match self {
            Connection::ViaProxy(c) => &c.handle,
            Connection::Direct(c) => &c.handle,
        }
    }
}

async fn connect(
    target: &Target,
    login: &str,
    creds: &UserCredentials,
) -> anyhow::Result<Connection> {
    Ok(match target {
        Target::Turnstile { proxy, trust } => Connection::ViaProxy(
            turnstile_ssh::client::connect_via_proxy(proxy, "bench", login, creds, trust).await?,
        ),
        Target::Sshd { port } => {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", *port)).await?;
            let _ = tcp.set_nodelay(true);
            // No host CA: sshd's own key is accepted (loopback, a benchmark).
            let mut c = turnstile_ssh::client::open(tcp, "sshd", "127.0.0.1", &[]).await?;
            c.auth_certificate(login, creds).await?;
            Connection::Direct(c)
        }
    })
}

/// One session: connect, PTY, `cat`; wait for the start; type a line every
/// tick until `stop`; Ctrl-D; wait for cat to exit.
/// What every session of a load shares.
struct Shared {
    n: usize,
    seconds: u64,
    target: Target,
    login: String,
    creds: UserCredentials,
    /// Bounds the connections being set up at once.
    setup: tokio::sync::Semaphore,
    counters: Arc<Counters>,
}

async fn session(
    i: usize,
    shared: Arc<Shared>,
    mut go: tokio::sync::watch::Receiver<Option<Instant>>,
) {
    let Shared {
        n,
        seconds,
        target,
        login,
        creds,
        setup,
        counters,
    } = &*shared;
    let (n, seconds) = (*n, *seconds);
    let result = async {
        let permit = setup.acquire().await?;
        let conn = connect(target, login, creds).await?;
        let ch = conn.handle().channel_open_session().await?;
        ch.request_pty(true, "xterm", 200, 50, 0, 0, &[]).await?;
        ch.exec(true, "cat").await?;
        drop(permit);
        counters.connected.fetch_add(1, Ordering::SeqCst);
        let (mut read, write) = ch.split();
        let bytes = counters.clone();
        // Ok once cat exits of the Ctrl-D; what the server said on stderr
        // if it ended the session first.
        let reader = tokio::spawn(async move {
            let mut said = Vec::new();
            while let Some(msg) = read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        bytes.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    ChannelMsg::ExtendedData { data, .. } => said.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { .. } => return Ok(()),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            Err(anyhow::anyhow!(
                "the server ended the session: {:?}",
                String::from_utf8_lossy(&said).trim()
            ))
        });
        let start = loop {
            if let Some(start) = *go.borrow_and_update() {
                break start;
            }
            go.changed().await?;
        };
        // Sessions spread over the tick, as people type.
        let phase = TICK * u32::try_from(i).unwrap_or(0) / u32::try_from(n.max(1)).unwrap_or(1);
        let mut tick = tokio::time::interval_at((start + phase).into(), TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = start + Duration::from_secs(seconds);
        let mut line = vec![b'x'; LINE];
        line.push(b'\r');
        let line = bytes::Bytes::from(line);
        while Instant::now() < stop && !reader.is_finished() {
            tick.tick().await;
            if write.data_bytes(line.clone()).await.is_err() {
                break;
            }
        }
        let _ = write.data_bytes(&b"\x04"[..]).await;
        tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .map_err(|_| anyhow::anyhow!("cat did not exit after Ctrl-D"))???;
        drop(conn);
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            counters.finished.fetch_add(1, Ordering::SeqCst);
        }
        Err(e) => counters.fail(format!("{e:#}")),
    }
}

/// What the server side used while a load ran.
struct Measured {
    ok: usize,
    failed: usize,
    first_error: Option<String>,
    setup_secs: f64,
    cpu_secs: f64,
    client_cpu_secs: f64,
    idle_mib: f64,
    peak_mib: f64,
    after_mib: f64,
    received: u64,
}

/// Runs the load against `target`; `memory` and `cpu` read the server side
/// (all its processes).
async fn load(
    n: usize,
    seconds: u64,
    target: &Target,
    login: &str,
    creds: &UserCredentials,
    memory: &dyn Fn() -> f64,
    cpu: &dyn Fn() -> f64,
) -> anyhow::Result<Measured> {
    let counters = Arc::new(Counters::default());
    let shared = Arc::new(Shared {
        n,
        seconds,
        target: target.clone(),
        login: login.to_string(),
        creds: creds.clone(),
        setup: tokio::sync::Semaphore::new(32),
        counters: counters.clone(),
    });
    let (go_tx, go_rx) = tokio::sync::watch::channel(None);
    let idle_mib = memory();
    let cpu0 = cpu();
    let client0 = cpu_secs(std::process::id());
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(session(i, shared.clone(), go_rx.clone())));
    }
    // Everyone connected (or failed), then the load starts for all at once.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = Instant::now();
    while counters.connected.load(Ordering::SeqCst) + counters.failed.load(Ordering::SeqCst) < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "sessions did not connect within 10 minutes"
        );
        if last.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "  {} of {n} sessions connected, {} failed",
                counters.connected.load(Ordering::SeqCst),
                counters.failed.load(Ordering::SeqCst)
            );
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let setup_secs = t0.elapsed().as_secs_f64();
    go_tx.send(Some(Instant::now() + Duration::from_millis(500)))?;
    let mut peak_mib = memory();
    let mut all = futures::future::join_all(tasks);
    loop {
        tokio::select! {
            _ = &mut all => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => peak_mib = peak_mib.max(memory()),
        }
    }
    // Memory once the sessions are gone: the least of the next 20 s
    // (allocators give memory back over a few seconds).
    let mut after_mib = memory();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after_mib = after_mib.min(memory());
    }
    Ok(Measured {
        ok: counters.finished.load(Ordering::SeqCst),
        failed: counters.failed.load(Ordering::SeqCst),
        first_error: counters
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        setup_secs,
        cpu_secs: cpu() - cpu0,
        client_cpu_secs: cpu_secs(std::process::id()) - client0,
        idle_mib,
        peak_mib,
        after_mib,
        received: counters.bytes.load(Ordering::Relaxed),
    })
}

/// Waits (up to 3 minutes) until `count` recordings more than `before` are
/// complete; how many are, and the bytes they take in the store.
async fn stored_bytes(
    cluster: &Cluster,
    before: &std::collections::HashSet<String>,
    count: usize,
) -> anyhow::Result<(usize, u64)> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let list = recordings(cluster)?;
        let new: Vec<_> = list
            .iter()
            .filter(|(sid, _, _)| !before.contains(sid))
            .collect();
        let complete = new.iter().filter(|(_, status, _)| status == "complete");
        if complete.clone().count() >= count || Instant::now() >= deadline {
            return Ok((
                complete.clone().count(),
                complete.map(|(_, _, size)| size).sum(),
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// (sid, status, size) of every recording the bench user sees.
fn recordings(cluster: &Cluster) -> anyhow::Result<Vec<(String, String, u64)>> {
    let out = turnstile_ok(
        &cluster.bin,
        &[
            "recordings",
            "ls",
            "-i",
            cluster.id.to_str().unwrap_or_default(),
            "--format",
            "json",
        ],
    )?;
    out.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)?;
            Ok((
                v["sid"].as_str().unwrap_or_default().to_string(),
                v["status"].as_str().unwrap_or_default().to_string(),
                v["size"].as_u64().unwrap_or(0),
            ))
        })
        .collect()
}

pub async fn run() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let n: usize = std::env::var("BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .max(1);
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
        .max(1);
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "node,node-sync".into());
    let modes: Vec<&str> = modes.split(',').filter(|m| !m.is_empty()).collect();
    for m in &modes {
        m.parse::<turnstile_api::recording::RecordingMode>()?;
    }
    let login = bench_login();
    let bin = turnstile_bin()?;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let cluster =
        Cluster::start(&bin, dir.path(), "sessions", &login, &Store::default(), "").await?;
    let identity = turnstile::identity_file::read(&cluster.id)?;
    // Enough room for every connection to start at once.
    let sshd = openssh_sshd_with(
        dir.path(),
        &cluster.id,
        "MaxStartups 200:30:400\nUseDNS no\nLoginGraceTime 600\n",
    )?;

    println!(
        "{n} interactive sessions at once (PTY, `cat`, a line of {LINE} characters typed every 100 ms, about \
         1 KiB a tick printed back) for {seconds} s, one client process; login {login}. Server CPU: every \
         server process and what it ran (the sessions' `cat`), connections included; per MiB the client \
         received, since a saturated machine serves less than was typed. Memory: PSS of \
         Turnstile's auth, proxy and node, or of every sshd process (its sessions' `cat` left out); peak \
         during the load, and the least in the 20 s after."
    );
    println!(
        "{:<22}  {:>11}  {:>8}  {:>9}  {:>11}  {:>10}  {:>9}  {:>10}  {:>9}  {:>10}  {:>10}  {:>9}",
        "server",
        "sessions ok",
        "setup s",
        "CPU s",
        "CPU vs sshd",
        "CPU s/MiB",
        "idle MiB",
        "peak MiB",
        "MiB/sess",
        "after MiB",
        "stored MiB",
        "client s"
    );
    let mut rows = Vec::new();
    let creds = identity.credentials.clone();
    for mode in &modes {
        cluster.set_mode(mode).await?;
        let before: std::collections::HashSet<String> = recordings(&cluster)?
            .into_iter()
            .map(|(sid, _, _)| sid)
            .collect();
        let target = Target::Turnstile {
            proxy: cluster.proxy_addr.clone(),
            trust: identity.trust.clone(),
        };
        let pids = [cluster.auth.pid(), cluster.proxy.pid(), cluster.node.pid()];
        let memory = move || pids.iter().map(|p| pss_mib(*p)).sum::<f64>();
        let cpu = || cluster.cpu().iter().sum::<f64>();
        let m = load(n, seconds, &target, &login, &creds, &memory, &cpu).await?;
        let (complete, stored) = if *mode == "off" {
            (0, 0)
        } else {
            stored_bytes(&cluster, &before, m.ok).await?
        };
        if complete < m.ok {
            println!(
                "turnstile, {mode}: {complete} of {} recordings complete 3 minutes after the end",
                m.ok
            );
        }
        rows.push((format!("turnstile, {mode}"), m, Some(stored)));
    }
    if let Some(sshd) = &sshd {
        let target = Target::Sshd { port: sshd.port };
        let pid = sshd.child.id();
        let memory = move || {
            process_tree(pid)
                .iter()
                .filter(|(p, comm)| *p == pid || comm.starts_with("sshd"))
                .map(|(p, _)| pss_mib(*p))
                .sum::<f64>()
        };
        let cpu = || cpu_secs(pid);
        let m = load(n, seconds, &target, &login, &creds, &memory, &cpu).await?;
        rows.push(("OpenSSH sshd".to_string(), m, None));
    }
    let sshd_cpu = rows
        .iter()
        .find(|(_, _, stored)| stored.is_none())
        .map(|(_, m, _)| m.cpu_secs);
    for (label, m, stored) in &rows {
        println!(
            "{label:<22}  {:>11}  {:>8.1}  {:>9.1}  {:>11}  {:>10.3}  {:>9.0}  {:>10.0}  {:>9.3}  {:>10.0}  {:>10}  {:>9.1}",
            format!("{}/{n}", m.ok),
            m.setup_secs,
            m.cpu_secs,
            sshd_cpu.map_or("-".into(), |s| format!("{:.2}", m.cpu_secs / s)),
            m.cpu_secs / (m.received as f64 / f64::from(1 << 20)).max(1e-9),
            m.idle_mib,
            m.peak_mib,
            (m.peak_mib - m.idle_mib) / n as f64,
            m.after_mib,
            stored.map_or("-".into(), |b| format!(
                "{:.1}",
                b as f64 / f64::from(1 << 20)
            )),
            m.client_cpu_secs,
        );
    }
    for (label, m, _) in &rows {
        if m.failed > 0 {
            println!(
                "{label}: {} session(s) failed; the first: {}",
                m.failed,
                m.first_error.as_deref().unwrap_or("?")
            );
        }
        let expected = m.ok as u64 * seconds * 10 * (LINE as u64 + 1);
        println!(
            "{label}: the client received {:.1} MiB ({:.2}x what it typed)",
            m.received as f64 / f64::from(1 << 20),
            m.received as f64 / expected.max(1) as f64
        );
    }
    Ok(())
}

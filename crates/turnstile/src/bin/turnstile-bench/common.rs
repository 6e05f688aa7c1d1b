//! What the benchmarks share: Turnstile's processes, OpenSSH's sshd, CPU
//! and memory of a process.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub fn repeated_file(path: &std::path::Path, seed: &[u8], size: u64) -> anyhow::Result<()> {
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
pub struct Service {
    child: std::process::Child,
    banner: String,
}

impl Service {
    pub fn start(
        name: &str,
        bin: &std::path::Path,
        config: &std::path::Path,
    ) -> anyhow::Result<Self> {
        Self::start_env(name, bin, config, &[])
    }

    pub fn start_env(
        name: &str,
        bin: &std::path::Path,
        config: &std::path::Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let log = std::fs::File::create(config.with_extension("log"))?;
        let mut child = std::process::Command::new(bin)
            .args(["start", "--config", config.to_str().unwrap_or_default()])
            .envs(env.iter().map(|(k, v)| (k, v)))
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
    pub fn field(&self, label: &str) -> anyhow::Result<String> {
        self.banner
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(label).map(str::trim_start))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .with_context(|| format!("no {label} in {}", self.banner))
    }

    pub fn cpu(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_mib(&self) -> f64 {
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

pub fn turnstile_ok(bin: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
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
pub fn timed(program: &str, args: &[&str]) -> anyhow::Result<(f64, String)> {
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
pub fn cpu_secs(pid: u32) -> f64 {
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
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Bulk output through `turnstile ssh` in each recording mode, against
/// OpenSSH direct to a plain sshd, on a cluster of separate processes.
/// The lines of a private sshd's config: a fresh host key, the cluster's
/// user CA (read off the identity's certificate) trusted, no PAM.
pub fn sshd_base_config(dir: &std::path::Path, id: &std::path::Path) -> anyhow::Result<String> {
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

/// OpenSSH client options of every benchmark run against a private sshd:
/// no user config, no prompt, no host key check (loopback), errors only,
/// only the identity given with `-i`.
pub const OPENSSH_OPTIONS: [&str; 12] = [
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
];

/// A private sshd listening on loopback, trusting the cluster's user CA.
pub struct Sshd {
    pub child: std::process::Child,
    pub port: u16,
    /// `CertificateFile=…` for the client.
    pub cert: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn openssh_sshd(dir: &std::path::Path, id: &std::path::Path) -> anyhow::Result<Option<Sshd>> {
    openssh_sshd_with(dir, id, "")
}

/// `openssh_sshd` with more lines of sshd_config.
pub fn openssh_sshd_with(
    dir: &std::path::Path,
    id: &std::path::Path,
    extra: &str,
) -> anyhow::Result<Option<Sshd>> {
    if !std::path::Path::new("/usr/sbin/sshd").exists() {
        println!("(OpenSSH rows skipped: no /usr/sbin/sshd)");
        return Ok(None);
    }
    let base = sshd_base_config(dir, id)?;
    let port = free_port()?;
    let config = dir.join("sshd_listen_config");
    std::fs::write(
        &config,
        format!("Port {port}\nListenAddress 127.0.0.1\n{base}{extra}"),
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

/// The login sessions run as: `BENCH_LOGIN`, else turnstile-test if the
/// machine has it (scripts/install-test-deps.sh makes it), else root.
pub fn bench_login() -> String {
    std::env::var("BENCH_LOGIN").unwrap_or_else(|_| {
        if nix::unistd::User::from_name("turnstile-test")
            .ok()
            .flatten()
            .is_some()
        {
            "turnstile-test".into()
        } else {
            "root".into()
        }
    })
}

/// The release `turnstile` next to this binary.
pub fn turnstile_bin() -> anyhow::Result<std::path::PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("turnstile");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run scripts/bench.sh",
        bin.display()
    );
    Ok(bin)
}

/// Where recordings go, and what auth's process needs to reach it.
#[derive(Clone, Default)]
pub struct Store {
    /// `turnstile.storage.audit_sessions_uri`; the default (files) if None.
    pub uri: Option<String>,
    pub env: Vec<(String, String)>,
}

/// Auth, a proxy and a node, each its own process, joined with tokens; a
/// user `bench` with an identity signed for the proxy.
pub struct Cluster {
    pub auth: Service,
    pub proxy: Service,
    pub node: Service,
    pub bin: std::path::PathBuf,
    pub auth_data: std::path::PathBuf,
    pub proxy_addr: String,
    /// The user's identity (`-i`).
    pub id: std::path::PathBuf,
}

impl Cluster {
    /// In `dir/<name>-*`; `node_config` is added to the node's
    /// `ssh_service` section.
    pub async fn start(
        bin: &std::path::Path,
        dir: &std::path::Path,
        name: &str,
        login: &str,
        store: &Store,
        node_config: &str,
    ) -> anyhow::Result<Self> {
        let path = |part: &str| dir.join(format!("{name}-{part}"));
        let storage = match &store.uri {
            Some(uri) => format!("  storage:\n    audit_sessions_uri: \"{uri}\"\n"),
            None => String::new(),
        };
        std::fs::write(
            path("auth.yaml"),
            format!(
                "turnstile:\n  data_dir: {}\n{storage}auth_service:\n  listen_addr: 127.0.0.1:0\n  cluster_name: bench\n",
                path("auth").display()
            ),
        )?;
        let auth = Service::start_env("auth", bin, &path("auth.yaml"), &store.env)?;
        let auth_addr = auth.field("auth")?;
        let pin = auth.field("CA pin")?;
        let auth_data = path("auth");
        let admin = |args: &[&str]| admin_of(bin, &auth_data, args);
        let token = |kind: &str| -> anyhow::Result<String> {
            let out = admin(&["tokens", "add", "--type", kind, "--format", "json"])?;
            let v: serde_json::Value = serde_json::from_str(out.trim())?;
            v["token"].as_str().map(str::to_string).context("token")
        };
        let joining = |part: &str,
                       token: &str,
                       service: &str|
         -> anyhow::Result<std::path::PathBuf> {
            let config = path(&format!("{part}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "turnstile:\n  data_dir: {}\n  auth_servers: [\"{auth_addr}\"]\n  join_token: {token}\n  ca_pin: {pin}\n{MANY_CLIENTS}{service}",
                    path(part).display()
                ),
            )?;
            Ok(config)
        };
        let proxy = Service::start(
            "proxy",
            bin,
            &joining(
                "proxy",
                &token("proxy")?,
                "proxy_service:\n  listen_addr: 127.0.0.1:0\n",
            )?,
        )?;
        let proxy_addr = proxy.field("proxy")?;
        let node = Service::start(
            "node",
            bin,
            &joining(
                "node",
                &token("node")?,
                &format!(
                    "ssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: bench\n{node_config}"
                ),
            )?,
        )?;
        admin(&[
            "users", "add", "bench", "--roles", "access", "--logins", login,
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
        Ok(Self {
            auth,
            proxy,
            node,
            bin: bin.to_path_buf(),
            auth_data,
            proxy_addr,
            id,
        })
    }

    pub fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        admin_of(&self.bin, &self.auth_data, args)
    }

    /// CPU seconds of auth, proxy and node so far.
    pub fn cpu(&self) -> [f64; 3] {
        [self.auth.cpu(), self.proxy.cpu(), self.node.cpu()]
    }

    pub fn rss_mib(&self) -> [f64; 3] {
        [
            self.auth.rss_mib(),
            self.proxy.rss_mib(),
            self.node.rss_mib(),
        ]
    }

    /// Sets the cluster's recording mode and waits until the node's view has
    /// it (views refresh every 5 s).
    pub async fn set_mode(&self, mode: &str) -> anyhow::Result<()> {
        self.admin(&["config", "set", "session_recording", mode])?;
        tokio::time::sleep(Duration::from_secs(6)).await;
        Ok(())
    }

    /// Waits until the recording of `sid` is complete, as its user sees it
    /// (`turnstile recordings ls`); its size in the store.
    pub async fn wait_recorded(&self, sid: &str) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let out = turnstile_ok(
                &self.bin,
                &[
                    "recordings",
                    "ls",
                    "-i",
                    self.id.to_str().unwrap_or_default(),
                    "--format",
                    "json",
                ],
            )?;
            for line in out.lines() {
                let v: serde_json::Value = serde_json::from_str(line)?;
                if v["sid"] == sid && v["status"] == "complete" {
                    return v["size"].as_u64().context("size");
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the recording of {sid} never completed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn admin_of(
    bin: &std::path::Path,
    data: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut all = vec!["admin"];
    all.extend_from_slice(args);
    all.extend(["--data-dir", data.to_str().unwrap_or_default()]);
    turnstile_ok(bin, &all)
}

/// Where scripts/install-test-deps.sh puts the test servers.
pub fn test_tool(relative: &str) -> anyhow::Result<std::path::PathBuf> {
    let root = std::env::var_os("TURNSTILE_TEST_TOOLS")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/turnstile-test-tools"))
        })
        .context("HOME is not set")?;
    let path = root.join(relative);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run scripts/install-test-deps.sh",
        path.display()
    );
    Ok(path)
}

/// An S3 server for the benchmark (moto or s3s-fs) on loopback, its bucket
/// made; stopped on drop.
pub struct S3Server {
    child: std::process::Child,
    pub store: Store,
    _root: Option<tempfile::TempDir>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Benchmarks open hundreds of connections at once from 127.0.0.1: far
/// above the default limits on unauthenticated connections.
pub(crate) const MANY_CLIENTS: &str =
    "  pre_auth:\n    max_startups: \"4096\"\n    per_source_max_startups: 4096\n";

const BENCH_ACCESS_KEY: &str = "AKIATURNSTILEBENCH";
const BENCH_SECRET_KEY: &str = "turnstile-bench-secret-key";

impl S3Server {
    /// `kind`: `moto` or `s3s-fs`.
    pub async fn start(kind: &str) -> anyhow::Result<Self> {
        use std::io::{Read, Write};
        let port = free_port()?;
        let quiet = |c: &mut std::process::Command| {
            c.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
        };
        let (child, root) = match kind {
            "moto" => {
                let mut c = std::process::Command::new(test_tool("venv/bin/moto_server")?);
                c.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                quiet(&mut c);
                (c.spawn()?, None)
            }
            "s3s-fs" => {
                let root = tempfile::tempdir()?;
                std::fs::create_dir(root.path().join("turnstile"))?;
                let mut c = std::process::Command::new(test_tool("bin/s3s-fs")?);
                c.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", BENCH_ACCESS_KEY])
                    .args(["--secret-key", BENCH_SECRET_KEY])
                    .arg(root.path());
                quiet(&mut c);
                (c.spawn()?, Some(root))
            }
            other => bail!("BENCH_STORES: {other:?} is not a store here; known: moto, s3s-fs"),
        };
        let server = Self {
            child,
            store: Store {
                uri: Some(format!(
                    "s3://turnstile/bench?endpoint=http://127.0.0.1:{port}&region=us-east-1"
                )),
                env: vec![
                    ("AWS_ACCESS_KEY_ID".into(), BENCH_ACCESS_KEY.into()),
                    ("AWS_SECRET_ACCESS_KEY".into(), BENCH_SECRET_KEY.into()),
                ],
            },
            _root: root,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "{kind} did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if kind == "moto" {
            // moto checks no signature: a bare PUT makes the bucket.
            let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
            write!(
                tcp,
                "PUT /turnstile HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            let mut answer = String::new();
            tcp.read_to_string(&mut answer)?;
            anyhow::ensure!(answer.starts_with("HTTP/1.1 200"), "moto: {answer}");
        }
        Ok(server)
    }
}

/// A process's proportional set size in MiB (its share of shared pages).
pub fn pss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `pid` and all its descendants, with their command names.
pub fn process_tree(pid: u32) -> Vec<(u32, String)> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[open + 1..close].to_string();
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0);
            parent_of.push((p, ppid, comm));
        }
    }
    let mut out = vec![(pid, String::new())];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i].0;
        for (p, ppid, comm) in &parent_of {
            if *ppid == parent {
                out.push((*p, comm.clone()));
            }
        }
        i += 1;
    }
    out
}

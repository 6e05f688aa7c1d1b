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

//! The test cluster and helpers shared by the integration tests.
//!
//! `TestCluster` runs auth, proxy and node in this process on port 0, with
//! its data in a temporary directory, and stops on drop. Everything a user
//! types (admin, ssh) runs through the real `turnstile` binary, and OpenSSH
//! tests run the real `ssh`.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use turnstile::process::{Running, launch};
use turnstile_auth::Authority;

pub const BIN: &str = env!("CARGO_BIN_EXE_turnstile");

/// The non-root login tests run sessions as; `scripts/test.sh` creates it.
pub const TEST_LOGIN: &str = "turnstile-test";

pub struct TestCluster {
    pub dir: TempDir,
    running: Option<Running>,
    pub proxy_addr: String,
    pub node_addr: String,
    pub node_name: String,
    /// The web console's address, when the spec turns it on.
    pub web_addr: Option<String>,
}

/// Work on a cluster's data dir before it starts.
pub type Prepare = Box<dyn FnOnce(&Path) + Send>;

/// A fluent description of the cluster a test wants.
pub struct ClusterSpec {
    pub node_name: String,
    pub labels: Vec<(String, String)>,
    /// `sqlite` or `memory`.
    pub storage: &'static str,
    /// More `auth_service` lines, indented two spaces.
    pub auth_extra: String,
    /// More `turnstile` (global) lines, indented two spaces.
    pub global_extra: String,
    /// More `ssh_service` lines, indented two spaces.
    pub node_extra: String,
    /// More `proxy_service` lines, indented two spaces.
    pub proxy_extra: String,
    /// Runs on the data dir (not yet created by the cluster) before start.
    pub prepare: Option<Prepare>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            node_name: "web1".into(),
            labels: vec![("env".into(), "dev".into())],
            storage: "sqlite",
            auth_extra: String::new(),
            global_extra: String::new(),
            node_extra: String::new(),
            proxy_extra: String::new(),
            prepare: None,
        }
    }
}

impl TestCluster {
    pub async fn start() -> Self {
        Self::start_with(ClusterSpec::default()).await
    }

    pub async fn start_with(mut spec: ClusterSpec) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(prepare) = spec.prepare.take() {
            prepare(&dir.path().join("data"));
        }
        let labels: String = spec
            .labels
            .iter()
            .map(|(k, v)| format!("    {k}: {v}\n"))
            .collect();
        let yaml = format!(
            "turnstile:\n  data_dir: {data}\n  storage:\n    type: {storage}\n{global_extra}\
auth_service:\n  listen_addr: 127.0.0.1:0\n  cluster_name: test\n{auth_extra}\
proxy_service:\n  listen_addr: 127.0.0.1:0\n{proxy_extra}\
ssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: {node}\n{node_extra}  labels:\n{labels}",
            data = dir.path().join("data").display(),
            node = spec.node_name,
            storage = spec.storage,
            auth_extra = spec.auth_extra,
            global_extra = spec.global_extra,
            node_extra = spec.node_extra,
            proxy_extra = spec.proxy_extra,
        );
        let config_path = dir.path().join("turnstile.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let config = turnstile::config::load(Some(&config_path), None).expect("config");
        let running = launch(config).await.expect("cluster starts");
        let cluster = Self {
            proxy_addr: running.proxy_public_addr.clone().unwrap(),
            node_addr: running.node_addr.unwrap().to_string(),
            node_name: spec.node_name.clone(),
            web_addr: running.web_addr.map(|a| a.to_string()),
            running: Some(running),
            dir,
        };
        cluster.wait_for_node(&spec.node_name).await;
        cluster
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn authority(&self) -> Arc<Authority> {
        self.running
            .as_ref()
            .and_then(|r| r.authority.clone())
            .expect("the test cluster runs auth")
    }

    /// Polls until the node has registered with auth.
    pub async fn wait_for_node(&self, name: &str) {
        let authority = self.authority();
        poll_until(Duration::from_secs(15), || {
            let authority = authority.clone();
            let name = name.to_string();
            async move {
                authority
                    .list_nodes()
                    .await
                    .map(|nodes| nodes.iter().any(|n| n.name == name))
                    .unwrap_or(false)
            }
        })
        .await
        .unwrap_or_else(|_| panic!("node {name} never registered"));
    }

    /// `turnstile admin ARGS --data-dir DIR`.
    pub async fn admin(&self, args: &[&str]) -> Output {
        let data_dir = self.data_dir();
        let mut all: Vec<&str> = vec!["admin"];
        all.extend_from_slice(args);
        all.push("--data-dir");
        all.push(data_dir.to_str().unwrap());
        run(BIN, &all, None).await
    }

    /// `turnstile admin ARGS` that must succeed.
    pub async fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args).await;
        assert!(
            out.status.success(),
            "turnstile admin {args:?} failed:\n{}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    pub async fn add_user(&self, name: &str, roles: &str, logins: &str) {
        self.admin_ok(&["users", "add", name, "--roles", roles, "--logins", logins])
            .await;
    }

    /// Creates a role from YAML text.
    /// `admin users passwd USER --password-stdin`.
    pub async fn set_password(&self, user: &str, password: &str) {
        let data = self.data_dir();
        let out = run(
            BIN,
            &[
                "admin",
                "users",
                "passwd",
                user,
                "--password-stdin",
                "--data-dir",
                data.to_str().unwrap(),
            ],
            Some(format!("{password}\n").as_bytes()),
        )
        .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    pub async fn create_role(&self, name: &str, yaml: &str) {
        let path = self.dir.path().join(format!("{name}.role.yaml"));
        std::fs::write(&path, yaml).unwrap();
        self.admin_ok(&["roles", "create", "-f", path.to_str().unwrap()])
            .await;
    }

    /// Signs an identity for `user` and returns its path prefix.
    pub async fn sign(&self, user: &str) -> PathBuf {
        let out = self.dir.path().join(format!("id-{user}"));
        self.admin_ok(&["sign", "--user", user, "--out", out.to_str().unwrap()])
            .await;
        out
    }

    /// `turnstile ssh -i IDENTITY ARGS`.
    pub async fn ssh(&self, identity: &Path, args: &[&str]) -> Output {
        let mut all = vec!["ssh", "-i", identity.to_str().unwrap()];
        all.extend_from_slice(args);
        run(BIN, &all, None).await
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown_token().cancel();
        }
    }
}

/// Runs a program with optional stdin and collects its output; it is killed
/// if it runs longer than a minute.
pub async fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).await.unwrap();
        drop(pipe);
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within a minute"))
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `check` until it returns true or `deadline` passes.
pub async fn poll_until<F, Fut>(deadline: Duration, mut check: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The OpenSSH client, or a failure that says how to get it.
pub fn openssh() -> &'static str {
    let path = "/usr/bin/ssh";
    assert!(
        Path::new(path).exists(),
        "the OpenSSH client is missing; run scripts/test.sh, which installs openssh-client"
    );
    path
}

/// Checks the non-root test login exists (scripts/test.sh creates it).
pub fn test_login() -> &'static str {
    assert!(
        nix::unistd::User::from_name(TEST_LOGIN)
            .ok()
            .flatten()
            .is_some(),
        "local user {TEST_LOGIN} is missing; run scripts/test.sh, which creates it"
    );
    TEST_LOGIN
}

/// Writes the config of auth, proxy and node in one process on port 0, with
/// its data in `dir/data`; returns the config's path.
pub fn one_process_config(dir: &Path, node_name: &str) -> PathBuf {
    let config = dir.join("turnstile.yaml");
    std::fs::write(
        &config,
        format!(
            "turnstile:\n  data_dir: {}\n{}auth_service:\n  listen_addr: 127.0.0.1:0\nproxy_service:\n  listen_addr: 127.0.0.1:0\nssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: {node_name}\n",
            dir.join("data").display(),
            crate::cluster::MANY_FROM_ONE_ADDRESS,
        ),
    )
    .unwrap();
    config
}

/// The resident memory of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status")
        * 1024
}

/// A `turnstile start` process of the real binary, with its own config.
pub struct Proc {
    child: tokio::process::Child,
    pub banner: String,
    pub stderr_path: PathBuf,
}

impl Proc {
    /// Starts `turnstile start --config CONFIG` and waits for `turnstile is ready`.
    pub async fn start(config: &Path) -> Self {
        Self::try_start(config)
            .await
            .unwrap_or_else(|(status, stderr)| {
                panic!("turnstile start failed ({status}):\n{stderr}")
            })
    }

    /// Like `start`, with more environment variables (credentials of a store).
    pub async fn start_env(config: &Path, env: &[(&str, String)]) -> Self {
        Self::try_start_env(config, env)
            .await
            .unwrap_or_else(|(status, stderr)| {
                panic!("turnstile start failed ({status}):\n{stderr}")
            })
    }

    /// Like `start`, but returns the exit status and stderr if it fails.
    pub async fn try_start(config: &Path) -> Result<Self, (String, String)> {
        Self::try_start_env(config, &[]).await
    }

    /// Like `try_start`, with more environment variables.
    pub async fn try_start_env(
        config: &Path,
        env: &[(&str, String)],
    ) -> Result<Self, (String, String)> {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let stderr_path = config.with_extension("stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = tokio::process::Command::new(BIN)
            .args(["start", "--config", config.to_str().unwrap()])
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = String::new();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                banner.push_str(&line);
                banner.push('\n');
                if line == "turnstile is ready" {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !ready {
            let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .map(|s| format!("{:?}", s.ok()))
                .unwrap_or_else(|_| "still running".into());
            return Err((
                status,
                std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            ));
        }
        // Keep draining stdout so the process never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            banner,
            stderr_path,
        })
    }

    /// The value printed after `label` in the ready block (`auth`, `proxy`, `node`, `CA pin`).
    pub fn field(&self, label: &str) -> String {
        self.banner
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(label).map(str::trim_start))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {label:?} in:\n{}", self.banner))
            .to_string()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Resident memory of the process, in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid().as_raw() as u32)
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id().expect("running") as i32)
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        // Live sessions get `shutdown_grace` (30s) to finish.
        let status = tokio::time::timeout(Duration::from_secs(45), self.child.wait())
            .await
            .expect("stops within 45s of SIGTERM")
            .unwrap();
        assert!(
            status.success(),
            "clean exit, got {status:?}:\n{}",
            self.stderr()
        );
    }

    /// SIGTERM, without waiting.
    pub fn terminate(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// Waits for the process to exit, at most `bound`.
    pub async fn exited_within(mut self, bound: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(bound, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running after {bound:?}:\n{}", self.stderr()))
            .unwrap()
    }

    /// SIGKILL, as a crash.
    pub async fn kill9(mut self) {
        self.crash().await;
    }

    /// SIGKILL, keeping the (dead) handle: for a process a struct owns.
    pub async fn crash(&mut self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = self.child.wait().await;
    }
}

/// The audit log's events read from its files under `data/log`, for when
/// auth is no longer running.
pub fn audit_log_files(data: &Path) -> Vec<serde_json::Value> {
    let mut events = Vec::new();
    let Ok(dir) = std::fs::read_dir(data.join("log")) else {
        return events;
    };
    let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            if let Ok(v) = serde_json::from_str(line) {
                events.push(v);
            }
        }
    }
    events
}

/// The audit log's events (of kind `event`, if given), through
/// `turnstile admin audit search --data-dir DATA`.
pub async fn audit_events(data: &Path, event: Option<&str>) -> Vec<serde_json::Value> {
    let mut args = vec!["admin", "audit", "search", "--format", "json"];
    if let Some(event) = event {
        args.extend(["--event", event]);
    }
    args.extend(["--data-dir", data.to_str().unwrap()]);
    let out = run(BIN, &args, None).await;
    assert!(out.status.success(), "audit search: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What a finished child wrote to stderr.
pub async fn stderr_of(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    stderr
}

/// `turnstile ARGS` as a child that goes on running (a session held open):
/// stdin, stdout and stderr piped, killed on drop; `home`: a profile home.
pub fn spawn_turnstile(args: &[&str], home: Option<&Path>) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(home) = home {
        cmd.env("TURNSTILE_HOME", home);
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

/// `turnstile ARGS` with a profile home, for client commands.
pub async fn client(home: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env("RUST_BACKTRACE", "0")
        .env("TURNSTILE_HOME", home)
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).await.unwrap();
        drop(pipe);
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("finishes within a minute")
        .unwrap()
}

/// An echo server on loopback, for forwarding tests; its port.
pub async fn echo_server() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A loopback port free a moment ago, for a client-side listener (`ssh -L`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

//! A cluster of separate processes from the real binary, as it runs in
//! production: auth alone, a proxy and two nodes joining with tokens, users
//! logging in with a password, restarts, crashes and auth outages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{BIN, Proc, client, poll_until, run, text};

pub(crate) struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    pub(crate) fn new() -> Self {
        Self {
            root: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    pub(crate) fn config(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.path(&format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

pub(crate) fn auth_yaml(data: &Path, listen: &str, extra: &str) -> String {
    format!(
        "turnstile:\n  data_dir: {}\nauth_service:\n  listen_addr: {listen}\n  cluster_name: prod\n{extra}",
        data.display()
    )
}

pub(crate) fn joining_yaml(
    data: &Path,
    auth: &str,
    token: Option<&str>,
    pin: &str,
    service: &str,
) -> String {
    let token = token
        .map(|t| format!("  join_token: {t}\n"))
        .unwrap_or_default();
    format!(
        "turnstile:\n  data_dir: {}\n  auth_servers: [\"{auth}\"]\n{token}  ca_pin: {pin}\n{MANY_FROM_ONE_ADDRESS}{service}",
        data.display()
    )
}

/// The tests' clients all come from 127.0.0.1, up to 40 racers at once:
/// above the default of 10 unauthenticated connections per address.
pub(crate) const MANY_FROM_ONE_ADDRESS: &str = "  pre_auth:\n    per_source_max_startups: 100\n";

pub(crate) fn node_service(name: &str, env: &str) -> String {
    format!(
        "ssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: {name}\n  labels: {{env: {env}}}\n  heartbeat_interval: 1s\n"
    )
}

pub(crate) const PROXY_SERVICE: &str = "proxy_service:\n  listen_addr: 127.0.0.1:0\n";

pub(crate) async fn admin(auth_data: &Path, args: &[&str]) -> String {
    let mut all = vec!["admin"];
    all.extend_from_slice(args);
    all.extend(["--data-dir", auth_data.to_str().unwrap()]);
    let out = run(BIN, &all, None).await;
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub(crate) async fn admin_with_stdin(auth_data: &Path, args: &[&str], stdin: &[u8]) -> String {
    let mut all = vec!["admin"];
    all.extend_from_slice(args);
    all.extend(["--data-dir", auth_data.to_str().unwrap()]);
    let out = run(BIN, &all, Some(stdin)).await;
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A token for `kind` and the CA pin, from `admin tokens add --format json`.
pub(crate) async fn token(auth_data: &Path, kind: &str, ttl: &str) -> (String, String) {
    let out = admin(
        auth_data,
        &[
            "tokens", "add", "--type", kind, "--ttl", ttl, "--format", "json",
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (
        v["token"].as_str().unwrap().to_string(),
        v["ca_pin"].as_str().unwrap().to_string(),
    )
}

pub(crate) async fn node_names(auth_data: &Path) -> Vec<String> {
    admin(auth_data, &["nodes", "ls", "--format", "json"])
        .await
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Auth, a proxy and two nodes (web1 env=dev, db1 env=prod) as processes.
pub(crate) struct Cluster {
    pub dirs: Dirs,
    pub auth: Option<Proc>,
    pub proxy: Proc,
    pub web1: Option<Proc>,
    pub db1: Option<Proc>,
    pub auth_addr: String,
    pub proxy_addr: String,
    pub pin: String,
    auth_extra: String,
}

impl Cluster {
    pub(crate) async fn start() -> Self {
        Self::start_with("").await
    }

    /// `auth_extra`: more `auth_service` lines, indented two spaces.
    pub(crate) async fn start_with(auth_extra: &str) -> Self {
        let dirs = Dirs::new();
        let auth = Proc::start(&dirs.config(
            "auth",
            &auth_yaml(&dirs.path("auth"), "127.0.0.1:0", auth_extra),
        ))
        .await;
        let auth_addr = auth.field("auth");
        let pin = auth.field("CA pin");
        let auth_data = dirs.path("auth");
        let (t, p) = token(&auth_data, "proxy", "10m").await;
        assert_eq!(p, pin, "tokens print the same CA pin as start");
        let proxy = Proc::start(&dirs.config(
            "proxy",
            &joining_yaml(
                &dirs.path("proxy"),
                &auth_addr,
                Some(&t),
                &pin,
                PROXY_SERVICE,
            ),
        ))
        .await;
        let proxy_addr = proxy.field("proxy");
        let mut nodes = Vec::new();
        for (name, env) in [("web1", "dev"), ("db1", "prod")] {
            let (t, _) = token(&auth_data, "node", "10m").await;
            nodes.push(
                Proc::start(&dirs.config(
                    name,
                    &joining_yaml(
                        &dirs.path(name),
                        &auth_addr,
                        Some(&t),
                        &pin,
                        &node_service(name, env),
                    ),
                ))
                .await,
            );
        }
        let db1 = nodes.pop();
        let web1 = nodes.pop();
        let c = Self {
            dirs,
            auth: Some(auth),
            proxy,
            web1,
            db1,
            auth_addr,
            proxy_addr,
            pin,
            auth_extra: auth_extra.to_string(),
        };
        poll_until(Duration::from_secs(20), || async {
            let names = node_names(&c.auth_data()).await;
            names.contains(&"web1".to_string()) && names.contains(&"db1".to_string())
        })
        .await
        .expect("both nodes register");
        c
    }

    /// The auth config for a restart on the same address.
    pub(crate) fn auth_again_yaml(&self) -> String {
        auth_yaml(&self.auth_data(), &self.auth_addr, &self.auth_extra)
    }

    pub(crate) fn auth_data(&self) -> PathBuf {
        self.dirs.path("auth")
    }

    pub(crate) fn home(&self) -> PathBuf {
        self.dirs.path("home")
    }

    /// A dev-only user with a password.
    pub(crate) async fn add_alice(&self) {
        let role = self.dirs.path("dev-only.yaml");
        std::fs::write(
            &role,
            "kind: role\nversion: v3\nmetadata:\n  name: dev-only\nspec:\n  allow:\n    logins: ['{{internal.logins}}']\n    node_labels:\n      env: dev\n",
        )
        .unwrap();
        admin(
            &self.auth_data(),
            &["roles", "create", "-f", role.to_str().unwrap()],
        )
        .await;
        admin_with_stdin(
            &self.auth_data(),
            &[
                "users",
                "add",
                "alice",
                "--roles",
                "dev-only",
                "--logins",
                "root",
                "--password-stdin",
            ],
            b"correct horse battery\n",
        )
        .await;
    }

    pub(crate) async fn login(&self, password: &str) -> std::process::Output {
        client(
            &self.home(),
            &[
                "login",
                "--proxy",
                &self.proxy_addr,
                "--user",
                "alice",
                "--ca-pin",
                &self.pin,
                "--password-stdin",
            ],
            Some(format!("{password}\n").as_bytes()),
        )
        .await
    }

    pub(crate) async fn ssh(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["ssh"];
        all.extend_from_slice(args);
        client(&self.home(), &all, None).await
    }

    /// Restarts web1 (it keeps its identity) with more `turnstile` lines,
    /// indented two spaces, in its config; waits until auth has it again.
    pub(crate) async fn restart_web1(&mut self, global_extra: &str) {
        if let Some(p) = self.web1.take() {
            p.stop().await;
        }
        let yaml = joining_yaml(
            &self.dirs.path("web1"),
            &self.auth_addr,
            None,
            &self.pin,
            &format!("{global_extra}{}", node_service("web1", "dev")),
        );
        let node = Proc::start(&self.dirs.config("web1-again", &yaml)).await;
        let addr = node.field("node");
        self.web1 = Some(node);
        poll_until(Duration::from_secs(20), || async {
            admin(&self.auth_data(), &["nodes", "ls", "--format", "json"])
                .await
                .contains(&addr)
        })
        .await
        .expect("web1 registers again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_join_users_log_in_and_nodes_come_and_go() {
    let mut c = Cluster::start().await;
    c.add_alice().await;

    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Logged in as \"alice\" on cluster \"prod\""),
        "{}",
        text(&out.stdout)
    );
    let key = c.home().join("keys/prod/alice");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the private key is 0600");

    // ls shows only what the roles allow, and ssh uses the profile.
    let out = client(&c.home(), &["ls", "--format", "json"], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "web1");
    assert_eq!(listed[0]["labels"]["env"], "dev");
    let out = c.ssh(&["web1", "echo", "hello from web1"]).await;
    assert_eq!(
        text(&out.stdout),
        "hello from web1\n",
        "{}",
        text(&out.stderr)
    );
    let out = c.ssh(&["db1", "true"]).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("do not allow login \"root\" on node \"db1\""),
        "{}",
        text(&out.stderr)
    );

    // A restarted node uses the identity it kept, without a token.
    let web1_id = admin(&c.auth_data(), &["nodes", "ls", "--format", "json"]).await;
    c.web1.take().unwrap().stop().await;
    let config = c.dirs.config(
        "web1-again",
        &joining_yaml(
            &c.dirs.path("web1"),
            &c.auth_addr,
            None,
            &c.pin,
            &node_service("web1", "dev"),
        ),
    );
    c.web1 = Some(Proc::start(&config).await);
    let out = c.ssh(&["web1", "echo", "back"]).await;
    assert_eq!(text(&out.stdout), "back\n", "{}", text(&out.stderr));
    let again = admin(&c.auth_data(), &["nodes", "ls", "--format", "json"]).await;
    let id_of = |s: &str| {
        s.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["name"] == "web1")
            .map(|v| v["id"].clone())
    };
    assert_eq!(
        id_of(&web1_id),
        id_of(&again),
        "same host id after the restart"
    );

    // A node that stops heartbeating leaves the listings after its expiry.
    c.db1.take().unwrap().kill9().await;
    poll_until(Duration::from_secs(20), || async {
        !node_names(&c.auth_data())
            .await
            .contains(&"db1".to_string())
    })
    .await
    .expect("db1 expires from admin nodes ls");
    let out = client(&c.home(), &["ls"], None).await;
    assert!(!text(&out.stdout).contains("db1"));
    c.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_and_login_refusals() {
    let c = Cluster::start().await;
    c.add_alice().await;
    let auth_data = c.auth_data();

    // A used token.
    let (t, _) = token(&auth_data, "node", "10m").await;
    let first = Proc::start(&c.dirs.config(
        "n1",
        &joining_yaml(
            &c.dirs.path("n1"),
            &c.auth_addr,
            Some(&t),
            &c.pin,
            &node_service("n1", "dev"),
        ),
    ))
    .await;
    let reused = Proc::try_start(&c.dirs.config(
        "n2",
        &joining_yaml(
            &c.dirs.path("n2"),
            &c.auth_addr,
            Some(&t),
            &c.pin,
            &node_service("n2", "dev"),
        ),
    ))
    .await;
    let (_, stderr) = reused.err().expect("a reused token is refused");
    assert!(
        stderr.contains("invalid, expired or already used"),
        "{stderr}"
    );
    first.stop().await;

    // An expired token.
    let (t, _) = token(&auth_data, "node", "1s").await;
    let expired_at = std::time::SystemTime::now() + Duration::from_secs(2);
    while std::time::SystemTime::now() < expired_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = Proc::try_start(&c.dirs.config(
        "n3",
        &joining_yaml(
            &c.dirs.path("n3"),
            &c.auth_addr,
            Some(&t),
            &c.pin,
            &node_service("n3", "dev"),
        ),
    ))
    .await;
    let (_, stderr) = expired.err().expect("an expired token is refused");
    assert!(
        stderr.contains("invalid, expired or already used"),
        "{stderr}"
    );

    // The wrong CA pin: the joining process refuses the auth server.
    let (t, _) = token(&auth_data, "node", "10m").await;
    let wrong_pin = format!("sha256:{}", "0".repeat(64));
    let pinned = Proc::try_start(&c.dirs.config(
        "n4",
        &joining_yaml(
            &c.dirs.path("n4"),
            &c.auth_addr,
            Some(&t),
            &wrong_pin,
            &node_service("n4", "dev"),
        ),
    ))
    .await;
    let (_, stderr) = pinned.err().expect("a wrong pin is refused");
    assert!(stderr.contains("is not the cluster you pinned"), "{stderr}");
    // ...and the token was not spent on it.
    let ok = Proc::start(&c.dirs.config(
        "n5",
        &joining_yaml(
            &c.dirs.path("n5"),
            &c.auth_addr,
            Some(&t),
            &c.pin,
            &node_service("n5", "dev"),
        ),
    ))
    .await;
    ok.stop().await;

    // A wrong password is refused, after a delay, and audited.
    let started = std::time::Instant::now();
    let out = c.login("wrong password!").await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("wrong user name or password"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "refused after a delay"
    );
    let log_dir = auth_data.join("log");
    let logged: Vec<serde_json::Value> = std::fs::read_dir(&log_dir)
        .unwrap()
        .flat_map(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    let failure = logged
        .iter()
        .find(|v| v["event"] == "user.login" && v["success"] == false)
        .expect("a user.login failure event");
    assert_eq!(failure["user"], "alice");
    assert_eq!(failure["code"], "T1000W");
    assert!(
        failure["addr.remote"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(
        !c.home().join("profile.json").exists(),
        "nothing saved on failure"
    );

    // A login checks the cluster against the pin before sending the password.
    let out = client(
        &c.home(),
        &[
            "login",
            "--proxy",
            &c.proxy_addr,
            "--user",
            "alice",
            "--ca-pin",
            &wrong_pin,
            "--password-stdin",
        ],
        Some(b"correct horse battery\n"),
    )
    .await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("has CA pin"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_keep_working_while_auth_is_down_and_everything_resumes() {
    let mut c = Cluster::start().await;
    c.add_alice().await;
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Alice works before the outage, so proxy and node have seen her roles.
    let out = c.ssh(&["web1", "echo", "before"]).await;
    assert_eq!(text(&out.stdout), "before\n", "{}", text(&out.stderr));

    c.auth.take().unwrap().stop().await;
    // Proxy and node serve from their caches.
    for _ in 0..3 {
        let out = c.ssh(&["web1", "echo", "still here"]).await;
        assert_eq!(text(&out.stdout), "still here\n", "{}", text(&out.stderr));
    }
    // The node restarts during the outage: the events it could not send
    // wait in its on-disk queue.
    let web1_config = c.dirs.config(
        "web1-again",
        &joining_yaml(
            &c.dirs.path("web1"),
            &c.auth_addr,
            None,
            &c.pin,
            &node_service("web1", "dev"),
        ),
    );
    c.web1.take().unwrap().stop().await;
    c.web1 = Some(Proc::start(&web1_config).await);
    let out = client(&c.home(), &["ls"], None).await;
    assert!(text(&out.stdout).contains("web1"), "{}", text(&out.stderr));
    // A password cannot be checked: the user reads that, not "wrong password".
    let out = c.login("correct horse battery").await;
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("the proxy cannot reach auth to check the password")
            && !stderr.contains("wrong user name or password"),
        "{stderr}"
    );

    // Auth comes back on the same address; nodes re-register by themselves.
    let config = c.dirs.config("auth-again", &c.auth_again_yaml());
    c.auth = Some(Proc::start(&config).await);
    poll_until(Duration::from_secs(20), || async {
        let names = node_names(&c.auth_data()).await;
        names.contains(&"web1".to_string()) && names.contains(&"db1".to_string())
    })
    .await
    .expect("nodes heartbeat to the restarted auth");
    let out = c.ssh(&["web1", "echo", "after"]).await;
    assert_eq!(text(&out.stdout), "after\n", "{}", text(&out.stderr));
    // Every session of the outage is in the audit log, once.
    poll_until(Duration::from_secs(30), || async {
        let execs = crate::support::audit_events(&c.auth_data(), Some("exec")).await;
        let count = |command: &str| {
            execs
                .iter()
                .filter(|e| e["command"].as_str().is_some_and(|c| c.contains(command)))
                .count()
        };
        count("still here") == 3 && count("after") == 1
    })
    .await
    .expect("every session of the outage reaches the log, once");
    // Logging in again goes through auth: it works without restarting the proxy.
    let out = c.login("correct horse battery").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

//! An interactive shell through `turnstile ssh`, driven from a real PTY the
//! way a person at a terminal would: type a command, read its output, resize
//! the window, exit.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{BIN, TestCluster, test_login};

struct Terminal {
    pty: pty_process::Pty,
    seen: String,
    /// What the last `expect` consumed, its needle included.
    consumed: String,
}

impl Terminal {
    /// `turnstile ARGS` on a new terminal of `rows`×`cols`, with `env`.
    fn start(
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        (rows, cols): (u16, u16),
    ) -> (Self, tokio::process::Child) {
        let (pty, pts) = pty_process::open().unwrap();
        pty.resize(pty_process::Size::new(rows, cols)).unwrap();
        let child = pty_process::Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "0")
            .kill_on_drop(true)
            .spawn(pts)
            .unwrap();
        let term = Terminal {
            pty,
            seen: String::new(),
            consumed: String::new(),
        };
        (term, child)
    }

    async fn send(&mut self, keys: &str) {
        self.pty.write_all(keys.as_bytes()).await.unwrap();
        self.pty.flush().await.unwrap();
    }

    /// Reads until `needle` has appeared after what was already consumed.
    async fn expect(&mut self, needle: &str, within: Duration) {
        if !self.wait_for(needle, within).await {
            panic!("never saw {needle:?}; the terminal showed:\n{}", self.seen);
        }
    }

    /// Like `expect`, but says whether `needle` appeared in time.
    async fn wait_for(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(at) = self.seen.find(needle) {
                self.consumed = self.seen.drain(..at + needle.len()).collect();
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, self.pty.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => panic!(
                    "terminal closed before {needle:?}; it showed:\n{}",
                    self.seen
                ),
                Ok(Ok(n)) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_shell_in_a_real_pty() {
    let login = test_login();
    let c = TestCluster::start().await;
    c.add_user("alice", "access", login).await;
    let id = c.sign("alice").await;

    let (mut term, mut child) = Terminal::start(
        &["ssh", "-i", id.to_str().unwrap(), &format!("{login}@web1")],
        &[("TERM", "xterm-256color".as_ref())],
        (24, 80),
    );

    term.send("echo marker-$((6*7)) $TERM\r").await;
    term.expect("marker-42 xterm-256color", Duration::from_secs(20))
        .await;
    term.send("tty; echo $TURNSTILE_SESSION_ID | wc -c\r").await;
    term.expect("/dev/pts/", Duration::from_secs(10)).await;
    term.expect("37", Duration::from_secs(10)).await;
    term.send("echo sid-$TURNSTILE_SESSION_ID-end\r").await;
    term.expect("-end", Duration::from_secs(10)).await; // the line typed
    term.expect("-end", Duration::from_secs(10)).await; // its output
    let sid = term
        .consumed
        .rsplit("sid-")
        .next()
        .and_then(|s| s.strip_suffix("-end"))
        .filter(|s| s.len() == 36)
        .map(str::to_string);

    // A resize of the local window reaches the remote PTY.
    term.pty.resize(pty_process::Size::new(40, 100)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        term.send("stty size\r").await;
        if term.wait_for("40 100", Duration::from_secs(2)).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the remote PTY never saw the resize"
        );
    }

    term.send("exit 5\r").await;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("turnstile ssh exits after the shell does")
        .unwrap();
    assert_eq!(status.code(), Some(5));
    drop(term);

    // Played back on a terminal, the recording ends by itself (it waited
    // for a key after the last frame).
    let sid = sid.expect("the session printed its id");
    crate::recording::wait_complete(&id, &sid).await;
    let (mut term, mut child) = Terminal::start(
        &["play", "-i", id.to_str().unwrap(), &sid, "--speed", "50"],
        &[],
        (40, 100),
    );
    term.expect("marker-42", Duration::from_secs(20)).await;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the player exits at the end of the recording, no key pressed")
        .unwrap();
    assert!(status.success(), "{status:?}: {}", term.seen);
}

/// `turnstile login` as alice on a terminal: the question says `asked`
/// before "Trust it?", the user answers yes and types the password, and the
/// login succeeds.
async fn login_trusting_at_the_prompt(c: &TestCluster, home: &std::path::Path, asked: &str) {
    let (mut term, mut child) = Terminal::start(
        &["login", "--proxy", &c.proxy_addr, "--user", "alice"],
        &[("TURNSTILE_HOME", home.as_os_str())],
        (24, 100),
    );
    term.expect(asked, Duration::from_secs(20)).await;
    term.expect("Trust it? [y/N]", Duration::from_secs(5)).await;
    term.send("y\r").await;
    term.expect("Password for alice:", Duration::from_secs(10))
        .await;
    term.send("correct horse battery\r").await;
    term.expect("Logged in as \"alice\"", Duration::from_secs(20))
        .await;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_login_asks_to_trust_the_cluster_and_remembers_the_answer() {
    let c = TestCluster::start().await;
    c.add_user("alice", "access", "root").await;
    let data = c.data_dir();
    let out = crate::support::run(
        BIN,
        &[
            "admin",
            "users",
            "passwd",
            "alice",
            "--password-stdin",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        Some(b"correct horse battery\n"),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        crate::support::text(&out.stderr)
    );
    let home = c.dir.path().join("home");

    // Without a terminal and without a pin there is no one to ask.
    let out = crate::support::client(
        &home,
        &[
            "login",
            "--proxy",
            &c.proxy_addr,
            "--user",
            "alice",
            "--password-stdin",
        ],
        Some(b"correct horse battery\n"),
    )
    .await;
    assert_eq!(out.status.code(), Some(255));
    assert!(
        crate::support::text(&out.stderr).contains("pass --ca-pin"),
        "{}",
        crate::support::text(&out.stderr)
    );

    // The pin operators were given, not a fingerprint in another form.
    let pin = turnstile_api::pin::ca_pin_of_pem(&c.authority().tls_ca().cert_pem).unwrap();
    login_trusting_at_the_prompt(&c, &home, &format!("Its CA pin is {pin} ")).await;

    // The answer is remembered: no pin, no terminal, no question.
    let out = crate::support::client(
        &home,
        &[
            "login",
            "--proxy",
            &c.proxy_addr,
            "--user",
            "alice",
            "--password-stdin",
        ],
        Some(b"correct horse battery\n"),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        crate::support::text(&out.stderr)
    );
    let out = crate::support::client(&home, &["ssh", "web1", "echo", "profile works"], None).await;
    assert_eq!(crate::support::text(&out.stdout), "profile works\n");

    // A profile that trusted the cluster before it had a proxy host CA (what
    // an older client remembered): the user is asked once more.
    let trusted = home.join("trusted_clusters.json");
    let mut remembered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trusted).unwrap()).unwrap();
    for cluster in remembered["proxies"].as_object_mut().unwrap().values_mut() {
        cluster.as_object_mut().unwrap().remove("proxy_ca");
    }
    std::fs::write(&trusted, serde_json::to_vec(&remembered).unwrap()).unwrap();
    login_trusting_at_the_prompt(&c, &home, "before it had a proxy host CA").await;
}

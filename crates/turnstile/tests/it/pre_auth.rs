//! Connections that never authenticate: a flood from one address is cut to
//! its cap while others get in; what does not authenticate in time, or
//! never finishes its PROXY header, is closed; the anonymous user is kept
//! small.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{ClusterSpec, TestCluster, text};

/// A connection from `source` to `addr` that sends `first` and nothing more.
async fn silent(source: &str, addr: &str, first: &[u8]) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream
}

/// Reads until the server closes the connection (true) or `within` passes
/// (false); what it sent is appended to `seen`.
async fn closed_within(stream: &mut TcpStream, within: Duration, seen: &mut Vec<u8>) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

fn spec(pre_auth: &str) -> ClusterSpec {
    ClusterSpec {
        global_extra: format!("  pre_auth:\n{pre_auth}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_is_cut_to_its_cap_while_others_get_in() {
    let c = TestCluster::start_with(spec("    login_grace_time: 30s\n")).await;
    let login = crate::support::test_login();
    c.add_user("alice", "access", login).await;
    c.add_user("mallory", "access", login).await;
    for user in ["alice", "mallory"] {
        c.set_password(user, "correct horse battery").await;
    }
    let id = c.sign("alice").await;
    // This one process is auth, proxy and node.
    let idle = crate::support::rss_of(std::process::id());
    let mut flood = Vec::new();
    for _ in 0..500 {
        flood.push(silent("127.0.0.2", &c.proxy_addr, b"SSH-2.0-flood\r\n").await);
    }
    // 200 guesses at mallory's password at once, from the same address.
    let proxy = c.proxy_addr.clone();
    let guesses: Vec<_> = (0..200)
        .map(|i| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                try_password("127.0.0.2", &proxy, "mallory", &format!("guess {i}")).await
            })
        })
        .collect();
    // Meanwhile alice, from another address, runs a command and logs in
    // with her password, each at once.
    let started = Instant::now();
    let out = c
        .ssh(&id, &[&format!("{login}@web1"), "--", "echo", "in"])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "in");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(
        try_password("127.0.0.1", &proxy, "alice", "correct horse battery").await,
        Some(true)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let mut answered = 0;
    for g in guesses {
        assert_ne!(g.await.unwrap(), Some(true), "a guess got in");
        answered += 1;
    }
    assert_eq!(answered, 200);
    let grown = crate::support::rss_of(std::process::id()).saturating_sub(idle);
    assert!(grown < 200 << 20, "grew by {} MiB", grown >> 20);
    // The first ten silent connections are served (they got the server's
    // version); the rest were told why and closed.
    let mut kept = 0;
    let mut told = String::new();
    for stream in &mut flood {
        let mut seen = Vec::new();
        if closed_within(stream, Duration::from_millis(200), &mut seen).await {
            told = text(&seen);
        } else {
            assert!(text(&seen).starts_with("SSH-2.0-"), "{}", text(&seen));
            kept += 1;
        }
    }
    assert_eq!(kept, 10, "per_source_max_startups is 10 by default");
    assert!(
        told.contains("too many unauthenticated connections from 127.0.0.2")
            && told.contains("per_source_max_startups=10"),
        "{told}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_does_not_authenticate_in_time_is_disconnected() {
    let c = TestCluster::start_with(spec(
        "    login_grace_time: 2s\n    proxy_header_timeout: 1s\n",
    ))
    .await;
    // A client that sends its version and then nothing, to the proxy and
    // straight to the node.
    for addr in [&c.proxy_addr, &c.node_addr] {
        let mut stream = silent("127.0.0.1", addr, b"SSH-2.0-slow\r\n").await;
        let mut seen = Vec::new();
        assert!(
            closed_within(&mut stream, Duration::from_secs(15), &mut seen).await,
            "{addr}: still open past login_grace_time"
        );
    }
    // A node reading a PROXY header that never ends (0x0D, then nothing).
    let mut stream = silent("127.0.0.1", &c.node_addr, b"\r").await;
    let mut seen = Vec::new();
    assert!(
        closed_within(&mut stream, Duration::from_secs(10), &mut seen).await,
        "a half PROXY header held the connection past proxy_header_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anonymous_user_opens_few_channels_and_sends_small_frames() {
    use turnstile_api::door::{self, DoorRequest, DoorResponse};
    use turnstile_ssh::client::door::call;
    use turnstile_ssh::client::{ClientError, open_proxy};

    let c = TestCluster::start().await;
    let mut anon = open_proxy(
        &c.proxy_addr,
        &turnstile_ssh::client::Trust::first_contact(),
    )
    .await
    .unwrap();
    anon.auth_anonymous().await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            call(&anon, &DoorRequest::ClusterInfo).await,
            Ok(DoorResponse::ClusterInfo(_))
        ));
    }
    // The fourth channel sends a frame larger than 64 KiB.
    let mut channel = anon.handle.channel_open_session().await.unwrap();
    channel
        .request_subsystem(true, door::SUBSYSTEM)
        .await
        .unwrap();
    let mut frame = (100u32 * 1024).to_be_bytes().to_vec();
    frame.extend_from_slice(&[b' '; 1024]);
    channel.data(&frame[..]).await.unwrap();
    let mut buf = Vec::new();
    let answer = loop {
        match channel.wait().await {
            Some(russh::ChannelMsg::Data { data }) => {
                buf.extend_from_slice(&data);
                if let Some(r) = door::decode::<DoorResponse>(&mut buf).unwrap() {
                    break r;
                }
            }
            Some(_) => {}
            None => panic!("closed without an answer"),
        }
    };
    let DoorResponse::Error { message } = answer else {
        panic!("{answer:?}");
    };
    assert!(
        message.contains("larger than the 65536 allowed"),
        "{message}"
    );
    // A fifth channel is refused, saying why.
    match call(&anon, &DoorRequest::ClusterInfo).await {
        Err(ClientError::ChannelRefused(text)) => {
            assert!(text.contains("at most 4 channels"), "{text}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A password attempt as `user` from `source` through the proxy: did the
/// proxy accept it? `None`: the proxy refused the connection itself.
async fn try_password(source: &str, proxy_addr: &str, user: &str, password: &str) -> Option<bool> {
    let stream = silent(source, proxy_addr, b"").await;
    let mut conn = turnstile_ssh::client::open(stream, "the proxy", "127.0.0.1", &[])
        .await
        .ok()?;
    Some(conn.auth_password(user, password).await.is_ok())
}

/// [`try_password`] from a source the proxy does not refuse.
async fn password_from(source: &str, proxy_addr: &str, user: &str, password: &str) -> bool {
    try_password(source, proxy_addr, user, password)
        .await
        .expect("the proxy took the connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_locks_out_one_source_only_and_only_for_a_while() {
    let c = crate::cluster::Cluster::start_with(
        "  password_login:\n    lockout: 3s\n    backoff_start: 10ms\n    backoff_max: 40ms\n",
    )
    .await;
    c.add_alice().await;
    let right = "correct horse battery";
    for _ in 0..10 {
        assert!(!password_from("127.0.0.2", &c.proxy_addr, "alice", "wrong guess!").await);
    }
    assert!(
        !password_from("127.0.0.2", &c.proxy_addr, "alice", right).await,
        "the pair is locked out"
    );
    assert!(
        password_from("127.0.0.1", &c.proxy_addr, "alice", right).await,
        "another source still gets in"
    );
    // The lockout ends by itself.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !password_from("127.0.0.2", &c.proxy_addr, "alice", right).await {
        assert!(Instant::now() < deadline, "still locked out after 15s");
    }
    // A short password is sent, refused by auth and audited like any other.
    let out = c.login("short").await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("wrong user name or password"),
        "{}",
        text(&out.stderr)
    );
    let events = crate::support::audit_events(&c.auth_data(), Some("user.login")).await;
    let errors: Vec<String> = events
        .iter()
        .filter(|e| e["success"] == false)
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            format!("{} {}", field("addr.remote"), field("error"))
        })
        .collect();
    assert!(
        errors.iter().filter(|e| e.contains("127.0.0.2")).count() >= 11,
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("is locked out from 127.0.0.2 for 3s")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("too many failed logins for user \"alice\" from 127.0.0.2")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().filter(|e| e.contains("127.0.0.1")).count() >= 1,
        "the short password was audited: {errors:#?}"
    );
}

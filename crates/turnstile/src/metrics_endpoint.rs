//! Serves `GET /metrics` (Prometheus text format) on
//! `turnstile.metrics_listen_addr`: the process's counters and gauges
//! (`turnstile_api::metrics`). Plain HTTP/1.1, one request per connection,
//! nothing else answered: no way in to the cluster goes through it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The most a request may send before it is answered.
const MAX_REQUEST: usize = 8 * 1024;

/// Answers scrapes until `shutdown`.
pub fn spawn(listener: TcpListener, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(_) => continue,
                },
            };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), answer(&mut conn)).await;
            });
        }
    });
}

async fn answer(conn: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let line = line.lines().next().unwrap_or_default();
    let (status, kind, body) = match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["GET", "/metrics", _] => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            turnstile_api::metrics::METRICS.render(),
        ),
        ["GET", _, _] => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".to_string(),
        ),
        _ => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

//! The first page of an audit search over a large PostgreSQL log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use turnstile_api::audit::AuditEvent;
use turnstile_api::clock::SystemClock;
use turnstile_auth::audit_log::testing::PostgresServer;
use turnstile_auth::audit_log::{AuditLog, AuditQuery, PostgresAuditLog};

/// Events written per batch, as a node's forwarder sends them.
const BATCH: usize = 1000;
/// Searches timed per query.
const RUNS: usize = 20;

fn event(i: usize) -> AuditEvent {
    match i % 3 {
        0 => AuditEvent::UserLogin {
            user: format!("user{}", i % 1000),
            method: "password".into(),
            success: !i.is_multiple_of(7),
            error: None,
            remote_addr: "10.0.0.1:40000".into(),
        },
        1 => AuditEvent::AuditGap {
            server_id: format!("node-{}", i % 50),
            queue_id: "node".into(),
            missing_from: i as u64,
            missing_to: i as u64,
        },
        _ => AuditEvent::UserLogin {
            user: format!("user{}", i % 1000),
            method: "certificate".into(),
            success: true,
            error: None,
            remote_addr: "10.0.0.2:40000".into(),
        },
    }
}

pub async fn run() -> anyhow::Result<()> {
    let total: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let server = PostgresServer::start();
    let log = PostgresAuditLog::connect(&server.uri(), Arc::new(SystemClock)).await?;
    let started = Instant::now();
    for from in (0..total).step_by(BATCH) {
        let batch = (from..(from + BATCH).min(total))
            .map(|i| (event(i), format!("bench-{i}")))
            .collect();
        log.emit_batch(batch).await?;
    }
    let wrote = started.elapsed();
    println!(
        "Audit log in PostgreSQL {} (private server, fsync off): {total} events written in batches of {BATCH} in {:.1} s ({:.0} events/s)",
        server_version(),
        wrote.as_secs_f64(),
        total as f64 / wrote.as_secs_f64()
    );
    println!();
    println!("First page (1,000 events) of `admin audit search`, {RUNS} runs each");
    println!(
        "{:<34}  {:>8}  {:>8}  {:>8}",
        "query", "events", "p50 ms", "p99 ms"
    );
    let queries = [
        ("everything", AuditQuery::default()),
        (
            "--user user42",
            AuditQuery {
                user: Some("user42".into()),
                ..Default::default()
            },
        ),
        (
            "--event audit.gap",
            AuditQuery {
                event: Some("audit.gap".into()),
                ..Default::default()
            },
        ),
        (
            "--since 1h",
            AuditQuery {
                since: Some(std::time::SystemTime::now() - Duration::from_secs(3600)),
                ..Default::default()
            },
        ),
    ];
    for (label, mut query) in queries {
        query.limit = 1000;
        let mut samples = Vec::new();
        let mut events = 0;
        for _ in 0..RUNS {
            let t0 = Instant::now();
            let page = log.search(&query).await?;
            samples.push(t0.elapsed());
            events = page.events.len();
        }
        samples.sort();
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        println!(
            "{:<34}  {:>8}  {:>8.2}  {:>8.2}",
            label,
            events,
            at(0.5).as_secs_f64() * 1000.0,
            at(0.99).as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

fn server_version() -> String {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .max()
        })
        .unwrap_or_default()
}

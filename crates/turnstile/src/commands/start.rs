//! `turnstile start`: runs the configured services until SIGINT or SIGTERM,
//! and tells the operator on stdout where everything is and what to do next.

use std::io::Write;

use crate::cli::StartArgs;
use crate::config;
use crate::process::{Running, launch};

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The web console's address as a user types it: the proxy's public host
/// and the console's port.
pub fn web_url(r: &Running) -> Option<String> {
    let web = r.web_addr?;
    let host = r
        .proxy_public_addr
        .as_deref()
        .and_then(|p| p.rsplit_once(':').map(|(h, _)| h.to_string()))
        .unwrap_or_else(|| web.ip().to_string());
    Some(format!("https://{host}:{}/", web.port()))
}

/// The block printed when every service listens.
pub fn ready_banner(r: &Running) -> String {
    let mut out = String::new();
    let dir = shell_quote(&r.data_dir.display().to_string());
    out.push_str(&format!(
        "Turnstile {} is running.\n",
        turnstile_api::VERSION
    ));
    if let Some(cluster) = &r.cluster_name {
        out.push_str(&format!("  cluster  {cluster}\n"));
    }
    if let Some(a) = r.auth_addr {
        out.push_str(&format!("  auth     {a}  (gRPC, mutual TLS)\n"));
    }
    if let Some(p) = &r.proxy_public_addr {
        out.push_str(&format!("  proxy    {p}  (SSH)\n"));
    }
    if let (Some(n), Some(name)) = (r.node_addr, &r.node_name) {
        out.push_str(&format!("  node     {n}  (SSH, node name {name})\n"));
    }
    if let Some(m) = r.metrics_addr {
        out.push_str(&format!("  metrics  http://{m}/metrics\n"));
    }
    if let Some(url) = web_url(r) {
        let which = if r.web_self_signed {
            "self-signed certificate"
        } else {
            "certificate"
        };
        out.push_str(&format!(
            "  web      {url}  ({which}, SHA-256 {})\n",
            r.web_fingerprint.as_deref().unwrap_or("?")
        ));
    }
    out.push_str(&format!("  data     {}\n", r.data_dir.display()));
    if let Some(pin) = &r.ca_pin {
        out.push_str(&format!("  CA pin   {pin}\n"));
    }
    if r.auth_addr.is_some() {
        let node = r.node_name.clone().unwrap_or_else(|| "NODE".into());
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "root".into());
        out.push_str("\nAdd a user and connect:\n");
        out.push_str(&format!(
            "  turnstile admin users add alice --roles access --logins {user} --data-dir {dir}\n"
        ));
        out.push_str(&format!(
            "  turnstile admin sign --user alice --out alice --data-dir {dir}\n"
        ));
        out.push_str(&format!("  turnstile ssh -i alice {user}@{node}\n"));
        out.push_str(&format!("  ssh -F alice.ssh_config {node}\n"));
        if let Some(url) = web_url(r) {
            out.push_str(&format!(
                "  turnstile admin users passwd alice --password-stdin --data-dir {dir}   # then sign in at {url}\n"
            ));
        }
    }
    out.push_str("turnstile is ready\n");
    out
}

pub async fn run(args: StartArgs) -> anyhow::Result<()> {
    let config = config::load(args.config.as_deref(), args.data_dir)?;
    // Handlers go in before the banner: whoever reads "ready" may signal at once.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = launch(config).await?;
    let banner = ready_banner(&running);
    {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(banner.as_bytes())?;
        stdout.flush()?;
    }
    let token = running.shutdown_token();
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = token.cancelled() => {}
    }
    running.stop().await
}

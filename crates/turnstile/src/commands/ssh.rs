//! `turnstile ssh [LOGIN@]NODE [--] [COMMAND...]`: a command or an interactive
//! shell on a node through the proxy. Returns the remote exit status.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use turnstile_ssh::client::terminal::{RawMode, resize_events, stdin_is_tty, window_size};
use turnstile_ssh::client::{SessionRequest, connect_via_proxy, run_session};

use crate::cli::SshArgs;
use crate::profile::client_identity;

/// Environment variables sent to the node, as OpenSSH's default `SendEnv LANG LC_*`.
fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k == "LANG" || k.starts_with("LC_"))
        .collect()
}

pub async fn run(args: SshArgs) -> anyhow::Result<u32> {
    let (identity, proxy) = client_identity(&args.client)?;
    let creds = identity.credentials;
    let (login, node) = match args.destination.split_once('@') {
        Some((login, node)) => (login.to_string(), node.to_string()),
        None => {
            let logins = turnstile_api::identity::UserIdentity::from_extensions(|k| {
                creds.certificate.extensions().get(k).map(String::as_str)
            })
            .map(|id| id.logins)
            .unwrap_or_default();
            let principals = creds.certificate.valid_principals();
            let login = logins
                .iter()
                .find(|l| principals.contains(l))
                .or(principals.first())
                .cloned()
                .context("the certificate has no logins; give the login explicitly: LOGIN@NODE")?;
            (login, args.destination.clone())
        }
    };
    if node.is_empty() || login.is_empty() {
        anyhow::bail!("destination {:?} is not [LOGIN@]NODE", args.destination);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    creds.check_fresh(now)?;
    let conn = connect_via_proxy(&proxy, &node, &login, &creds, &identity.trust).await?;

    let command = (!args.command.is_empty()).then(|| args.command.join(" "));
    let want_pty = args.tty || (!args.no_tty && command.is_none() && stdin_is_tty());
    let pty = want_pty.then(|| {
        let (cols, rows) = window_size().unwrap_or((80, 24));
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        (term, cols, rows)
    });
    let _raw = if want_pty && stdin_is_tty() {
        Some(RawMode::enable().context("cannot put the terminal in raw mode")?)
    } else {
        None
    };
    let resize = if want_pty { resize_events() } else { None };
    let request = SessionRequest {
        command,
        pty,
        env: forwarded_env(),
    };
    let status = run_session(
        &conn,
        request,
        tokio::io::stdin(),
        tokio::io::stdout(),
        tokio::io::stderr(),
        resize,
    )
    .await?;
    Ok(status)
}

//! `turnstile login`: first contact with a cluster (trust its host CA and
//! proxy host CA by the CA pin, or by the user's yes at a prompt), then a
//! password login that
//! returns a short-lived certificate for a fresh key, saved as the profile.

use std::io::{BufRead, Write};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use russh::keys::Certificate;
use turnstile_ssh::client::Trust;
use turnstile_ssh::client::door::{FirstContact, fingerprints, first_contact, password_login};
use turnstile_ssh::identity::generate_ed25519;

use crate::cli::LoginArgs;
use crate::commands::admin::read_first_line;
use crate::identity_file::{self, NewIdentity};
use crate::profile::{self, Profile};

/// Talks to the user on the controlling terminal, even when stdin is a pipe.
struct Tty {
    file: std::fs::File,
}

impl Tty {
    fn open() -> Option<Self> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .ok()
            .map(|file| Self { file })
    }

    fn ask(&mut self, prompt: &str, echo: bool) -> anyhow::Result<String> {
        self.file.write_all(prompt.as_bytes())?;
        self.file.flush()?;
        let saved = rustix::termios::tcgetattr(&self.file).ok();
        if !echo && let Some(t) = &saved {
            let mut quiet = t.clone();
            quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
            let _ = rustix::termios::tcsetattr(
                &self.file,
                rustix::termios::OptionalActions::Now,
                &quiet,
            );
        }
        let mut line = String::new();
        let read = std::io::BufReader::new(&self.file).read_line(&mut line);
        if !echo {
            if let Some(t) = &saved {
                let _ = rustix::termios::tcsetattr(
                    &self.file,
                    rustix::termios::OptionalActions::Now,
                    t,
                );
            }
            let _ = self.file.write_all(b"\n");
        }
        read?;
        Ok(line.trim_end_matches(['\n', '\r']).to_string())
    }
}

/// Decides which CAs to trust for this proxy.
fn trust(
    args: &LoginArgs,
    contact: &FirstContact,
    home: &std::path::Path,
) -> anyhow::Result<Trust> {
    if let Some(pin) = &args.ca_pin {
        turnstile_api::pin::validate(pin).map_err(|e| anyhow::anyhow!("--ca-pin: {e}"))?;
        return contact.verify_pin(pin).map_err(|e| anyhow::anyhow!("{e}"));
    }
    // What is shown is the CA pin operators have (`turnstile start` and
    // `admin tokens add` print it); the host CA is trusted only if that CA
    // endorses it.
    let pin = contact.ca_pin().map_err(|e| anyhow::anyhow!("{e}"))?;
    let offered = contact
        .verify_pin(&pin)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let offered_host = profile::key_texts(&offered.host_ca);
    let offered_proxy = profile::key_texts(&offered.proxy_ca);
    let mut upgraded = false;
    if let Some(remembered) = profile::trusted(home, &args.proxy) {
        if remembered.host_ca == offered_host && remembered.proxy_ca == offered_proxy {
            return Ok(offered);
        }
        if remembered.host_ca == offered_host && remembered.proxy_ca.is_empty() {
            // Trusted before clusters had a proxy host CA: ask again.
            upgraded = true;
        } else {
            bail!(
                "the host CA of the cluster behind {} changed since you trusted it (now {}); if that is expected, log in with --ca-pin",
                args.proxy,
                fingerprints(&offered.host_ca).join(", ")
            );
        }
    }
    let why = if upgraded {
        "You trusted this cluster before it had a proxy host CA (it was upgraded); its CA pin endorses the new CA.\n"
    } else {
        ""
    };
    let mut tty = Tty::open().context(
        "cannot ask whether to trust this cluster without a terminal; pass --ca-pin (printed by `turnstile start`)",
    )?;
    let answer = tty.ask(
        &format!(
            "{why}The proxy at {} serves cluster {:?}.\nIts CA pin is {pin} (`turnstile start` and `admin tokens add` print it: compare).\nTrust it? [y/N] ",
            args.proxy,
            contact.info.cluster_name,
        ),
        true,
    )?;
    if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        bail!("not trusted; nothing was saved");
    }
    Ok(offered)
}

pub async fn run(args: LoginArgs) -> anyhow::Result<()> {
    let home = profile::home()?;
    let ttl = match &args.ttl {
        Some(t) => turnstile_api::duration::parse(t).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?,
        None => Duration::ZERO,
    };
    let contact = first_contact(&args.proxy).await?;
    let trust = trust(&args, &contact, &home)?;
    contact
        .verify_proxy(&trust)
        .map_err(|e| anyhow::anyhow!("{e}; not sending a password to it"))?;
    profile::remember(&home, &args.proxy, &contact.info.cluster_name, &trust)?;

    let password = if args.password_stdin {
        read_first_line()?
    } else {
        let mut tty =
            Tty::open().context("no terminal to ask for the password; use --password-stdin")?;
        tty.ask(&format!("Password for {}: ", args.user), false)?
    };
    let key = generate_ed25519();
    let issued = password_login(
        &args.proxy,
        &trust,
        &args.user,
        &password,
        key.public_key(),
        ttl.as_secs(),
    )
    .await?;
    let certificate = Certificate::from_openssh(&issued.certificate)
        .context("the proxy returned a certificate that cannot be read")?;
    let logins = turnstile_api::identity::UserIdentity::from_extensions(|k| {
        certificate.extensions().get(k).map(String::as_str)
    })
    .map(|id| id.logins)
    .unwrap_or_default();
    let default_login = logins
        .iter()
        .find(|l| issued.principals.contains(l))
        .or(issued.principals.first())
        .cloned()
        .unwrap_or_default();
    let cluster = contact.info.cluster_name.clone();
    let path = profile::identity_path(&home, &cluster, &args.user);
    identity_file::write(
        &path,
        &NewIdentity {
            user: &args.user,
            cluster_name: &cluster,
            key: &key,
            certificate: &certificate,
            host_ca: &contact.info.host_ca,
            proxy_ca: &contact.info.proxy_ca,
            proxy: &args.proxy,
            default_login: &default_login,
        },
    )?;
    profile::save(
        &home,
        &Profile {
            proxy: args.proxy.clone(),
            user: args.user.clone(),
            cluster: cluster.clone(),
            identity: path.clone(),
        },
    )?;
    crate::outln!(
        "Logged in as {:?} on cluster {cluster:?} through {}; certificate valid until {} (logins: {}).",
        args.user,
        args.proxy,
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(issued.valid_before)),
        issued.principals.join(", ")
    );
    crate::outln!(
        "Profile saved in {}; OpenSSH: ssh -F {}.ssh_config NODE",
        home.display(),
        path.display()
    );
    Ok(())
}

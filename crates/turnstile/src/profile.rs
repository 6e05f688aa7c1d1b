//! The client's profile under `~/.turnstile` (or `$TURNSTILE_HOME`): what
//! `turnstile login` saved (the identity files, the proxy, the user) and the
//! host CAs the user has chosen to trust, per proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use russh::keys::PublicKey;
use serde::{Deserialize, Serialize};
use turnstile_ssh::client::Trust;
use turnstile_ssh::identity::write_file;

use crate::cli::ClientArgs;
use crate::identity_file::{self, LoadedIdentity};

pub fn home() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TURNSTILE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither TURNSTILE_HOME nor HOME is set; cannot find the profile")?;
    Ok(PathBuf::from(home).join(".turnstile"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub proxy: String,
    pub user: String,
    pub cluster: String,
    /// Path prefix of the identity files.
    pub identity: PathBuf,
}

fn profile_path(home: &Path) -> PathBuf {
    home.join("profile.json")
}

pub fn save(home: &Path, profile: &Profile) -> anyhow::Result<()> {
    let text = serde_json::to_vec_pretty(profile)?;
    write_file(&profile_path(home), &text, 0o600)?;
    Ok(())
}

pub fn load(home: &Path) -> anyhow::Result<Option<Profile>> {
    let path = profile_path(home);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is damaged; log in again", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Where `turnstile login` keeps the identity of `user` on `cluster`.
pub fn identity_path(home: &Path, cluster: &str, user: &str) -> PathBuf {
    home.join("keys").join(cluster).join(user)
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Trusted {
    #[serde(default)]
    proxies: BTreeMap<String, TrustedCluster>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrustedCluster {
    cluster: String,
    pub host_ca: Vec<String>,
    /// Absent in what was trusted before clusters had a proxy host CA.
    #[serde(default)]
    pub proxy_ca: Vec<String>,
}

fn trusted_path(home: &Path) -> PathBuf {
    home.join("trusted_clusters.json")
}

fn load_trusted(home: &Path) -> Trusted {
    std::fs::read(trusted_path(home))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The CAs the user trusted earlier for this proxy.
pub fn trusted(home: &Path, proxy: &str) -> Option<TrustedCluster> {
    load_trusted(home).proxies.get(proxy).cloned()
}

/// Keys as OpenSSH writes them.
pub fn key_texts(keys: &[PublicKey]) -> Vec<String> {
    keys.iter().filter_map(|k| k.to_openssh().ok()).collect()
}

/// Remembers that the user trusts `trust` for this proxy.
pub fn remember(home: &Path, proxy: &str, cluster: &str, trust: &Trust) -> anyhow::Result<()> {
    let mut trusted = load_trusted(home);
    trusted.proxies.insert(
        proxy.to_string(),
        TrustedCluster {
            cluster: cluster.to_string(),
            host_ca: key_texts(&trust.host_ca),
            proxy_ca: key_texts(&trust.proxy_ca),
        },
    );
    write_file(
        &trusted_path(home),
        &serde_json::to_vec_pretty(&trusted)?,
        0o600,
    )?;
    Ok(())
}

/// The identity and proxy a client command uses: `-i PATH`, else the profile.
pub fn client_identity(args: &ClientArgs) -> anyhow::Result<(LoadedIdentity, String)> {
    let (identity, profile_proxy) = match &args.identity {
        Some(path) => (identity_file::read(path)?, None),
        None => {
            let home = home()?;
            let profile = load(&home)?.with_context(|| {
                "not logged in: run `turnstile login --proxy HOST:PORT --user NAME`, or pass -i PATH with an identity from `turnstile admin sign`"
            })?;
            (identity_file::read(&profile.identity)?, Some(profile.proxy))
        }
    };
    let proxy = args
        .proxy
        .clone()
        .or(profile_proxy)
        .or(identity.proxy.clone())
        .context("no proxy known: pass --proxy HOST:PORT")?;
    Ok((identity, proxy))
}

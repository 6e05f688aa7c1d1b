//! The four files of a user identity (`admin sign --out PATH`): the private key
//! (PATH, 0600), the certificate (PATH-cert.pub), the CAs as `@cert-authority`
//! lines (PATH.known_hosts: the proxy host CA for the proxy's name, the host
//! CA for every other host), and an ssh_config that jumps
//! through the proxy (PATH.ssh_config), which also records the proxy address
//! for `turnstile ssh -i PATH`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Certificate, PrivateKey};
use turnstile_ssh::client::{Trust, UserCredentials, known_hosts_lines, parse_cert_authorities};
use turnstile_ssh::identity::write_file;

const PROXY_MARKER: &str = "# turnstile-proxy: ";

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub struct IdentityPaths {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub known_hosts: PathBuf,
    pub ssh_config: PathBuf,
}

impl IdentityPaths {
    pub fn new(path: &Path) -> Self {
        Self {
            key: path.to_path_buf(),
            cert: sibling(path, "-cert.pub"),
            known_hosts: sibling(path, ".known_hosts"),
            ssh_config: sibling(path, ".ssh_config"),
        }
    }
}

/// What `write` needs to know.
pub struct NewIdentity<'a> {
    pub user: &'a str,
    pub cluster_name: &'a str,
    pub key: &'a PrivateKey,
    pub certificate: &'a Certificate,
    pub host_ca: &'a [String],
    pub proxy_ca: &'a [String],
    pub proxy: &'a str,
    pub default_login: &'a str,
}

fn quote(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Writes the four files; returns their paths.
pub fn write(out: &Path, id: &NewIdentity<'_>) -> anyhow::Result<IdentityPaths> {
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        std::env::current_dir()?.join(out)
    };
    let paths = IdentityPaths::new(&out);
    let key_pem = id.key.to_openssh(LineEnding::LF)?;
    write_file(&paths.key, key_pem.as_bytes(), 0o600)?;
    write_file(
        &paths.cert,
        format!("{}\n", id.certificate.to_openssh()?).as_bytes(),
        0o644,
    )?;
    let known_hosts = known_hosts_lines(id.cluster_name, id.proxy, id.host_ca, id.proxy_ca);
    write_file(&paths.known_hosts, known_hosts.as_bytes(), 0o644)?;
    let proxy_host = host_of(id.proxy);
    let lines = [
        format!(
            "# Turnstile identity of user {:?} for cluster {:?}, written by `turnstile admin sign`.",
            id.user, id.cluster_name
        ),
        format!("# Use: ssh -F {} NODE [COMMAND]", quote(&paths.ssh_config)),
        format!("{PROXY_MARKER}{}", id.proxy),
        "Host *".to_string(),
        format!("    IdentityFile {}", quote(&paths.key)),
        format!("    CertificateFile {}", quote(&paths.cert)),
        "    IdentitiesOnly yes".to_string(),
        format!("    UserKnownHostsFile {}", quote(&paths.known_hosts)),
        "    GlobalKnownHostsFile /dev/null".to_string(),
        "    StrictHostKeyChecking yes".to_string(),
        "    PasswordAuthentication no".to_string(),
        "    KbdInteractiveAuthentication no".to_string(),
        format!("    User {}", id.default_login),
        // Every host but the proxy itself is reached through the proxy.
        format!("Host * !{proxy_host}"),
        format!("    ProxyJump {}@{}", id.user, id.proxy),
    ];
    let config = lines.join("\n") + "\n";
    write_file(&paths.ssh_config, config.as_bytes(), 0o644)?;
    Ok(paths)
}

/// An identity read back for `turnstile ssh -i PATH`.
pub struct LoadedIdentity {
    pub credentials: UserCredentials,
    pub trust: Trust,
    pub proxy: Option<String>,
}

pub fn read(path: &Path) -> anyhow::Result<LoadedIdentity> {
    let paths = IdentityPaths::new(path);
    let key_text = std::fs::read_to_string(&paths.key).with_context(|| {
        format!(
            "cannot read the identity's key {}; write one with `turnstile admin sign --out {}`",
            paths.key.display(),
            path.display()
        )
    })?;
    let key = PrivateKey::from_openssh(&key_text)
        .with_context(|| format!("{} is not an OpenSSH private key", paths.key.display()))?;
    let cert_text = std::fs::read_to_string(&paths.cert)
        .with_context(|| format!("cannot read the certificate {}", paths.cert.display()))?;
    let certificate = Certificate::from_openssh(cert_text.trim())
        .with_context(|| format!("{} is not an OpenSSH certificate", paths.cert.display()))?;
    if certificate.public_key() != key.public_key().key_data() {
        bail!(
            "the certificate {} is not for the key {}",
            paths.cert.display(),
            paths.key.display()
        );
    }
    let known_hosts = std::fs::read_to_string(&paths.known_hosts).with_context(|| {
        format!(
            "cannot read {}, which holds the cluster's host CA",
            paths.known_hosts.display()
        )
    })?;
    let trust = parse_cert_authorities(&known_hosts);
    if trust.host_ca.is_empty() {
        bail!(
            "{} has no @cert-authority line; write the identity again with `turnstile admin sign`",
            paths.known_hosts.display()
        );
    }
    let proxy = std::fs::read_to_string(&paths.ssh_config)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(PROXY_MARKER).map(|p| p.trim().to_string()))
        });
    Ok(LoadedIdentity {
        credentials: UserCredentials {
            key: std::sync::Arc::new(key),
            certificate,
        },
        trust,
        proxy,
    })
}

//! A process's credentials on disk: its host id, the TLS identity it talks to
//! auth with, and (for nodes and proxies) its SSH host key and certificate.
//!
//! Layout under `<data_dir>/identity/`: `host_id`, and per system role
//! `<role>/tls.crt`, `<role>/tls.key`, `<role>/ca.crt`, `<role>/ssh_host_key`,
//! `<role>/ssh_host_key-cert.pub`. Private keys are written 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{Certificate, PrivateKey};
use turnstile_api::identity::SystemRole;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid {what}: {message}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
}

/// A fresh Ed25519 key.
pub fn generate_ed25519() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

/// PEM of a TLS certificate, its key, and the cluster's TLS CA.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

pub fn identity_root(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

fn role_dir(data_dir: &Path, role: SystemRole) -> PathBuf {
    identity_root(data_dir).join(role.as_str())
}

fn read(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents` atomically (temp file, then rename) with `mode`.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// The process's host id, created on first use.
pub fn load_or_create_host_id(data_dir: &Path) -> Result<String, IdentityError> {
    let path = identity_root(data_dir).join("host_id");
    match fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
            Err(IdentityError::Read { path, source })
        }
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            write_file(&path, id.as_bytes(), 0o644)?;
            Ok(id)
        }
    }
}

impl TlsIdentity {
    /// The identity of `role` kept in `data_dir`, if there is one.
    pub fn load(data_dir: &Path, role: SystemRole) -> Result<Option<Self>, IdentityError> {
        let dir = role_dir(data_dir, role);
        if !dir.join("tls.crt").exists() {
            return Ok(None);
        }
        Ok(Some(Self {
            cert_pem: read(&dir.join("tls.crt"))?,
            key_pem: read(&dir.join("tls.key"))?,
            ca_pem: read(&dir.join("ca.crt"))?,
        }))
    }

    pub fn save(&self, data_dir: &Path, role: SystemRole) -> Result<(), IdentityError> {
        let dir = role_dir(data_dir, role);
        write_file(&dir.join("ca.crt"), self.ca_pem.as_bytes(), 0o644)?;
        write_file(&dir.join("tls.key"), self.key_pem.as_bytes(), 0o600)?;
        write_file(&dir.join("tls.crt"), self.cert_pem.as_bytes(), 0o644)
    }
}

/// An SSH host key and, once auth has signed one, its certificate.
#[derive(Debug, Clone)]
pub struct HostKeys {
    pub key: PrivateKey,
    pub certificate: Option<Certificate>,
}

impl HostKeys {
    /// Loads the host key of `role`, creating one on first use, and the last
    /// certificate auth signed for it.
    pub fn load_or_create(data_dir: &Path, role: SystemRole) -> Result<Self, IdentityError> {
        let dir = role_dir(data_dir, role);
        let key_path = dir.join("ssh_host_key");
        let key = if key_path.exists() {
            PrivateKey::from_openssh(read(&key_path)?).map_err(|e| IdentityError::Invalid {
                path: key_path.clone(),
                what: "OpenSSH private key",
                message: e.to_string(),
            })?
        } else {
            let key = generate_ed25519();
            let pem = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| IdentityError::Invalid {
                    path: key_path.clone(),
                    what: "OpenSSH private key",
                    message: e.to_string(),
                })?;
            write_file(&key_path, pem.as_bytes(), 0o600)?;
            key
        };
        let cert_path = dir.join("ssh_host_key-cert.pub");
        let certificate = if cert_path.exists() {
            Some(
                Certificate::from_openssh(read(&cert_path)?.trim()).map_err(|e| {
                    IdentityError::Invalid {
                        path: cert_path.clone(),
                        what: "OpenSSH certificate",
                        message: e.to_string(),
                    }
                })?,
            )
        } else {
            None
        };
        Ok(Self { key, certificate })
    }

    pub fn save_certificate(
        &mut self,
        data_dir: &Path,
        role: SystemRole,
        certificate: Certificate,
    ) -> Result<(), IdentityError> {
        let path = role_dir(data_dir, role).join("ssh_host_key-cert.pub");
        let text = certificate
            .to_openssh()
            .map_err(|e| IdentityError::Invalid {
                path: path.clone(),
                what: "OpenSSH certificate",
                message: e.to_string(),
            })?;
        write_file(&path, format!("{text}\n").as_bytes(), 0o644)?;
        self.certificate = Some(certificate);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn host_id_and_keys_are_stable_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create_host_id(dir.path()).unwrap();
        assert_eq!(load_or_create_host_id(dir.path()).unwrap(), id);
        let keys = HostKeys::load_or_create(dir.path(), SystemRole::Node).unwrap();
        let again = HostKeys::load_or_create(dir.path(), SystemRole::Node).unwrap();
        assert_eq!(keys.key.public_key(), again.key.public_key());
        let mode = fs::metadata(dir.path().join("identity/node/ssh_host_key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

//! The console's HTTPS certificate: the operator's (`https_cert_file`,
//! `https_key_file`), or a self-signed one for the proxy's public name, made
//! once and kept in the data dir so its fingerprint stays what `start`
//! printed. Never one from the cluster's internal TLS CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field}: cannot read {path}: {source}")]
    Read {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{field}: {path} holds no {what} in PEM form")]
    Pem {
        field: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("the HTTPS certificate and key do not go together: {0}")]
    Mismatch(String),
    #[error("cannot write the self-signed certificate in {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
}

/// Where the console's certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// The operator's files.
    Files { cert: PathBuf, key: PathBuf },
    /// Self-signed for `name`, kept under `dir`.
    SelfSigned { dir: PathBuf, name: String },
}

/// A loaded certificate: the server config and the SHA-256 fingerprint of
/// the leaf (`AA:BB:…`, as browsers show it).
pub struct Loaded {
    pub config: Arc<rustls::ServerConfig>,
    pub fingerprint: String,
    pub self_signed: bool,
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// The SHA-256 fingerprint of a DER certificate, colon-separated hex.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn self_signed(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join("web_cert.pem");
    let key = dir.join("web_key.pem");
    let same_name = std::fs::read_to_string(dir.join("web_cert.name"))
        .map(|n| n.trim() == name)
        .unwrap_or(false);
    if cert.exists() && key.exists() && same_name {
        return Ok((cert, key));
    }
    let made = rcgen::generate_simple_self_signed(vec![name.to_string()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let write = |path: &Path, text: &str, mode: u32| -> Result<(), TlsError> {
        turnstile_ssh::identity::write_file(path, text.as_bytes(), mode).map_err(|e| {
            TlsError::Write {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            }
        })
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write(&key, &made.signing_key.serialize_pem(), 0o600)?;
    write(&cert, &made.cert.pem(), 0o644)?;
    write(&dir.join("web_cert.name"), name, 0o644)?;
    Ok((cert, key))
}

pub fn load(source: &CertSource) -> Result<Loaded, TlsError> {
    let (cert_path, key_path, self_signed) = match source {
        CertSource::Files { cert, key } => (cert.clone(), key.clone(), false),
        CertSource::SelfSigned { dir, name } => {
            let (c, k) = self_signed(dir, name)?;
            (c, k, true)
        }
    };
    let cert_pem = read("proxy_service.https_cert_file", &cert_path)?;
    let key_pem = read("proxy_service.https_key_file", &key_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            field: "proxy_service.https_cert_file",
            path: cert_path.clone(),
            what: "certificate",
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::Pem {
            field: "proxy_service.https_cert_file",
            path: cert_path,
            what: "certificate",
        });
    };
    let fingerprint = fingerprint(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::Pem {
        field: "proxy_service.https_key_file",
        path: key_path.clone(),
        what: "private key",
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Mismatch(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    // HTTP/1.1: WebSocket upgrades (terminals) need nothing more.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        fingerprint,
        self_signed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_files_load_and_bad_ones_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["console.example".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["other.example".into()]).unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        let wrong_key = dir.path().join("w.pem");
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        std::fs::write(&wrong_key, other.signing_key.serialize_pem()).unwrap();
        let loaded = load(&CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        })
        .unwrap();
        assert_eq!(loaded.fingerprint, fingerprint(made.cert.der()));
        assert!(!loaded.self_signed);

        let err = load(&CertSource::Files {
            cert: cert.clone(),
            key: wrong_key,
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("do not go together"), "{err}");
        let err = load(&CertSource::Files {
            cert: dir.path().join("missing.pem"),
            key,
        })
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("proxy_service.https_cert_file"),
            "{err}"
        );
    }

    #[test]
    fn the_self_signed_certificate_is_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let source = CertSource::SelfSigned {
            dir: dir.path().to_path_buf(),
            name: "127.0.0.1".into(),
        };
        let first = load(&source).unwrap().fingerprint;
        assert_eq!(load(&source).unwrap().fingerprint, first);
        let renamed = CertSource::SelfSigned {
            dir: dir.path().to_path_buf(),
            name: "proxy.example".into(),
        };
        assert_ne!(
            load(&renamed).unwrap().fingerprint,
            first,
            "a new name, a new certificate"
        );
    }
}

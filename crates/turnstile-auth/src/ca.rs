//! The cluster's three certificate authorities: the user SSH CA, the host SSH
//! CA (both Ed25519) and the TLS CA of the internal API. Created once, kept in
//! the backend, and the only code that holds their private keys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{Fingerprint, LineEnding};
use russh::keys::{Certificate, HashAlg, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use turnstile_api::error::ApiError;
use turnstile_api::identity::{Permits, SystemRole, UserIdentity};
use turnstile_api::rpc::AUTH_SERVER_NAME;

/// A fresh Ed25519 key, for CAs, hosts and users alike.
pub fn generate_ed25519() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

fn internal(what: &str) -> impl Fn(&dyn std::fmt::Display) -> ApiError + '_ {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An SSH certificate authority.
#[derive(Debug, Clone)]
pub struct SshCa {
    key: PrivateKey,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct StoredSshCa {
    private_key: String,
}

impl SshCa {
    pub fn generate() -> Self {
        Self {
            key: generate_ed25519(),
        }
    }

    pub(crate) fn to_stored(&self) -> Result<StoredSshCa, ApiError> {
        let pem = self
            .key
            .to_openssh(LineEnding::LF)
            .map_err(|e| internal("encode CA key")(&e))?;
        Ok(StoredSshCa {
            private_key: pem.to_string(),
        })
    }

    pub(crate) fn from_stored(s: &StoredSshCa) -> Result<Self, ApiError> {
        let key = PrivateKey::from_openssh(&s.private_key)
            .map_err(|e| internal("decode stored CA key")(&e))?;
        Ok(Self { key })
    }

    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    pub fn public_key_openssh(&self) -> String {
        self.public_key().to_openssh().unwrap_or_default()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.key.fingerprint(HashAlg::Sha256)
    }

    fn builder(
        subject: &PublicKey,
        valid_after: SystemTime,
        valid_before: SystemTime,
    ) -> Result<Builder, ApiError> {
        let nonce: [u8; 32] = rand::random();
        let mut b = Builder::new(
            nonce.to_vec(),
            subject.key_data().clone(),
            unix(valid_after),
            unix(valid_before),
        )
        .map_err(|e| internal("certificate window")(&e))?;
        b.serial(rand::random())
            .map_err(|e| internal("certificate serial")(&e))?;
        Ok(b)
    }

    /// Signs a user certificate: principals are the logins, the identity rides in extensions.
    pub fn sign_user(
        &self,
        subject: &PublicKey,
        identity: &UserIdentity,
        permits: Permits,
        principals: &[String],
        valid_after: SystemTime,
        valid_before: SystemTime,
    ) -> Result<Certificate, ApiError> {
        self.sign_user_adding(
            subject,
            identity,
            permits,
            principals,
            &[],
            valid_after,
            valid_before,
        )
    }

    /// [`Self::sign_user`] with `extra` extensions beside the identity's.
    #[allow(clippy::too_many_arguments)]
    pub fn sign_user_adding(
        &self,
        subject: &PublicKey,
        identity: &UserIdentity,
        permits: Permits,
        principals: &[String],
        extra: &[(String, String)],
        valid_after: SystemTime,
        valid_before: SystemTime,
    ) -> Result<Certificate, ApiError> {
        if principals.is_empty() {
            return Err(ApiError::bad_parameter(format!(
                "user {:?} has no logins allowed by their roles; give them logins (admin users add --logins) or a role that allows some",
                identity.user
            )));
        }
        let mut extensions: Vec<(String, String)> =
            identity.extensions(permits).into_iter().collect();
        extensions.extend(extra.iter().cloned());
        self.sign_user_with(
            subject,
            &identity.user,
            principals,
            &extensions,
            valid_after,
            valid_before,
        )
    }

    /// Signs a user certificate with exactly these extensions.
    pub fn sign_user_with(
        &self,
        subject: &PublicKey,
        key_id: &str,
        principals: &[String],
        extensions: &[(String, String)],
        valid_after: SystemTime,
        valid_before: SystemTime,
    ) -> Result<Certificate, ApiError> {
        if principals.is_empty() {
            return Err(ApiError::bad_parameter(
                "a user certificate needs principals",
            ));
        }
        let mut b = Self::builder(subject, valid_after, valid_before)?;
        let err = internal("build user certificate");
        b.cert_type(CertType::User).map_err(|e| err(&e))?;
        b.key_id(key_id.to_string()).map_err(|e| err(&e))?;
        for p in principals {
            b.valid_principal(p.clone()).map_err(|e| err(&e))?;
        }
        let mut sorted = extensions.to_vec();
        sorted.sort();
        for (name, value) in sorted {
            b.extension(name, value).map_err(|e| err(&e))?;
        }
        b.sign(&self.key).map_err(|e| err(&e))
    }

    /// Signs a host certificate for `principals` (the host's id, name and address).
    pub fn sign_host(
        &self,
        subject: &PublicKey,
        host_id: &str,
        principals: &[String],
        extensions: &[(String, String)],
        valid_after: SystemTime,
        valid_before: SystemTime,
    ) -> Result<Certificate, ApiError> {
        let mut b = Self::builder(subject, valid_after, valid_before)?;
        let err = internal("build host certificate");
        b.cert_type(CertType::Host).map_err(|e| err(&e))?;
        b.key_id(host_id.to_string()).map_err(|e| err(&e))?;
        for p in principals {
            b.valid_principal(p.clone()).map_err(|e| err(&e))?;
        }
        for (name, value) in extensions {
            b.extension(name.clone(), value.clone())
                .map_err(|e| err(&e))?;
        }
        b.sign(&self.key).map_err(|e| err(&e))
    }
}

/// The TLS certificate authority of the internal gRPC API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsCa {
    pub cert_pem: String,
    key_pem: String,
}

/// A TLS certificate and key issued to a process, in PEM.
#[derive(Debug, Clone)]
pub struct TlsIdentityPem {
    pub cert_pem: String,
    pub key_pem: String,
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix(t)).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl TlsCa {
    pub fn generate(cluster_name: &str, now: SystemTime) -> Result<Self, ApiError> {
        let err = internal("create TLS CA");
        let key = KeyPair::generate().map_err(|e| err(&e))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            DnType::CommonName,
            format!("turnstile {cluster_name} TLS CA"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, cluster_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + Duration::from_secs(10 * 365 * 86400));
        let cert = params.self_signed(&key).map_err(|e| err(&e))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// `sha256:<hex>` of the CA's SubjectPublicKeyInfo: what joining processes pin.
    pub fn pin(&self) -> Result<String, ApiError> {
        turnstile_api::pin::ca_pin_of_pem(&self.cert_pem)
    }

    /// Signs `message` with the CA key (ECDSA P-256, SHA-256, ASN.1 signature).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, ApiError> {
        use rcgen::SigningKey;
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| internal("load TLS CA key")(&e))?;
        key.sign(message)
            .map_err(|e| internal("sign with TLS CA")(&e))
    }

    /// Issues a certificate for a process: CN = its host id, OU = its role.
    /// `public_key_der` is the subject's SubjectPublicKeyInfo; `None` generates a
    /// key here and returns it (for identities made inside the auth process).
    pub fn issue(
        &self,
        cluster_name: &str,
        role: SystemRole,
        host_id: &str,
        public_key_der: Option<&[u8]>,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<TlsIdentityPem, ApiError> {
        let err = internal("issue TLS certificate");
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(|e| err(&e))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).map_err(|e| err(&e))?;
        let mut sans = vec![host_id.to_string()];
        if role == SystemRole::Auth {
            sans.push(AUTH_SERVER_NAME.to_string());
            sans.push("localhost".to_string());
        }
        let mut params = CertificateParams::new(sans).map_err(|e| err(&e))?;
        if role == SystemRole::Auth {
            params
                .subject_alt_names
                .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        }
        params.distinguished_name.push(DnType::CommonName, host_id);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, cluster_name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = offset(now - Duration::from_secs(3600));
        params.not_after = offset(now + ttl);
        let (cert, key_pem) = match public_key_der {
            Some(der) => {
                let spki = SubjectPublicKeyInfo::from_der(der).map_err(|e| {
                    ApiError::bad_parameter(format!("the TLS public key is not valid DER: {e}"))
                })?;
                (
                    params.signed_by(&spki, &issuer).map_err(|e| err(&e))?,
                    String::new(),
                )
            }
            None => {
                let key = KeyPair::generate().map_err(|e| err(&e))?;
                (
                    params.signed_by(&key, &issuer).map_err(|e| err(&e))?,
                    key.serialize_pem(),
                )
            }
        };
        Ok(TlsIdentityPem {
            cert_pem: cert.pem(),
            key_pem,
        })
    }
}

/// The role and host id in a peer's TLS certificate (OU and CN).
pub fn peer_identity(der: &[u8]) -> Result<(SystemRole, String), ApiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| ApiError::access_denied("the client certificate cannot be parsed"))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| ApiError::access_denied("the client certificate has no common name"))?;
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| ApiError::access_denied("the client certificate names no role"))?;
    let role = ou.parse().map_err(ApiError::access_denied)?;
    Ok((role, cn.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_certificates_carry_identity_and_validate_against_the_ca() {
        let ca = SshCa::generate();
        let user_key = generate_ed25519();
        let id = UserIdentity {
            user: "alice".into(),
            roles: vec!["access".into()],
            logins: vec!["root".into()],
        };
        let now = SystemTime::now();
        let cert = ca
            .sign_user(
                user_key.public_key(),
                &id,
                Permits::default(),
                &["root".into()],
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
            )
            .unwrap();
        cert.validate([&ca.fingerprint()]).unwrap();
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.valid_principals(), ["root".to_string()]);
        let other = SshCa::generate();
        assert!(cert.validate([&other.fingerprint()]).is_err());
        let back = UserIdentity::from_extensions(|k| cert.extensions().get(k).map(String::as_str));
        assert_eq!(back, Some(id));
        // Survives storage.
        let stored = ca.to_stored().unwrap();
        assert_eq!(
            SshCa::from_stored(&stored).unwrap().fingerprint(),
            ca.fingerprint()
        );
    }

    #[test]
    fn empty_principals_are_refused() {
        let ca = SshCa::generate();
        let id = UserIdentity {
            user: "bob".into(),
            roles: vec![],
            logins: vec![],
        };
        let now = SystemTime::now();
        let err = ca
            .sign_user(
                generate_ed25519().public_key(),
                &id,
                Permits::default(),
                &[],
                now,
                now,
            )
            .unwrap_err();
        assert!(err.message.contains("no logins"));
    }

    #[test]
    fn tls_identities_name_role_and_host() {
        let now = SystemTime::now();
        let ca = TlsCa::generate("main", now).unwrap();
        let issued = ca
            .issue(
                "main",
                SystemRole::Node,
                "host-1",
                None,
                now,
                Duration::from_secs(60),
            )
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let (role, id) = peer_identity(&pem.contents).unwrap();
        assert_eq!((role, id.as_str()), (SystemRole::Node, "host-1"));
        assert!(ca.pin().unwrap().starts_with("sha256:"));
        assert_eq!(ca.pin().unwrap().len(), "sha256:".len() + 64);
    }
}

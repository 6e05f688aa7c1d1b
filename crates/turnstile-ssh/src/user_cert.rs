//! Checking a user certificate offered to a node or the proxy. russh checks
//! only that a certificate is signed by the key inside it and is within its
//! window; trust in the signer, the certificate type, principals and critical
//! options are ours to check, here, before anything else looks at the user.

use russh::keys::Certificate;
use russh::keys::ssh_key::Fingerprint;
use russh::keys::ssh_key::certificate::CertType;
use turnstile_api::audit::AuditEvent;
use turnstile_api::identity::UserIdentity;

/// Why a certificate was refused; the text is for logs and the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertRefusal {
    #[error("the certificate is not signed by this cluster's user CA")]
    UnknownCa,
    #[error("the certificate is a host certificate, not a user certificate")]
    NotUserCert,
    #[error(
        "the certificate expired at unix time {0}; get a new one with `turnstile login` or `turnstile admin sign`"
    )]
    Expired(u64),
    #[error("the certificate is not valid before unix time {0}")]
    NotYetValid(u64),
    #[error("the certificate's signature does not verify")]
    BadSignature,
    #[error("the certificate has no principals")]
    NoPrincipals,
    #[error("the certificate has critical option {0:?}, which Turnstile does not support")]
    CriticalOption(String),
    #[error("the certificate carries no Turnstile identity (user and roles)")]
    NoIdentity,
}

/// The audit event of a refusal of the holder of `cert`, under the user it
/// names (if it names one). What the client sent is cut to
/// [`turnstile_api::audit::MAX_CLIENT_TEXT`], so a certificate with a huge
/// name cannot make an event auth refuses.
pub fn refusal_event(
    cert: &Certificate,
    login: &str,
    server_id: &str,
    remote_addr: &str,
    reason: &str,
) -> AuditEvent {
    use turnstile_api::audit::bounded;
    AuditEvent::AccessDenied {
        user: cert
            .extensions()
            .get(turnstile_api::identity::EXT_USER)
            .map(|u| bounded(u))
            .unwrap_or_default(),
        login: bounded(login),
        server_id: server_id.to_string(),
        remote_addr: remote_addr.to_string(),
        reason: bounded(reason),
    }
}

/// Verifies `cert` against the cluster's user CA at `now` (unix seconds) and
/// returns the identity it carries.
pub fn verify_user_cert(
    cert: &Certificate,
    user_ca: &[Fingerprint],
    now: u64,
) -> Result<UserIdentity, CertRefusal> {
    if cert.verify_signature().is_err() {
        return Err(CertRefusal::BadSignature);
    }
    let signer = cert
        .signature_key()
        .fingerprint(russh::keys::HashAlg::Sha256);
    if !user_ca.contains(&signer) {
        return Err(CertRefusal::UnknownCa);
    }
    if cert.cert_type() != CertType::User {
        return Err(CertRefusal::NotUserCert);
    }
    if now < cert.valid_after() {
        return Err(CertRefusal::NotYetValid(cert.valid_after()));
    }
    if now >= cert.valid_before() {
        return Err(CertRefusal::Expired(cert.valid_before()));
    }
    // Belt and braces: the library's own full check must agree.
    cert.validate_at(now, user_ca)
        .map_err(|_| CertRefusal::UnknownCa)?;
    if cert.valid_principals().is_empty() {
        return Err(CertRefusal::NoPrincipals);
    }
    if let Some(name) = cert.critical_options().keys().next() {
        return Err(CertRefusal::CriticalOption(name.clone()));
    }
    UserIdentity::from_extensions(|k| cert.extensions().get(k).map(String::as_str))
        .ok_or(CertRefusal::NoIdentity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::generate_ed25519;
    use russh::keys::HashAlg;
    use russh::keys::ssh_key::certificate::Builder;

    fn cert(
        ca: &russh::keys::PrivateKey,
        kind: CertType,
        principals: &[&str],
        window: (u64, u64),
        with_identity: bool,
    ) -> Certificate {
        let key = generate_ed25519();
        let mut b = Builder::new(
            vec![7; 16],
            key.public_key().key_data().clone(),
            window.0,
            window.1,
        )
        .unwrap();
        b.cert_type(kind).unwrap();
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        if principals.is_empty() {
            b.all_principals_valid().unwrap();
        }
        if with_identity {
            let id = UserIdentity {
                user: "alice".into(),
                roles: vec!["access".into()],
                logins: vec!["root".into()],
            };
            for (k, v) in id.extensions(turnstile_api::identity::Permits::default()) {
                b.extension(k, v).unwrap();
            }
        }
        b.sign(ca).unwrap()
    }

    #[test]
    fn each_refusal_is_named() {
        let ca = generate_ed25519();
        let fp = [ca.fingerprint(HashAlg::Sha256)];
        let now = 1_000_000;
        let good = cert(&ca, CertType::User, &["root"], (now - 10, now + 10), true);
        assert_eq!(verify_user_cert(&good, &fp, now).unwrap().user, "alice");

        let other = generate_ed25519();
        let foreign = cert(
            &other,
            CertType::User,
            &["root"],
            (now - 10, now + 10),
            true,
        );
        assert_eq!(
            verify_user_cert(&foreign, &fp, now),
            Err(CertRefusal::UnknownCa)
        );

        let host = cert(&ca, CertType::Host, &["root"], (now - 10, now + 10), true);
        assert_eq!(
            verify_user_cert(&host, &fp, now),
            Err(CertRefusal::NotUserCert)
        );

        let expired = cert(&ca, CertType::User, &["root"], (now - 10, now - 1), true);
        assert_eq!(
            verify_user_cert(&expired, &fp, now),
            Err(CertRefusal::Expired(now - 1))
        );

        let empty = cert(&ca, CertType::User, &[], (now - 10, now + 10), true);
        assert_eq!(
            verify_user_cert(&empty, &fp, now),
            Err(CertRefusal::NoPrincipals)
        );

        let anonymous = cert(&ca, CertType::User, &["root"], (now - 10, now + 10), false);
        assert_eq!(
            verify_user_cert(&anonymous, &fp, now),
            Err(CertRefusal::NoIdentity)
        );
    }
}

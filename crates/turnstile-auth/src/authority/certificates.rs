//! The certificates the authority issues and checks: TLS identities, host
//! certificates (a node's names set by auth from the name bound to its host
//! id; a proxy's own names signed by the proxy host CA), user certificates
//! (capped by the roles, bounded by the user's current record and locks),
//! the proxy's per-session certificates.

use super::*;

impl Authority {
    /// Issues a TLS identity to a process of this cluster.
    pub fn issue_tls(
        &self,
        role: SystemRole,
        host_id: &str,
        public_key_der: Option<&[u8]>,
    ) -> Result<TlsIdentityPem, ApiError> {
        self.tls_ca.issue(
            &self.cluster_name,
            role,
            host_id,
            public_key_der,
            self.clock.now(),
            TLS_CERT_TTL,
        )
    }

    /// Signs a host certificate whose principals are the host id and `names`:
    /// a proxy's by the proxy host CA (and it says so in an extension), any
    /// other by the host CA, so a node's certificate never passes for a
    /// proxy's.
    fn generate_host_cert(
        &self,
        host_id: &str,
        role: SystemRole,
        public_key: &PublicKey,
        names: &[String],
    ) -> Result<Certificate, ApiError> {
        let mut principals = vec![host_id.to_string()];
        for name in names {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ApiError::bad_parameter(format!(
                    "host principal {name:?} is empty or has whitespace"
                )));
            }
            if !principals.contains(name) {
                principals.push(name.clone());
            }
        }
        let now = self.clock.now();
        let (ca, extensions): (&SshCa, Vec<(String, String)>) = match role {
            SystemRole::Proxy => (
                &self.proxy_ca,
                vec![(EXT_HOST_ROLE.to_string(), role.to_string())],
            ),
            _ => (&self.host_ca, Vec::new()),
        };
        ca.sign_host(
            public_key,
            host_id,
            &principals,
            &extensions,
            now - CLOCK_SKEW,
            now + self.host_cert_ttl,
        )
    }

    /// The identity in a user certificate of this cluster that is valid now,
    /// cut down to the user's current record (refused for a locked or
    /// removed user).
    pub async fn verify_user_certificate(
        &self,
        text: &str,
    ) -> Result<(Certificate, UserIdentity), ApiError> {
        let (cert, identity) = self.certified_identity(text)?;
        let current = self.current_identity(&identity).await?;
        Ok((cert, current))
    }

    /// What a certificate's identity may do now: its roles and logins cut
    /// down to the user's current record; refused when a lock covers the
    /// user or the user is gone.
    pub async fn current_identity(
        &self,
        identity: &UserIdentity,
    ) -> Result<UserIdentity, ApiError> {
        self.refuse_if_locked(&identity.user).await?;
        let record = match self.get_user(&identity.user).await {
            Ok(r) => Some(r),
            Err(e) if e.kind == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        identity
            .bounded_by(
                record
                    .as_ref()
                    .map(|r| (r.roles.as_slice(), r.logins.as_slice())),
            )
            .map_err(ApiError::access_denied)
    }

    /// Refuses a user whom a lock covers.
    pub async fn refuse_if_locked(&self, user: &str) -> Result<(), ApiError> {
        let who = turnstile_api::lock::LockSubject {
            user,
            login: None,
            node: None,
        };
        match turnstile_api::lock::covering(&self.list_locks().await?, &who, self.now_unix()) {
            Some(lock) => Err(ApiError::access_denied(lock.refusal())),
            None => Ok(()),
        }
    }

    fn certified_identity(&self, text: &str) -> Result<(Certificate, UserIdentity), ApiError> {
        let cert = Certificate::from_openssh(text.trim())
            .map_err(|e| ApiError::bad_parameter(format!("certificate: {e}")))?;
        let identity = self.identity_in(&cert)?;
        Ok((cert, identity))
    }

    /// What a user certificate of this cluster, valid now, says of its holder.
    fn identity_in(&self, cert: &Certificate) -> Result<UserIdentity, ApiError> {
        cert.validate_at(self.clock.unix_now(), [&self.user_ca.fingerprint()])
            .map_err(|_| {
                ApiError::access_denied(
                    "the certificate is not a valid certificate of this cluster",
                )
            })?;
        UserIdentity::from_extensions(|k| cert.extensions().get(k).map(String::as_str))
            .ok_or_else(|| ApiError::access_denied("the certificate carries no Turnstile identity"))
    }

    /// For a proxy recording a session: a host certificate naming the node
    /// (its id and bound name) on the proxy's own key, from the host CA.
    pub async fn node_host_cert_for_proxy(
        &self,
        node_name: &str,
        proxy_key: &PublicKey,
    ) -> Result<Certificate, ApiError> {
        let node = self
            .list_nodes()
            .await?
            .into_iter()
            .find(|n| n.name.eq_ignore_ascii_case(node_name))
            .ok_or_else(|| ApiError::not_found(format!("node {node_name:?} not found")))?;
        self.generate_host_cert(
            &node.id,
            SystemRole::Node,
            proxy_key,
            &[node.name.clone(), node.name.to_ascii_lowercase()],
        )
    }

    /// For a proxy recording a session: a certificate for the proxy's key that
    /// is the user's (same identity, same logins), marked as the proxy's and
    /// valid for five minutes (long enough to authenticate to the node).
    pub async fn proxy_user_cert(
        &self,
        proxy_id: &str,
        user_certificate: &str,
        proxy_key: &PublicKey,
    ) -> Result<IssuedUserCert, ApiError> {
        let (current, identity) = self.verify_user_certificate(user_certificate).await?;
        let now = self.clock.now();
        let valid_before = now + Duration::from_secs(300);
        let permits = self.role_set(&identity.roles).await?.limits().permits();
        let mut b = Vec::new();
        for (k, v) in identity.extensions(permits) {
            b.push((k, v));
        }
        b.push((EXT_VIA_PROXY.to_string(), proxy_id.to_string()));
        let certificate = self.user_ca.sign_user_with(
            proxy_key,
            &identity.user,
            current.valid_principals(),
            &b,
            now - CLOCK_SKEW,
            valid_before,
        )?;
        Ok(IssuedUserCert {
            certificate,
            principals: current.valid_principals().to_vec(),
            valid_before,
        })
    }

    /// A certificate for a new key of the holder of `current`, expiring no
    /// later than `current` does.
    pub async fn renew_user_cert(
        &self,
        current: &Certificate,
        public_key: &PublicKey,
        ttl: Duration,
    ) -> Result<IssuedUserCert, ApiError> {
        let unix_now = self.clock.unix_now();
        let identity = self.identity_in(current)?;
        let remaining = Duration::from_secs(current.valid_before().saturating_sub(unix_now));
        let ttl = if ttl.is_zero() {
            remaining
        } else {
            ttl.min(remaining)
        };
        self.generate_user_cert(&identity.user, public_key, ttl)
            .await
    }

    /// A user certificate for `public_key`, its TTL capped by the roles'
    /// `max_session_ttl` (`ttl` zero: the cap itself).
    pub async fn generate_user_cert(
        &self,
        user: &str,
        public_key: &PublicKey,
        ttl: Duration,
    ) -> Result<IssuedUserCert, ApiError> {
        self.generate_user_cert_with(user, public_key, ttl, &[])
            .await
    }

    /// [`Self::generate_user_cert`] with `extra` extensions beside the
    /// identity's.
    pub(super) async fn generate_user_cert_with(
        &self,
        user: &str,
        public_key: &PublicKey,
        ttl: Duration,
        extra: &[(String, String)],
    ) -> Result<IssuedUserCert, ApiError> {
        self.refuse_if_locked(user).await?;
        let record = self.get_user(user).await?;
        let roles = self.role_set(&record.roles).await?;
        let principals = roles.allowed_logins(&record.logins);
        let cap = roles.limits().max_session_ttl;
        let ttl = if ttl.is_zero() { cap } else { ttl.min(cap) };
        let identity = UserIdentity {
            user: record.name.clone(),
            roles: record.roles.clone(),
            logins: record.logins.clone(),
        };
        let now = self.clock.now();
        let valid_before = now + ttl;
        let certificate = self.user_ca.sign_user_adding(
            public_key,
            &identity,
            roles.limits().permits(),
            &principals,
            extra,
            now - CLOCK_SKEW,
            valid_before,
        )?;
        Ok(IssuedUserCert {
            certificate,
            principals,
            valid_before,
        })
    }

    /// A node's host certificate: its names are the host id, the name bound
    /// to that id (bound now to `requested` at first join) and, when the
    /// node advertises the address it calls auth from (`caller`), that
    /// address's host; nothing the node asks for beyond that. Returns the
    /// certificate and the bound name.
    pub async fn issue_node_host_cert(
        &self,
        host_id: &str,
        key: &PublicKey,
        requested: &str,
        advertised: &str,
        caller: Option<std::net::IpAddr>,
    ) -> Result<(Certificate, String), ApiError> {
        let name = self.bind_node_name(host_id, requested).await?;
        let mut names = vec![name.clone(), name.to_ascii_lowercase()];
        let host = advertised
            .rsplit_once(':')
            .map_or(advertised, |(h, _)| h)
            .trim_matches(['[', ']']);
        if let (Ok(ip), Some(caller)) = (host.parse::<std::net::IpAddr>(), caller)
            && ip == caller
        {
            names.push(host.to_string());
        }
        let cert = self.generate_host_cert(host_id, SystemRole::Node, key, &names)?;
        self.remember_node_key(host_id, key).await?;
        Ok((cert, name))
    }

    /// A proxy's host certificate for its own `names`, from the proxy host CA.
    pub fn issue_proxy_host_cert(
        &self,
        host_id: &str,
        key: &PublicKey,
        names: &[String],
    ) -> Result<Certificate, ApiError> {
        self.generate_host_cert(host_id, SystemRole::Proxy, key, names)
    }
}

//! Who is who: the system roles of processes in a cluster, and what a user
//! certificate carries beyond its principals (in extensions signed by the CA).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Certificate extension: the Turnstile user name.
pub const EXT_USER: &str = "turnstile-user@turnstile";
/// Certificate extension: comma-separated role names.
pub const EXT_ROLES: &str = "turnstile-roles@turnstile";
/// Certificate extension: comma-separated logins given to the user (for `{{internal.logins}}`).
pub const EXT_LOGINS: &str = "turnstile-logins@turnstile";

/// What a user certificate permits beyond a terminal, in the standard
/// OpenSSH `permit-*` extensions: only what the user's roles allow, so a
/// stock sshd with `TrustedUserCAKeys` grants no more than a node would.
/// X11 forwarding is never permitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permits {
    pub port_forwarding: bool,
    pub agent_forwarding: bool,
}

impl Permits {
    /// The `permit-*` extensions these permits give.
    pub fn extensions(self) -> Vec<&'static str> {
        let mut out = vec!["permit-pty", "permit-user-rc"];
        if self.port_forwarding {
            out.push("permit-port-forwarding");
        }
        if self.agent_forwarding {
            out.push("permit-agent-forwarding");
        }
        out
    }
}

/// What a process is to the cluster; carried in its TLS certificate (OU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemRole {
    Auth,
    Node,
    Proxy,
    Admin,
}

impl SystemRole {
    pub fn as_str(self) -> &'static str {
        match self {
            SystemRole::Auth => "auth",
            SystemRole::Node => "node",
            SystemRole::Proxy => "proxy",
            SystemRole::Admin => "admin",
        }
    }
}

impl fmt::Display for SystemRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SystemRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auth" => Ok(SystemRole::Auth),
            "node" => Ok(SystemRole::Node),
            "proxy" => Ok(SystemRole::Proxy),
            "admin" => Ok(SystemRole::Admin),
            other => Err(format!("unknown system role {other:?}")),
        }
    }
}

/// The user behind a certificate, read from its CA-signed extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    pub user: String,
    pub roles: Vec<String>,
    pub logins: Vec<String>,
}

impl UserIdentity {
    /// The extensions to sign into a certificate.
    pub fn extensions(&self, permits: Permits) -> BTreeMap<String, String> {
        let mut ext: BTreeMap<String, String> = permits
            .extensions()
            .into_iter()
            .map(|e| (e.to_string(), String::new()))
            .collect();
        ext.insert(EXT_USER.into(), self.user.clone());
        ext.insert(EXT_ROLES.into(), self.roles.join(","));
        ext.insert(EXT_LOGINS.into(), self.logins.join(","));
        ext
    }

    /// What a certificate's identity may still do under the user's current
    /// record (`None`: the user no longer exists): its roles and logins cut
    /// down to those the user holds now, so a certificate never outgrants
    /// the record. Refused, with the reason, when no role is left.
    pub fn bounded_by(
        &self,
        current: Option<(&[String], &[String])>,
    ) -> Result<UserIdentity, String> {
        let Some((roles, logins)) = current else {
            return Err(format!(
                "user {:?} no longer exists; their certificates are no longer accepted",
                self.user
            ));
        };
        let kept_roles: Vec<String> = self
            .roles
            .iter()
            .filter(|r| roles.contains(r))
            .cloned()
            .collect();
        if kept_roles.is_empty() {
            return Err(format!(
                "user {:?} no longer holds any role of this certificate ({}); get a new one with `turnstile login`",
                self.user,
                self.roles.join(", ")
            ));
        }
        Ok(UserIdentity {
            user: self.user.clone(),
            roles: kept_roles,
            logins: self
                .logins
                .iter()
                .filter(|l| logins.contains(l))
                .cloned()
                .collect(),
        })
    }

    /// Reads the identity back; `None` if the certificate is not Turnstile's.
    pub fn from_extensions<'a>(
        mut get: impl FnMut(&str) -> Option<&'a str>,
    ) -> Option<UserIdentity> {
        let split = |s: &str| -> Vec<String> {
            s.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect()
        };
        let user = get(EXT_USER)?.to_string();
        if user.is_empty() {
            return None;
        }
        let roles = split(get(EXT_ROLES)?);
        let logins = split(get(EXT_LOGINS).unwrap_or(""));
        Some(UserIdentity {
            user,
            roles,
            logins,
        })
    }
}

/// User certificate extension: issued to a proxy (whose host id is the value)
/// to connect to a node on a user's behalf in a proxy recording mode.
pub const EXT_VIA_PROXY: &str = "turnstile-via-proxy@turnstile";

/// User certificate extension of a web console terminal's certificate: the
/// browser's address, which auth signed in and the proxy audits instead of
/// its own (the terminal comes in through the proxy's own door).
pub const EXT_WEB_CLIENT: &str = "turnstile-web-client@turnstile";

/// Host certificate extension naming the system role of the host (`proxy`
/// for proxies), so nodes can trust what a proxy tells them.
pub const EXT_HOST_ROLE: &str = "turnstile-role@turnstile";

/// The statement the TLS CA signs about the host CAs: a client that trusts
/// the TLS CA (by its pin) can then trust these host CA and proxy host CA
/// keys, each for what it signs.
pub fn host_ca_statement(
    cluster_name: &str,
    host_ca_keys: &[String],
    proxy_ca_keys: &[String],
) -> Vec<u8> {
    let mut s = format!("turnstile host CA endorsement v2\ncluster {cluster_name}\n");
    for key in host_ca_keys {
        s.push_str("host-ca ");
        s.push_str(key.trim());
        s.push('\n');
    }
    for key in proxy_ca_keys {
        s.push_str("proxy-ca ");
        s.push_str(key.trim());
        s.push('\n');
    }
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_extensions() {
        let id = UserIdentity {
            user: "alice".into(),
            roles: vec!["access".into(), "dev".into()],
            logins: vec!["alice".into(), "root".into()],
        };
        let ext = id.extensions(Permits::default());
        assert!(ext.contains_key("permit-pty"));
        assert!(!ext.contains_key("permit-port-forwarding"));
        assert!(!ext.contains_key("permit-X11-forwarding"));
        let all = id.extensions(Permits {
            port_forwarding: true,
            agent_forwarding: true,
        });
        assert!(all.contains_key("permit-port-forwarding"));
        assert!(all.contains_key("permit-agent-forwarding"));
        assert!(!all.contains_key("permit-X11-forwarding"));
        let back = UserIdentity::from_extensions(|k| ext.get(k).map(String::as_str)).unwrap();
        assert_eq!(back, id);
        assert!(UserIdentity::from_extensions(|_| None).is_none());
    }

    #[test]
    fn a_certificate_never_outgrants_the_current_record() {
        let id = UserIdentity {
            user: "dave".into(),
            roles: vec!["access".into(), "admin-ish".into()],
            logins: vec!["dave".into(), "root".into()],
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (roles, logins) = (s(&["access", "other"]), s(&["dave"]));
        let bounded = id.bounded_by(Some((&roles, &logins))).unwrap();
        assert_eq!(bounded.roles, s(&["access"]));
        assert_eq!(bounded.logins, s(&["dave"]));
        let gone = id.bounded_by(None).unwrap_err();
        assert!(gone.contains("no longer exists"), "{gone}");
        let none_left = id.bounded_by(Some((&s(&["other"]), &logins))).unwrap_err();
        assert!(none_left.contains("access, admin-ish"), "{none_left}");
    }
}

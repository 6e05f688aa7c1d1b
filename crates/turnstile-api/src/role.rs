//! Roles in Teleport's v3 form, and what a set of roles allows.
//!
//! Parsing is strict: keys Teleport does not know are refused (serde's
//! `deny_unknown_fields`), Teleport keys Turnstile does not implement are kept
//! and reported by [`Role::unimplemented_fields`] so the caller can warn.
//! [`Role::validate`] checks values and names the field at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duration::WrittenDuration;
use crate::labels::{LabelSelector, LabelValues, Labels, selector_matches, validate_label};
use crate::recording::RecordingPolicy;

/// The template that expands to the logins given to a user with `--logins`.
pub const INTERNAL_LOGINS: &str = "{{internal.logins}}";

/// The longest certificate a role set allows when no role says otherwise.
pub const DEFAULT_MAX_SESSION_TTL: Duration = Duration::from_secs(30 * 3600);

/// The role every cluster has: every node, the logins given to the user.
pub const BUILTIN_ACCESS_ROLE: &str = "access";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub kind: String,
    pub version: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: RoleSpec,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    #[serde(default)]
    pub options: RoleOptions,
    #[serde(default)]
    pub allow: RoleConditions,
    #[serde(default)]
    pub deny: RoleConditions,
}

/// Declares a struct of Teleport keys: the implemented ones typed, the others
/// kept as raw values so they can be named in a warning.
macro_rules! teleport_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            implemented { $($(#[$fmeta:meta])* $field:ident : $ty:ty,)* }
            unimplemented { $($ufield:ident $(= $rename:literal)?,)* }
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[$fmeta])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
            $(
                #[serde(default, skip_serializing_if = "Option::is_none")]
                $(#[serde(rename = $rename)])?
                pub $ufield: Option<Value>,
            )*
        }

        impl $name {
            /// Teleport keys present here that Turnstile does not implement.
            pub fn unimplemented_fields(&self) -> Vec<&'static str> {
                let mut out = Vec::new();
                $(
                    if self.$ufield.is_some() {
                        out.push(teleport_struct!(@name $ufield $(= $rename)?));
                    }
                )*
                out
            }
        }
    };
    (@name $field:ident = $rename:literal) => { $rename };
    (@name $field:ident) => { stringify!($field) };
}

teleport_struct! {
    pub struct RoleOptions {
        implemented {
            /// Concurrent SSH connections to nodes per user, cluster-wide; 0 = unlimited.
            max_connections: i64,
            /// Session channels per SSH connection; 0 = unlimited.
            max_sessions: i64,
            /// Longest certificate the role allows.
            max_session_ttl: WrittenDuration,
            /// What happens when a session's recording cannot be written.
            record_session: RecordSession,
            /// Ends a session after this long without input from the user.
            client_idle_timeout: WrittenDuration,
            /// Ends a session when the certificate it was opened with expires.
            disconnect_expired_cert: bool,
            /// Agent forwarding (`ssh -A`); default false, allowed when any role allows it.
            forward_agent: bool,
            /// Port forwarding (`ssh -L`, `-R`, `-D`, `-W`); default true, allowed
            /// when any role allows it (leaving it unset allows it).
            port_forwarding: bool,
        }
        unimplemented {
            cert_format,
            permit_x11_forwarding,
            enhanced_recording,
            require_session_mfa,
            ssh_file_copy,
            create_host_user,
            create_host_user_mode,
            pin_source_ip,
            lock,
            request_access,
            request_prompt,
            max_kubernetes_connections,
            desktop_clipboard,
            desktop_directory_sharing,
            record_desktop_session,
            device_trust_mode,
            cert_extensions,
            idp,
            ssh_port_forwarding,
            create_db_user,
            create_desktop_user,
        }
    }
}

teleport_struct! {
    /// `record_session`: `ssh` applies to SSH sessions, `default` when `ssh` is absent.
    pub struct RecordSession {
        implemented {
            default: RecordingPolicy,
            ssh: RecordingPolicy,
        }
        unimplemented {
            desktop,
        }
    }
}

teleport_struct! {
    pub struct RoleConditions {
        implemented {
            logins: Vec<String>,
            node_labels: LabelSelector,
            rules: Vec<Rule>,
        }
        unimplemented {
            kubernetes_groups,
            kubernetes_users,
            kubernetes_labels,
            kubernetes_resources,
            db_labels,
            db_names,
            db_users,
            db_roles,
            app_labels,
            cluster_labels,
            windows_desktop_labels,
            windows_desktop_logins,
            aws_role_arns,
            azure_identities,
            gcp_service_accounts,
            request,
            review_requests,
            impersonate,
            host_groups,
            host_sudoers,
            node_labels_expression,
            join_sessions,
            require_session_join,
            desktop_groups,
            group_labels,
            spiffe,
        }
    }
}

teleport_struct! {
    pub struct Rule {
        implemented {
            resources: Vec<String>,
            verbs: Vec<String>,
        }
        unimplemented {
            where_ = "where",
            actions,
        }
    }
}

/// A problem with a role, naming the field at fault and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RoleError {
    pub field: String,
    pub message: String,
}

fn role_error(field: impl Into<String>, message: impl Into<String>) -> RoleError {
    RoleError {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks a user, role or login name: what may appear in a principal, a key
/// path and a message without quoting trouble.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > 64 {
        return Err(format!("{what} {name:?} is longer than 64 characters"));
    }
    let ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if !ok || name.starts_with(['-', '.']) {
        return Err(format!(
            "{what} {name:?} may only contain letters, digits, '-', '_', '.' and '@', and may not start with '-' or '.'"
        ));
    }
    Ok(())
}

impl Role {
    /// A new empty v3 role with this name.
    pub fn new(name: &str) -> Self {
        Role {
            kind: "role".into(),
            version: "v3".into(),
            metadata: Metadata {
                name: name.into(),
                ..Metadata::default()
            },
            spec: RoleSpec::default(),
        }
    }

    /// The built-in `access` role: every node, the user's own logins.
    pub fn builtin_access() -> Self {
        let mut role = Role::new(BUILTIN_ACCESS_ROLE);
        role.metadata.description =
            Some("built-in: every node, with the logins given to the user".into());
        role.spec.allow.logins = Some(vec![INTERNAL_LOGINS.into()]);
        role.spec.allow.node_labels = Some(BTreeMap::from([(
            "*".to_string(),
            LabelValues::One("*".into()),
        )]));
        role
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), RoleError> {
        if self.kind != "role" {
            return Err(role_error(
                "kind",
                format!("must be \"role\", got {:?}", self.kind),
            ));
        }
        if self.version != "v3" {
            return Err(role_error(
                "version",
                format!(
                    "{:?} is not supported; write version: v3 (Turnstile reads Teleport's v3 roles)",
                    self.version
                ),
            ));
        }
        validate_name("role name", &self.metadata.name)
            .map_err(|m| role_error("metadata.name", m))?;
        let options = &self.spec.options;
        for (field, value) in [
            ("spec.options.max_connections", options.max_connections),
            ("spec.options.max_sessions", options.max_sessions),
        ] {
            if let Some(v) = value
                && v < 0
            {
                return Err(role_error(
                    field,
                    format!("must be 0 (unlimited) or a positive integer, got {v}"),
                ));
            }
            if let Some(v) = value
                && v > i64::from(u32::MAX)
            {
                return Err(role_error(field, format!("{v} is too large")));
            }
        }
        if let Some(ttl) = options.max_session_ttl
            && ttl.0 < Duration::from_secs(60)
        {
            return Err(role_error(
                "spec.options.max_session_ttl",
                format!("{ttl} is shorter than the minimum of 1m"),
            ));
        }
        for (which, cond) in [("allow", &self.spec.allow), ("deny", &self.spec.deny)] {
            validate_conditions(which, cond)?;
        }
        Ok(())
    }

    /// Teleport fields present in this role that Turnstile ignores, as dotted paths.
    pub fn unimplemented_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (field, present) in [
            ("metadata.expires", self.metadata.expires.is_some()),
            ("metadata.revision", self.metadata.revision.is_some()),
            ("metadata.id", self.metadata.id.is_some()),
        ] {
            if present {
                out.push(field.into());
            }
        }
        out.extend(
            self.spec
                .options
                .unimplemented_fields()
                .into_iter()
                .map(|f| format!("spec.options.{f}")),
        );
        if let Some(r) = &self.spec.options.record_session {
            out.extend(
                r.unimplemented_fields()
                    .into_iter()
                    .map(|f| format!("spec.options.record_session.{f}")),
            );
        }
        for (which, cond) in [("allow", &self.spec.allow), ("deny", &self.spec.deny)] {
            out.extend(
                cond.unimplemented_fields()
                    .into_iter()
                    .map(|f| format!("spec.{which}.{f}")),
            );
            for (i, rule) in cond.rules.iter().flatten().enumerate() {
                out.extend(
                    rule.unimplemented_fields()
                        .into_iter()
                        .map(|f| format!("spec.{which}.rules[{i}].{f}")),
                );
            }
        }
        out
    }
}

fn validate_conditions(which: &str, cond: &RoleConditions) -> Result<(), RoleError> {
    for (i, login) in cond.logins.iter().flatten().enumerate() {
        let field = format!("spec.{which}.logins[{i}]");
        if login.contains("{{") || login.contains("}}") {
            if login != INTERNAL_LOGINS {
                return Err(role_error(
                    field,
                    format!(
                        "unknown template {login:?}; the only template Turnstile expands is {INTERNAL_LOGINS}"
                    ),
                ));
            }
            continue;
        }
        validate_name("login", login).map_err(|m| role_error(field, m))?;
    }
    for (key, values) in cond.node_labels.iter().flatten() {
        let field = format!("spec.{which}.node_labels.{key}");
        validate_label("label key", key).map_err(|m| role_error(&field, m))?;
        if values.values().is_empty() {
            return Err(role_error(
                &field,
                "has no values; list at least one, or '*'",
            ));
        }
        for v in values.values() {
            validate_label("label value", v).map_err(|m| role_error(&field, m))?;
        }
    }
    for (i, rule) in cond.rules.iter().flatten().enumerate() {
        let field = format!("spec.{which}.rules[{i}]");
        if rule.resources.as_ref().is_none_or(Vec::is_empty) {
            return Err(role_error(
                format!("{field}.resources"),
                "is empty; name at least one resource, e.g. [session]",
            ));
        }
        if rule.verbs.as_ref().is_none_or(Vec::is_empty) {
            return Err(role_error(
                format!("{field}.verbs"),
                "is empty; name at least one verb, e.g. [list, read]",
            ));
        }
    }
    Ok(())
}

/// Limits computed over a user's roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// 0 = unlimited.
    pub max_connections: u32,
    /// 0 = unlimited.
    pub max_sessions: u32,
    pub max_session_ttl: Duration,
    /// `strict` unless a role says `best_effort` and none says `strict`.
    pub recording: RecordingPolicy,
    /// The shortest non-zero `client_idle_timeout` of the roles.
    pub client_idle_timeout: Option<Duration>,
    /// Some role says `disconnect_expired_cert: true`.
    pub disconnect_expired_cert: bool,
    /// Some role allows port forwarding (unset counts as allowing).
    pub port_forwarding: bool,
    /// Some role says `forward_agent: true`.
    pub forward_agent: bool,
}

/// What a user reads when none of their roles allows port forwarding.
pub fn port_forwarding_refused(user: &str) -> String {
    format!(
        "port forwarding is not allowed for user {user:?}: none of their roles allows it (port_forwarding: false)"
    )
}

/// What a user reads when none of their roles allows agent forwarding.
pub fn agent_forwarding_refused(user: &str) -> String {
    format!(
        "agent forwarding is not allowed for user {user:?}: none of their roles sets forward_agent: true"
    )
}

/// What a user reads who asks for X11 forwarding.
pub const X11_REFUSED: &str = "X11 forwarding is not supported by Turnstile";

impl Limits {
    /// The `permit-*` extensions a certificate under these roles carries.
    pub fn permits(&self) -> crate::identity::Permits {
        crate::identity::Permits {
            port_forwarding: self.port_forwarding,
            agent_forwarding: self.forward_agent,
        }
    }
}

/// Why a role set refused access.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AccessDenied(pub String);

/// The roles of one user, with the user's own logins for template expansion.
#[derive(Debug, Clone, Default)]
pub struct RoleSet {
    roles: Vec<Role>,
}

impl RoleSet {
    pub fn new(roles: Vec<Role>) -> Self {
        Self { roles }
    }

    pub fn roles(&self) -> &[Role] {
        &self.roles
    }

    fn expand(logins: &Option<Vec<String>>, internal: &[String]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for login in logins.iter().flatten() {
            if login == INTERNAL_LOGINS {
                out.extend(internal.iter().cloned());
            } else {
                out.insert(login.clone());
            }
        }
        out
    }

    /// Logins the roles allow somewhere and deny nowhere: a certificate's principals.
    pub fn allowed_logins(&self, internal: &[String]) -> Vec<String> {
        let mut allowed = BTreeSet::new();
        let mut denied = BTreeSet::new();
        for role in &self.roles {
            allowed.extend(Self::expand(&role.spec.allow.logins, internal));
            denied.extend(Self::expand(&role.spec.deny.logins, internal));
        }
        allowed.difference(&denied).cloned().collect()
    }

    /// May the user log in as `login` on a node with these labels?
    pub fn check_login(
        &self,
        user: &str,
        login: &str,
        internal: &[String],
        node_name: &str,
        node_labels: &Labels,
    ) -> Result<(), AccessDenied> {
        for role in &self.roles {
            if Self::expand(&role.spec.deny.logins, internal).contains(login) {
                return Err(AccessDenied(format!(
                    "login {login:?} is denied to user {user:?} by role {:?}",
                    role.name()
                )));
            }
            if let Some(selector) = &role.spec.deny.node_labels
                && selector_matches(selector, node_labels)
            {
                return Err(AccessDenied(format!(
                    "node {node_name:?} is denied to user {user:?} by role {:?}",
                    role.name()
                )));
            }
        }
        let mut login_anywhere = false;
        for role in &self.roles {
            if !Self::expand(&role.spec.allow.logins, internal).contains(login) {
                continue;
            }
            login_anywhere = true;
            let node_ok = match &role.spec.allow.node_labels {
                None => true,
                Some(selector) => selector_matches(selector, node_labels),
            };
            if node_ok {
                return Ok(());
            }
        }
        if login_anywhere {
            Err(AccessDenied(format!(
                "the roles of user {user:?} do not allow login {login:?} on node {node_name:?} (its labels: {})",
                crate::labels::DisplayLabels(node_labels)
            )))
        } else {
            let allowed = self.allowed_logins(internal);
            Err(AccessDenied(format!(
                "user {user:?} may not log in as {login:?}; the roles allow: {}",
                if allowed.is_empty() {
                    "no logins".to_string()
                } else {
                    allowed.join(", ")
                }
            )))
        }
    }

    /// Does some role allow this node at all (for listings)?
    pub fn can_see_node(&self, node_labels: &Labels) -> bool {
        let denied = self.roles.iter().any(|r| {
            r.spec
                .deny
                .node_labels
                .as_ref()
                .is_some_and(|s| selector_matches(s, node_labels))
        });
        !denied
            && self.roles.iter().any(|r| match &r.spec.allow.node_labels {
                None => true,
                Some(s) => selector_matches(s, node_labels),
            })
    }

    /// May holders of these roles read the audit log (a rule allowing
    /// `event` `list`)? The one rule the web console and auth both ask.
    pub fn may_read_audit(&self) -> bool {
        self.allows_rule("event", "list")
    }

    /// Does a rule allow `verb` on `resource` (and no deny rule forbid it)?
    pub fn allows_rule(&self, resource: &str, verb: &str) -> bool {
        let matches = |rules: &Option<Vec<Rule>>| {
            rules.iter().flatten().any(|rule| {
                let has = |list: &Option<Vec<String>>, want: &str| {
                    list.iter().flatten().any(|v| v == want || v == "*")
                };
                has(&rule.resources, resource) && has(&rule.verbs, verb)
            })
        };
        !self.roles.iter().any(|r| matches(&r.spec.deny.rules))
            && self.roles.iter().any(|r| matches(&r.spec.allow.rules))
    }

    /// Across roles, the smallest non-zero value wins.
    pub fn limits(&self) -> Limits {
        let smallest_nonzero = |get: fn(&RoleOptions) -> Option<i64>| {
            self.roles
                .iter()
                .filter_map(|r| get(&r.spec.options))
                .filter(|v| *v > 0)
                .min()
                .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX))
        };
        let ttl = self
            .roles
            .iter()
            .filter_map(|r| r.spec.options.max_session_ttl)
            .map(|d| d.0)
            .min()
            .unwrap_or(DEFAULT_MAX_SESSION_TTL);
        let said: Vec<RecordingPolicy> = self
            .roles
            .iter()
            .filter_map(|r| r.spec.options.record_session.as_ref())
            .filter_map(|r| r.ssh.or(r.default))
            .collect();
        let recording = if said.contains(&RecordingPolicy::BestEffort)
            && !said.contains(&RecordingPolicy::Strict)
        {
            RecordingPolicy::BestEffort
        } else {
            RecordingPolicy::Strict
        };
        Limits {
            client_idle_timeout: self
                .roles
                .iter()
                .filter_map(|r| r.spec.options.client_idle_timeout)
                .map(|d| d.0)
                .filter(|d| !d.is_zero())
                .min(),
            disconnect_expired_cert: self
                .roles
                .iter()
                .any(|r| r.spec.options.disconnect_expired_cert == Some(true)),
            port_forwarding: self
                .roles
                .iter()
                .any(|r| r.spec.options.port_forwarding != Some(false)),
            forward_agent: self
                .roles
                .iter()
                .any(|r| r.spec.options.forward_agent == Some(true)),
            recording,
            max_connections: smallest_nonzero(|o| o.max_connections),
            max_sessions: smallest_nonzero(|o| o.max_sessions),
            max_session_ttl: ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role_json(v: serde_json::Value) -> Role {
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn builtin_access_allows_own_logins_everywhere() {
        let set = RoleSet::new(vec![Role::builtin_access()]);
        let mine = vec!["alice".to_string(), "root".to_string()];
        assert!(
            set.check_login("alice", "root", &mine, "web1", &labels(&[("env", "prod")]))
                .is_ok()
        );
        let err = set
            .check_login("alice", "bob", &mine, "web1", &labels(&[]))
            .unwrap_err();
        assert!(err.0.contains("may not log in as \"bob\""), "{err}");
        assert_eq!(set.allowed_logins(&mine), mine);
    }

    #[test]
    fn node_labels_restrict_and_deny_wins() {
        let dev = role_json(serde_json::json!({
            "kind": "role", "version": "v3", "metadata": {"name": "dev"},
            "spec": {"allow": {"logins": ["ubuntu"], "node_labels": {"env": ["dev", "staging"]}}}
        }));
        let no_ubuntu = role_json(serde_json::json!({
            "kind": "role", "version": "v3", "metadata": {"name": "no-ubuntu"},
            "spec": {"deny": {"logins": ["ubuntu"]}}
        }));
        let set = RoleSet::new(vec![dev.clone()]);
        assert!(
            set.check_login("a", "ubuntu", &[], "n", &labels(&[("env", "dev")]))
                .is_ok()
        );
        let err = set
            .check_login("a", "ubuntu", &[], "n", &labels(&[("env", "prod")]))
            .unwrap_err();
        assert!(err.0.contains("do not allow login"), "{err}");
        let set = RoleSet::new(vec![dev, no_ubuntu]);
        let err = set
            .check_login("a", "ubuntu", &[], "n", &labels(&[("env", "dev")]))
            .unwrap_err();
        assert!(err.0.contains("denied"), "{err}");
        assert!(set.allowed_logins(&[]).is_empty());
    }

    #[test]
    fn smallest_nonzero_limit_wins() {
        let mk = |name: &str, conns: i64, sessions: i64| {
            let mut r = Role::new(name);
            r.spec.options.max_connections = Some(conns);
            r.spec.options.max_sessions = Some(sessions);
            r
        };
        let set = RoleSet::new(vec![mk("a", 0, 10), mk("b", 3, 0), mk("c", 5, 4)]);
        let limits = set.limits();
        assert_eq!(limits.max_connections, 3);
        assert_eq!(limits.max_sessions, 4);
        assert_eq!(limits.max_session_ttl, DEFAULT_MAX_SESSION_TTL);
        assert_eq!(
            RoleSet::new(vec![mk("z", 0, 0)]).limits().max_connections,
            0
        );
    }

    #[test]
    fn recording_is_strict_unless_a_role_says_best_effort_and_none_says_strict() {
        let mk = |name: &str, yaml: &str| -> Role {
            serde_json::from_str(&format!(
                "{{\"kind\":\"role\",\"version\":\"v3\",\"metadata\":{{\"name\":\"{name}\"}},\"spec\":{{\"options\":{yaml}}}}}"
            ))
            .unwrap()
        };
        let silent = mk("silent", "{}");
        let best = mk("best", r#"{"record_session":{"ssh":"best_effort"}}"#);
        let by_default = mk("dflt", r#"{"record_session":{"default":"best_effort"}}"#);
        let strict = mk(
            "strict",
            r#"{"record_session":{"default":"best_effort","ssh":"strict"}}"#,
        );
        let policy = |roles: Vec<Role>| RoleSet::new(roles).limits().recording;
        assert_eq!(policy(vec![silent.clone()]), RecordingPolicy::Strict);
        assert_eq!(
            policy(vec![silent.clone(), best.clone()]),
            RecordingPolicy::BestEffort
        );
        assert_eq!(policy(vec![by_default]), RecordingPolicy::BestEffort);
        assert_eq!(policy(vec![best, strict.clone()]), RecordingPolicy::Strict);
        assert_eq!(policy(vec![strict]), RecordingPolicy::Strict);
        let with_desktop = mk("d", r#"{"record_session":{"desktop":true}}"#);
        assert_eq!(
            with_desktop.unimplemented_fields(),
            vec!["spec.options.record_session.desktop".to_string()]
        );
        let bad: Result<Role, _> = serde_json::from_str(
            r#"{"kind":"role","version":"v3","metadata":{"name":"x"},"spec":{"options":{"record_session":{"ssh":"sometimes"}}}}"#,
        );
        assert!(bad.is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut r = Role::new("x");
        r.spec.options.max_connections = Some(-1);
        let err = r.validate().unwrap_err();
        assert_eq!(err.field, "spec.options.max_connections");

        let mut r = Role::new("x");
        r.spec.allow.logins = Some(vec!["{{external.foo}}".into()]);
        assert_eq!(r.validate().unwrap_err().field, "spec.allow.logins[0]");

        let mut r = Role::new("x");
        r.version = "v5".into();
        assert_eq!(r.validate().unwrap_err().field, "version");

        let r = Role::new("bad name");
        assert_eq!(r.validate().unwrap_err().field, "metadata.name");
    }

    #[test]
    fn unknown_keys_refused_and_teleport_keys_reported() {
        let unknown = serde_json::from_value::<Role>(serde_json::json!({
            "kind": "role", "version": "v3", "metadata": {"name": "x"},
            "spec": {"options": {"max_conections": 2}}
        }));
        assert!(unknown.unwrap_err().to_string().contains("max_conections"));
        let r = role_json(serde_json::json!({
            "kind": "role", "version": "v3", "metadata": {"name": "x"},
            "spec": {"options": {"forward_agent": true, "permit_x11_forwarding": true},
                     "allow": {"kubernetes_groups": ["a"], "rules": [{"resources": ["session"], "verbs": ["list"], "where": "x"}]}}
        }));
        assert_eq!(
            r.unimplemented_fields(),
            vec![
                "spec.options.permit_x11_forwarding",
                "spec.allow.kubernetes_groups",
                "spec.allow.rules[0].where"
            ]
        );
    }

    #[test]
    fn forwarding_is_allowed_when_any_role_allows_it() {
        let with = |opts: serde_json::Value| {
            role_json(serde_json::json!({
                "kind": "role", "version": "v3", "metadata": {"name": "r"},
                "spec": {"options": opts}
            }))
        };
        let unset = with(serde_json::json!({}));
        let no_ports = with(serde_json::json!({"port_forwarding": false}));
        let agent = with(serde_json::json!({"forward_agent": true}));
        // Port forwarding: default true; one role that denies it denies it
        // only when no other role allows it.
        assert!(RoleSet::new(vec![unset.clone()]).limits().port_forwarding);
        assert!(
            !RoleSet::new(vec![no_ports.clone()])
                .limits()
                .port_forwarding
        );
        assert!(
            RoleSet::new(vec![no_ports.clone(), unset.clone()])
                .limits()
                .port_forwarding
        );
        // Agent forwarding: default false; any role that allows it allows it.
        assert!(!RoleSet::new(vec![unset.clone()]).limits().forward_agent);
        assert!(RoleSet::new(vec![unset, agent]).limits().forward_agent);
    }

    #[test]
    fn rules_grant_session_reading() {
        let auditor = role_json(serde_json::json!({
            "kind": "role", "version": "v3", "metadata": {"name": "auditor"},
            "spec": {"allow": {"rules": [{"resources": ["session"], "verbs": ["list", "read"]}]}}
        }));
        let set = RoleSet::new(vec![auditor]);
        assert!(set.allows_rule("session", "read"));
        assert!(!set.allows_rule("session", "delete"));
        assert!(!RoleSet::new(vec![Role::builtin_access()]).allows_rule("session", "list"));
    }
}

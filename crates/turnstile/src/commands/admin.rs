//! `turnstile admin`: the operator's tool. It reaches the local auth service
//! over the gRPC API with the admin identity that auth keeps in its data dir,
//! the way `tctl` does on an auth host.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::json;
use turnstile_api::auth_channel::AuthChannel;
use turnstile_api::identity::SystemRole;
use turnstile_api::labels::{DisplayLabels, Labels};
use turnstile_api::role::Role;
use turnstile_api::rpc::{AuthClient, proto};
use turnstile_ssh::cluster_view::auth_client;
use turnstile_ssh::identity::{TlsIdentity, generate_ed25519};

use crate::cli::{
    AdminArgs, AdminCommand, AuditCommand, ConfigCommand, Format, ListCommand, LocksCommand,
    NodesCommand, RolesCommand, SemaphoresCommand, SignArgs, TokensCommand, UsersCommand,
};
use crate::config::{self, resolve};
use crate::identity_file::{self, NewIdentity};
use crate::process::{AUTH_ADDR_FILE, PROXY_ADDR_FILE};

struct Admin {
    client: AuthClient<AuthChannel>,
    data_dir: PathBuf,
    auth_addr: String,
}

/// Turns an RPC failure into a message for the operator.
fn rpc_error(admin: &Admin, status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable => anyhow::anyhow!(
            "cannot reach the auth service at {}: {}; is `turnstile start` running with data dir {}?",
            admin.auth_addr,
            status.message(),
            admin.data_dir.display()
        ),
        _ => anyhow::anyhow!("{}", status.message()),
    }
}

fn connect(config_path: Option<&Path>, data_dir: Option<PathBuf>) -> anyhow::Result<Admin> {
    let (data_dir, configured_addr) = match config_path {
        Some(path) => {
            let c = config::load(Some(path), data_dir)?;
            let addr = c.auth.as_ref().map(|a| a.listen_addr.to_string());
            (c.data_dir, addr)
        }
        None => (
            data_dir.unwrap_or_else(|| PathBuf::from(resolve::DEFAULT_DATA_DIR)),
            None,
        ),
    };
    let identity = TlsIdentity::load(&data_dir, SystemRole::Admin)?.with_context(|| {
        format!(
            "no admin identity in {}; run `turnstile admin` on the auth server with --data-dir (or --config) pointing at its data dir",
            data_dir.join("identity/admin").display()
        )
    })?;
    let auth_addr = std::fs::read_to_string(data_dir.join(AUTH_ADDR_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or(configured_addr)
        .unwrap_or_else(|| resolve::DEFAULT_AUTH_ADDR.to_string());
    let client = auth_client(&auth_addr, &identity)?;
    Ok(Admin {
        client,
        data_dir,
        auth_addr,
    })
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let mut admin = connect(args.config.as_deref(), args.data_dir)?;
    match args.command {
        AdminCommand::Roles(cmd) => roles(&mut admin, cmd).await,
        AdminCommand::Users(cmd) => users(&mut admin, cmd).await,
        AdminCommand::Nodes(NodesCommand::Ls { format }) => nodes_ls(&mut admin, format).await,
        AdminCommand::Nodes(NodesCommand::Rename { old, new }) => {
            let bound = admin
                .client
                .rename_node(proto::RenameNodeRequest {
                    name: old.clone(),
                    new_name: new,
                })
                .await
                .map_err(|s| rpc_error(&admin, s))?
                .into_inner();
            crate::outln!(
                "Node {old:?} (host {}) is now {:?}; its host certificate carries the new name from its next renewal (restart it to have that now).",
                bound.host_id,
                bound.name
            );
            Ok(())
        }
        AdminCommand::Nodes(NodesCommand::Rm { name }) => {
            let bound = admin
                .client
                .remove_node(proto::DeleteRequest { name })
                .await
                .map_err(|s| rpc_error(&admin, s))?
                .into_inner();
            crate::outln!(
                "Node {:?} (host {}) forgotten; its name is free.",
                bound.name,
                bound.host_id
            );
            Ok(())
        }
        AdminCommand::Tokens(TokensCommand::Add { roles, ttl, format }) => {
            tokens_add(&mut admin, roles, &ttl, format).await
        }
        AdminCommand::Config(cmd) => config_cmd(&mut admin, cmd).await,
        AdminCommand::Locks(cmd) => locks(&mut admin, cmd).await,
        AdminCommand::Semaphores(SemaphoresCommand::Rm { lease }) => {
            semaphores_rm(&mut admin, &lease).await
        }
        AdminCommand::Semaphores(SemaphoresCommand::Ls { format }) => {
            semaphores_ls(&mut admin, format).await
        }
        AdminCommand::Sessions(ListCommand::Ls { format }) => sessions_ls(&mut admin, format).await,
        AdminCommand::Audit(AuditCommand::Search {
            event,
            user,
            since,
            limit,
            format,
        }) => audit_search(&mut admin, event, user, since, limit, format).await,
        AdminCommand::Sign(args) => sign(&mut admin, args).await,
    }
}

/// Parses a role file; errors name the field, line and column.
pub fn parse_role(path: &Path) -> anyhow::Result<Role> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read role file {}", path.display()))?;
    let role: Role = serde_norway::from_str(&text)
        .map_err(|e| anyhow::anyhow!("role file {}: {e}", path.display()))?;
    role.validate()
        .map_err(|e| anyhow::anyhow!("role file {}: {e}", path.display()))?;
    Ok(role)
}

pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        crate::outln!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn limit(v: Option<i64>) -> String {
    match v {
        None | Some(0) => "-".into(),
        Some(n) => n.to_string(),
    }
}

async fn roles(admin: &mut Admin, cmd: RolesCommand) -> anyhow::Result<()> {
    match cmd {
        RolesCommand::Create { file, force } => {
            let role = parse_role(&file)?;
            for field in role.unimplemented_fields() {
                eprintln!(
                    "warning: role {:?}: {field} is a Teleport setting Turnstile does not implement; it is ignored",
                    role.name()
                );
            }
            let resp = admin
                .client
                .upsert_role(proto::UpsertRoleRequest {
                    role_json: serde_json::to_string(&role)?,
                    create_only: !force,
                })
                .await
                .map_err(|s| rpc_error(admin, s))?
                .into_inner();
            if resp.created {
                crate::outln!("role {:?} created", role.name());
            } else {
                crate::outln!("role {:?} replaced", role.name());
            }
        }
        RolesCommand::Ls { format } => {
            let list = admin
                .client
                .get_roles(proto::GetRolesRequest { names: vec![] })
                .await
                .map_err(|s| rpc_error(admin, s))?
                .into_inner();
            let roles: Vec<Role> = list
                .role_json
                .iter()
                .map(|j| serde_json::from_str(j))
                .collect::<Result<_, _>>()?;
            if format == Format::Json {
                for r in &roles {
                    crate::outln!("{}", serde_json::to_string(r)?);
                }
                return Ok(());
            }
            let rows: Vec<Vec<String>> = roles
                .iter()
                .map(|r| {
                    let o = &r.spec.options;
                    vec![
                        r.name().to_string(),
                        r.spec.allow.logins.clone().unwrap_or_default().join(","),
                        r.spec
                            .allow
                            .node_labels
                            .as_ref()
                            .map_or("(all)".into(), |s| {
                                s.iter()
                                    .map(|(k, v)| format!("{k}={}", v.values().join("|")))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            }),
                        limit(o.max_connections),
                        limit(o.max_sessions),
                        o.max_session_ttl.map_or("-".into(), |d| d.to_string()),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME",
                    "LOGINS",
                    "NODE LABELS",
                    "MAX CONNECTIONS",
                    "MAX SESSIONS",
                    "MAX TTL",
                ],
                &rows,
            );
        }
        RolesCommand::Rm { name } => {
            admin
                .client
                .delete_role(proto::DeleteRequest { name: name.clone() })
                .await
                .map_err(|s| rpc_error(admin, s))?;
            crate::outln!("role {name:?} removed");
        }
    }
    Ok(())
}

async fn users(admin: &mut Admin, cmd: UsersCommand) -> anyhow::Result<()> {
    match cmd {
        UsersCommand::Add {
            name,
            roles,
            logins,
            password_stdin,
        } => {
            // Read (and check) the password before anything is stored.
            let password = if password_stdin {
                Some(read_password_line()?)
            } else {
                None
            };
            let roles = non_empty(roles);
            let logins = non_empty(logins);
            admin
                .client
                .upsert_user(proto::UpsertUserRequest {
                    user: Some(proto::User {
                        name: name.clone(),
                        roles: roles.clone(),
                        logins: logins.clone(),
                        created_unix: 0,
                    }),
                    create_only: true,
                })
                .await
                .map_err(|s| rpc_error(admin, s))?;
            if let Some(password) = password {
                admin
                    .client
                    .set_password(proto::SetPasswordRequest {
                        user: name.clone(),
                        password,
                    })
                    .await
                    .map_err(|s| {
                        anyhow::anyhow!(
                            "user {name:?} was added, but the password was refused: {}; set one with `turnstile admin users passwd {name} --password-stdin`",
                            s.message()
                        )
                    })?;
            }
            crate::outln!(
                "user {name:?} added (roles: {}; logins: {})",
                roles.join(", "),
                if logins.is_empty() {
                    "none".into()
                } else {
                    logins.join(", ")
                }
            );
            crate::outln!(
                "Give them an identity: turnstile admin sign --user {name} --out {name} --data-dir {}",
                admin.data_dir.display()
            );
        }
        UsersCommand::Ls { format } => {
            let users = list_users(admin).await?;
            if format == Format::Json {
                for u in &users {
                    crate::outln!(
                        "{}",
                        json!({"user": u.name, "roles": u.roles, "logins": u.logins, "created": rfc3339(u.created_unix)})
                    );
                }
                return Ok(());
            }
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| vec![u.name.clone(), u.roles.join(","), u.logins.join(",")])
                .collect();
            print_table(&["USER", "ROLES", "LOGINS"], &rows);
        }
        UsersCommand::Update {
            name,
            roles,
            logins,
        } => {
            if roles.is_none() && logins.is_none() {
                anyhow::bail!(
                    "nothing to change for user {name:?}: give --roles ROLE,… or --logins LOGIN,… (or both)"
                );
            }
            let users = list_users(admin).await?;
            let Some(mut user) = users.into_iter().find(|u| u.name == name) else {
                anyhow::bail!(
                    "there is no user {name:?}; add one with `turnstile admin users add {name} --roles …`"
                );
            };
            if let Some(roles) = roles {
                let roles = non_empty(roles);
                if roles.is_empty() {
                    anyhow::bail!("--roles is empty: a user needs at least one role");
                }
                user.roles = roles;
            }
            if let Some(logins) = logins {
                user.logins = non_empty(logins);
            }
            admin
                .client
                .upsert_user(proto::UpsertUserRequest {
                    user: Some(user.clone()),
                    create_only: false,
                })
                .await
                .map_err(|s| rpc_error(admin, s))?;
            crate::outln!(
                "user {name:?} updated: roles {}, logins {}",
                user.roles.join(","),
                if user.logins.is_empty() {
                    "(none)".to_string()
                } else {
                    user.logins.join(",")
                }
            );
        }
        UsersCommand::Passwd { name, .. } => {
            let password = read_password_line()?;
            admin
                .client
                .set_password(proto::SetPasswordRequest {
                    user: name.clone(),
                    password,
                })
                .await
                .map_err(|s| rpc_error(admin, s))?;
            crate::outln!("password of user {name:?} set");
        }
        UsersCommand::Rm { name } => {
            admin
                .client
                .delete_user(proto::DeleteRequest { name: name.clone() })
                .await
                .map_err(|s| rpc_error(admin, s))?;
            crate::outln!("user {name:?} removed");
        }
    }
    Ok(())
}

/// A comma-separated list as given, without its empty entries (`a,,b`, `a,`).
fn non_empty(list: Vec<String>) -> Vec<String> {
    list.into_iter().filter(|s| !s.is_empty()).collect()
}

async fn list_users(admin: &mut Admin) -> anyhow::Result<Vec<proto::User>> {
    Ok(admin
        .client
        .list_users(proto::ListUsersRequest {})
        .await
        .map_err(|s| rpc_error(admin, s))?
        .into_inner()
        .users)
}

fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn nodes_ls(admin: &mut Admin, format: Format) -> anyhow::Result<()> {
    let nodes = admin
        .client
        .list_nodes(proto::ListNodesRequest {})
        .await
        .map_err(|s| rpc_error(admin, s))?
        .into_inner()
        .nodes;
    if format == Format::Json {
        for n in &nodes {
            crate::outln!(
                "{}",
                json!({"name": n.name, "id": n.id, "addr": n.addr, "labels": n.labels, "expires": rfc3339(n.expires_unix)})
            );
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let labels: Labels = n.labels.clone().into_iter().collect();
            vec![
                n.name.clone(),
                n.addr.clone(),
                DisplayLabels(&labels).to_string(),
                n.id.clone(),
            ]
        })
        .collect();
    print_table(&["NODE", "ADDRESS", "LABELS", "ID"], &rows);
    Ok(())
}

async fn sign(admin: &mut Admin, args: SignArgs) -> anyhow::Result<()> {
    let ttl =
        turnstile_api::duration::parse(&args.ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    if ttl.is_zero() {
        bail!("--ttl: must be longer than zero, e.g. 1h");
    }
    let proxy = match args.proxy {
        Some(p) => p,
        None => std::fs::read_to_string(admin.data_dir.join(PROXY_ADDR_FILE))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .context("no proxy address known in this data dir; pass --proxy HOST:PORT")?,
    };
    let users = admin
        .client
        .list_users(proto::ListUsersRequest {})
        .await
        .map_err(|s| rpc_error(admin, s))?
        .into_inner()
        .users;
    let user = users
        .iter()
        .find(|u| u.name == args.user)
        .with_context(|| {
            format!(
                "user {:?} not found; add them with `turnstile admin users add`",
                args.user
            )
        })?;
    let key = generate_ed25519();
    let issued = admin
        .client
        .generate_user_cert(proto::GenerateUserCertRequest {
            user: args.user.clone(),
            public_key: key.public_key().to_openssh()?,
            ttl_seconds: ttl.as_secs(),
        })
        .await
        .map_err(|s| rpc_error(admin, s))?
        .into_inner();
    let certificate = russh::keys::Certificate::from_openssh(&issued.certificate)?;
    let authorities = admin
        .client
        .get_authorities(proto::GetAuthoritiesRequest {})
        .await
        .map_err(|s| rpc_error(admin, s))?
        .into_inner();
    let default_login = user
        .logins
        .iter()
        .find(|l| issued.principals.contains(l))
        .or(issued.principals.first())
        .cloned()
        .unwrap_or_default();
    let paths = identity_file::write(
        &args.out,
        &NewIdentity {
            user: &args.user,
            cluster_name: &authorities.cluster_name,
            key: &key,
            certificate: &certificate,
            host_ca: &authorities.host_ca,
            proxy_ca: &authorities.proxy_ca,
            proxy: &proxy,
            default_login: &default_login,
        },
    )?;
    crate::outln!(
        "Identity of user {:?} written, valid until {} (logins: {}):",
        args.user,
        humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_secs(issued.valid_before_unix)
        ),
        issued.principals.join(", ")
    );
    for p in [
        &paths.key,
        &paths.cert,
        &paths.known_hosts,
        &paths.ssh_config,
    ] {
        crate::outln!("  {}", p.display());
    }
    crate::outln!("Connect with:");
    crate::outln!("  ssh -F {} NODE", paths.ssh_config.display());
    crate::outln!("  turnstile ssh -i {} NODE", paths.key.display());
    Ok(())
}

/// The first line of standard input, without its line ending; checked
/// against the password policy here so a bad one fails before anything is stored.
pub fn read_password_line() -> anyhow::Result<String> {
    let password = read_first_line()?;
    turnstile_auth::passwords::check_policy(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(password)
}

/// The first line of standard input, without its line ending (a password
/// to log in with: auth judges it, and audits a wrong one).
pub fn read_first_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("no password on standard input (--password-stdin reads its first line)");
    }
    Ok(password)
}

async fn tokens_add(
    admin: &mut Admin,
    roles: Vec<String>,
    ttl: &str,
    format: Format,
) -> anyhow::Result<()> {
    let ttl = turnstile_api::duration::parse(ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    let roles: Vec<String> = roles.into_iter().filter(|r| !r.is_empty()).collect();
    let resp = admin
        .client
        .create_token(proto::CreateTokenRequest {
            roles: roles.clone(),
            ttl_seconds: ttl.as_secs(),
        })
        .await
        .map_err(|s| rpc_error(admin, s))?
        .into_inner();
    let expires = rfc3339(resp.expires_unix);
    if format == Format::Json {
        crate::outln!(
            "{}",
            json!({"token": resp.token, "type": roles, "expires": expires, "ca_pin": resp.ca_pin, "auth_server": admin.auth_addr})
        );
        return Ok(());
    }
    crate::outln!(
        "Join token for {} (single use, valid until {expires}):",
        roles.join(", ")
    );
    crate::outln!("  {}", resp.token);
    crate::outln!("CA pin:");
    crate::outln!("  {}", resp.ca_pin);
    crate::outln!("In the joining process's config:");
    crate::outln!("  turnstile:");
    crate::outln!("    auth_servers: [\"{}\"]", admin.auth_addr);
    crate::outln!("    join_token: {}", resp.token);
    crate::outln!("    ca_pin: {}", resp.ca_pin);
    Ok(())
}

fn rfc3339_ms(unix_ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Every connection slot held in the cluster.
async fn list_leases(admin: &mut Admin) -> anyhow::Result<Vec<proto::SemaphoreLease>> {
    Ok(admin
        .client
        .list_semaphores(proto::ListSemaphoresRequest {
            kind: String::new(),
        })
        .await
        .map_err(|s| rpc_error(admin, s))?
        .into_inner()
        .leases)
}

async fn semaphores_rm(admin: &mut Admin, lease: &str) -> anyhow::Result<()> {
    let leases = list_leases(admin).await?;
    let Some(l) = leases.iter().find(|l| l.lease_id == lease) else {
        bail!("no slot with lease {lease:?} is held; see `turnstile admin semaphores ls`");
    };
    admin
        .client
        .cancel_semaphore(proto::CancelSemaphoreRequest {
            kind: l.kind.clone(),
            name: l.name.clone(),
            lease_id: l.lease_id.clone(),
        })
        .await
        .map_err(|s| rpc_error(admin, s))?;
    crate::outln!(
        "freed the slot of user {:?} held on {} since {}",
        l.name,
        l.holder_name,
        rfc3339_ms(l.since_unix_ms)
    );
    Ok(())
}

async fn semaphores_ls(admin: &mut Admin, format: Format) -> anyhow::Result<()> {
    let leases = list_leases(admin).await?;
    if format == Format::Json {
        for l in &leases {
            crate::outln!(
                "{}",
                json!({
                    "kind": l.kind, "user": l.name, "lease_id": l.lease_id,
                    "node": l.holder_name, "server_id": l.holder, "login": l.login,
                    "addr.remote": l.remote_addr, "since": rfc3339_ms(l.since_unix_ms),
                    "expires": rfc3339_ms(l.expires_unix_ms),
                })
            );
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            vec![
                l.lease_id.clone(),
                l.name.clone(),
                l.holder_name.clone(),
                l.login.clone(),
                l.remote_addr.clone(),
                rfc3339_ms(l.since_unix_ms),
                rfc3339_ms(l.expires_unix_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "LEASE",
            "USER",
            "NODE",
            "LOGIN",
            "REMOTE ADDRESS",
            "SINCE",
            "LEASE EXPIRES",
        ],
        &rows,
    );
    Ok(())
}

async fn sessions_ls(admin: &mut Admin, format: Format) -> anyhow::Result<()> {
    let trackers = admin
        .client
        .list_session_trackers(proto::ListSessionTrackersRequest {})
        .await
        .map_err(|s| rpc_error(admin, s))?
        .into_inner()
        .trackers;
    if format == Format::Json {
        for t in &trackers {
            crate::outln!(
                "{}",
                json!({
                    "id": t.id, "user": t.user, "login": t.login, "node": t.node_name,
                    "server_id": t.node_id, "addr.remote": t.remote_addr,
                    "since": rfc3339_ms(t.since_unix_ms), "sessions": t.channels,
                })
            );
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = trackers
        .iter()
        .map(|t| {
            vec![
                t.user.clone(),
                t.node_name.clone(),
                t.login.clone(),
                t.remote_addr.clone(),
                rfc3339_ms(t.since_unix_ms),
                t.channels.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "USER",
            "NODE",
            "LOGIN",
            "REMOTE ADDRESS",
            "SINCE",
            "SESSIONS",
        ],
        &rows,
    );
    Ok(())
}

async fn audit_search(
    admin: &mut Admin,
    event: Option<String>,
    user: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
    format: Format,
) -> anyhow::Result<()> {
    let since_unix_ms = match since {
        Some(s) => {
            let ago =
                turnstile_api::duration::parse(&s).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let at = std::time::SystemTime::now() - ago;
            i64::try_from(at.duration_since(UNIX_EPOCH)?.as_millis()).unwrap_or(0)
        }
        None => 0,
    };
    // Text names the node an event happened on, by name where auth knows it.
    let node_names: std::collections::HashMap<String, String> = if format == Format::Json {
        Default::default()
    } else {
        admin
            .client
            .list_nodes(proto::ListNodesRequest {})
            .await
            .map(|r| {
                r.into_inner()
                    .nodes
                    .into_iter()
                    .map(|n| (n.id, n.name))
                    .collect()
            })
            .unwrap_or_default()
    };
    // A page at a time, printed as it comes: the first lines show at once
    // however long the log.
    let mut left = limit.unwrap_or(usize::MAX);
    let mut after = String::new();
    while left > 0 {
        let page = admin
            .client
            .search_audit_events(proto::SearchAuditEventsRequest {
                event: event.clone().unwrap_or_default(),
                user: user.clone().unwrap_or_default(),
                since_unix_ms,
                limit: u32::try_from(left.min(AUDIT_PAGE)).unwrap_or(0),
                after: after.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| rpc_error(admin, s))?
            .into_inner();
        for line in page.event_json.iter().take(left) {
            print_audit_event(line, format, &node_names);
        }
        left = left.saturating_sub(page.event_json.len());
        if page.next.is_empty() {
            break;
        }
        after = page.next;
    }
    Ok(())
}

/// How many events `audit search` asks for at a time.
const AUDIT_PAGE: usize = 1000;

fn print_audit_event(
    line: &str,
    format: Format,
    node_names: &std::collections::HashMap<String, String>,
) {
    if format == Format::Json {
        crate::outln!("{line}");
        return;
    }
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v[k].to_string())
    };
    let mut text = format!(
        "{} {} {} user={}",
        field("time"),
        field("event"),
        field("code"),
        field("user")
    );
    let node = v["node"].as_str().map(str::to_string).or_else(|| {
        v["server_id"].as_str().map(|id| {
            node_names
                .get(id)
                .cloned()
                .unwrap_or_else(|| id.to_string())
        })
    });
    if let Some(node) = node {
        text.push_str(&format!(" node={node}"));
    }
    for k in [
        "login",
        "target",
        "command",
        "exitCode",
        "sid",
        "sessctl_kind",
        "max",
        "addr.remote",
        "success",
        "error",
        "reason",
    ] {
        if !v[k].is_null() {
            let value = field(k);
            if value.contains(' ') {
                text.push_str(&format!(" {k}={value:?}"));
            } else {
                text.push_str(&format!(" {k}={value}"));
            }
        }
    }
    crate::outln!("{text}");
}

async fn config_cmd(admin: &mut Admin, cmd: ConfigCommand) -> anyhow::Result<()> {
    let c = match &cmd {
        ConfigCommand::Get { .. } => admin
            .client
            .get_cluster_config(proto::GetClusterConfigRequest {})
            .await
            .map_err(|s| rpc_error(admin, s))?
            .into_inner(),
        ConfigCommand::Set { key, value } => admin
            .client
            .set_cluster_config(proto::SetClusterConfigRequest {
                key: key.clone(),
                value: value.clone(),
            })
            .await
            .map_err(|s| rpc_error(admin, s))?
            .into_inner(),
    };
    let duration = |ms: u64| turnstile_api::duration::format(Duration::from_millis(ms));
    let settings = [
        ("session_recording", c.session_recording.clone()),
        (
            "session_control_timeout",
            duration(c.session_control_timeout_ms),
        ),
        ("locking_mode", c.locking_mode.clone()),
        (
            "client_idle_timeout",
            if c.client_idle_timeout_ms == 0 {
                "none".into()
            } else {
                duration(c.client_idle_timeout_ms)
            },
        ),
        (
            "disconnect_expired_cert",
            c.disconnect_expired_cert.to_string(),
        ),
    ];
    if matches!(
        cmd,
        ConfigCommand::Get {
            format: Format::Json
        }
    ) {
        let object: serde_json::Map<String, serde_json::Value> = settings
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        crate::outln!("{}", serde_json::Value::Object(object));
        return Ok(());
    }
    if let ConfigCommand::Set { key, value } = &cmd {
        crate::outln!(
            "{key} set to {value}; nodes and proxies pick it up within 10s (a recording mode applies to sessions that start after that)"
        );
    }
    for (k, v) in settings {
        crate::outln!("{k:<24} {v}");
    }
    Ok(())
}

async fn locks(admin: &mut Admin, cmd: LocksCommand) -> anyhow::Result<()> {
    match cmd {
        LocksCommand::Add {
            user,
            node,
            login,
            ttl,
            message,
        } => {
            let target = match (user, node, login) {
                (Some(u), None, None) => format!("user={u}"),
                (None, Some(n), None) => format!("node={n}"),
                (None, None, Some(l)) => format!("login={l}"),
                _ => anyhow::bail!("a lock has one target: give one of --user, --node, --login"),
            };
            let ttl_seconds = match ttl.as_deref() {
                None => 0,
                Some(t) => {
                    let d = turnstile_api::duration::parse(t)
                        .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
                    anyhow::ensure!(
                        d.as_secs() > 0,
                        "--ttl: a lock lasts at least 1s; leave --ttl out for a lock until removed"
                    );
                    d.as_secs()
                }
            };
            let lock = admin
                .client
                .create_lock(proto::CreateLockRequest {
                    target,
                    message,
                    ttl_seconds,
                })
                .await
                .map_err(|s| rpc_error(admin, s))?
                .into_inner();
            let lock = parse_lock(&lock)?;
            crate::outln!(
                "lock {} placed on {}{}; nodes and proxies end its sessions and refuse new ones within 10s",
                lock.id,
                lock.target,
                lock.expires_unix
                    .map_or(String::new(), |t| format!(" until {}", rfc3339(t)))
            );
        }
        LocksCommand::Ls { format } => {
            let list = admin
                .client
                .list_locks(proto::ListLocksRequest {})
                .await
                .map_err(|s| rpc_error(admin, s))?
                .into_inner()
                .locks;
            let locks = list
                .iter()
                .map(parse_lock)
                .collect::<anyhow::Result<Vec<_>>>()?;
            if format == Format::Json {
                for l in &locks {
                    crate::outln!("{}", serde_json::to_string(l)?);
                }
                return Ok(());
            }
            let rows: Vec<Vec<String>> = locks
                .iter()
                .map(|l| {
                    vec![
                        l.id.clone(),
                        l.target.to_string(),
                        l.message.clone(),
                        rfc3339(l.created_unix),
                        l.expires_unix.map_or("never".into(), rfc3339),
                    ]
                })
                .collect();
            print_table(&["ID", "TARGET", "MESSAGE", "CREATED", "EXPIRES"], &rows);
        }
        LocksCommand::Rm { id } => {
            admin
                .client
                .delete_lock(proto::DeleteRequest { name: id.clone() })
                .await
                .map_err(|s| rpc_error(admin, s))?;
            crate::outln!(
                "lock {id} removed; nodes and proxies let its target in again within 10s"
            );
        }
    }
    Ok(())
}

fn parse_lock(m: &proto::LockMessage) -> anyhow::Result<turnstile_api::lock::Lock> {
    serde_json::from_str(&m.lock_json).map_err(|e| anyhow::anyhow!("auth sent a bad lock: {e}"))
}

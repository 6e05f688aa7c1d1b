//! The command line: every subcommand, flag and help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "turnstile",
    version,
    about = "An SSH access plane: short-lived certificates, per-user session limits, recorded sessions",
    long_about = "Turnstile lets people reach servers through a proxy with short-lived SSH certificates.\n\n\
Start a one-node cluster in an empty folder with `turnstile start`; it prints the commands that add \
a user and connect. The same binary is the client (`turnstile ssh`) and the operator's tool \
(`turnstile admin`).\n\nLogs go to stderr; set RUST_LOG=debug for more."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the cluster's services: auth, proxy and node (all three without a config file).
    Start(StartArgs),
    /// Log in to a cluster through its proxy with a password; saves a profile in ~/.turnstile.
    Login(LoginArgs),
    /// Run a command, or an interactive shell, on a node through the proxy.
    Ssh(SshArgs),
    /// List the nodes you may reach.
    Ls(LsArgs),
    /// Replay a recorded session.
    Play(PlayArgs),
    /// List and export recorded sessions.
    #[command(subcommand)]
    Recordings(RecordingsCommand),
    /// Operator commands for the local cluster (roles, users, nodes, identities).
    Admin(AdminArgs),
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// YAML config (see examples/turnstile.yaml). Without it: auth, proxy and
    /// node on 127.0.0.1:3025/3023/3022.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where state is kept (default ./turnstile-data, or turnstile.data_dir of the config).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Saves the key (0600), certificate, proxy address and the cluster's host CA \
under ~/.turnstile (or $TURNSTILE_HOME); then `turnstile ssh NODE` and `turnstile ls` need no -i.\n\n\
First contact: pass --ca-pin (printed by `turnstile start`), or confirm the host CA fingerprint \
when asked; the answer is remembered.\n\nExample:\n  \
echo \"$PASSWORD\" | turnstile login --proxy proxy.example.com:3023 --user alice --ca-pin sha256:... --password-stdin"
)]
pub struct LoginArgs {
    /// The proxy, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub proxy: String,
    /// Your Turnstile user name.
    #[arg(long)]
    pub user: String,
    /// The cluster's CA pin (sha256:...), to trust it on first contact without a prompt.
    #[arg(long, value_name = "PIN")]
    pub ca_pin: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// How long the certificate should live (capped by your roles' max_session_ttl).
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PlayFormat {
    /// Timed replay in this terminal (the default on a terminal).
    Tty,
    /// The session's output alone (the default when stdout is not a terminal).
    Text,
    /// The events, one JSON object a line.
    Json,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Keys during a replay: space pauses and resumes, left and right arrows \
seek 5 seconds, q quits.\n\nExamples:\n  turnstile play 6f1c... --speed 2\n  \
turnstile play 6f1c... --format text > session.txt"
)]
pub struct PlayArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The session id (from `turnstile recordings ls`, or TURNSTILE_SESSION_ID).
    pub sid: String,
    /// Replay this many times as fast.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Cap pauses at this many seconds (0: no cap).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub max_idle: f64,
    #[arg(long, value_enum)]
    pub format: Option<PlayFormat>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExportFormat {
    /// asciicast v2, for the asciinema tools.
    Asciicast,
}

#[derive(Debug, Subcommand)]
pub enum RecordingsCommand {
    /// List the recordings you may see (your own, or all with a session list rule).
    Ls {
        #[command(flatten)]
        client: ClientArgs,
        /// Only this user's sessions.
        #[arg(long)]
        user: Option<String>,
        /// Only sessions that started within this long, e.g. 1h, 7d.
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Write a recording in another format.
    Export {
        #[command(flatten)]
        client: ClientArgs,
        sid: String,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Write here instead of standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Identity written by `turnstile admin sign --out PATH` (key, certificate,
    /// host CA and proxy address). Default: the profile of `turnstile login`.
    #[arg(short = 'i', long = "identity", value_name = "PATH", global = true)]
    pub identity: Option<PathBuf>,
    /// The proxy to go through, HOST:PORT (overrides the identity's).
    #[arg(long, value_name = "HOST:PORT", global = true)]
    pub proxy: Option<String>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: the remote command's, or 255 when Turnstile itself fails \
(cannot connect, authentication refused, access denied).\n\nExamples:\n  \
turnstile ssh -i alice root@web1 -- uptime\n  turnstile ssh -i alice web1"
)]
pub struct SshArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Allocate a PTY even when standard input is not a terminal.
    #[arg(short = 't', conflicts_with = "no_tty")]
    pub tty: bool,
    /// Never allocate a PTY.
    #[arg(short = 'T')]
    pub no_tty: bool,
    /// [LOGIN@]NODE: the node by name; LOGIN defaults to the user's first login.
    #[arg(value_name = "[LOGIN@]NODE")]
    pub destination: String,
    /// The command to run; without one, an interactive shell.
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The cluster's config file; admin finds the data dir and auth address in it.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// The auth server's data dir, where the admin identity lives (default ./turnstile-data).
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create, list and remove roles (Teleport v3 YAML).
    #[command(subcommand)]
    Roles(RolesCommand),
    /// Add, list and remove users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Registered nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Join tokens for nodes and proxies.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Cluster settings, changed live (session_recording, session_control_timeout,
    /// locking_mode, client_idle_timeout, disconnect_expired_cert).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Lock a user, a node or a login: live sessions end and new ones are refused.
    #[command(subcommand)]
    Locks(LocksCommand),
    /// Connection slots held under max_connections.
    #[command(subcommand)]
    Semaphores(SemaphoresCommand),
    /// Active connections on nodes.
    #[command(subcommand)]
    Sessions(ListCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Write a user identity: key, certificate, known_hosts and ssh_config for OpenSSH.
    Sign(SignArgs),
}

#[derive(Debug, Subcommand)]
pub enum RolesCommand {
    /// Create a role from a YAML file.
    Create {
        /// The role's YAML (kind: role, version: v3).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Replace the role if it exists.
        #[arg(long)]
        force: bool,
    },
    /// List roles.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Remove a role no user has.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Add a user.
    Add {
        name: String,
        /// Comma-separated roles, e.g. access,dev.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Comma-separated logins for {{internal.logins}}, e.g. root,alice.
        #[arg(long, value_delimiter = ',')]
        logins: Vec<String>,
        /// Set a password (for `turnstile login`) from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's roles or logins (what is not given stays).
    Update {
        name: String,
        /// Comma-separated roles, replacing the user's.
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
        /// Comma-separated logins for {{internal.logins}}, replacing the user's.
        #[arg(long, value_delimiter = ',')]
        logins: Option<Vec<String>>,
    },
    /// Set a user's password (for `turnstile login`).
    Passwd {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List users.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Remove a user.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a single-use join token; prints it with the CA pin.
    #[command(
        after_help = "Put the token and the CA pin in the joining process's config:\n  \
turnstile:\n    auth_servers: [\"AUTH:3025\"]\n    join_token: TOKEN\n    ca_pin: PIN"
    )]
    Add {
        /// What may join with it: node, proxy, or node,proxy.
        #[arg(
            long = "type",
            value_delimiter = ',',
            required = true,
            value_name = "node|proxy"
        )]
        roles: Vec<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show the cluster settings.
    Get {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Change one: session_recording (node, node-sync, proxy, proxy-sync, off; recorders
    /// follow within 10 s, each session keeps the mode it started in),
    /// session_control_timeout (e.g. 2m), locking_mode (best_effort, strict),
    /// client_idle_timeout (e.g. 15m; 0s: none) or disconnect_expired_cert (true, false).
    Set { key: String, value: String },
}

#[derive(Debug, Subcommand)]
pub enum LocksCommand {
    /// Place a lock. Within 10s every node and proxy ends the live sessions
    /// it covers, with the message on the user's terminal, and refuses new
    /// connections, whatever certificate they carry.
    #[command(
        group(clap::ArgGroup::new("target").required(true).args(["user", "node", "login"])),
        after_help = "Examples:\n  turnstile admin locks add --user dave --message \"offboarded; ask IT\"\n  \
turnstile admin locks add --node db-1 --ttl 30m --message \"maintenance\""
    )]
    Add {
        /// Lock every connection of this user.
        #[arg(long)]
        user: Option<String>,
        /// Lock every connection to this node (its name or host id).
        #[arg(long)]
        node: Option<String>,
        /// Lock every connection as this login (OS user), on every node.
        #[arg(long)]
        login: Option<String>,
        /// How long the lock lasts, e.g. 30m, 12h (default: until removed).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Shown to the users it stops.
        #[arg(long, default_value = "")]
        message: String,
    },
    /// List the locks in force.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Remove a lock by its id (from `locks ls`).
    Rm { id: String },
}

#[derive(Debug, Subcommand)]
pub enum SemaphoresCommand {
    /// List the slots held, oldest first.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Free a slot by hand (its LEASE from `semaphores ls`), e.g. one a node
    /// that will not come back still holds. The connection on it, if any,
    /// is closed by its node when it next renews the slot.
    Rm { lease: String },
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// List them.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Search the audit log, oldest first.
    #[command(
        after_help = "Examples:\n  turnstile admin audit search --event sessctl.limit --since 1h\n  \
turnstile admin audit search --user alice --format json"
    )]
    Search {
        /// Only events of this name, e.g. sessctl.limit, user.login.
        #[arg(long)]
        event: Option<String>,
        /// Only events of this user.
        #[arg(long)]
        user: Option<String>,
        /// Only events newer than this, e.g. 30m, 1h, 7d.
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// At most this many events, the oldest first (default: all, read a
        /// page of 1,000 at a time).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List registered nodes.
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Give a node another name. A node's name is bound to its host id at
    /// first join and never issued to another node; this is the way to
    /// change it.
    #[command(
        after_help = "The node's listing and routing use NEW at once; its host certificate carries NEW from its next renewal (at most 12 h; restart the node to have it now). Users reaching it as OLD must use NEW."
    )]
    Rename {
        /// The node's current name.
        old: String,
        /// The name it gets.
        new: String,
    },
    /// Free a node's name and forget the node (for a node that is gone, so
    /// another may take its name).
    Rm {
        /// The node's name.
        name: String,
    },
}

#[derive(Debug, Args)]
#[command(
    after_help = "Writes PATH (private key, 0600), PATH-cert.pub, PATH.known_hosts and \
PATH.ssh_config. Then:\n  ssh -F PATH.ssh_config NODE uptime\n  turnstile ssh -i PATH NODE"
)]
pub struct SignArgs {
    /// The user to sign for.
    #[arg(long)]
    pub user: String,
    /// Certificate lifetime, e.g. 1h (capped by the roles' max_session_ttl).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// The proxy the identity points at, HOST:PORT (default: the local proxy's address).
    #[arg(long, value_name = "HOST:PORT")]
    pub proxy: Option<String>,
    /// Path prefix of the files to write.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

//! The audit log of a cluster of several auth servers: one PostgreSQL
//! table every auth server writes to (`storage.audit_events_uri:
//! postgres://…`). Each event is a row keyed by its uid, so an event written
//! twice (a host's batch resent to another auth server) is stored once; the
//! body is the event's JSON as the file log would write it. Searches read
//! pages ordered by time and uid, on indexes for time, user, event and
//! session, so the first page comes back at once however long the log.
//!
//! The connection is opened at start and again, on the next write, after it
//! breaks: while PostgreSQL is unreachable, writes fail and the events wait
//! in the hosts' queues.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};
use turnstile_api::audit::AuditEvent;
use turnstile_api::clock::Clock;

use super::pg_tls::RustlsTls;
use super::{AuditLog, AuditLogError, AuditPage, AuditQuery};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS turnstile_audit_events (
    uid TEXT PRIMARY KEY,
    time TIMESTAMPTZ NOT NULL,
    event TEXT NOT NULL,
    username TEXT NOT NULL DEFAULT '',
    sid TEXT NOT NULL DEFAULT '',
    body JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS turnstile_audit_events_time ON turnstile_audit_events (time, uid);
CREATE INDEX IF NOT EXISTS turnstile_audit_events_user ON turnstile_audit_events (username, time, uid);
CREATE INDEX IF NOT EXISTS turnstile_audit_events_event ON turnstile_audit_events (event, time, uid);
CREATE INDEX IF NOT EXISTS turnstile_audit_events_sid ON turnstile_audit_events (sid, time, uid);
";

/// Two auth servers starting at once create the schema one after the other.
const SCHEMA_LOCK: i64 = 0x7475_726e_7374_696c;

#[derive(Debug)]
pub struct PostgresAuditLog {
    config: tokio_postgres::Config,
    /// TLS, when the URI names the CA to check the server with.
    tls: Option<RustlsTls>,
    /// The URI without its password, for messages.
    target: String,
    client: Mutex<Option<Arc<Client>>>,
    clock: Arc<dyn Clock>,
}

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `uri` without the password it may carry.
fn redacted(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &uri[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:…{}", &uri[..scheme + 3], &uri[at..]),
                None => uri.to_string(),
            }
        }
        _ => uri.to_string(),
    }
}

impl PostgresAuditLog {
    /// Connects to `uri` (a libpq URI: `postgres://user:pass@host/db`, or
    /// `postgres:///db?host=/run/postgresql` for a Unix socket) and creates
    /// the table and its indexes if they are missing.
    ///
    /// `sslrootcert=/path/ca.pem` in the query (libpq's parameter) turns on
    /// TLS, checked against that CA; `sslmode=require` without it is
    /// refused, since nothing could check the server. `sslcert=` and
    /// `sslkey=` (PEM files) give a client certificate for servers that ask
    /// for one (`cert` in pg_hba.conf).
    pub async fn connect(uri: &str, clock: Arc<dyn Clock>) -> Result<Self, AuditLogError> {
        let target = redacted(uri);
        let bad = |message: String| AuditLogError::Postgres {
            target: target.clone(),
            message,
        };
        let (rest, rootcert) = take_query_param(uri, "sslrootcert");
        let (rest, cert) = take_query_param(&rest, "sslcert");
        let (rest, key) = take_query_param(&rest, "sslkey");
        let client_cert = match (cert, key) {
            (Some(cert), Some(key)) => {
                let read = |what: &str, path: &str| {
                    std::fs::read(path).map_err(|e| bad(format!("{what} {path}: {e}")))
                };
                Some((read("sslcert", &cert)?, read("sslkey", &key)?))
            }
            (None, None) => None,
            _ => {
                return Err(bad(
                    "sslcert and sslkey go together: give both (the client certificate and its key) or neither"
                        .into(),
                ));
            }
        };
        if client_cert.is_some() && rootcert.is_none() {
            return Err(bad(
                "sslcert needs sslrootcert=/path/to/ca.pem: a client certificate is only sent to a server checked against its CA"
                    .into(),
            ));
        }
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| bad(format!("not a PostgreSQL URI: {e}")))?;
        let tls = match rootcert {
            Some(path) => {
                let pem =
                    std::fs::read(&path).map_err(|e| bad(format!("sslrootcert {path}: {e}")))?;
                let tls = RustlsTls::new(&pem, client_cert.as_ref())
                    .map_err(|e| bad(format!("{e} (sslrootcert={path})")))?;
                // A CA given means TLS wanted: never fall back to plain.
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(tls)
            }
            None if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require => {
                return Err(bad(
                    "sslmode=require needs sslrootcert=/path/to/ca.pem in the URI: the CA \
                     that signed PostgreSQL's certificate"
                        .into(),
                ));
            }
            None => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
        };
        let log = Self {
            config,
            tls,
            target,
            client: Mutex::new(None),
            clock,
        };
        let client = log.client().await?;
        let schema = async {
            client
                .batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {SCHEMA} COMMIT;"
                ))
                .await
        };
        schema.await.map_err(|e| log.failed(&e))?;
        Ok(log)
    }

    fn failed(&self, e: &tokio_postgres::Error) -> AuditLogError {
        let message = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => {
                // The cause says what: "invalid peer certificate: UnknownIssuer".
                let mut text = e.to_string();
                let mut source = std::error::Error::source(e);
                while let Some(cause) = source {
                    text.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                text
            }
        };
        AuditLogError::Postgres {
            target: self.target.clone(),
            message,
        }
    }

    /// The open connection, or a new one if there is none or it broke.
    async fn client(&self) -> Result<Arc<Client>, AuditLogError> {
        let mut current = self.client.lock().await;
        if let Some(client) = current.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let target = self.target.clone();
        let broke = move |e: tokio_postgres::Error| {
            tracing::warn!(%target, error = %e, "the audit log's PostgreSQL connection broke");
        };
        let client = match &self.tls {
            Some(tls) => {
                let (client, connection) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| self.failed(&e))?;
                tokio::spawn(async move { connection.await.map_err(broke) });
                client
            }
            None => {
                let (client, connection) = self
                    .config
                    .connect(NoTls)
                    .await
                    .map_err(|e| self.failed(&e))?;
                tokio::spawn(async move { connection.await.map_err(broke) });
                client
            }
        };
        let client = Arc::new(client);
        *current = Some(client.clone());
        Ok(client)
    }

    pub(crate) async fn insert(&self, rows: Vec<Value>) -> Result<(), AuditLogError> {
        if rows.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        // One statement for the batch: one round trip, one commit.
        let body = Value::Array(rows);
        client
            .execute(
                "INSERT INTO turnstile_audit_events (uid, time, event, username, sid, body)
                 SELECT e->>'uid', (e->>'time')::timestamptz, e->>'event',
                        COALESCE(e->>'user', ''), COALESCE(e->>'sid', ''), e
                 FROM jsonb_array_elements($1::text::jsonb) AS e
                 ON CONFLICT (uid) DO NOTHING",
                &[&body.to_string()],
            )
            .await
            .map_err(|e| self.failed(&e))?;
        Ok(())
    }

    fn stamp(&self) -> String {
        humantime::format_rfc3339_millis(self.clock.now()).to_string()
    }
}

/// `uri` without the query parameter `name`, and that parameter's value.
fn take_query_param(uri: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = uri.split_once('?') else {
        return (uri.to_string(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, value)
}

/// A page's end: the last event's time (milliseconds) and uid.
fn cursor_of(event: &Value) -> Option<String> {
    let time = event["time"].as_str()?;
    let at = humantime::parse_rfc3339(time).ok()?;
    Some(format!("{}:{}", to_ms(at), event["uid"].as_str()?))
}

fn parse_cursor(cursor: &str) -> Result<(i64, String), AuditLogError> {
    cursor
        .split_once(':')
        .and_then(|(ms, uid)| Some((ms.parse().ok()?, uid.to_string())))
        .ok_or_else(|| {
            AuditLogError::BadCursor(format!("{cursor:?} is not where a page of this log ended"))
        })
}

#[async_trait]
impl AuditLog for PostgresAuditLog {
    async fn emit(&self, event: AuditEvent) -> Result<Value, AuditLogError> {
        let json = event.to_json(&self.stamp(), &uuid::Uuid::new_v4().to_string());
        self.insert(vec![json.clone()]).await?;
        Ok(json)
    }

    async fn emit_batch(&self, events: Vec<(AuditEvent, String)>) -> Result<(), AuditLogError> {
        let time = self.stamp();
        self.insert(
            events
                .iter()
                .map(|(event, uid)| event.to_json(&time, uid))
                .collect(),
        )
        .await
    }

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage, AuditLogError> {
        let (after_ms, after_uid) = match &query.after {
            Some(cursor) => {
                let (ms, uid) = parse_cursor(cursor)?;
                (Some(ms), Some(uid))
            }
            None => (None, None),
        };
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let since_ms = query.since.map(to_ms);
        let client = self.client().await?;
        // One more than asked: whether there is a next page.
        let rows = client
            .query(
                "SELECT body::text FROM turnstile_audit_events
                 WHERE ($1::text IS NULL OR event = $1)
                   AND ($2::text IS NULL OR username = $2)
                   AND ($3::bigint IS NULL OR time >= to_timestamp($3::bigint / 1000.0))
                   AND ($4::bigint IS NULL
                        OR (time, uid) > (to_timestamp($4::bigint / 1000.0), $5::text))
                 ORDER BY time, uid
                 LIMIT CASE WHEN $6::bigint = 0 THEN NULL ELSE $6::bigint + 1 END",
                &[
                    &query.event,
                    &query.user,
                    &since_ms,
                    &after_ms,
                    &after_uid,
                    &limit,
                ],
            )
            .await
            .map_err(|e| self.failed(&e))?;
        let mut events: Vec<Value> = rows
            .iter()
            .filter_map(|row| serde_json::from_str(row.get::<_, &str>(0)).ok())
            .collect();
        let more = query.limit > 0 && events.len() > query.limit;
        events.truncate(if more { query.limit } else { events.len() });
        let next = if more {
            events.last().and_then(cursor_of)
        } else {
            None
        };
        Ok(AuditPage { events, next })
    }
}

/// A private PostgreSQL for tests: a fresh cluster in a temporary
/// directory, listening only on a Unix socket there; stopped on drop.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::path::{Path, PathBuf};
    use std::process::Command;

    #[derive(Debug)]
    pub struct PostgresServer {
        dir: tempfile::TempDir,
        bin: PathBuf,
        running: bool,
        /// The server's options: where it listens, TLS.
        options: String,
        /// With TLS: the TCP port, and the CA that signed its certificate.
        tls: Option<(u16, PathBuf)>,
        /// When it takes only clients with a certificate: theirs.
        client_cert: Option<(PathBuf, PathBuf)>,
    }

    /// The newest installed PostgreSQL's programs.
    fn bin_dir() -> PathBuf {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                    .collect()
            })
            .unwrap_or_default();
        versions.retain(|p| p.join("initdb").is_file());
        versions.sort();
        versions.pop().expect(
            "PostgreSQL is missing: run scripts/test.sh, which installs the postgresql package",
        )
    }

    /// Runs `program` as the `postgres` user when this is root (PostgreSQL
    /// refuses to run as root), else as this user.
    fn as_postgres(program: &Path) -> Command {
        if nix_is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn nix_is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false)
    }

    impl PostgresServer {
        pub fn start() -> Self {
            Self::start_with(false, false)
        }

        /// A server that takes only TLS connections, on a loopback port,
        /// with a certificate for localhost from a CA of its own.
        pub fn start_tls() -> Self {
            Self::start_with(true, false)
        }

        /// As [`Self::start_tls`], and it takes only clients with a
        /// certificate from its CA naming the user (`cert` in pg_hba.conf);
        /// [`Self::uri`] names one.
        pub fn start_tls_with_client_certs() -> Self {
            Self::start_with(true, true)
        }

        fn start_with(tls: bool, client_certs: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            if nix_is_root() {
                let ok = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(dir.path())
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown of the PostgreSQL test directory");
            }
            let bin = bin_dir();
            let out = as_postgres(&bin.join("initdb"))
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "initdb: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let socket_dir = dir.path().display().to_string();
            let (options, tls) = if tls {
                let (port, ca) = Self::prepare_tls(dir.path(), client_certs);
                let mut options = format!(
                    "-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} -c fsync=off \
                     -c ssl=on -c ssl_cert_file={socket_dir}/server.crt \
                     -c ssl_key_file={socket_dir}/server.key"
                );
                if client_certs {
                    options.push_str(&format!(" -c ssl_ca_file={socket_dir}/ca.pem"));
                }
                (options, Some((port, ca)))
            } else {
                (
                    format!("-c listen_addresses='' -k {socket_dir} -c fsync=off"),
                    None,
                )
            };
            let client_cert = client_certs
                .then(|| (dir.path().join("client.crt"), dir.path().join("client.key")));
            let mut server = Self {
                dir,
                bin,
                running: false,
                options,
                tls,
                client_cert,
            };
            server.restart();
            server
        }

        /// Writes the server's certificate and key (a CA of its own, kept
        /// as ca.pem) and a pg_hba.conf that takes TCP connections only
        /// over TLS (and, with `client_certs`, only with a client
        /// certificate for user `postgres`, written as client.crt and
        /// client.key); returns a free port and the CA's path.
        fn prepare_tls(dir: &Path, client_certs: bool) -> (u16, PathBuf) {
            use crate::ca::TlsCa;
            use turnstile_api::identity::SystemRole;
            let now = std::time::SystemTime::now();
            let ca = TlsCa::generate("postgres-test", now).unwrap();
            let issued = ca
                .issue(
                    "postgres-test",
                    SystemRole::Auth,
                    "postgres",
                    None,
                    now,
                    std::time::Duration::from_secs(86400),
                )
                .unwrap();
            std::fs::write(dir.join("server.crt"), &issued.cert_pem).unwrap();
            std::fs::write(dir.join("server.key"), &issued.key_pem).unwrap();
            std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
            let method = if client_certs {
                // The certificate's common name must be the user's name.
                let client = ca
                    .issue(
                        "postgres-test",
                        SystemRole::Auth,
                        "postgres",
                        None,
                        now,
                        std::time::Duration::from_secs(86400),
                    )
                    .unwrap();
                std::fs::write(dir.join("client.crt"), &client.cert_pem).unwrap();
                std::fs::write(dir.join("client.key"), &client.key_pem).unwrap();
                "cert"
            } else {
                "trust"
            };
            std::fs::write(
                dir.join("data/pg_hba.conf"),
                format!("local all all trust\nhostssl all all 127.0.0.1/32 {method}\n"),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            if nix_is_root() {
                for f in ["server.crt", "server.key", "data/pg_hba.conf", "ca.pem"] {
                    let _ = Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(dir.join(f))
                        .status();
                }
            }
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            (port, dir.join("ca.pem"))
        }

        /// Starts the stopped server again, with its data.
        pub fn restart(&mut self) {
            let out = as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-o", &self.options, "-w", "-l"])
                .arg(self.dir.path().join("log"))
                .arg("start")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "pg_ctl start: {}{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
            );
            self.running = true;
        }

        /// Stops the server at once (as a crash would); its data stays.
        pub fn stop(&mut self) {
            if !self.running {
                return;
            }
            let _ = as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .output();
            self.running = false;
        }

        /// The URI of its `postgres` database: over the Unix socket, or
        /// over TLS (checked against its CA) for a TLS server.
        pub fn uri(&self) -> String {
            match (&self.tls, &self.client_cert) {
                (Some((port, ca)), Some((cert, key))) => format!(
                    "postgres://postgres@localhost:{port}/postgres?sslrootcert={}&sslcert={}&sslkey={}",
                    ca.display(),
                    cert.display(),
                    key.display()
                ),
                (Some((port, ca)), None) => format!(
                    "postgres://postgres@localhost:{port}/postgres?sslrootcert={}",
                    ca.display()
                ),
                (None, _) => format!(
                    "postgres:///postgres?host={}&user=postgres",
                    self.dir.path().display()
                ),
            }
        }
    }

    impl Drop for PostgresServer {
        fn drop(&mut self) {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::testing::PostgresServer;
    use super::*;
    use turnstile_api::clock::SystemClock;

    use crate::audit_log::tests::login;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("postgres://turnstile:s3cret@db:5432/audit"),
            "postgres://turnstile:…@db:5432/audit"
        );
        assert_eq!(
            redacted("postgres:///x?host=/tmp"),
            "postgres:///x?host=/tmp"
        );
    }

    #[tokio::test]
    async fn events_are_stored_once_by_uid_and_read_a_page_at_a_time() {
        let server = PostgresServer::start();
        let log = PostgresAuditLog::connect(&server.uri(), Arc::new(SystemClock))
            .await
            .unwrap();
        // A second auth server on the same database: the schema is there.
        let other = PostgresAuditLog::connect(&server.uri(), Arc::new(SystemClock))
            .await
            .unwrap();
        let batch: Vec<(AuditEvent, String)> = (0..5)
            .map(|i| (login(&format!("u{i}")), format!("uid-{i}")))
            .collect();
        log.emit_batch(batch.clone()).await.unwrap();
        // Resent to the other auth server: stored once.
        other.emit_batch(batch).await.unwrap();
        other.emit(login("alice")).await.unwrap();
        let all = log.search(&AuditQuery::default()).await.unwrap();
        assert_eq!(all.events.len(), 6);
        assert!(all.next.is_none());
        let mut pages = Vec::new();
        let mut query = AuditQuery {
            limit: 2,
            ..Default::default()
        };
        loop {
            let page = log.search(&query).await.unwrap();
            pages.push(page.events.len());
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, [2, 2, 2]);
        let alice = other
            .search(&AuditQuery {
                user: Some("alice".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(alice.events.len(), 1);
        assert_eq!(alice.events[0]["event"], "user.login");
        let e = log
            .search(&AuditQuery {
                after: Some("nonsense".into()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not where a page"), "{e}");
    }

    #[tokio::test]
    async fn tls_is_checked_against_the_ca_of_sslrootcert_and_never_skipped() {
        let server = PostgresServer::start_tls();
        let uri = server.uri();
        let log = PostgresAuditLog::connect(&uri, Arc::new(SystemClock))
            .await
            .unwrap();
        log.emit(login("over-tls")).await.unwrap();
        assert_eq!(
            log.search(&AuditQuery::default())
                .await
                .unwrap()
                .events
                .len(),
            1
        );
        // Another CA: the server's certificate is refused.
        let dir = tempfile::tempdir().unwrap();
        let other = crate::ca::TlsCa::generate("other", std::time::SystemTime::now()).unwrap();
        let other_ca = dir.path().join("other.pem");
        std::fs::write(&other_ca, &other.cert_pem).unwrap();
        let (base, _) = take_query_param(&uri, "sslrootcert");
        let wrong = format!("{base}?sslrootcert={}", other_ca.display());
        let e = PostgresAuditLog::connect(&wrong, Arc::new(SystemClock))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("certificate") || e.contains("Certificate"),
            "{e}"
        );
        // TLS asked for with nothing to check the server by: refused.
        let e =
            PostgresAuditLog::connect(&format!("{base}?sslmode=require"), Arc::new(SystemClock))
                .await
                .unwrap_err()
                .to_string();
        assert!(e.contains("sslmode=require needs sslrootcert"), "{e}");
        // Without TLS, the server (hostssl only) refuses the connection.
        assert!(
            PostgresAuditLog::connect(&base, Arc::new(SystemClock))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_server_asking_for_client_certificates_takes_sslcert_and_sslkey() {
        let server = PostgresServer::start_tls_with_client_certs();
        let uri = server.uri();
        let log = PostgresAuditLog::connect(&uri, Arc::new(SystemClock))
            .await
            .unwrap();
        log.emit(login("with-client-cert")).await.unwrap();
        let (without_key, _) = take_query_param(&uri, "sslkey");
        let e = PostgresAuditLog::connect(&without_key, Arc::new(SystemClock))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslcert and sslkey go together"), "{e}");
        // Without a certificate the server refuses the connection.
        let (no_cert, _) = take_query_param(&without_key, "sslcert");
        let e = PostgresAuditLog::connect(&no_cert, Arc::new(SystemClock))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("certificate"), "{e}");
    }

    #[tokio::test]
    async fn writes_fail_while_postgres_is_down_and_resume_without_a_restart() {
        let mut server = PostgresServer::start();
        let log = PostgresAuditLog::connect(&server.uri(), Arc::new(SystemClock))
            .await
            .unwrap();
        log.emit(login("before")).await.unwrap();
        server.stop();
        let e = log.emit(login("during")).await.unwrap_err();
        assert!(e.to_string().contains("audit log in PostgreSQL"), "{e}");
        server.restart();
        log.emit(login("after")).await.unwrap();
        let users: Vec<String> = log
            .search(&AuditQuery::default())
            .await
            .unwrap()
            .events
            .iter()
            .map(|e| e["user"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(users, ["before", "after"]);
    }
}

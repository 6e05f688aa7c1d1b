//! Recordings in S3 and S3-compatible stores, Azure and GCS, against real
//! servers started here on 127.0.0.1 from what scripts/test.sh installs: moto
//! (in memory, enforces the 5 MiB minimum part, checks no signature), s3s-fs
//! (on disk, so it survives a restart; checks SigV4), Azurite, and
//! gcp-storage-emulator (behind a proxy that counts compose sources: the
//! emulator does not enforce GCS's limit of 32).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::cluster::{admin, token};
use crate::recording::{play, wait_complete};
use crate::support::{BIN, Proc, free_port, poll_until, run, spawn_turnstile, stderr_of, text};

pub(crate) const BUCKET: &str = "turnstile";
pub(crate) const ACCESS_KEY: &str = "AKIATURNSTILETEST";
pub(crate) const SECRET_KEY: &str = "turnstile-test-secret-key";

/// Where scripts/test.sh installs the test servers.
fn tools() -> PathBuf {
    std::env::var_os("TURNSTILE_TEST_TOOLS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/turnstile-test-tools"))
        })
        .expect("TURNSTILE_TEST_TOOLS or HOME is set")
}

fn tool(relative: &str) -> PathBuf {
    let path = tools().join(relative);
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh, which installs the test servers",
        path.display()
    );
    path
}

/// An S3 server of the tests, stopped on drop.
pub(crate) struct S3Server {
    child: Option<tokio::process::Child>,
    port: u16,
    /// s3s-fs: its data directory (a bucket is a subdirectory).
    root: Option<PathBuf>,
}

/// Starts a test server (`program` under the tools directory), quiet and
/// stopped on drop, and waits until it listens on `port`.
async fn start_server(program: &str, args: &[&str], port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new(tool(program))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    poll_until(Duration::from_secs(30), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await
    .unwrap_or_else(|_| panic!("{program} never listened on {port}"));
    child
}

impl S3Server {
    async fn moto() -> Self {
        let port = free_port();
        let child = start_server(
            "venv/bin/moto_server",
            &["-H", "127.0.0.1", "-p", &port.to_string()],
            port,
        )
        .await;
        // moto checks no signature: a bare PUT makes the bucket.
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(
            format!("PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        Self {
            child: Some(child),
            port,
            root: None,
        }
    }

    /// s3s-fs serving `root` on `port`, its bucket made.
    pub(crate) async fn s3s_fs(root: &Path, port: u16) -> Self {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let mut server = Self {
            child: None,
            port,
            root: Some(root.to_path_buf()),
        };
        server.start().await;
        server
    }

    async fn start(&mut self) {
        let root = self.root.clone().expect("s3s-fs");
        let child = start_server(
            "bin/s3s-fs",
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
                root.to_str().unwrap(),
            ],
            self.port,
        )
        .await;
        self.child = Some(child);
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn uri(&self, prefix: &str) -> String {
        format!(
            "s3://{BUCKET}/{prefix}?region=us-east-1&endpoint={}",
            self.endpoint()
        )
    }

    /// The store as a test reads it, straight through object_store.
    fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .unwrap()
    }
}

/// Credentials for the turnstile processes.
pub(crate) fn aws_env(secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_moto_and_s3s_fs() {
    let root = tempfile::tempdir().unwrap();
    let moto = S3Server::moto().await;
    let s3s = S3Server::s3s_fs(root.path(), free_port()).await;
    for server in [&moto, &s3s] {
        let store = turnstile_recording::storage::ObjectUploadStore::new(
            &server.uri("conformance"),
            Arc::new(server.client()),
            &format!("conformance/{}", uuid::Uuid::new_v4()),
            turnstile_recording::storage::S3_MIN_PART,
        );
        turnstile_recording::storage::UploadStore::check(&store)
            .await
            .unwrap();
        turnstile_recording::storage::conformance::run(&store).await;
    }
}

/// One process (auth, proxy, node) recording to `uri`.
fn one_process_yaml(data: &Path, uri: &str, mode: &str, extra_global: &str) -> String {
    format!(
        "turnstile:\n  data_dir: {}\n  storage:\n    audit_sessions_uri: \"{uri}\"\n{extra_global}auth_service:\n  listen_addr: 127.0.0.1:0\n  cluster_name: test\n  session_recording: {mode}\nproxy_service:\n  listen_addr: 127.0.0.1:0\nssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: web1\n",
        data.display()
    )
}

/// alice, allowed root everywhere; her identity's path.
async fn alice(data: &Path, dir: &Path) -> PathBuf {
    admin(
        data,
        &[
            "users", "add", "alice", "--roles", "access", "--logins", "root",
        ],
    )
    .await;
    let id = dir.join("alice");
    admin(
        data,
        &["sign", "--user", "alice", "--out", id.to_str().unwrap()],
    )
    .await;
    id
}

fn parts_in(rec: &[u8]) -> usize {
    rec.windows(8)
        .filter(|w| *w == turnstile_recording::part::MAGIC)
        .count()
}

/// Runs `command` (which prints `$TURNSTILE_SESSION_ID` first) through
/// Turnstile, waits for its recording to complete, and checks that it is one
/// object of at least `min_parts` parts in `client` that plays back byte for
/// byte. Returns the session's id.
async fn recorded_object_plays_back(
    client: &dyn turnstile_recording::storage::Blobs,
    prefix: &str,
    id: &Path,
    command: &str,
    min_parts: usize,
) -> String {
    let out = run(
        BIN,
        &["ssh", "-i", id.to_str().unwrap(), "web1", "--", command],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sid = text(&out.stdout[..36]);
    wait_complete(id, &sid).await;
    let path = object_store::path::Path::from(format!("{prefix}/{sid}.rec"));
    let size = client.size(&path).await.unwrap();
    let object = client.read(&path, 0..size).await.unwrap();
    assert!(
        parts_in(&object) >= min_parts,
        "{} parts",
        parts_in(&object)
    );
    let played = play(id, &sid, "text").await;
    assert!(
        played == out.stdout,
        "{} bytes played, {} printed",
        played.len(),
        out.stdout.len()
    );
    sid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sync_session_becomes_one_object_of_several_parts_on_moto() {
    let moto = S3Server::moto().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let prefix = format!("sessions/{}", uuid::Uuid::new_v4());
    let config = dir.path().join("turnstile.yaml");
    std::fs::write(
        &config,
        one_process_yaml(&data, &moto.uri(&prefix), "node-sync", ""),
    )
    .unwrap();
    let p = Proc::start_env(&config, &aws_env(SECRET_KEY)).await;
    let id = alice(&data, dir.path()).await;
    recorded_object_plays_back(
        &moto.client(),
        &prefix,
        &id,
        "echo $TURNSTILE_SESSION_ID; head -c 33554432 /dev/urandom",
        3,
    )
    .await;
    // Nothing is left in the staging area once complete.
    use futures::TryStreamExt;
    let staged: Vec<_> = object_store::ObjectStore::list(
        &moto.client(),
        Some(&object_store::path::Path::from(format!("{prefix}/staging"))),
    )
    .try_collect()
    .await
    .unwrap();
    assert!(staged.is_empty(), "{staged:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_or_a_missing_bucket_are_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let s3s = S3Server::s3s_fs(root.path(), free_port()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("turnstile.yaml");
    std::fs::write(&config, one_process_yaml(&data, &s3s.uri("x"), "node", "")).unwrap();
    let Err((_, stderr)) = Proc::try_start_env(&config, &aws_env("not-the-secret")).await else {
        panic!("started with a wrong secret key");
    };
    assert!(
        stderr.contains("turnstile.storage.audit_sessions_uri")
            && stderr.contains(&format!("s3://{BUCKET}/x"))
            && stderr.contains("cannot write"),
        "{stderr}"
    );
    // moto answers for a bucket that is not there as S3 does.
    let moto = S3Server::moto().await;
    let missing = moto
        .uri("x")
        .replace("s3://turnstile/", "s3://no-such-bucket/");
    std::fs::write(&config, one_process_yaml(&data, &missing, "node", "")).unwrap();
    let Err((_, stderr)) = Proc::try_start_env(&config, &aws_env(SECRET_KEY)).await else {
        panic!("started with a missing bucket");
    };
    assert!(
        stderr.contains("s3://no-such-bucket/x") && stderr.contains("NoSuchBucket"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_interrupted_by_an_auth_restart_is_resumed_on_s3s_fs() {
    let root = tempfile::tempdir().unwrap();
    let s3s = S3Server::s3s_fs(root.path(), free_port()).await;
    let dir = tempfile::tempdir().unwrap();
    let auth_data = dir.path().join("auth");
    let prefix = format!("resume/{}", uuid::Uuid::new_v4());
    let auth_yaml = |listen: &str| {
        format!(
            "turnstile:\n  data_dir: {}\n  storage:\n    audit_sessions_uri: \"{}\"\nauth_service:\n  listen_addr: {listen}\n  cluster_name: test\n  session_recording: node-sync\n",
            auth_data.display(),
            s3s.uri(&prefix)
        )
    };
    let auth_config = dir.path().join("auth.yaml");
    std::fs::write(&auth_config, auth_yaml("127.0.0.1:0")).unwrap();
    let auth = Proc::start_env(&auth_config, &aws_env(SECRET_KEY)).await;
    let auth_addr = auth.field("auth");
    let pin = auth.field("CA pin");
    let (t, _) = token(&auth_data, "node,proxy", "10m").await;
    let edge_config = dir.path().join("edge.yaml");
    std::fs::write(
        &edge_config,
        format!(
            "turnstile:\n  data_dir: {}\n  auth_servers: [\"{auth_addr}\"]\n  join_token: {t}\n  ca_pin: {pin}\nproxy_service:\n  listen_addr: 127.0.0.1:0\nssh_service:\n  listen_addr: 127.0.0.1:0\n  node_name: web1\n",
            dir.path().join("edge").display()
        ),
    )
    .unwrap();
    let edge = Proc::start(&edge_config).await;
    admin(
        &auth_data,
        &[
            "users", "add", "alice", "--roles", "access", "--logins", "root",
        ],
    )
    .await;
    let id = dir.path().join("alice");
    admin(
        &auth_data,
        &[
            "sign",
            "--user",
            "alice",
            "--out",
            id.to_str().unwrap(),
            "--proxy",
            &edge.field("proxy"),
        ],
    )
    .await;
    poll_until(Duration::from_secs(20), || async {
        admin(&auth_data, &["nodes", "ls"]).await.contains("web1")
    })
    .await
    .expect("web1 registers");
    // 12 MiB, a pause (auth dies and comes back meanwhile), 8 MiB more.
    let mut session = spawn_turnstile(
        &[
            "ssh",
            "-i",
            id.to_str().unwrap(),
            "web1",
            "--",
            "echo $TURNSTILE_SESSION_ID; head -c 12582912 /dev/urandom | base64; echo pause; read go; head -c 8388608 /dev/urandom | base64",
        ],
        None,
    );
    let mut go = session.stdin.take().unwrap();
    let mut out = BufReader::new(session.stdout.take().unwrap());
    let mut shown = Vec::new();
    let mut line = String::new();
    out.read_line(&mut line).await.unwrap();
    let sid = line.trim().to_string();
    shown.extend_from_slice(line.as_bytes());
    loop {
        let mut l = String::new();
        out.read_line(&mut l).await.unwrap();
        shown.extend_from_slice(l.as_bytes());
        if l == "pause\n" {
            break;
        }
    }
    // Parts are stored before auth goes.
    let parts = || async {
        let out = crate::recording::as_user(&id, &["recordings", "ls", "--format", "json"]).await;
        text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["sid"] == sid.as_str())
            .and_then(|v| v["parts"].as_u64())
            .unwrap_or(0)
    };
    poll_until(Duration::from_secs(30), || async { parts().await >= 2 })
        .await
        .expect("parts are stored while the session runs");
    let before = parts().await;
    auth.kill9().await;
    std::fs::write(&auth_config, auth_yaml(&auth_addr)).unwrap();
    let _auth = Proc::start_env(&auth_config, &aws_env(SECRET_KEY)).await;
    go.write_all(b"go\n").await.unwrap();
    out.read_to_end(&mut shown).await.unwrap();
    let status = session.wait().await.unwrap();
    assert!(status.success(), "{}", stderr_of(&mut session).await);
    // The same upload went on: its stored parts were kept.
    assert!(
        parts().await >= before,
        "parts went from {before} to {}",
        parts().await
    );
    wait_complete(&id, &sid).await;
    let played = play(&id, &sid, "text").await;
    assert!(
        played == shown,
        "{} bytes played, {} shown",
        played.len(),
        shown.len()
    );
    edge.stop().await;
}

/// A one-process cluster recording to s3s-fs in `mode`, with alice.
async fn cluster_on(s3s: &S3Server, mode: &str, dir: &Path) -> (Proc, PathBuf, PathBuf) {
    let data = dir.join("data");
    let config = dir.join("turnstile.yaml");
    std::fs::write(
        &config,
        one_process_yaml(
            &data,
            &s3s.uri(&format!("down/{mode}")),
            mode,
            "  recording:\n    sync_ack_timeout: 3s\n",
        ),
    )
    .unwrap();
    let p = Proc::start_env(&config, &aws_env(SECRET_KEY)).await;
    let id = alice(&data, dir).await;
    (p, data, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_down_mid_session_ends_sync_sessions_and_async_ones_land_later() {
    let root = tempfile::tempdir().unwrap();
    let mut s3s = S3Server::s3s_fs(root.path(), free_port()).await;

    // node-sync: the store goes, the session ends within the bound.
    let dir = tempfile::tempdir().unwrap();
    let (p, _, id) = cluster_on(&s3s, "node-sync", dir.path()).await;
    let mut session = spawn_turnstile(
        &[
            "ssh",
            "-i",
            id.to_str().unwrap(),
            "web1",
            "--",
            "while true; do echo tick; sleep 0.1; done",
        ],
        None,
    );
    let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("tick"));
    s3s.stop().await;
    let stopped = Instant::now();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let status = tokio::time::timeout(Duration::from_secs(40), session.wait())
        .await
        .expect("the node-sync session ends")
        .unwrap();
    let stderr = stderr_of(&mut session).await;
    assert_eq!(status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains("session ended: its recording cannot be written"),
        "{stderr}"
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "{:?}",
        stopped.elapsed()
    );
    // Auth said why once per cause, not once per request.
    let log = p.stderr();
    let complaints = log.matches("the recording store fails").count();
    assert!(
        (1..=3).contains(&complaints),
        "{complaints} complaints:\n{log}"
    );
    s3s.start().await;
    p.stop().await;

    // node: the store goes, the session goes on, the recording lands later.
    let dir = tempfile::tempdir().unwrap();
    let (p, _, id) = cluster_on(&s3s, "node", dir.path()).await;
    let mut session = spawn_turnstile(
        &[
            "ssh",
            "-i",
            id.to_str().unwrap(),
            "web1",
            "--",
            "echo $TURNSTILE_SESSION_ID; for i in $(seq 1 60); do echo line-$i; sleep 0.05; done",
        ],
        None,
    );
    let mut out = BufReader::new(session.stdout.take().unwrap());
    let mut sid = String::new();
    out.read_line(&mut sid).await.unwrap();
    s3s.stop().await;
    let mut rest = String::new();
    out.read_to_string(&mut rest).await.unwrap();
    assert!(
        session.wait().await.unwrap().success(),
        "the node session went on"
    );
    assert!(rest.contains("line-60\n"), "{rest}");
    // Ended, not yet stored: `recordings ls` says so.
    let sid = sid.trim().to_string();
    let state = || async {
        let out = crate::recording::as_user(&id, &["recordings", "ls", "--format", "json"]).await;
        text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["sid"] == sid.as_str())
            .map(|v| v["status"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    poll_until(Duration::from_secs(20), || async {
        state().await == "uploading"
    })
    .await
    .unwrap_or_else(|_| panic!("listed as {:?}, not uploading", "?"));
    s3s.start().await;
    wait_complete(&id, &sid).await;
    let played = text(&play(&id, &sid, "text").await);
    assert_eq!(played, format!("{sid}\n{rest}"));
    p.stop().await;
}

/// Azurite's well-known development account.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Azurite's blob service, its container made; stopped on drop.
struct Azurite {
    _child: tokio::process::Child,
    _location: tempfile::TempDir,
    port: u16,
}

impl Azurite {
    async fn start() -> Self {
        let location = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = start_server(
            "node/node_modules/.bin/azurite-blob",
            &[
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--location",
                location.path().to_str().unwrap(),
                "--skipApiVersionCheck",
                "--silent",
            ],
            port,
        )
        .await;
        let script = format!(
            "const {{BlobServiceClient, StorageSharedKeyCredential}} = require('@azure/storage-blob');\
             const cred = new StorageSharedKeyCredential('{AZURITE_ACCOUNT}', '{AZURITE_KEY}');\
             new BlobServiceClient('http://127.0.0.1:{port}/{AZURITE_ACCOUNT}', cred)\
               .getContainerClient('{BUCKET}').create()\
               .then(() => process.exit(0), e => {{ console.error(e.message); process.exit(1); }});"
        );
        let out = tokio::process::Command::new("node")
            .args(["-e", &script])
            .current_dir(tool("node"))
            .output()
            .await
            .expect("node runs");
        assert!(
            out.status.success(),
            "creating the container: {}",
            text(&out.stderr)
        );
        Self {
            _child: child,
            _location: location,
            port,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    fn uri(&self, prefix: &str) -> String {
        format!(
            "azblob://{BUCKET}/{prefix}?account={AZURITE_ACCOUNT}&endpoint={}",
            self.endpoint()
        )
    }

    fn client(&self) -> object_store::azure::MicrosoftAzure {
        object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(AZURITE_ACCOUNT)
            .with_access_key(AZURITE_KEY)
            .with_container_name(BUCKET)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .build()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_block_blobs_pass_the_conformance_suite_and_record_a_session() {
    let azurite = Azurite::start().await;
    let store = turnstile_recording::storage::ObjectUploadStore::new(
        &azurite.uri("conformance"),
        Arc::new(azurite.client()),
        &format!("conformance/{}", uuid::Uuid::new_v4()),
        turnstile_recording::storage::AZURE_MIN_PART,
    );
    turnstile_recording::storage::UploadStore::check(&store)
        .await
        .unwrap();
    turnstile_recording::storage::conformance::run(&store).await;

    // A wrong key or a container that is not there: refused at start.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("turnstile.yaml");
    std::fs::write(
        &config,
        one_process_yaml(&data, &azurite.uri("x"), "node", ""),
    )
    .unwrap();
    let wrong_key = base64_of(&[7u8; 64]);
    let Err((_, stderr)) =
        Proc::try_start_env(&config, &[("AZURE_STORAGE_ACCOUNT_KEY", wrong_key)]).await
    else {
        panic!("started with a wrong account key");
    };
    assert!(
        stderr.contains("turnstile.storage.audit_sessions_uri")
            && stderr.contains(&format!("azblob://{BUCKET}/x"))
            && stderr.contains("cannot write"),
        "{stderr}"
    );
    let missing = azurite.uri("x").replace(
        &format!("azblob://{BUCKET}/"),
        "azblob://no-such-container/",
    );
    std::fs::write(&config, one_process_yaml(&data, &missing, "node", "")).unwrap();
    let Err((_, stderr)) = Proc::try_start_env(
        &config,
        &[("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.to_string())],
    )
    .await
    else {
        panic!("started with a missing container");
    };
    assert!(
        stderr.contains("azblob://no-such-container/x") && stderr.contains("ContainerNotFound"),
        "{stderr}"
    );

    // A session recorded into block blobs (small blocks: several of them).
    let prefix = format!("sessions/{}", uuid::Uuid::new_v4());
    let uri = format!("{}&min_part=262144", azurite.uri(&prefix));
    std::fs::write(&config, one_process_yaml(&data, &uri, "node-sync", "")).unwrap();
    let p = Proc::start_env(
        &config,
        &[("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.to_string())],
    )
    .await;
    let id = alice(&data, dir.path()).await;
    recorded_object_plays_back(
        &azurite.client(),
        &prefix,
        &id,
        "echo $TURNSTILE_SESSION_ID; head -c 2000000 /dev/urandom | base64",
        3,
    )
    .await;
    p.stop().await;
}

/// A service-account key that tells object_store to send no token (the
/// emulator checks none).
const GCS_NO_OAUTH: &str = r#"{"disable_oauth": true, "client_email": "test@example.invalid", "private_key": "", "private_key_id": ""}"#;

/// gcp-storage-emulator with the bucket made, in memory, seen through a
/// proxy that records how many sources each compose request names.
struct GcsEmulator {
    _child: tokio::process::Child,
    proxy: u16,
    composes: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl GcsEmulator {
    async fn start() -> Self {
        let port = free_port();
        let child = start_server(
            "venv/bin/gcp-storage-emulator",
            &[
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--default-bucket",
                BUCKET,
                "--in-memory",
                "--quiet",
            ],
            port,
        )
        .await;
        let composes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap().port();
        let seen = composes.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward_one_request(client, port, seen.clone()));
            }
        });
        Self {
            _child: child,
            proxy,
            composes,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy)
    }

    fn uri(&self, prefix: &str) -> String {
        format!("gs://{BUCKET}/{prefix}?endpoint={}", self.endpoint())
    }

    fn client(&self) -> Arc<turnstile_recording::storage::GcsJson> {
        let anonymous =
            object_store::StaticCredentialProvider::new(object_store::gcp::GcpCredential {
                bearer: String::new(),
            });
        Arc::new(
            turnstile_recording::storage::GcsJson::new(
                BUCKET,
                Some(&self.endpoint()),
                Arc::new(anonymous),
            )
            .unwrap(),
        )
    }

    fn composes(&self) -> Vec<usize> {
        self.composes.lock().unwrap().clone()
    }
}

/// Passes one HTTP request to the emulator (which closes the connection
/// after each answer) and its answer back; a compose request's number of
/// sources is recorded.
async fn forward_one_request(
    mut client: tokio::net::TcpStream,
    upstream: u16,
    composes: Arc<std::sync::Mutex<Vec<usize>>>,
) {
    let mut request = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let head_end = loop {
        let Ok(n) = client.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while request.len() < head_end + length {
        let Ok(n) = client.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
    }
    if head.lines().next().is_some_and(|l| l.contains("/compose")) {
        let body: serde_json::Value =
            serde_json::from_slice(&request[head_end..head_end + length]).unwrap();
        let sources = body["sourceObjects"].as_array().map_or(0, Vec::len);
        composes.lock().unwrap().push(sources);
    }
    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    if server.write_all(&request).await.is_err() {
        return;
    }
    let _ = tokio::io::copy(&mut server, &mut client).await;
    let _ = client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_composes_parts_in_rounds_of_at_most_32_and_the_recording_plays_back() {
    let gcs = GcsEmulator::start().await;
    let client = gcs.client();
    let prefix = object_store::path::Path::from(format!("conformance/{}", uuid::Uuid::new_v4()));
    let store = turnstile_recording::storage::ObjectUploadStore::with_parts(
        &format!("gs://{BUCKET}/conformance"),
        client.clone(),
        Arc::new(turnstile_recording::storage::ComposedParts::new(
            client.clone(),
            &prefix,
        )),
        prefix.as_ref(),
        turnstile_recording::storage::GCS_MIN_PART,
    );
    turnstile_recording::storage::UploadStore::check(&store)
        .await
        .unwrap();
    turnstile_recording::storage::conformance::run(&store).await;

    // A bucket that is not there: refused at start.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("turnstile.yaml");
    let key = [("GOOGLE_SERVICE_ACCOUNT_KEY", GCS_NO_OAUTH.to_string())];
    let missing = gcs
        .uri("x")
        .replace(&format!("gs://{BUCKET}/"), "gs://no-such-bucket/");
    std::fs::write(&config, one_process_yaml(&data, &missing, "node", "")).unwrap();
    let Err((_, stderr)) = Proc::try_start_env(&config, &key).await else {
        panic!("started with a missing bucket");
    };
    assert!(
        stderr.contains("turnstile.storage.audit_sessions_uri")
            && stderr.contains("gs://no-such-bucket/x")
            && stderr.contains("cannot write"),
        "{stderr}"
    );

    // A session of more than 40 parts (auth's frames are up to ~200 KiB, so
    // parts of 64 KiB hold one or two): composed in rounds.
    let prefix = format!("sessions/{}", uuid::Uuid::new_v4());
    let uri = format!("{}&min_part=65536", gcs.uri(&prefix));
    std::fs::write(&config, one_process_yaml(&data, &uri, "node-sync", "")).unwrap();
    let p = Proc::start_env(&config, &key).await;
    let id = alice(&data, dir.path()).await;
    let before = gcs.composes().len();
    recorded_object_plays_back(
        &*client,
        &prefix,
        &id,
        "echo $TURNSTILE_SESSION_ID; head -c 12582912 /dev/urandom",
        40,
    )
    .await;
    let composes = gcs.composes()[before..].to_vec();
    assert!(composes.len() >= 3, "compose calls: {composes:?}");
    assert!(
        composes
            .iter()
            .all(|n| (1..=turnstile_recording::storage::COMPOSE_MAX_SOURCES).contains(n)),
        "compose calls: {composes:?}"
    );
    // The part objects and the rounds' objects are gone.
    let left = turnstile_recording::storage::Blobs::list(
        &*client,
        &object_store::path::Path::from(format!("{prefix}/parts")),
    )
    .await
    .unwrap();
    assert!(left.is_empty(), "{left:?}");
    p.stop().await;

    // A recording of more parts than one object may hold (GCS composes at
    // most 1,024 components; `max_parts` lowers that here) goes on in
    // continuation objects, each of at most that many parts, played as one.
    let prefix = format!("sessions/{}", uuid::Uuid::new_v4());
    let uri = format!("{}&min_part=65536&max_parts=8", gcs.uri(&prefix));
    std::fs::write(&config, one_process_yaml(&data, &uri, "node-sync", "")).unwrap();
    let p = Proc::start_env(&config, &key).await;
    // Signed again: the identity names the proxy's address, new after a restart.
    admin(
        &data,
        &["sign", "--user", "alice", "--out", id.to_str().unwrap()],
    )
    .await;
    let out = run(
        BIN,
        &[
            "ssh",
            "-i",
            id.to_str().unwrap(),
            "web1",
            "--",
            "echo $TURNSTILE_SESSION_ID; head -c 4194304 /dev/urandom",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sid = text(&out.stdout[..36]);
    wait_complete(&id, &sid).await;
    let mut parts = Vec::new();
    for n in 0.. {
        let name = if n == 0 {
            format!("{prefix}/{sid}.rec")
        } else {
            format!("{prefix}/{sid}.{n}.rec")
        };
        let path = object_store::path::Path::from(name);
        use turnstile_recording::storage::Blobs;
        let Ok(size) = Blobs::size(&*client, &path).await else {
            break;
        };
        parts.push(parts_in(
            &Blobs::read(&*client, &path, 0..size).await.unwrap(),
        ));
    }
    assert!(
        parts.len() >= 2 && parts.iter().all(|n| (1..=8).contains(n)),
        "parts of each object: {parts:?}"
    );
    let played = play(&id, &sid, "text").await;
    assert!(
        played == out.stdout,
        "{} bytes played, {} printed",
        played.len(),
        out.stdout.len()
    );
    p.stop().await;
}

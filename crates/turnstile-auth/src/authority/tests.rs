//! The authority's unit tests.

use super::*;
use crate::audit_log::MemoryAuditLog;
use crate::backend::MemoryBackend;
use crate::ca::generate_ed25519;
use turnstile_api::clock::{ManualClock, SystemClock};

/// An authority on a clock the test moves.
pub(crate) async fn authority_at() -> (Authority, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let a = Authority::open(
        Arc::new(MemoryBackend::new()),
        clock.clone(),
        Arc::new(MemoryAuditLog::default()),
        "main",
    )
    .await
    .unwrap();
    (a, clock)
}

async fn authority() -> Authority {
    Authority::open(
        Arc::new(MemoryBackend::new()),
        Arc::new(SystemClock),
        Arc::new(MemoryAuditLog::default()),
        "main",
    )
    .await
    .unwrap()
}

fn user(name: &str, roles: &[&str], logins: &[&str]) -> UserRecord {
    UserRecord {
        name: name.into(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        logins: logins.iter().map(|s| s.to_string()).collect(),
        password_hash: None,
        created_unix: 0,
    }
}

#[tokio::test]
async fn cas_are_created_once() {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let audit = Arc::new(MemoryAuditLog::default());
    let a = Authority::open(
        backend.clone(),
        Arc::new(SystemClock),
        audit.clone(),
        "main",
    )
    .await
    .unwrap();
    let b = Authority::open(backend, Arc::new(SystemClock), audit, "main")
        .await
        .unwrap();
    assert_eq!(a.user_ca().fingerprint(), b.user_ca().fingerprint());
    assert_eq!(a.tls_ca().pin().unwrap(), b.tls_ca().pin().unwrap());
    assert_ne!(a.user_ca().fingerprint(), a.host_ca().fingerprint());
}

#[tokio::test]
async fn refused_requests_change_nothing() {
    let a = authority().await;
    a.upsert_user(user("alice", &["access"], &["root"]), true)
        .await
        .unwrap();
    let before = a.get_user("alice").await.unwrap();
    let err = a
        .upsert_user(user("alice", &["nope"], &["root"]), false)
        .await
        .unwrap_err();
    assert!(
        err.message.contains("role \"nope\" does not exist"),
        "{err}"
    );
    assert_eq!(a.get_user("alice").await.unwrap(), before);
    let err = a
        .upsert_user(user("alice", &["access"], &[]), true)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::AlreadyExists);
    assert_eq!(a.get_user("alice").await.unwrap(), before);

    let mut bad = Role::new("dev");
    bad.spec.options.max_sessions = Some(-3);
    let err = a.upsert_role(bad, true).await.unwrap_err();
    assert!(err.message.contains("spec.options.max_sessions"), "{err}");
    assert!(a.get_role("dev").await.is_err());
}

#[tokio::test]
async fn roles_in_use_and_builtin_roles_are_kept() {
    let a = authority().await;
    a.upsert_role(Role::new("dev"), true).await.unwrap();
    a.upsert_user(user("bob", &["dev"], &[]), true)
        .await
        .unwrap();
    let err = a.delete_role("dev").await.unwrap_err();
    assert!(err.message.contains("bob"), "{err}");
    assert!(a.delete_role("access").await.is_err());
    assert!(a.upsert_role(Role::builtin_access(), false).await.is_err());
    a.delete_user("bob").await.unwrap();
    a.delete_role("dev").await.unwrap();
}

#[tokio::test]
async fn user_certs_are_capped_by_max_session_ttl() {
    let a = authority().await;
    let mut short = Role::new("short");
    short.spec.allow.logins = Some(vec!["deploy".into()]);
    short.spec.options.max_session_ttl = Some(turnstile_api::duration::WrittenDuration(
        Duration::from_secs(600),
    ));
    a.upsert_role(short, true).await.unwrap();
    a.upsert_user(user("carol", &["access", "short"], &["carol"]), true)
        .await
        .unwrap();
    let key = generate_ed25519();
    let issued = a
        .generate_user_cert("carol", key.public_key(), Duration::from_secs(86400))
        .await
        .unwrap();
    let lifetime = issued.certificate.valid_before() - issued.certificate.valid_after();
    assert!(lifetime <= 600 + 60, "{lifetime}");
    assert_eq!(issued.principals, vec!["carol", "deploy"]);
}

#[tokio::test]
async fn node_names_are_bound_to_host_ids_for_good() {
    let clock = Arc::new(turnstile_api::clock::ManualClock::new(SystemTime::now()));
    let a = Authority::open(
        Arc::new(MemoryBackend::with_clock(clock.clone())),
        clock.clone(),
        Arc::new(MemoryAuditLog::default()),
        "main",
    )
    .await
    .unwrap();
    let node = |id: &str, name: &str, addr: &str| NodeRecord {
        id: id.into(),
        name: name.into(),
        addr: addr.into(),
        labels: Labels::new(),
        expires_unix: 0,
        host_key: String::new(),
    };
    let ttl = Duration::from_secs(60);
    let err = a
        .upsert_node(node("n1", "web1", "127.0.0.1:0"), ttl)
        .await
        .unwrap_err();
    assert!(err.message.contains("real address"), "{err}");
    let key = generate_ed25519().public_key().clone();
    let (cert, name) = a
        .issue_node_host_cert(
            "n1",
            &key,
            "web1",
            "10.0.0.1:3022",
            Some([10, 0, 0, 1].into()),
        )
        .await
        .unwrap();
    assert_eq!(name, "web1");
    assert_eq!(cert.valid_principals(), ["n1", "web1", "10.0.0.1"]);
    a.upsert_node(node("n1", "web1", "10.0.0.1:3022"), ttl)
        .await
        .unwrap();
    assert_eq!(
        a.list_nodes().await.unwrap()[0].host_key,
        key.to_openssh().unwrap()
    );

    // Another host id may not have the name, in any case, nor a
    // certificate for it, nor for the first node's id as a name.
    for asked in ["web1", "WEB1"] {
        let err = a
            .upsert_node(node("n2", asked, "10.0.0.2:3022"), ttl)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::AlreadyExists);
        assert!(err.message.contains("bound to host n1"), "{err}");
        let err = a
            .issue_node_host_cert("n2", &key, asked, "10.0.0.2:3022", None)
            .await
            .unwrap_err();
        assert!(err.message.contains("ignoring case"), "{err}");
    }
    let err = a
        .issue_node_host_cert("n2", &key, "n1", "10.0.0.2:3022", None)
        .await
        .unwrap_err();
    assert!(err.message.contains("host id"), "{err}");
    // An address the node does not call from is not among its names, and a
    // node asking for another name gets the one bound to it.
    let (cert, name) = a
        .issue_node_host_cert(
            "n1",
            &key,
            "proxy.example.com",
            "10.0.0.9:3022",
            Some([10, 0, 0, 1].into()),
        )
        .await
        .unwrap();
    assert_eq!(name, "web1");
    assert_eq!(cert.valid_principals(), ["n1", "web1"]);

    // The registration lapses; the name stays bound.
    clock.advance(Duration::from_secs(61));
    assert!(a.list_nodes().await.unwrap().is_empty());
    let err = a
        .issue_node_host_cert("n2", &key, "web1", "10.0.0.2:3022", None)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::AlreadyExists);

    // Renaming moves the name; removing frees it.
    let renamed = a.rename_node("web1", "web-one").await.unwrap();
    assert_eq!(renamed.host_id, "n1");
    let (_, name) = a
        .issue_node_host_cert("n1", &key, "web1", "10.0.0.1:3022", None)
        .await
        .unwrap();
    assert_eq!(name, "web-one");
    let (_, name) = a
        .issue_node_host_cert("n2", &key, "web1", "10.0.0.2:3022", None)
        .await
        .unwrap();
    assert_eq!(name, "web1");
    let err = a.rename_node("web-one", "WEB1").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::AlreadyExists);
    assert_eq!(a.remove_node("web-one").await.unwrap().host_id, "n1");
    let (_, name) = a
        .issue_node_host_cert("n3", &key, "web-one", "10.0.0.3:3022", None)
        .await
        .unwrap();
    assert_eq!(name, "web-one");
    assert!(a.remove_node("nothing").await.is_err());
}

mod login_tests {
    use super::*;
    use crate::audit_log::{AuditQuery, MemoryAuditLog};
    use crate::backend::MemoryBackend;
    use crate::ca::generate_ed25519;
    use turnstile_api::clock::SystemClock;

    #[tokio::test]
    async fn password_login_issues_certificates_and_audits_failures() {
        let audit = Arc::new(MemoryAuditLog::default());
        let a = Authority::open(
            Arc::new(MemoryBackend::new()),
            Arc::new(SystemClock),
            audit.clone(),
            "main",
        )
        .await
        .unwrap();
        a.upsert_user(
            UserRecord {
                name: "alice".into(),
                roles: vec!["access".into()],
                logins: vec!["root".into()],
                password_hash: None,
                created_unix: 0,
            },
            true,
        )
        .await
        .unwrap();
        let key = generate_ed25519();
        let no_password = a
            .login(
                "alice",
                "whatever1",
                Some(key.public_key()),
                Duration::ZERO,
                "1.2.3.4:5",
            )
            .await;
        assert!(
            no_password.is_err(),
            "a user without a password cannot log in"
        );
        a.set_password("alice", "s3cret-pass").await.unwrap();
        let err = a
            .login(
                "alice",
                "wrong-pass",
                Some(key.public_key()),
                Duration::ZERO,
                "1.2.3.4:5",
            )
            .await
            .unwrap_err();
        assert_eq!(err.message, "wrong user name or password");
        let issued = a
            .login(
                "alice",
                "s3cret-pass",
                Some(key.public_key()),
                Duration::from_secs(600),
                "1.2.3.4:5",
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(issued.principals, vec!["root"]);
        let failures = audit
            .search(&AuditQuery {
                event: Some("user.login".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .events;
        assert_eq!(failures.len(), 3);
        assert_eq!(failures[1]["code"], "T1000W");
        assert_eq!(failures[1]["addr.remote"], "1.2.3.4:5");
        assert_eq!(failures[2]["success"], true);

        // Renewal keeps the expiry of the certificate it renews.
        let key2 = generate_ed25519();
        let renewed = a
            .renew_user_cert(
                &issued.certificate,
                key2.public_key(),
                Duration::from_secs(86400),
            )
            .await
            .unwrap();
        assert!(renewed.certificate.valid_before() <= issued.certificate.valid_before());
    }

    #[tokio::test]
    async fn join_tokens_are_single_use() {
        let a = Authority::open(
            Arc::new(MemoryBackend::new()),
            Arc::new(SystemClock),
            Arc::new(MemoryAuditLog::default()),
            "main",
        )
        .await
        .unwrap();
        let (token, _) = a
            .create_token(&[SystemRole::Node], Duration::from_secs(60))
            .await
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = rcgen::PublicKeyData::subject_public_key_info(&key);
        let joined = a
            .join(&token, &[(SystemRole::Node, der.clone())])
            .await
            .unwrap();
        assert_eq!(joined.identities.len(), 1);
        assert!(uuid::Uuid::parse_str(&joined.host_id).is_ok());
        let err = a
            .join(&token, &[(SystemRole::Node, der)])
            .await
            .unwrap_err();
        assert!(err.message.contains("already used"), "{err}");
    }
}

/// Two authorities on one backend, as two auth servers on one etcd.
async fn two_authorities() -> (Arc<Authority>, Arc<Authority>) {
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let open = || async {
        Arc::new(
            Authority::open(
                backend.clone(),
                Arc::new(SystemClock),
                Arc::new(MemoryAuditLog::default()),
                "main",
            )
            .await
            .unwrap(),
        )
    };
    (open().await, open().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_removed_while_a_user_is_given_it_is_never_left_dangling() {
    let (a, b) = two_authorities().await;
    for round in 0..40 {
        a.upsert_role(Role::new("ops"), false).await.unwrap();
        let user = format!("u{round}");
        let give = {
            let a = a.clone();
            let user = user.clone();
            tokio::spawn(async move {
                a.put_user(&user, vec!["ops".into()], vec!["root".into()], false)
                    .await
            })
        };
        let remove = {
            let b = b.clone();
            tokio::spawn(async move { b.delete_role("ops").await })
        };
        let (gave, removed) = (give.await.unwrap(), remove.await.unwrap());
        let role_exists = b.get_role("ops").await.is_ok();
        let has_it = a
            .get_user(&user)
            .await
            .is_ok_and(|u| u.roles.iter().any(|r| r == "ops"));
        assert!(
            role_exists || !has_it,
            "round {round}: user {user} holds removed role ops (give: {gave:?}, remove: {removed:?})"
        );
        if has_it {
            assert!(removed.is_err() && gave.is_ok(), "round {round}");
        }
        // Whoever lost said so.
        assert!(
            gave.is_ok() || removed.is_ok() || role_exists,
            "round {round}"
        );
        // Next round starts with the user holding nothing of ops.
        if has_it {
            a.put_user(&user, vec!["access".into()], vec!["root".into()], false)
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_set_through_one_server_survives_a_user_update_through_the_other() {
    let (a, b) = two_authorities().await;
    a.upsert_role(Role::new("ops"), false).await.unwrap();
    for round in 0..10 {
        let user = format!("p{round}");
        a.put_user(&user, vec!["access".into()], vec!["root".into()], true)
            .await
            .unwrap();
        let password = {
            let a = a.clone();
            let user = user.clone();
            tokio::spawn(async move { a.set_password(&user, "correct-horse-42").await })
        };
        let roles = {
            let b = b.clone();
            let user = user.clone();
            tokio::spawn(async move {
                b.put_user(&user, vec!["ops".into()], vec!["root".into()], false)
                    .await
            })
        };
        password.await.unwrap().unwrap();
        roles.await.unwrap().unwrap();
        let stored = a.get_user(&user).await.unwrap();
        assert_eq!(stored.roles, vec!["ops".to_string()], "round {round}");
        assert!(
            a.login(
                &user,
                "correct-horse-42",
                None,
                Duration::from_secs(60),
                "test"
            )
            .await
            .is_ok(),
            "round {round}: the password was lost to the concurrent role change"
        );
    }
}

mod web_session_tests {
    use super::*;

    #[tokio::test]
    async fn web_sessions_end_when_idle_at_the_ttl_and_with_their_user() {
        let (a, clock) = authority_at().await;
        let mut short = Role::new("short");
        short.spec.allow.logins = Some(vec!["deploy".into()]);
        short.spec.options.max_session_ttl = Some(turnstile_api::duration::WrittenDuration(
            Duration::from_secs(600),
        ));
        a.upsert_role(short, true).await.unwrap();
        a.upsert_user(user("carol", &["short"], &["carol"]), true)
            .await
            .unwrap();
        a.set_password("carol", "correct horse battery")
            .await
            .unwrap();
        let idle = Duration::from_secs(120);
        let err = a
            .create_web_session("carol", "wrong password", "10.0.0.1:1", idle)
            .await
            .unwrap_err();
        assert_eq!(err.message, "wrong user name or password");

        // Activity keeps a session; two minutes without ends it.
        let (token, s) = a
            .create_web_session("carol", "correct horse battery", "10.0.0.1:1", idle)
            .await
            .unwrap();
        assert_eq!(s.record.expires_unix - s.record.created_unix, 600);
        clock.advance(Duration::from_secs(100));
        a.web_session(&token).await.unwrap();
        clock.advance(Duration::from_secs(100));
        a.web_session(&token).await.unwrap();
        clock.advance(Duration::from_secs(121));
        let err = a.web_session(&token).await.unwrap_err();
        assert!(err.message.contains("without activity"), "{err}");
        assert!(a.web_session(&token).await.is_err(), "it stays ended");

        // However active, a session ends at max_session_ttl; its terminal
        // certificates end with it.
        let (token, _) = a
            .create_web_session("carol", "correct horse battery", "10.0.0.1:1", idle)
            .await
            .unwrap();
        for _ in 0..5 {
            clock.advance(Duration::from_secs(100));
            a.web_session(&token).await.unwrap();
        }
        let key = generate_ed25519();
        let cert = a
            .web_session_cert(&token, key.public_key(), "203.0.113.5:4444")
            .await
            .unwrap();
        assert_eq!(
            cert.certificate.extensions()[turnstile_api::identity::EXT_WEB_CLIENT],
            "203.0.113.5:4444"
        );
        let left = cert.certificate.valid_before() as i64 - a.now_unix();
        assert!((1..=100).contains(&left), "{left}");
        clock.advance(Duration::from_secs(101));
        let err = a.web_session(&token).await.unwrap_err();
        assert!(err.message.contains("max_session_ttl"), "{err}");

        // A token that was never issued, and one whose user is gone.
        assert!(a.web_session("not-a-token").await.is_err());
        let (token, _) = a
            .create_web_session("carol", "correct horse battery", "10.0.0.1:1", idle)
            .await
            .unwrap();
        a.delete_user("carol").await.unwrap();
        // Made again under the name, the user does not inherit the session.
        a.upsert_user(user("carol", &["short"], &["carol"]), true)
            .await
            .unwrap();
        let err = a.web_session(&token).await.unwrap_err();
        assert!(err.message.contains("your user was removed"), "{err}");
        assert!(a.web_session(&token).await.is_err());
    }
}

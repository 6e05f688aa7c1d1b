//! The one test suite every backend passes. Each backend's tests call [`run`]
//! with a factory that builds a fresh, empty backend on the given clock.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use turnstile_api::clock::{Clock, ManualClock};

use super::{Backend, BackendError};

/// Runs every check against fresh backends from `make`.
pub async fn run<F, Fut>(make: F)
where
    F: Fn(Arc<ManualClock>) -> Fut,
    Fut: Future<Output = Arc<dyn Backend>>,
{
    let fresh = || async {
        let clock = Arc::new(ManualClock::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        ));
        let backend = make(clock.clone()).await;
        (backend, clock)
    };
    let (b, _) = fresh().await;
    get_put_delete(b.as_ref()).await;
    let (b, _) = fresh().await;
    create_is_exclusive(b.as_ref()).await;
    let (b, _) = fresh().await;
    compare_and_swap_checks_revision(b.as_ref()).await;
    let (b, _) = fresh().await;
    range_is_prefix_and_ordered(b.as_ref()).await;
    let (b, clock) = fresh().await;
    expiry_hides_items(b.as_ref(), &clock).await;
    let (b, _) = fresh().await;
    racing_swaps_are_exact(b).await;
    let (b, _) = fresh().await;
    watches_see_writes_and_deletes_under_their_prefix(b.as_ref()).await;
}

async fn watches_see_writes_and_deletes_under_their_prefix(b: &dyn Backend) {
    let mut watch = b.watch("roles/").await.unwrap();
    b.put("roles/a", b"1".to_vec(), None).await.unwrap();
    b.put("users/a", b"1".to_vec(), None).await.unwrap();
    let rev = b.create("roles/b", b"1".to_vec(), None).await.unwrap();
    b.compare_and_swap("roles/b", rev, b"2".to_vec(), None)
        .await
        .unwrap();
    assert!(b.create("roles/b", vec![], None).await.is_err());
    b.delete("roles/a").await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let change = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a change arrives")
            .expect("the watch goes on");
        seen.push((change.key, change.deleted));
    }
    assert_eq!(
        seen,
        [
            ("roles/a".to_string(), false),
            ("roles/b".to_string(), false),
            ("roles/b".to_string(), false),
            ("roles/a".to_string(), true),
        ],
        "writes and deletes in order; nothing of other prefixes or refused writes"
    );
}

async fn get_put_delete(b: &dyn Backend) {
    assert!(matches!(b.get("a").await, Err(BackendError::NotFound(_))));
    let r1 = b.put("a", b"1".to_vec(), None).await.unwrap();
    let item = b.get("a").await.unwrap();
    assert_eq!(
        (item.key.as_str(), item.value.as_slice(), item.revision),
        ("a", &b"1"[..], r1)
    );
    let r2 = b.put("a", b"2".to_vec(), None).await.unwrap();
    assert!(r2 > r1, "revisions rise on every write");
    b.delete("a").await.unwrap();
    assert!(matches!(b.get("a").await, Err(BackendError::NotFound(_))));
    assert!(matches!(
        b.delete("a").await,
        Err(BackendError::NotFound(_))
    ));
    let r3 = b.put("a", b"3".to_vec(), None).await.unwrap();
    assert!(r3 > r2, "a recreated key never reuses an old revision");
}

async fn create_is_exclusive(b: &dyn Backend) {
    b.create("t", b"x".to_vec(), None).await.unwrap();
    assert!(matches!(
        b.create("t", b"y".to_vec(), None).await,
        Err(BackendError::AlreadyExists(_))
    ));
    assert_eq!(
        b.get("t").await.unwrap().value,
        b"x",
        "a refused create changes nothing"
    );
}

async fn compare_and_swap_checks_revision(b: &dyn Backend) {
    assert!(matches!(
        b.compare_and_swap("s", 1, vec![], None).await,
        Err(BackendError::NotFound(_))
    ));
    let r1 = b.put("s", b"1".to_vec(), None).await.unwrap();
    let r2 = b
        .compare_and_swap("s", r1, b"2".to_vec(), None)
        .await
        .unwrap();
    assert!(matches!(
        b.compare_and_swap("s", r1, b"stale".to_vec(), None).await,
        Err(BackendError::CompareFailed(_))
    ));
    assert_eq!(b.get("s").await.unwrap().value, b"2");
    assert!(matches!(
        b.compare_and_delete("s", r1).await,
        Err(BackendError::CompareFailed(_))
    ));
    b.compare_and_delete("s", r2).await.unwrap();
    assert!(matches!(b.get("s").await, Err(BackendError::NotFound(_))));
}

async fn range_is_prefix_and_ordered(b: &dyn Backend) {
    for key in ["roles/b", "roles/a", "rolesx", "users/a", "roles/c/d"] {
        b.put(key, key.as_bytes().to_vec(), None).await.unwrap();
    }
    let keys: Vec<String> = b
        .range("roles/")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(keys, vec!["roles/a", "roles/b", "roles/c/d"]);
    assert!(b.range("nothing/").await.unwrap().is_empty());
}

async fn expiry_hides_items(b: &dyn Backend, clock: &ManualClock) {
    let soon = clock.now() + Duration::from_secs(10);
    let rev = b.put("e", b"x".to_vec(), Some(soon)).await.unwrap();
    b.put("e2", b"y".to_vec(), None).await.unwrap();
    assert_eq!(b.get("e").await.unwrap().expires, Some(soon));
    clock.advance(Duration::from_secs(11));
    assert!(matches!(b.get("e").await, Err(BackendError::NotFound(_))));
    assert_eq!(b.range("e").await.unwrap().len(), 1);
    assert!(matches!(
        b.compare_and_swap("e", rev, vec![], None).await,
        Err(BackendError::NotFound(_))
    ));
    b.create("e", b"again".to_vec(), None)
        .await
        .expect("an expired key can be created anew");
}

async fn racing_swaps_are_exact(b: Arc<dyn Backend>) {
    b.put("counter", b"0".to_vec(), None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let item = b.get("counter").await.unwrap();
                let n: u64 = std::str::from_utf8(&item.value).unwrap().parse().unwrap();
                match b
                    .compare_and_swap(
                        "counter",
                        item.revision,
                        (n + 1).to_string().into_bytes(),
                        None,
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(BackendError::CompareFailed(_)) => tokio::task::yield_now().await,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(b.get("counter").await.unwrap().value, b"16");
}

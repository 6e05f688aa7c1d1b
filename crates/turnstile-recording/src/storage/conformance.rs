//! The one test suite every `UploadStore` passes.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::{StorageError, UploadStore};
use crate::event::RecordingEvent;
use crate::part::{encode_part, encode_record};
use crate::reader::read_events;

fn part(first: u64, count: u64, pad_to: usize) -> Vec<u8> {
    let mut records = Vec::new();
    for ei in first..first + count {
        encode_record(
            &RecordingEvent {
                ei,
                event: "print".into(),
                data: format!("event {ei}\n").into_bytes(),
                ..Default::default()
            },
            &mut records,
        );
    }
    encode_part(&records, pad_to).unwrap()
}

/// All objects of a session, read one after another.
async fn whole(store: &dyn UploadStore, sid: &str, objects: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for n in 0..objects {
        out.extend(store.read(sid, n, 0, usize::MAX).await.unwrap());
    }
    out
}

pub async fn run(store: &dyn UploadStore) {
    let sid = uuid::Uuid::new_v4().to_string();
    assert!(matches!(
        store.size(&sid, 0).await,
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        store.create_upload("../etc", 0).await,
        Err(StorageError::BadParameter(_))
    ));

    // Parts arrive out of order and one is rewritten; completion joins in order.
    let upload = store.create_upload(&sid, 0).await.unwrap();
    let min = store.min_part_size();
    let p3 = store.upload_part(&upload, 3, part(20, 5, 0)).await.unwrap();
    store
        .upload_part(&upload, 1, part(0, 3, min))
        .await
        .unwrap();
    let p1 = store
        .upload_part(&upload, 1, part(0, 10, min))
        .await
        .unwrap();
    let p2 = store
        .upload_part(&upload, 2, part(10, 10, min))
        .await
        .unwrap();

    // Staged chunks are listed in event order and read back; deleting one
    // twice is fine.
    let c2 = store.stage(&upload, 25, 26, part(25, 2, 0)).await.unwrap();
    let c1 = store.stage(&upload, 20, 24, part(20, 5, 0)).await.unwrap();
    let staged = store.list_staged(&upload).await.unwrap();
    assert_eq!(staged, vec![c1.clone(), c2.clone()]);
    assert_eq!(
        store.read_staged(&upload, &c2).await.unwrap(),
        part(25, 2, 0)
    );
    store
        .delete_staged(&upload, std::slice::from_ref(&c1))
        .await
        .unwrap();
    store.delete_staged(&upload, &[c1]).await.unwrap();
    assert_eq!(store.list_staged(&upload).await.unwrap(), vec![c2]);

    let size = store
        .complete(&upload, &[p3.clone(), p1.clone(), p2.clone()])
        .await
        .unwrap();
    assert_eq!(store.size(&sid, 0).await.unwrap(), size);
    // A retry of a completion that went through says the same.
    assert_eq!(store.complete(&upload, &[p1, p2, p3]).await.unwrap(), size);
    assert!(store.list_staged(&upload).await.unwrap().is_empty());
    let bytes = store.read(&sid, 0, 0, usize::MAX).await.unwrap();
    assert_eq!(bytes.len() as u64, size);
    let events = read_events(&bytes).unwrap();
    assert_eq!(events.len(), 25);
    assert_eq!(
        store.read(&sid, 0, 2, 3).await.unwrap(),
        bytes[2..5].to_vec()
    );

    // A continuation is an object of its own; overlapping events are read once.
    let more = store.create_upload(&sid, 1).await.unwrap();
    let p = store.upload_part(&more, 1, part(23, 5, 0)).await.unwrap();
    store.complete(&more, &[p]).await.unwrap();
    assert_eq!(
        store.size(&sid, 0).await.unwrap(),
        size,
        "never appended to"
    );
    let events = read_events(&whole(store, &sid, 2).await).unwrap();
    assert_eq!(
        events.iter().map(|e| e.ei).collect::<Vec<_>>(),
        (0..28).collect::<Vec<_>>()
    );
    assert_ne!(store.url(&sid, 0), store.url(&sid, 1));

    // Aborted uploads vanish with their parts and chunks.
    let other = uuid::Uuid::new_v4().to_string();
    let dropped = store.create_upload(&other, 0).await.unwrap();
    store.upload_part(&dropped, 1, part(0, 1, 0)).await.unwrap();
    store.stage(&dropped, 1, 1, part(1, 1, 0)).await.unwrap();
    store.abort(&dropped).await.unwrap();
    assert!(store.list_staged(&dropped).await.unwrap().is_empty());
    assert!(matches!(
        store.size(&other, 0).await,
        Err(StorageError::NotFound(_))
    ));
}

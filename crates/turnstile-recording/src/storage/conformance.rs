//! The one test suite every `UploadStore` passes.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::{StorageError, UploadStore};
use crate::event::RecordingEvent;
use crate::part::PartWriter;
use crate::reader::read_events;

fn part(first: u64, count: u64, min: usize) -> Vec<u8> {
    let mut w = PartWriter::new(min);
    for ei in first..first + count {
        w.push(&RecordingEvent {
            ei,
            event: "print".into(),
            data: format!("event {ei}\n").into_bytes(),
            ..Default::default()
        })
        .unwrap();
    }
    w.take_last().unwrap().unwrap().bytes
}

pub async fn run(store: &dyn UploadStore) {
    let sid = uuid::Uuid::new_v4().to_string();
    assert!(matches!(
        store.size(&sid).await,
        Err(StorageError::NotFound(_))
    ));
    assert!(matches!(
        store.create_upload("../etc").await,
        Err(StorageError::BadParameter(_))
    ));

    // Parts arrive out of order and one is rewritten; completion joins in order.
    let upload = store.create_upload(&sid).await.unwrap();
    assert_eq!(store.list_uploads().await.unwrap(), vec![upload.clone()]);
    let p3 = store.upload_part(&upload, 3, part(20, 5, 0)).await.unwrap();
    store.upload_part(&upload, 1, part(0, 3, 0)).await.unwrap();
    let p1 = store.upload_part(&upload, 1, part(0, 10, 0)).await.unwrap();
    let p2 = store
        .upload_part(&upload, 2, part(10, 10, 0))
        .await
        .unwrap();
    let listed = store.list_parts(&upload).await.unwrap();
    assert_eq!(
        listed.iter().map(|p| p.number).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let size = store.complete(&upload, &[p3, p1, p2]).await.unwrap();
    assert_eq!(store.size(&sid).await.unwrap(), size);
    assert!(store.list_uploads().await.unwrap().is_empty());
    let bytes = store.read(&sid, 0, usize::MAX).await.unwrap();
    let events = read_events(&bytes).unwrap();
    assert_eq!(events.len(), 25);
    assert_eq!(store.read(&sid, 2, 3).await.unwrap(), bytes[2..5].to_vec());

    // A continuation appends; overlapping events are read once.
    let more = store.create_upload(&sid).await.unwrap();
    let p = store.upload_part(&more, 1, part(23, 5, 0)).await.unwrap();
    store.complete(&more, &[p]).await.unwrap();
    let events = read_events(&store.read(&sid, 0, usize::MAX).await.unwrap()).unwrap();
    assert_eq!(
        events.iter().map(|e| e.ei).collect::<Vec<_>>(),
        (0..28).collect::<Vec<_>>()
    );

    // Aborted uploads vanish.
    let other = uuid::Uuid::new_v4().to_string();
    let dropped = store.create_upload(&other).await.unwrap();
    store.upload_part(&dropped, 1, part(0, 1, 0)).await.unwrap();
    store.abort(&dropped).await.unwrap();
    assert!(store.list_uploads().await.unwrap().is_empty());
    assert!(matches!(
        store.size(&other).await,
        Err(StorageError::NotFound(_))
    ));
}

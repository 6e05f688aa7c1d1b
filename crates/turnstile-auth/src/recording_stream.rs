//! Receives one recorder's `RecordSession` stream: open or resume, frames of
//! events, complete. Every frame is checked (its events belong to this
//! session and this recorder, in order) but not compressed again: frames are
//! joined into parts as they came. An event is acknowledged only once it is
//! durable in the recording store, and within about a second: frames that do
//! not yet fill a part are staged as a chunk object of their own (at most
//! every [`STAGE_AFTER`]), and deleted once a part holds them. While the
//! store refuses writes, nothing more is acknowledged.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use turnstile_api::error::ApiError;
use turnstile_api::rpc::proto;
use turnstile_recording::part::{
    Frame, HEADER_LEN, MAX_FRAME_RAW, encode_record, part_from_payload,
};
use turnstile_recording::storage::{StagedChunk, Upload};

use crate::authority::Authority;
use crate::recordings::{Opening, Recordings, upload_event};

/// Events wait at most this long before they are staged and acknowledged.
pub const STAGE_AFTER: Duration = Duration::from_millis(500);

/// Frames not yet in a stored part.
#[derive(Debug)]
struct Piece {
    /// zstd frames of the records of `first_ei..=last_ei`.
    zstd: Vec<u8>,
    last_ei: u64,
    /// The chunk that holds it durably, once staged.
    staged: Option<StagedChunk>,
}

/// One stream's state on auth.
#[derive(Debug)]
struct Receiver {
    sid: String,
    server_id: String,
    upload: Upload,
    min_part: usize,
    pieces: Vec<Piece>,
    bytes: usize,
    /// The highest event index taken.
    taken: i64,
    /// The highest event index durable (in a part or a staged chunk).
    durable: i64,
    /// Since when pieces have waited unstaged.
    unstaged_since: Option<Instant>,
    stop_ms: Option<i64>,
}

fn fail(e: ApiError) -> Status {
    e.into()
}

impl Receiver {
    /// Opens or resumes the session's upload: what an earlier stream staged
    /// is durable, and goes into the next part.
    async fn open(
        recordings: &Recordings,
        server_id: &str,
        opening: &Opening,
    ) -> Result<Self, Status> {
        // The stream of a recorder that died may still be storing a part
        // (the index moves on, then its staged chunks go): read the index
        // again after the chunks, and start over if it moved, or the events
        // that part holds would look lost.
        let mut attempts = 0;
        let (record, upload, staged) = loop {
            let record = recordings.open(server_id, opening).await.map_err(fail)?;
            let upload = record.upload.clone().ok_or_else(|| {
                Status::unavailable("the upload was completed meanwhile; try again")
            })?;
            let staged = recordings
                .staged_after(&upload, record.last_ei)
                .await
                .map_err(fail)?;
            let now = recordings.get(&opening.sid).await.map_err(fail)?;
            if now
                .as_ref()
                .is_some_and(|r| r.last_ei == record.last_ei && r.uploads_to(&upload))
            {
                break (record, upload, staged);
            }
            attempts += 1;
            if attempts >= 20 {
                return Err(Status::unavailable(format!(
                    "the recording of {} keeps changing under another stream; try again",
                    opening.sid
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut rx = Receiver {
            sid: opening.sid.clone(),
            server_id: server_id.to_string(),
            upload,
            min_part: recordings.store().min_part_size(),
            pieces: Vec::new(),
            bytes: 0,
            taken: record.last_ei,
            durable: record.last_ei,
            unstaged_since: None,
            stop_ms: None,
        };
        for (chunk, payload) in staged {
            rx.bytes += payload.len();
            rx.taken = chunk.last_ei as i64;
            rx.durable = rx.taken;
            rx.pieces.push(Piece {
                zstd: payload,
                last_ei: chunk.last_ei,
                staged: Some(chunk),
            });
        }
        Ok(rx)
    }

    /// Takes a frame after checking it; frames or events already taken are
    /// dropped (resends after a resume are normal).
    fn take(&mut self, frame: Frame) -> Result<(), Status> {
        if frame.first_ei > frame.last_ei || frame.raw_len > MAX_FRAME_RAW as u64 {
            return Err(Status::invalid_argument(format!(
                "frame of events {}..={} with {} bytes is malformed (at most {MAX_FRAME_RAW} bytes)",
                frame.first_ei, frame.last_ei, frame.raw_len
            )));
        }
        if (frame.last_ei as i64) <= self.taken {
            return Ok(());
        }
        if frame.first_ei as i64 > self.taken + 1 {
            // Something between was lost on the way: the recorder resumes.
            return Err(Status::failed_precondition(format!(
                "events {}..{} of session {} are missing; resume from {}",
                self.taken + 1,
                frame.first_ei,
                self.sid,
                self.durable
            )));
        }
        let summary = frame
            .summarize(MAX_FRAME_RAW, &self.sid, &self.server_id)
            .map_err(|e| Status::invalid_argument(format!("session {}: {e}", self.sid)))?;
        if summary.count != frame.last_ei - frame.first_ei + 1
            || summary.first_ei != Some(frame.first_ei)
            || !summary.consecutive
        {
            return Err(Status::invalid_argument(format!(
                "frame of events {}..={} does not hold exactly those events",
                frame.first_ei, frame.last_ei
            )));
        }
        if !summary.owned {
            return Err(Status::permission_denied(
                "failed to validate event metadata: the event is for another session or server",
            ));
        }
        if let Some(stop) = summary.stop_ms {
            self.stop_ms = Some(stop);
        }
        let zstd = if (frame.first_ei as i64) > self.taken {
            frame.zstd
        } else {
            // Partly taken before (a resend cut differently): keep the new events.
            let events = frame
                .events(MAX_FRAME_RAW)
                .map_err(|e| Status::invalid_argument(format!("session {}: {e}", self.sid)))?;
            let mut records = Vec::new();
            for e in events.iter().filter(|e| e.ei as i64 > self.taken) {
                encode_record(e, &mut records);
            }
            turnstile_recording::part::compress(&records)
                .map_err(|e| Status::internal(format!("compress: {e}")))?
        };
        self.bytes += zstd.len();
        self.pieces.push(Piece {
            zstd,
            last_ei: frame.last_ei,
            staged: None,
        });
        self.taken = frame.last_ei as i64;
        self.unstaged_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn full(&self) -> bool {
        self.bytes + HEADER_LEN >= self.min_part
    }

    /// Stores what is held as one part (padded unless it is the last), and
    /// lets its staged chunks go.
    async fn store_part(&mut self, recordings: &Recordings, last: bool) -> Result<(), Status> {
        let Some(last_ei) = self.pieces.last().map(|p| p.last_ei) else {
            return Ok(());
        };
        let pad_to = if last { 0 } else { self.min_part };
        let bytes = part_from_payload(self.pieces.iter().map(|p| p.zstd.as_slice()), pad_to);
        // The upload changes when its object was full; the staged chunks are
        // the earlier upload's.
        let staged_in = self.upload.clone();
        recordings
            .store_part(&self.sid, &mut self.upload, bytes, last_ei)
            .await
            .map_err(fail)?;
        let staged: Vec<StagedChunk> = self.pieces.drain(..).filter_map(|p| p.staged).collect();
        self.bytes = 0;
        self.unstaged_since = None;
        self.durable = self.durable.max(last_ei as i64);
        if !staged.is_empty()
            && let Err(e) = recordings.store().delete_staged(&staged_in, &staged).await
        {
            // Left over, they only repeat events a part holds.
            tracing::warn!(sid = %self.sid, error = %e, "cannot delete staged chunks");
        }
        Ok(())
    }

    /// Stages the pieces not yet durable as one chunk.
    async fn stage(&mut self, recordings: &Recordings) -> Result<(), Status> {
        let start = self.pieces.iter().position(|p| p.staged.is_none());
        let Some(start) = start else {
            self.unstaged_since = None;
            return Ok(());
        };
        let first_ei = u64::try_from(self.durable + 1).unwrap_or(0);
        let last_ei = self.pieces[self.pieces.len() - 1].last_ei;
        let zstd: Vec<u8> = self.pieces[start..]
            .iter()
            .flat_map(|p| p.zstd.iter().copied())
            .collect();
        let bytes = part_from_payload([zstd.as_slice()], 0);
        let chunk = recordings
            .observe(
                recordings
                    .store()
                    .stage(&self.upload, first_ei, last_ei, bytes)
                    .await,
            )
            .map_err(fail)?;
        turnstile_api::metrics::METRICS.chunks_staged.inc();
        self.pieces.truncate(start);
        self.pieces.push(Piece {
            zstd,
            last_ei,
            staged: Some(chunk),
        });
        self.durable = last_ei as i64;
        self.unstaged_since = None;
        Ok(())
    }
}

/// Serves one recorder's stream until it completes or goes away.
pub async fn serve(
    recordings: &Arc<Recordings>,
    authority: &Authority,
    server_id: &str,
    inbound: &mut tonic::Streaming<proto::RecordRequest>,
    tx: &mpsc::Sender<Result<proto::RecordStatus, Status>>,
    shutdown: &CancellationToken,
) -> Result<(), Status> {
    use proto::record_request::Request;
    let opening = match inbound.message().await?.and_then(|m| m.request) {
        Some(Request::Open(o)) => o,
        _ => {
            return Err(Status::invalid_argument(
                "a recording stream starts with open",
            ));
        }
    };
    let sid = opening.sid.clone();
    // Before the upload is opened: the completer must not take it meanwhile.
    let _streaming = recordings.streaming(&sid);
    let mut rx = Receiver::open(recordings, server_id, &opening).await?;
    tracing::info!(%sid, recorder = %server_id, from_ei = rx.durable + 1, "recording stream opened");
    let send = |last_ei: i64, complete: bool| async move {
        tx.send(Ok(proto::RecordStatus { last_ei, complete }))
            .await
            .map_err(|_| Status::cancelled("the recorder went away"))
    };
    send(rx.durable, false).await?;
    let mut acked = rx.durable;
    let mut touched = Instant::now();
    let mut touching: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let stage_at = rx.unstaged_since.map(|t| t + STAGE_AFTER);
        let msg = tokio::select! {
            m = inbound.message() => Some(m?),
            _ = sleep_until(stage_at) => None,
            _ = shutdown.cancelled() => {
                // What was received is made durable; the recorder resumes
                // with another auth server, or with this one after its restart.
                rx.stage(recordings).await?;
                if rx.durable > acked {
                    send(rx.durable, false).await?;
                }
                return Err(Status::unavailable("the auth server is shutting down"));
            }
        };
        match msg {
            None => rx.stage(recordings).await?,
            Some(None) => break,
            Some(Some(m)) => match m.request {
                Some(Request::Frames(batch)) => {
                    for f in batch.frames {
                        rx.take(Frame::from_proto(f))?;
                        if rx.full() {
                            rx.store_part(recordings, false).await?;
                            touched = Instant::now();
                        }
                    }
                    // Short of room, the recorder asks for its events to be stored now.
                    if batch.flush || stage_at.is_some_and(|at| Instant::now() >= at) {
                        rx.stage(recordings).await?;
                    }
                }
                Some(Request::Complete(_)) => {
                    rx.store_part(recordings, true).await?;
                    let done = recordings.complete(&sid, rx.stop_ms).await.map_err(fail)?;
                    authority.record(upload_event(&done)).await;
                    send(done.last_ei.max(rx.durable), true).await?;
                    return Ok(());
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "unexpected message in a recording stream",
                    ));
                }
            },
        }
        if rx.durable > acked {
            acked = rx.durable;
            send(acked, false).await?;
        }
        if touched.elapsed() > recordings.touch_every()
            && touching.as_ref().is_none_or(|t| t.is_finished())
        {
            // Off the loop: a slow index must not stop the stream being read
            // (what it leaves unread holds the connection's window for all).
            let (recordings, sid) = (recordings.clone(), sid.clone());
            touching = Some(tokio::spawn(async move {
                if let Err(e) = recordings.touch(&sid).await {
                    tracing::warn!(%sid, error = %e, "cannot note the recorder alive in the index");
                }
            }));
            touched = Instant::now();
        }
    }
    // The recorder left without completing: what is durable stays (staged
    // or in parts); what was not acknowledged it will resend.
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use turnstile_api::clock::SystemClock;
    use turnstile_api::rpc::proto::RecordingEvent;
    use turnstile_recording::reader::read_events;
    use turnstile_recording::storage::{MemoryStore, UploadStore};

    use super::*;
    use crate::backend::MemoryBackend;

    const SID: &str = "0d9a4c2e-7b1f-4e3a-9c5d-2f8e6a1b3c4d";

    fn frame(first: u64, last: u64) -> Frame {
        let mut records = Vec::new();
        for ei in first..=last {
            encode_record(
                &RecordingEvent {
                    ei,
                    event: "print".into(),
                    sid: SID.into(),
                    server_id: "node-1".into(),
                    data: format!("line {ei}\n").into_bytes(),
                    ..Default::default()
                },
                &mut records,
            );
        }
        Frame::compress(first, last, &records).unwrap()
    }

    fn recordings_on(store: &Arc<MemoryStore>) -> Recordings {
        Recordings::new(
            Arc::new(MemoryBackend::new()),
            store.clone(),
            Arc::new(SystemClock),
        )
    }

    async fn receiver(recordings: &Recordings) -> Receiver {
        let opening = Opening {
            sid: SID.into(),
            user: "alice".into(),
            login: "root".into(),
            node_name: "web1".into(),
            start_ms: 0,
        };
        Receiver::open(recordings, "node-1", &opening)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn staged_events_are_durable_resumed_and_completed_without_loss_or_repeats() {
        let store = Arc::new(MemoryStore::new(1 << 20));
        let recordings = recordings_on(&store);
        let mut rx = receiver(&recordings).await;
        rx.take(frame(0, 9)).unwrap();
        assert_eq!(rx.durable, -1, "taken is not durable");
        rx.stage(&recordings).await.unwrap();
        assert_eq!(rx.durable, 9);
        // A resend after a reconnect and a frame that overlaps are dropped or cut.
        rx.take(frame(0, 9)).unwrap();
        rx.take(frame(5, 14)).unwrap();
        rx.stage(&recordings).await.unwrap();
        assert_eq!(rx.durable, 14);
        // A gap is refused: something was lost on the way.
        assert_eq!(
            rx.take(frame(20, 21)).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        // A frame of another session is refused.
        let mut foreign = frame(15, 15);
        let mut records = Vec::new();
        encode_record(
            &RecordingEvent {
                ei: 15,
                sid: "11111111-2222-4333-8444-555555555555".into(),
                server_id: "node-1".into(),
                ..Default::default()
            },
            &mut records,
        );
        foreign.zstd = turnstile_recording::part::compress(&records).unwrap();
        assert_eq!(
            rx.take(foreign).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // The stream breaks; the next one (any auth server) finds what was staged.
        drop(rx);
        let mut rx = receiver(&recordings).await;
        assert_eq!((rx.taken, rx.durable), (14, 14));
        rx.take(frame(15, 19)).unwrap();
        rx.stage(&recordings).await.unwrap();
        // The recorder is gone for good: the completer folds the staged
        // chunks into the last part.
        drop(rx);
        let done = recordings.complete(SID, None).await.unwrap();
        assert_eq!(done.status, crate::recordings::STATUS_COMPLETE);
        let bytes = store.read(SID, 0, 0, usize::MAX).await.unwrap();
        let events = read_events(&bytes).unwrap();
        assert_eq!(
            events.iter().map(|e| e.ei).collect::<Vec<_>>(),
            (0..20).collect::<Vec<_>>()
        );
        // Completing again changes nothing.
        assert_eq!(
            recordings.complete(SID, None).await.unwrap().size,
            done.size
        );
    }

    #[tokio::test]
    async fn nothing_is_acknowledged_while_the_store_refuses_writes() {
        let store = Arc::new(MemoryStore::new(1 << 20));
        let recordings = recordings_on(&store);
        let mut rx = receiver(&recordings).await;
        rx.take(frame(0, 4)).unwrap();
        store.refuse_writes(true);
        assert!(rx.stage(&recordings).await.is_err());
        assert_eq!(rx.durable, -1);
        store.refuse_writes(false);
        rx.stage(&recordings).await.unwrap();
        assert_eq!(rx.durable, 4);
    }

    #[tokio::test]
    async fn a_part_the_store_refused_leaves_no_gap_in_the_numbers() {
        let store = Arc::new(MemoryStore::new(64));
        let recordings = recordings_on(&store);
        let mut rx = receiver(&recordings).await;
        rx.take(frame(0, 40)).unwrap();
        store.refuse_writes(true);
        assert!(rx.store_part(&recordings, false).await.is_err());
        store.refuse_writes(false);
        rx.store_part(&recordings, false).await.unwrap();
        let record = recordings.get(SID).await.unwrap().unwrap();
        assert_eq!(
            record.parts.iter().map(|p| p.number).collect::<Vec<_>>(),
            [1]
        );
        assert_eq!(record.next_part, 2);
    }

    #[tokio::test]
    async fn a_full_part_is_stored_padded_and_its_chunks_deleted() {
        let store = Arc::new(MemoryStore::new(64));
        let recordings = recordings_on(&store);
        let mut rx = receiver(&recordings).await;
        rx.take(frame(0, 0)).unwrap();
        rx.stage(&recordings).await.unwrap();
        let upload = rx.upload.clone();
        assert_eq!(store.list_staged(&upload).await.unwrap().len(), 1);
        rx.take(frame(1, 40)).unwrap();
        assert!(rx.full());
        rx.store_part(&recordings, false).await.unwrap();
        assert_eq!(rx.durable, 40);
        assert!(store.list_staged(&upload).await.unwrap().is_empty());
        let record = recordings.get(SID).await.unwrap().unwrap();
        assert_eq!(record.last_ei, 40);
        assert!(record.parts[0].size >= 64);
    }
    #[tokio::test]
    async fn an_object_full_of_parts_is_completed_and_the_recording_goes_on_in_the_next() {
        // As GCS, which composes at most 1,024 components into an object.
        let store = Arc::new(MemoryStore::new(64).with_max_parts(2));
        let recordings = recordings_on(&store);
        let mut rx = receiver(&recordings).await;
        for k in 0..3u64 {
            rx.take(frame(k * 41, k * 41 + 40)).unwrap();
            assert!(rx.full());
            rx.store_part(&recordings, false).await.unwrap();
        }
        let record = recordings.get(SID).await.unwrap().unwrap();
        assert_eq!(record.objects.len(), 1, "two parts made the first object");
        assert_eq!(record.parts.len(), 1);
        // The stream breaks; the next one goes on in the second object.
        drop(rx);
        let mut rx = receiver(&recordings).await;
        assert_eq!(rx.durable, 122);
        rx.take(frame(123, 163)).unwrap();
        rx.store_part(&recordings, false).await.unwrap();
        rx.take(frame(164, 170)).unwrap();
        rx.stage(&recordings).await.unwrap();
        drop(rx);
        // The completer folds the staged events into a third object.
        let done = recordings.complete(SID, None).await.unwrap();
        assert_eq!(done.objects.len(), 3);
        let mut bytes = Vec::new();
        for n in 0..3 {
            bytes.extend(store.read(SID, n, 0, usize::MAX).await.unwrap());
        }
        assert_eq!(done.size, bytes.len() as u64);
        let events = read_events(&bytes).unwrap();
        assert_eq!(
            events.iter().map(|e| e.ei).collect::<Vec<_>>(),
            (0..=170).collect::<Vec<_>>()
        );
    }
    /// While one auth server holds the claim on completing an upload (it is
    /// completing it), another leaves the upload alone; once the claim has
    /// lapsed (its holder died midway), the other completes it.
    #[tokio::test]
    async fn an_upload_another_auth_server_is_completing_is_left_to_it() {
        use crate::recordings::{Completion, CompletionClaim};
        let store = Arc::new(MemoryStore::new(1 << 20));
        let backend: Arc<dyn crate::backend::Backend> = Arc::new(MemoryBackend::new());
        let a = Recordings::new(backend.clone(), store.clone(), Arc::new(SystemClock));
        let mut rx = receiver(&a).await;
        rx.take(frame(0, 9)).unwrap();
        rx.stage(&a).await.unwrap();
        drop(rx);
        let claim = |until_ms: i64| {
            let backend = backend.clone();
            async move {
                let key = format!("recordings/{SID}");
                let item = backend.get(&key).await.unwrap();
                let mut r: crate::recordings::RecordingRecord =
                    serde_json::from_slice(&item.value).unwrap();
                r.completing = Some(CompletionClaim {
                    by: "auth-b".into(),
                    until_ms,
                });
                backend
                    .put(&key, serde_json::to_vec(&r).unwrap(), None)
                    .await
                    .unwrap();
            }
        };
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        assert_eq!(
            backend.range("uploads/").await.unwrap().len(),
            1,
            "an upload in progress has its key"
        );
        claim(now_ms + 60_000).await;
        assert!(matches!(
            a.complete_open(SID, None).await.unwrap(),
            Completion::ClaimedElsewhere
        ));
        let e = a.complete(SID, None).await.unwrap_err();
        assert!(
            e.message.contains("being completed by another auth server"),
            "{e:?}"
        );
        assert!(
            a.get(SID).await.unwrap().unwrap().upload.is_some(),
            "left alone"
        );
        claim(now_ms - 1).await;
        let Completion::Done(done) = a.complete_open(SID, None).await.unwrap() else {
            panic!("a lapsed claim holds nothing");
        };
        assert_eq!(done.status, crate::recordings::STATUS_COMPLETE);
        assert!(done.completing.is_none(), "the claim is let go");
        assert!(
            backend.range("uploads/").await.unwrap().is_empty(),
            "a completed upload's key is gone: the completer reads only uploads in progress"
        );
        assert!(matches!(
            a.complete_open(SID, None).await.unwrap(),
            Completion::AlreadyComplete(_)
        ));
        let events = read_events(&store.read(SID, 0, 0, usize::MAX).await.unwrap()).unwrap();
        assert_eq!(events.len(), 10);
    }

    /// The completer takes uploads whose recorder looks silent in the index;
    /// one whose stream is open here is never taken, however long it only
    /// staged (staging notes nothing in the index). It was: the stream's
    /// next chunk then went to a completed upload, and the recorder read
    /// "auth lost acknowledged events".
    #[tokio::test]
    async fn the_completer_leaves_an_upload_alone_while_its_stream_is_open() {
        let clock = Arc::new(turnstile_api::clock::ManualClock::new(
            std::time::UNIX_EPOCH + Duration::from_secs(1_000_000),
        ));
        let store = Arc::new(MemoryStore::new(1 << 20));
        let recordings =
            Recordings::new(Arc::new(MemoryBackend::new()), store.clone(), clock.clone())
                .with_grace(Duration::from_secs(2));
        assert_eq!(recordings.touch_every(), Duration::from_millis(500));
        let streaming = recordings.streaming(SID);
        let mut rx = receiver(&recordings).await;
        rx.take(frame(0, 9)).unwrap();
        rx.stage(&recordings).await.unwrap();
        clock.advance(Duration::from_secs(5));
        assert!(
            recordings
                .abandoned(Duration::from_secs(2))
                .await
                .unwrap()
                .is_empty()
        );
        // Gone (the recorder crashed): now it is abandoned.
        drop(streaming);
        drop(rx);
        let abandoned = recordings.abandoned(Duration::from_secs(2)).await.unwrap();
        assert_eq!(abandoned.len(), 1);
    }
}

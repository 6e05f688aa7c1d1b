//! Record -> stream -> store -> play. Session events and their part format,
//! the recorder (one pipeline for node and proxy, every mode), its spool and
//! the shipper that streams events to auth, the storage of recordings, and
//! playback. Knows nothing of SSH or of
//! auth's internals; talks to auth only through the API types of
//! `turnstile-api`.
#![forbid(unsafe_code)]

pub mod asciicast;
pub mod backlog;
pub mod event;
pub mod part;
pub mod player;
pub mod reader;
pub mod recorder;
pub mod shipper;
pub mod spool;
pub mod storage;

pub use event::RecordingEvent;

//! Record -> stream -> store -> play. Session events and their part format,
//! the recorder's local spool, the uploader that streams spooled events to
//! auth, the storage of recordings, and playback. Knows nothing of SSH or of
//! auth's internals; talks to auth only through the API types of
//! `turnstile-api`.
#![forbid(unsafe_code)]

pub mod asciicast;
pub mod event;
pub mod part;
pub mod player;
pub mod reader;
pub mod recorder;
pub mod spool;
pub mod storage;
pub mod uploader;

pub use event::RecordingEvent;

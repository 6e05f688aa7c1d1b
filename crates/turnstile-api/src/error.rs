//! Error kinds that cross the network. Services map their own errors onto one of
//! these, and callers branch on the kind, never on the text.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    CompareFailed,
    LimitExceeded,
    AccessDenied,
    BadParameter,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn code(self) -> tonic::Code {
        match self {
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorKind::CompareFailed => tonic::Code::Aborted,
            ErrorKind::LimitExceeded => tonic::Code::ResourceExhausted,
            ErrorKind::AccessDenied => tonic::Code::PermissionDenied,
            ErrorKind::BadParameter => tonic::Code::InvalidArgument,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }

    pub fn from_code(code: tonic::Code) -> Self {
        match code {
            tonic::Code::NotFound => ErrorKind::NotFound,
            tonic::Code::AlreadyExists => ErrorKind::AlreadyExists,
            tonic::Code::Aborted => ErrorKind::CompareFailed,
            tonic::Code::ResourceExhausted => ErrorKind::LimitExceeded,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => ErrorKind::AccessDenied,
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                ErrorKind::BadParameter
            }
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Internal,
        }
    }
}

/// Whether a call that failed with `code` went unanswered (the service is
/// down, too slow, or the connection broke) rather than refused; a transport
/// failure reaches a tonic caller as `Unknown` too.
pub fn unanswered(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

/// An error as it travels between services: a kind to branch on and a message
/// for the person who will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn already_exists(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, m)
    }
    pub fn access_denied(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::AccessDenied, m)
    }
    pub fn bad_parameter(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadParameter, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, m)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.kind.code(), e.message)
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let kind = ErrorKind::from_code(s.code());
        let message = if kind == ErrorKind::Unavailable && s.message().is_empty() {
            "the auth service is unreachable".to_string()
        } else {
            s.message().to_string()
        };
        ApiError { kind, message }
    }
}

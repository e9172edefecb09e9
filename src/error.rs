//! The one error type of the server. Services return it; the HTTP edge turns it into a Matrix
//! error body (`errcode` + `error`) with the status the spec gives that code.

use std::borrow::Cow;

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use http::StatusCode;
use serde_json::{Value as JsonValue, json};

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A Matrix error code, with the extra fields some codes carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// `M_FORBIDDEN` (403).
    Forbidden,
    /// `M_UNKNOWN_TOKEN` (401); `soft_logout` tells the client it may log in again keeping state.
    UnknownToken {
        /// Whether the token expired rather than being revoked.
        soft_logout: bool,
    },
    /// `M_MISSING_TOKEN` (401).
    MissingToken,
    /// `M_BAD_JSON` (400).
    BadJson,
    /// `M_NOT_JSON` (400).
    NotJson,
    /// `M_NOT_FOUND` (404).
    NotFound,
    /// `M_LIMIT_EXCEEDED` (429).
    LimitExceeded {
        /// How long the client should wait.
        retry_after_ms: u64,
    },
    /// `M_UNRECOGNIZED` with the given status (404 unknown endpoint, 405 wrong method).
    Unrecognized(StatusCode),
    /// `M_UNKNOWN` (400) for bad requests without a better code.
    Unknown,
    /// `M_TOO_LARGE` (413).
    TooLarge,
    /// `M_TOO_LARGE` (502): another server's media is larger than this server serves.
    RemoteTooLarge,
    /// `M_USER_IN_USE` (400).
    UserInUse,
    /// `M_INVALID_USERNAME` (400).
    InvalidUsername,
    /// `M_WEAK_PASSWORD` (400).
    WeakPassword,
    /// `M_INVALID_PARAM` (400).
    InvalidParam,
    /// `M_MISSING_PARAM` (400).
    MissingParam,
    /// `M_USER_DEACTIVATED` (403).
    UserDeactivated,
    /// `M_USER_LOCKED` (401).
    UserLocked,
    /// `M_GUEST_ACCESS_FORBIDDEN` (403).
    GuestAccessForbidden,
    /// `M_THREEPID_DENIED` (403) for third-party identifiers this server does not handle.
    ThreepidDenied,
    /// `M_UNAUTHORIZED` (401).
    Unauthorized,
    /// `M_UNSUPPORTED_ROOM_VERSION` (400).
    UnsupportedRoomVersion,
    /// `M_RESOURCE_LIMIT_EXCEEDED` (403).
    ResourceLimitExceeded,
    /// `M_ROOM_IN_USE` (400): a room alias asked for at room creation is taken.
    RoomInUse,
    /// `M_BAD_ALIAS` (400): a canonical alias does not point to the room.
    BadAlias,
    /// `M_UNKNOWN` with 409: the resource already exists (an alias, ...).
    Conflict,
    /// `M_UNKNOWN_POS` (400): a sync or pagination token this server never issued.
    UnknownPos,
    /// `M_BAD_JSON` with 405: account data the server manages itself (`m.fully_read`, ...).
    ServerManaged,
    /// `M_WRONG_ROOM_KEYS_VERSION` (403): a key backup write to a version that is not current.
    WrongRoomKeysVersion {
        /// The current version, if any.
        current_version: Option<String>,
    },
    /// `M_DUPLICATE_ANNOTATION` (400): the same reaction sent twice to one event.
    DuplicateAnnotation,
    /// `M_UNKNOWN` (500): something broke inside; the detail goes to the log, not the client.
    Internal,
    /// Media created with `/create` whose content has not arrived yet (504).
    NotYetUploaded,
    /// Content was already uploaded to this media id (409).
    CannotOverwriteMedia,
    /// `M_EXCLUSIVE` (400): a user id or alias an application service reserved.
    Exclusive,
    /// `M_URL_NOT_SET` (400): the application service has no URL.
    UrlNotSet,
    /// `M_BAD_STATUS` (502): the application service answered with an error.
    BadStatus {
        /// The status it answered.
        status: u16,
        /// The body it answered.
        body: String,
    },
    /// `M_CONNECTION_FAILED` (502): the application service could not be reached.
    ConnectionFailed,
    /// `M_CONNECTION_TIMEOUT` (504): the application service did not answer in time.
    ConnectionTimeout,
    /// `M_MAX_DELAY_EXCEEDED` (400): a delayed event asked for more than the server allows.
    MaxDelayExceeded {
        /// The longest delay allowed, in milliseconds.
        max_delay: u64,
    },
    /// `M_INCOMPATIBLE_ROOM_VERSION` (400): a joining server does not support the room's version.
    IncompatibleRoomVersion {
        /// The room's version.
        room_version: String,
    },
}

impl ErrorKind {
    /// The `errcode` string.
    pub fn errcode(&self) -> &'static str {
        match self {
            Self::Forbidden => "M_FORBIDDEN",
            Self::UnknownToken { .. } => "M_UNKNOWN_TOKEN",
            Self::MissingToken => "M_MISSING_TOKEN",
            Self::BadJson => "M_BAD_JSON",
            Self::NotJson => "M_NOT_JSON",
            Self::NotFound => "M_NOT_FOUND",
            Self::LimitExceeded { .. } => "M_LIMIT_EXCEEDED",
            Self::Unrecognized(_) => "M_UNRECOGNIZED",
            Self::Unknown | Self::Internal => "M_UNKNOWN",
            Self::TooLarge | Self::RemoteTooLarge => "M_TOO_LARGE",
            Self::UserInUse => "M_USER_IN_USE",
            Self::InvalidUsername => "M_INVALID_USERNAME",
            Self::WeakPassword => "M_WEAK_PASSWORD",
            Self::InvalidParam => "M_INVALID_PARAM",
            Self::MissingParam => "M_MISSING_PARAM",
            Self::UserDeactivated => "M_USER_DEACTIVATED",
            Self::UserLocked => "M_USER_LOCKED",
            Self::GuestAccessForbidden => "M_GUEST_ACCESS_FORBIDDEN",
            Self::ThreepidDenied => "M_THREEPID_DENIED",
            Self::Unauthorized => "M_UNAUTHORIZED",
            Self::UnsupportedRoomVersion => "M_UNSUPPORTED_ROOM_VERSION",
            Self::ResourceLimitExceeded => "M_RESOURCE_LIMIT_EXCEEDED",
            Self::RoomInUse => "M_ROOM_IN_USE",
            Self::BadAlias => "M_BAD_ALIAS",
            Self::Conflict => "M_UNKNOWN",
            Self::UnknownPos => "M_UNKNOWN_POS",
            Self::ServerManaged => "M_BAD_JSON",
            Self::WrongRoomKeysVersion { .. } => "M_WRONG_ROOM_KEYS_VERSION",
            Self::NotYetUploaded => "M_NOT_YET_UPLOADED",
            Self::CannotOverwriteMedia => "M_CANNOT_OVERWRITE_MEDIA",
            Self::DuplicateAnnotation => "M_DUPLICATE_ANNOTATION",
            Self::Exclusive => "M_EXCLUSIVE",
            Self::UrlNotSet => "M_URL_NOT_SET",
            Self::BadStatus { .. } => "M_BAD_STATUS",
            Self::ConnectionFailed => "M_CONNECTION_FAILED",
            Self::ConnectionTimeout => "M_CONNECTION_TIMEOUT",
            Self::MaxDelayExceeded { .. } => "M_MAX_DELAY_EXCEEDED",
            Self::IncompatibleRoomVersion { .. } => "M_INCOMPATIBLE_ROOM_VERSION",
        }
    }

    /// The HTTP status the spec pairs with this code.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Forbidden
            | Self::UserDeactivated
            | Self::GuestAccessForbidden
            | Self::ThreepidDenied
            | Self::ResourceLimitExceeded
            | Self::WrongRoomKeysVersion { .. } => StatusCode::FORBIDDEN,
            Self::UnknownToken { .. }
            | Self::MissingToken
            | Self::UserLocked
            | Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::LimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unrecognized(status) => *status,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Conflict | Self::CannotOverwriteMedia => StatusCode::CONFLICT,
            Self::NotYetUploaded => StatusCode::GATEWAY_TIMEOUT,
            Self::ServerManaged => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadStatus { .. } | Self::ConnectionFailed | Self::RemoteTooLarge => {
                StatusCode::BAD_GATEWAY
            }
            Self::ConnectionTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Exclusive | Self::UrlNotSet => StatusCode::BAD_REQUEST,
            Self::IncompatibleRoomVersion { .. } => StatusCode::BAD_REQUEST,
            Self::BadJson
            | Self::NotJson
            | Self::Unknown
            | Self::UserInUse
            | Self::InvalidUsername
            | Self::WeakPassword
            | Self::InvalidParam
            | Self::MissingParam
            | Self::UnsupportedRoomVersion
            | Self::RoomInUse
            | Self::BadAlias
            | Self::UnknownPos
            | Self::DuplicateAnnotation
            | Self::MaxDelayExceeded { .. } => StatusCode::BAD_REQUEST,
        }
    }
}

/// A failure to hand back to a client.
#[derive(Debug)]
pub enum Error {
    /// A Matrix error with a human-readable reason.
    Matrix(ErrorKind, Cow<'static, str>),
    /// User-interactive auth is needed: the body is the flows/session document, status 401.
    Uiaa(JsonValue),
}

impl Error {
    /// A Matrix error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self::Matrix(kind, message.into())
    }

    /// `M_FORBIDDEN`.
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }

    /// `M_NOT_FOUND`.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// `M_BAD_JSON`.
    pub fn bad_json(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::BadJson, message)
    }

    /// `M_INVALID_PARAM`.
    pub fn invalid_param(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::InvalidParam, message)
    }

    /// An internal failure: logged in full, reported to the client without detail.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(ErrorKind::Internal, "Internal server error")
    }

    /// Whether this is an internal failure (storage, corrupt data) rather than a refusal.
    pub fn is_internal(&self) -> bool {
        matches!(self, Self::Matrix(ErrorKind::Internal, _))
    }

    /// The Matrix error kind, if this is not a UIA challenge.
    pub fn kind(&self) -> Option<&ErrorKind> {
        match self {
            Self::Matrix(kind, _) => Some(kind),
            Self::Uiaa(_) => None,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Matrix(kind, message) => write!(f, "{}: {message}", kind.errcode()),
            Self::Uiaa(_) => f.write_str("user-interactive authentication required"),
        }
    }
}

impl std::error::Error for Error {}

impl From<crate::storage::StorageError> for Error {
    fn from(err: crate::storage::StorageError) -> Self {
        Self::internal(err)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match self {
            Self::Uiaa(body) => (StatusCode::UNAUTHORIZED, Json(body)).into_response(),
            Self::Matrix(kind, message) => {
                let mut body = json!({ "errcode": kind.errcode(), "error": message });
                match &kind {
                    ErrorKind::UnknownToken { soft_logout } => {
                        body["soft_logout"] = (*soft_logout).into();
                    }
                    ErrorKind::LimitExceeded { retry_after_ms } => {
                        body["retry_after_ms"] = (*retry_after_ms).into();
                    }
                    ErrorKind::WrongRoomKeysVersion { current_version } => {
                        body["current_version"] = current_version.clone().into();
                    }
                    ErrorKind::MaxDelayExceeded { max_delay } => {
                        body["max_delay"] = (*max_delay).into();
                    }
                    ErrorKind::BadStatus { status, body: answer } => {
                        body["status"] = (*status).into();
                        body["body"] = answer.clone().into();
                    }
                    ErrorKind::IncompatibleRoomVersion { room_version } => {
                        body["room_version"] = room_version.clone().into();
                    }
                    _ => {}
                }
                let mut response = (kind.status(), Json(body)).into_response();
                if let ErrorKind::LimitExceeded { retry_after_ms } = kind {
                    let secs = retry_after_ms.div_ceil(1000).max(1);
                    if let Ok(value) = http::HeaderValue::from_str(&secs.to_string()) {
                        response.headers_mut().insert(http::header::RETRY_AFTER, value);
                    }
                }
                response
            }
        }
    }
}

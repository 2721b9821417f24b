//! `Error`: the one error type of the contract. Callers match on variants, never on strings.

use std::time::Duration;

use crate::path::NodePath;

/// Why a string is not a valid [`NodePath`]; see [`crate::path`] for the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    /// The path is the empty string.
    #[error("path is empty")]
    Empty,
    /// The path does not start with `/`.
    #[error("path must start with '/'")]
    NotAbsolute,
    /// The path ends with `/` and is not the root.
    #[error("path must not end with '/'")]
    TrailingSlash,
    /// Two slashes in a row (`//`); `index` counts segments from 0.
    #[error("segment {index} is empty ('//')")]
    EmptySegment {
        /// Zero-based index of the empty segment.
        index: usize,
    },
    /// A `.` or `..` segment.
    #[error("segment {index} is {segment:?}, relative segments are not allowed")]
    RelativeSegment {
        /// Zero-based index of the segment.
        index: usize,
        /// The offending segment.
        segment: String,
    },
    /// A character one of the servers cannot store faithfully.
    #[error("character {character:?} at byte {offset} is not allowed")]
    ForbiddenCharacter {
        /// Byte offset of the character.
        offset: usize,
        /// The character.
        character: char,
    },
    /// A node name given to `join` contains `/`.
    #[error("a node name must not contain '/'")]
    SlashInName,
    /// `/zookeeper` is reserved by ZooKeeper.
    #[error("'/zookeeper' is reserved by ZooKeeper")]
    Reserved,
    /// Longer than [`crate::path::MAX_PATH_LEN`].
    #[error("path is {len} bytes, the limit is {max}")]
    TooLong {
        /// Length found, in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Deeper than [`crate::path::MAX_DEPTH`].
    #[error("path has {depth} segments, the limit is {max}")]
    TooDeep {
        /// Depth found.
        depth: usize,
        /// The limit.
        max: usize,
    },
}

/// A boxed error from a backend's client library, kept as the source of [`Error::Backend`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Every failure of a [`Registry`](crate::Registry) operation.
///
/// Guarantees: input errors ([`InvalidPath`](Error::InvalidPath),
/// [`ValueTooLarge`](Error::ValueTooLarge), [`InvalidArgument`](Error::InvalidArgument)) are
/// returned before any I/O and leave nothing written. [`Error::is_retryable`] is true exactly
/// for failures where the operation may be retried as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The path broke a rule of [`NodePath`]; nothing was sent.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The rejected input (escaped, truncated to 128 bytes).
        path: String,
        /// Which rule it broke.
        reason: InvalidPath,
    },
    /// The value is over [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN); nothing was sent.
    #[error("value of {len} bytes for {path} is over the limit of {max} bytes")]
    ValueTooLarge {
        /// Target path.
        path: NodePath,
        /// Size given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An argument other than a path or value is malformed (an option, a URL); nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The node does not exist.
    #[error("node {path} does not exist")]
    NotFound {
        /// The missing node.
        path: NodePath,
    },
    /// A node already exists at the path of a non-sequential create.
    #[error("node {path} already exists")]
    AlreadyExists {
        /// The existing node.
        path: NodePath,
    },
    /// A compare-and-set or conditional delete found another version.
    #[error("version mismatch at {path}: expected {expected}, found {actual}")]
    VersionMismatch {
        /// The node.
        path: NodePath,
        /// The version the caller expected.
        expected: u64,
        /// The version found.
        actual: u64,
    },
    /// A non-recursive delete of a node that has children.
    #[error("node {path} has children; delete it recursively")]
    NotEmpty {
        /// The node.
        path: NodePath,
    },
    /// A create under an ephemeral node: ephemeral nodes never have children.
    #[error("cannot create {path}: its parent {parent} is ephemeral")]
    EphemeralParent {
        /// The node that was to be created.
        path: NodePath,
        /// Its ephemeral parent.
        parent: NodePath,
    },
    /// The server could not be reached or did not answer; retryable. A write may still have
    /// happened (the connection dropped after the server applied it): read to learn its
    /// outcome before repeating a versioned write.
    #[error("registry unavailable: {message}")]
    Unavailable {
        /// What was tried and what failed.
        message: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The operation did not complete within its deadline; retryable, and it may have happened.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation.
        operation: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The session ended (lease or ZooKeeper session expired) while the operation ran; the
    /// client opens a new session by itself, so this is retryable.
    #[error("session expired")]
    SessionExpired,
    /// Authentication was refused (wrong or unknown credentials). Not retryable as is: the
    /// credentials, or the server's users, must change first. A watch stream ends with it;
    /// later calls try again (the client is not closed by it).
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// The credentials are valid but lack the permission for this operation.
    #[error("permission denied on {path}")]
    PermissionDenied {
        /// The node.
        path: NodePath,
    },
    /// The registry was closed; every later call returns this, unless its input is bad
    /// (input errors come first).
    #[error("registry is closed")]
    Closed,
    /// The backend does not support this operation; see
    /// [`Capabilities`](crate::Capabilities).
    #[error("not supported by the {backend} backend: {what}")]
    NotSupported {
        /// Backend name.
        backend: &'static str,
        /// What is missing.
        what: String,
    },
    /// Any other backend failure, with the client library's error as its source.
    #[error("{backend} error: {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What failed.
        message: String,
        /// The client library's error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed: [`Unavailable`](Error::Unavailable),
    /// [`Timeout`](Error::Timeout) and [`SessionExpired`](Error::SessionExpired).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::Timeout { .. } | Error::SessionExpired
        )
    }

    /// The [`InvalidArgument`](Error::InvalidArgument) every backend gives for an attempt
    /// to `operation` ("create", "write", "delete", "register") the root node, which always exists and
    /// belongs to no one: the same words everywhere, before any I/O.
    pub fn root(operation: &str) -> Self {
        Error::InvalidArgument(format!("cannot {operation} the root node"))
    }

    /// Shorthand for [`Error::Unavailable`] without a source.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: None,
        }
    }
}

/// The result of every registry operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Mapping zookeeper-client failures onto the contract's `Error`.

use registry_core::{Error, NodePath};
use zookeeper_client::Error as Zk;

pub(crate) const BACKEND: &str = "zookeeper";

/// Classifies a client error for `operation` on `path`.
pub(crate) fn map(error: Zk, operation: &str, path: &NodePath) -> Error {
    match error {
        Zk::NoNode => Error::NotFound { path: path.clone() },
        Zk::NodeExists => Error::AlreadyExists { path: path.clone() },
        Zk::NotEmpty => Error::NotEmpty { path: path.clone() },
        Zk::NoChildrenForEphemerals => Error::EphemeralParent {
            path: path.clone(),
            parent: path.parent().unwrap_or_else(NodePath::root),
        },
        // The caller reads the node to fill in the versions.
        Zk::BadVersion => Error::VersionMismatch {
            path: path.clone(),
            expected: 0,
            actual: 0,
        },
        Zk::NoAuth => Error::PermissionDenied { path: path.clone() },
        Zk::AuthFailed => Error::AuthFailed(format!("zookeeper {operation} {path}")),
        Zk::SessionExpired | Zk::ClientClosed => Error::SessionExpired,
        Zk::BadArguments(m) => Error::InvalidArgument(format!("zookeeper {operation} {path}: {m}")),
        // The client resets the connection when it cannot make sense of what the server sent
        // (a reply to no pending request, bytes it cannot decode) and fails every request in
        // flight with that error; the session goes on, so sending again can succeed.
        Zk::UnexpectedError(_)
        | Zk::UnmarshalError { .. }
        | Zk::ConnectionLoss
        | Zk::Timeout
        | Zk::NoHosts
        | Zk::Throttled
        | Zk::SessionMoved
        | Zk::NotReadOnly
        | Zk::Custom(_) => Error::Unavailable {
            message: format!("zookeeper {operation} {path}: {error}"),
            source: Some(Box::new(error)),
        },
        other => Error::Backend {
            backend: BACKEND,
            message: format!("{operation} {path}: {other}"),
            source: Some(Box::new(other)),
        },
    }
}

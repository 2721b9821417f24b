//! Mapping etcd-client failures onto the contract's `Error`.

use registry_core::{Error, NodePath};
use tonic::Code;

pub(crate) const BACKEND: &str = "etcd";

/// Classifies a client error; `path` names the node for permission errors.
pub(crate) fn map(error: etcd_client::Error, operation: &str, path: Option<&NodePath>) -> Error {
    use etcd_client::Error as E;
    match error {
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
            | Code::ResourceExhausted => Error::Unavailable {
                message: format!("etcd {operation}: {}", status.message()),
                source: Some(Box::new(status)),
            },
            // etcd reports a wrong user or password as InvalidArgument.
            _ if status.message().contains("authentication failed")
                || status.message().contains("invalid auth token") =>
            {
                Error::AuthFailed(format!("etcd {operation}: {}", status.message()))
            }
            Code::Unauthenticated => {
                Error::AuthFailed(format!("etcd {operation}: {}", status.message()))
            }
            // A write under a lease that expired or was revoked: the session is gone, and the
            // session task opens a new one.
            Code::NotFound if status.message().contains("lease not found") => Error::SessionExpired,
            // A put with ignore_lease to a missing key: how `set` learns the node is missing.
            Code::InvalidArgument if status.message() == "etcdserver: key not found" => {
                match path {
                    Some(path) => Error::NotFound { path: path.clone() },
                    None => Error::Backend {
                        backend: BACKEND,
                        message: format!("{operation}: {}", status.message()),
                        source: Some(Box::new(status)),
                    },
                }
            }
            Code::PermissionDenied => Error::PermissionDenied {
                path: path.cloned().unwrap_or_else(NodePath::root),
            },
            _ => Error::Backend {
                backend: BACKEND,
                message: format!("{operation}: {}", status.message()),
                source: Some(Box::new(status)),
            },
        },
        E::TransportError(e) => Error::Unavailable {
            message: format!("etcd {operation}: transport error"),
            source: Some(Box::new(e)),
        },
        E::IoError(e) => Error::Unavailable {
            message: format!("etcd {operation}: {e}"),
            source: Some(Box::new(e)),
        },
        E::WatchError(m) | E::LeaseKeepAliveError(m) => Error::Unavailable {
            message: format!("etcd {operation}: {m}"),
            source: None,
        },
        E::InvalidArgs(m) | E::EndpointError(m) => {
            Error::InvalidArgument(format!("etcd {operation}: {m}"))
        }
        E::InvalidUri(e) => Error::InvalidArgument(format!("etcd endpoint: {e}")),
        other => Error::Backend {
            backend: BACKEND,
            message: format!("{operation}: {other}"),
            source: Some(Box::new(other)),
        },
    }
}

/// The error behind a watch create the server refused, if retrying cannot help. etcd gives
/// only a reason text; before 3.5 every auth failure of a create reads "permission denied".
pub(crate) fn watch_refused(reason: &str, path: &NodePath) -> Option<Error> {
    if reason.contains("permission denied") {
        Some(Error::PermissionDenied { path: path.clone() })
    } else if reason.contains("invalid auth token") || reason.contains("user name is empty") {
        Some(Error::AuthFailed(format!("etcd watch: {reason}")))
    } else {
        None
    }
}

/// Whether a request failed before it reached any server (so retrying cannot repeat it).
pub(crate) fn not_sent(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == Code::Unavailable
                && (status.message().contains("tcp connect error")
                    || status.message().contains("Connection refused"))
        }
        _ => false,
    }
}

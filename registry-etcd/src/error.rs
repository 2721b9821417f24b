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
            Code::Unauthenticated => {
                Error::AuthFailed(format!("etcd {operation}: {}", status.message()))
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

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
            // The client logs in again and retries once when its token was refused (expired or
            // forgotten by a restart); refused again, the token is new, so it is a race (another
            // restart) and the credentials still hold: retryable, not terminal. A failed login
            // says "authentication failed" below.
            _ if status.message().contains("invalid auth token") => Error::Unavailable {
                message: format!(
                    "etcd {operation}: login token refused after logging in again: {}",
                    status.message()
                ),
                source: Some(Box::new(status)),
            },
            // etcd reports a wrong user or password as InvalidArgument.
            _ if status.message().contains("authentication failed") => {
                Error::AuthFailed(format!("etcd {operation}: {}", status.message()))
            }
            Code::Unauthenticated => {
                Error::AuthFailed(format!("etcd {operation}: {}", status.message()))
            }
            // A client without credentials on a server with auth on.
            _ if status.message().contains("user name is empty") => Error::AuthFailed(format!(
                "etcd {operation}: {} (the server requires a user name and password)",
                status.message()
            )),
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
/// only a reason text. The hub has already logged in again and retried a create refused for
/// what may be its token (see [`token_refusal`]), so "permission denied" here is final. An
/// "invalid auth token" is not: the login just succeeded, so the credentials hold, and the
/// watch retries (logging in again), while a login that fails ends it with `AuthFailed`.
pub(crate) fn watch_refused(reason: &str, path: &NodePath) -> Option<Error> {
    if reason.contains("permission denied") {
        Some(Error::PermissionDenied { path: path.clone() })
    } else if reason.contains("user name is empty") {
        Some(Error::AuthFailed(format!("etcd watch: {reason}")))
    } else {
        None
    }
}

/// Whether a watch create refused with `reason` may have been refused for the stream's login
/// token rather than for the user's permissions, so that logging in again may help. etcd
/// 3.4.23 (measured) says "invalid auth token" for an expired or forgotten token. "permission
/// denied" is the user's permissions and final: a new login (which re-opens the stream every
/// watch of the client shares) would only repeat for every refused watch.
pub(crate) fn token_refusal(reason: &str) -> bool {
    reason.contains("invalid auth token") || reason.contains("user name is empty")
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

/// Whether a member refused a request for having no leader. It refuses before doing
/// anything (etcd checks require-leader ahead of the request), and a proposal a leaderless
/// member drops is reported otherwise, so the request did not happen.
pub(crate) fn no_leader(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == Code::Unavailable && status.message() == "etcdserver: no leader")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn a_refused_token_is_retryable_and_a_refused_login_is_terminal() {
        // What is left of an expired token after the client logged in again and retried.
        let token = map(
            status(Code::Unauthenticated, "etcdserver: invalid auth token"),
            "get",
            None,
        );
        assert!(
            matches!(token, Error::Unavailable { .. }) && token.is_retryable(),
            "{token:?}"
        );
        let login = map(
            status(
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            "get",
            None,
        );
        assert!(matches!(login, Error::AuthFailed(_)), "{login:?}");
        let path = NodePath::new("/a").unwrap();
        let denied = map(
            status(Code::PermissionDenied, "etcdserver: permission denied"),
            "get",
            Some(&path),
        );
        assert!(
            matches!(&denied, Error::PermissionDenied { path: p } if *p == path),
            "{denied:?}"
        );
    }

    #[test]
    fn watch_refusals_worth_a_new_login_and_final_ones() {
        let path = NodePath::new("/a").unwrap();
        let stale = "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token";
        assert!(token_refusal(stale));
        assert!(watch_refused(stale, &path).is_none());
        // The user's permissions: final at once, no new login.
        assert!(!token_refusal("etcdserver: permission denied"));
        assert!(matches!(
            watch_refused("etcdserver: permission denied", &path),
            Some(Error::PermissionDenied { .. })
        ));
        assert!(!token_refusal("mvcc: required revision has been compacted"));
        assert!(watch_refused("mvcc: required revision has been compacted", &path).is_none());
    }

    #[test]
    fn only_a_refusal_for_want_of_a_leader_reads_as_no_leader() {
        assert!(no_leader(&status(
            Code::Unavailable,
            "etcdserver: no leader"
        )));
        // A timed-out proposal may still be applied: not a refusal.
        assert!(!no_leader(&status(
            Code::Unavailable,
            "etcdserver: request timed out"
        )));
        assert!(!no_leader(&status(
            Code::Unavailable,
            "etcdserver: leader changed"
        )));
        assert!(!no_leader(&status(Code::Unknown, "etcdserver: no leader")));
    }
}

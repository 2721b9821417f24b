//! `Fixture`: what a backend provides so the suite can run its cases against it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use registry_core::{Error, Registry, Result, SessionId};

/// Faults a fixture can inject; a case that needs one it lacks is skipped with the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Expire a client's session as the server would (ephemerals deleted, client told).
    ExpireSession,
    /// Cut a client's connection for a while without ending its session.
    InterruptConnection,
}

/// A backend under test: opens clients in isolated namespaces and injects faults.
///
/// One fixture may be shared by every case of a test binary (one server process); each case
/// asks for its own namespace, so cases never see each other's nodes. Clients must be opened
/// from inside the case's tokio runtime.
#[async_trait]
pub trait Fixture: Send + Sync + 'static {
    /// Backend name, used in test names and messages (`memory`, `etcd`, `zookeeper`).
    fn name(&self) -> &'static str;

    /// Opens a new client (its own session) whose root `/` is the namespace `namespace`.
    /// Clients opened with the same namespace see the same tree; different namespaces never
    /// see each other. `namespace` is a single path segment of `[a-z0-9_]`.
    async fn open(&self, namespace: &str) -> Result<Arc<dyn Registry>>;

    /// Which faults [`expire_session`](Fixture::expire_session) and friends can inject.
    fn supports(&self, fault: Fault) -> bool;

    /// Expires `session` the way the server would: its ephemeral nodes go away and its client
    /// reports `Lost` then `Reestablished`.
    async fn expire_session(&self, session: SessionId) -> Result<()> {
        let _ = session;
        Err(Error::NotSupported {
            backend: self.name(),
            what: "expire_session".into(),
        })
    }

    /// Cuts the connection of the client holding `session` for `duration` (shorter than the
    /// session timeout): it reports `Suspended`, then `Connected` with the same session.
    async fn interrupt_connection(&self, session: SessionId, duration: Duration) -> Result<()> {
        let _ = (session, duration);
        Err(Error::NotSupported {
            backend: self.name(),
            what: "interrupt_connection".into(),
        })
    }

    /// How many watches the server holds for clients of `namespace` (or in total, if the
    /// server cannot tell namespaces apart and the fixture isolates its own count); `None` if
    /// the fixture cannot count them, which skips the case that checks watch release.
    async fn active_watches(&self, namespace: &str) -> Option<usize> {
        let _ = namespace;
        None
    }

    /// How long after a session is lost (or its owner closed) its ephemeral nodes can still
    /// be seen by other clients: bounds the suite's waits.
    fn expiry_bound(&self) -> Duration {
        Duration::from_secs(10)
    }
}

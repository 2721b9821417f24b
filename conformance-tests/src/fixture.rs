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
    /// Start servers of the case's own ([`Fixture::start_cluster`], 1 or 3 members) and
    /// connect clients to given addresses ([`Fixture::connect_to`]): kills, pauses,
    /// partitions, leader loss and owner processes.
    Servers,
    /// Compact the servers' history ([`Fixture::compact`]).
    Compaction,
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

    /// Starts `size` server processes of this backend for one fault case (blocking work is
    /// the fixture's to move off the runtime).
    async fn start_cluster(&self, size: usize) -> Result<Box<dyn crate::harness::Cluster>> {
        let _ = size;
        Err(Error::NotSupported {
            backend: self.name(),
            what: "servers of a case's own".into(),
        })
    }

    /// Opens a client of the servers at `members` (one address per member, in order), with
    /// the session TTL [`session_ttl`](Fixture::session_ttl). Must not start anything else:
    /// owner processes call it in a fresh process.
    async fn connect_to(&self, members: &[std::net::SocketAddr]) -> Result<Arc<dyn Registry>> {
        let _ = members;
        Err(Error::NotSupported {
            backend: self.name(),
            what: "connect_to".into(),
        })
    }

    /// Compacts the history of the servers at `members` up to their latest revision.
    async fn compact(&self, members: &[std::net::SocketAddr]) -> Result<()> {
        let _ = members;
        Err(Error::NotSupported {
            backend: self.name(),
            what: "compaction".into(),
        })
    }

    /// Session TTL (etcd lease TTL, ZooKeeper session timeout) of clients the fixture opens.
    fn session_ttl(&self) -> Duration {
        Duration::from_secs(2)
    }

    /// How long after a session is lost (or its owner closed) its ephemeral nodes can still
    /// be seen by other clients: bounds the suite's waits.
    fn expiry_bound(&self) -> Duration {
        Duration::from_secs(10)
    }
}

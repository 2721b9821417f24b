//! `Mutex`: a distributed lock with fencing tokens, on any [`Registry`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::contender::{is_contender, remove_in_background, Contender, HoldMonitor, LOCK};
use crate::error::{Error, Result};
use crate::node::Node;
use crate::path::NodePath;
use crate::registry::Registry;

/// A distributed lock at a path: contenders queue as ephemeral-sequential children
/// (`lock-<token>-<counter>`); other nodes under the path take no turn.
///
/// Guarantees: at most one [`MutexGuard`] per lock path is held at a time while sessions are
/// intact; a release wakes exactly the next waiter; fencing tokens grow strictly from holder
/// to holder; a pending `lock()` that is dropped leaves no node behind; a holder whose session
/// is lost sees [`MutexGuard::is_held`] turn false (check it, or pass the fencing token to the
/// resource, before acting on the lock).
///
/// Not re-entrant (unlike Curator's `InterProcessMutex`, like etcd's `concurrency.Mutex`): a
/// second `lock()` of the same path while this process holds it queues behind the held
/// guard, as any other contender does.
#[derive(Clone)]
pub struct Mutex {
    registry: Arc<dyn Registry>,
    path: NodePath,
    wake_ups: Arc<AtomicU64>,
}

/// Proof of holding a [`Mutex`]; releases on [`unlock`](MutexGuard::unlock) or drop.
pub struct MutexGuard {
    registry: Arc<dyn Registry>,
    node: Option<Node>,
    monitor: HoldMonitor,
}

impl Mutex {
    /// A lock whose contenders live under `path` (created if missing).
    pub fn new(registry: Arc<dyn Registry>, path: NodePath) -> Mutex {
        Mutex {
            registry,
            path,
            wake_ups: Arc::default(),
        }
    }

    /// How often this handle's waiters were woken to re-check their turn (each waiter is
    /// woken only by its predecessor leaving: the no-herd property the suite counts).
    pub fn wake_ups(&self) -> u64 {
        self.wake_ups.load(Ordering::Relaxed)
    }

    /// The lock's path.
    pub fn path(&self) -> &NodePath {
        &self.path
    }

    /// Waits until the lock is ours.
    pub async fn lock(&self) -> Result<MutexGuard> {
        let contender =
            Contender::enqueue(self.registry.clone(), &self.path, LOCK, Bytes::new()).await?;
        contender.wait_for_turn(&self.wake_ups).await?;
        Ok(self.hold(contender))
    }

    /// Takes the lock if nobody holds or waits for it; `None` otherwise (nothing left behind).
    pub async fn try_lock(&self) -> Result<Option<MutexGuard>> {
        let contender =
            Contender::enqueue(self.registry.clone(), &self.path, LOCK, Bytes::new()).await?;
        let children = self.registry.children(&self.path).await?;
        let first = children.nodes.iter().find(|n| is_contender(n, LOCK));
        if first.map(|n| &n.path) == Some(&contender.node.path) {
            contender.still_owned()?;
            Ok(Some(self.hold(contender)))
        } else {
            contender.remove().await?;
            Ok(None)
        }
    }

    /// Like [`lock`](Mutex::lock), giving up after `timeout` with [`Error::Timeout`] (and
    /// leaving no node behind).
    pub async fn lock_timeout(&self, timeout: Duration) -> Result<MutexGuard> {
        tokio::time::timeout(timeout, self.lock())
            .await
            .map_err(|_| Error::Timeout {
                operation: format!("lock {}", self.path),
                after: timeout,
            })?
    }

    fn hold(&self, contender: Contender) -> MutexGuard {
        let (registry, node) = contender.disarm();
        let monitor = HoldMonitor::start(registry.clone(), node.clone());
        MutexGuard {
            registry,
            node: Some(node),
            monitor,
        }
    }
}

impl MutexGuard {
    /// The fencing token: the lock node's `create_order`, strictly increasing across holders.
    pub fn fencing_token(&self) -> u64 {
        self.node.as_ref().map_or(0, |n| n.create_order)
    }

    /// Whether the lock is still ours: false while it is at risk (see
    /// [`lost`](MutexGuard::lost)), and for good once our session or node is lost.
    pub fn is_held(&self) -> bool {
        self.node.is_some() && self.monitor.is_held()
    }

    /// Resolves once the lock can no longer be counted on: the session is suspended (the
    /// server may expire it and give the lock to the next contender before this client
    /// learns of it), lost or closed, the node was deleted by someone else, or the watch on
    /// it could not open or broke (a delete would go unseen). Stop acting as the holder then,
    /// as Curator users do on `SUSPENDED`. A suspension can end with the same session and the
    /// lock still held, once a read made after the reconnection (or a watch opened again)
    /// shows the node:
    /// [`is_held`](MutexGuard::is_held) tells, and a later call waits again until the next
    /// risk or loss.
    pub async fn lost(&self) {
        self.monitor.lost().await
    }

    /// Releases the lock and waits until its node is gone. If the delete fails for a reason
    /// that passes (connection suspended), the error is returned and the delete goes on in the
    /// background until the node is gone or its session ends.
    /// A future dropped before it returns leaves the delete to the background too.
    pub async fn unlock(mut self) -> Result<()> {
        let Some(node) = self.node.clone() else {
            return Ok(());
        };
        let outcome = super::contender::remove_node(self.registry.clone(), &node).await;
        // Kept until the delete was answered: an unlock dropped midway leaves the removal to
        // `drop`, in the background.
        self.node = None;
        outcome
    }
}

impl Drop for MutexGuard {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            remove_in_background(self.registry.clone(), node, self.monitor.runtime.as_ref());
        }
    }
}

impl std::fmt::Debug for MutexGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MutexGuard")
            .field("node", &self.node.as_ref().map(|n| n.path.as_str()))
            .field("fencing_token", &self.fencing_token())
            .field("held", &self.is_held())
            .finish()
    }
}

//! `Election`: leader election with fencing tokens (etcd's Campaign / Resign / Observe,
//! Curator's LeaderLatch), on any [`Registry`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

use super::contender::{
    is_contender, remove_in_background, remove_node, Contender, HoldMonitor, CANDIDATE,
};
use crate::error::Result;
use crate::node::Node;
use crate::path::NodePath;
use crate::registry::Registry;
use crate::watch::{WatchOptions, WatchedState};

/// A leader election among the candidates under a path (ephemeral-sequential
/// `candidate-<token>-<counter>` children; other nodes under the path are not candidates).
///
/// Guarantees: the leader is the oldest candidate (lowest `create_order`); at most one
/// [`Leadership`] per path is held while sessions are intact; leaders' tokens grow strictly;
/// a dropped pending `campaign()` leaves no node behind; a leader whose session is lost sees
/// [`Leadership::is_leader`] turn false.
#[derive(Clone)]
pub struct Election {
    registry: Arc<dyn Registry>,
    path: NodePath,
    wake_ups: Arc<AtomicU64>,
}

/// The current leader as seen by an observer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The value the leader campaigned with (e.g. its address).
    pub value: Bytes,
    /// Its fencing token (`create_order` of its node).
    pub token: u64,
    /// Its candidate node.
    pub path: NodePath,
}

/// Held by the elected leader until [`resign`](Leadership::resign), drop, or loss.
pub struct Leadership {
    registry: Arc<dyn Registry>,
    node: Option<Node>,
    monitor: HoldMonitor,
}

/// The oldest candidate among `nodes` (other nodes under the path are no candidates).
fn leader_of(nodes: impl Iterator<Item = Node>) -> Option<Leader> {
    nodes
        .filter(|n| is_contender(n, CANDIDATE))
        .min_by_key(|n| n.create_order)
        .map(|n| Leader {
            value: n.value,
            token: n.create_order,
            path: n.path,
        })
}

impl Election {
    /// An election whose candidates live under `path` (created if missing).
    pub fn new(registry: Arc<dyn Registry>, path: NodePath) -> Election {
        Election {
            registry,
            path,
            wake_ups: Arc::default(),
        }
    }

    /// How often this handle's campaigns were woken to re-check their turn.
    pub fn wake_ups(&self) -> u64 {
        self.wake_ups.load(Ordering::Relaxed)
    }

    /// Waits until this candidate leads; `value` is published to observers.
    pub async fn campaign(&self, value: Bytes) -> Result<Leadership> {
        let contender =
            Contender::enqueue(self.registry.clone(), &self.path, CANDIDATE, value).await?;
        contender.wait_for_turn(&self.wake_ups).await?;
        let (registry, node) = contender.disarm();
        let monitor = HoldMonitor::start(registry.clone(), node.clone());
        Ok(Leadership {
            registry,
            node: Some(node),
            monitor,
        })
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        match self.registry.children(&self.path).await {
            Ok(children) => Ok(leader_of(children.nodes.into_iter())),
            Err(crate::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The leader now and after every change (`None` while there is none); consecutive
    /// duplicates are not repeated. Ends with the registry.
    pub async fn observe(&self) -> Result<BoxStream<'static, Result<Option<Leader>>>> {
        let stream = self
            .registry
            .watch(&self.path, WatchOptions::children())
            .await?;
        let mut state = WatchedState::new();
        let mut last: Option<Option<Leader>> = None;
        Ok(stream
            .filter_map(move |item| {
                let out = match item {
                    Err(error) => Some(Err(error)),
                    Ok(event) => {
                        state.apply(&event);
                        let now = leader_of(state.nodes().cloned());
                        if last.as_ref() == Some(&now) {
                            None
                        } else {
                            last = Some(now.clone());
                            Some(Ok(now))
                        }
                    }
                };
                futures::future::ready(out)
            })
            .boxed())
    }
}

impl Leadership {
    /// The fencing token: strictly greater than every earlier leader's.
    pub fn token(&self) -> u64 {
        self.node.as_ref().map_or(0, |n| n.create_order)
    }

    /// Whether we still lead: false while leadership is at risk (see
    /// [`lost`](Leadership::lost)), and for good once our session or node is lost.
    pub fn is_leader(&self) -> bool {
        self.node.is_some() && self.monitor.is_held()
    }

    /// Resolves once leadership can no longer be counted on: the session is suspended (the
    /// server may expire it and another candidate take over before this client learns of
    /// it), lost or closed, the node was deleted, or the watch on it could not open or broke
    /// (a delete would go unseen). Stop leading then, as Curator's `LeaderSelector` does on
    /// `SUSPENDED`. A suspension can end with the same session and leadership kept, once a
    /// read made after the reconnection (or a watch opened again) shows the node: [`is_leader`](Leadership::is_leader) tells, and
    /// a later call waits again until the next risk or loss.
    pub async fn lost(&self) {
        self.monitor.lost().await
    }

    /// Steps down and waits until our candidate node is gone. If the delete fails for a
    /// reason that passes (connection suspended), the error is returned and the delete goes on
    /// in the background until the node is gone or its session ends.
    /// A future dropped before it returns leaves the delete to the background too.
    pub async fn resign(mut self) -> Result<()> {
        let Some(node) = self.node.clone() else {
            return Ok(());
        };
        let outcome = remove_node(self.registry.clone(), &node).await;
        // Kept until the delete was answered: a resign dropped midway leaves the removal to
        // `drop`, in the background.
        self.node = None;
        outcome
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            remove_in_background(self.registry.clone(), node, self.monitor.runtime.as_ref());
        }
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("token", &self.token())
            .field("leader", &self.is_leader())
            .finish()
    }
}

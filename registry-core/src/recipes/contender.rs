//! `Contender`: one ephemeral-sequential node in a queue of contenders, shared by the lock
//! and the election.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::node::{CreateMode, DeleteScope, Expected, Node};
use crate::path::NodePath;
use crate::registry::Registry;
use crate::session::SessionState;
use crate::watch::{WatchEvent, WatchOptions};

/// A node we created in the queue; deleted on drop unless handed over.
pub(crate) struct Contender {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) node: Node,
    armed: bool,
}

impl Contender {
    /// Creates our node `<dir>/<kind>-<token>-<counter>`. The random token lets us find our
    /// node again if the create's reply was lost.
    pub(crate) async fn enqueue(
        registry: Arc<dyn Registry>,
        dir: &NodePath,
        kind: &str,
        value: Bytes,
    ) -> Result<Contender> {
        let token: u64 = rand::thread_rng().gen();
        let prefix = dir.join(&format!("{kind}-{token:016x}-"))?;
        // Obtaining our node runs in a task of its own: if our caller is dropped meanwhile,
        // the task still sees the outcome and removes the node nobody will own.
        let (reply, answer) = tokio::sync::oneshot::channel();
        let (creator, dir) = (registry.clone(), dir.clone());
        let span = tracing::debug_span!("recipe_create", prefix = %prefix);
        tokio::spawn(
            async move {
                let created = match creator
                    .create(&prefix, value, CreateMode::EphemeralSequential)
                    .await
                {
                    Err(error) if error.is_retryable() => {
                        // The create may have happened: adopt it rather than orphan it.
                        let mine = creator.children(&dir).await.ok().and_then(|c| {
                            c.nodes
                                .into_iter()
                                .find(|n| n.path.name().starts_with(prefix.name()))
                        });
                        mine.ok_or(error)
                    }
                    other => other,
                };
                if let Err(Ok(orphan)) = reply.send(created) {
                    let _ = remove_node(&*creator, &orphan).await;
                }
            }
            .instrument(span),
        );
        let node = answer
            .await
            .unwrap_or_else(|_| Err(Error::unavailable("recipe create task ended")))?;
        Ok(Contender {
            registry,
            node,
            armed: true,
        })
    }

    /// Waits until our node is the oldest in `dir`, watching only the node just before it.
    /// Returns `Err(Error::SessionExpired)` if our node disappears (session lost, deleted):
    /// a lost session ends the wait at once, since our ephemeral node went with it while the
    /// predecessor we watch may stay.
    pub(crate) async fn wait_for_turn(&self, wake_ups: &AtomicU64) -> Result<()> {
        let dir = self
            .node
            .path
            .parent()
            .ok_or_else(|| Error::InvalidArgument("contender at the root".into()))?;
        let mut sessions = self.registry.session_events();
        // Each round either returns or waits for a predecessor to go away; the queue ahead
        // of us only shrinks, so the rounds are bounded by its length.
        loop {
            let children = self.registry.children(&dir).await?;
            let position = children
                .nodes
                .iter()
                .position(|n| n.path == self.node.path)
                .ok_or(Error::SessionExpired)?;
            if position == 0 {
                return Ok(());
            }
            let predecessor = &children.nodes[position - 1];
            let mut stream = self
                .registry
                .watch(&predecessor.path, WatchOptions::node())
                .await?;
            loop {
                tokio::select! {
                    status = sessions.next() => match status.map(|s| s.state) {
                        None | Some(SessionState::Closed) => return Err(Error::Closed),
                        Some(SessionState::Lost) => return Err(Error::SessionExpired),
                        Some(_) => {}
                    },
                    event = stream.next() => match event {
                        None => return Err(Error::Closed),
                        Some(Err(error)) => return Err(error),
                        Some(Ok(WatchEvent::Snapshot(s))) => {
                            if s.nodes.is_empty() {
                                break;
                            }
                        }
                        // Continuity was lost (reconnect, new session): look at the queue again.
                        Some(Ok(WatchEvent::Resync { .. })) | Some(Ok(WatchEvent::Deleted(_))) => {
                            break
                        }
                        Some(Ok(_)) => {}
                    },
                }
            }
            wake_ups.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deletes our node now (idempotent; a node already gone is fine).
    pub(crate) async fn remove(mut self) -> Result<()> {
        self.armed = false;
        remove_node(&*self.registry, &self.node).await
    }

    /// Hands the node over to a holder object that removes it itself.
    pub(crate) fn disarm(mut self) -> (Arc<dyn Registry>, Node) {
        self.armed = false;
        (self.registry.clone(), self.node.clone())
    }
}

pub(crate) async fn remove_node(registry: &dyn Registry, node: &Node) -> Result<()> {
    match registry
        .delete(&node.path, Expected::Any, DeleteScope::Node)
        .await
    {
        Ok(()) | Err(Error::NotFound { .. }) | Err(Error::Closed) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Deletes a node in the background (drop paths, where we cannot await).
pub(crate) fn remove_in_background(registry: Arc<dyn Registry>, node: Node) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            if let Err(error) = remove_node(&*registry, &node).await {
                tracing::warn!(path = %node.path, %error, "could not remove recipe node");
            }
        });
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        // A cancelled lock()/campaign() must not leave its node behind.
        if self.armed {
            remove_in_background(self.registry.clone(), self.node.clone());
        }
    }
}

/// Watches a held node and its session; flips `held` to false when either is lost.
pub(crate) struct HoldMonitor {
    registry: Arc<dyn Registry>,
    owner: Option<crate::node::SessionId>,
    held: Arc<AtomicBool>,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl HoldMonitor {
    pub(crate) fn start(registry: Arc<dyn Registry>, node: Node) -> HoldMonitor {
        let held = Arc::new(AtomicBool::new(true));
        let (lost_tx, lost) = watch::channel(false);
        let flag = held.clone();
        let owner = node.ephemeral_owner;
        let monitored = registry.clone();
        let span = tracing::debug_span!("recipe_hold", path = %node.path);
        let task = tokio::spawn(async move {
            let mut sessions = registry.session_events();
            let stream = registry.watch(&node.path, WatchOptions::node()).await;
            let mark_lost = |why: &str| {
                flag.store(false, Ordering::SeqCst);
                lost_tx.send_replace(true);
                tracing::warn!(path = %node.path, why, "recipe node lost");
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(_) => {
                    mark_lost("cannot watch the held node");
                    return;
                }
            };
            loop {
                tokio::select! {
                    status = sessions.next() => match status {
                        None => { mark_lost("registry closed"); return; }
                        Some(s) if matches!(s.state, SessionState::Lost | SessionState::Closed)
                            || (s.state.is_live() && s.session_id != owner && owner.is_some()) => {
                            mark_lost("session lost");
                            return;
                        }
                        Some(_) => {}
                    },
                    event = stream.next() => match event {
                        None | Some(Err(_)) => { mark_lost("watch on the held node ended"); return; }
                        Some(Ok(WatchEvent::Deleted(_))) => { mark_lost("held node deleted"); return; }
                        Some(Ok(WatchEvent::Snapshot(s))) | Some(Ok(WatchEvent::Resync { snapshot: s, .. })) => {
                            if !s.nodes.iter().any(|n| n.create_order == node.create_order) {
                                mark_lost("held node missing");
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                    },
                }
            }
        }
        .instrument(span));
        HoldMonitor {
            registry: monitored,
            owner,
            held,
            lost,
            task,
        }
    }

    /// Whether the node and its session are still ours, as far as we know.
    pub(crate) fn is_held(&self) -> bool {
        // Checked synchronously too, so a holder never believes in a session already lost.
        let session = self.registry.session();
        self.held.load(Ordering::SeqCst)
            && session.state.is_live()
            && session.session_id == self.owner
    }

    /// Resolves once the hold is lost.
    pub(crate) async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }
}

impl Drop for HoldMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

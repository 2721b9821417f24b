//! `Contender`: one ephemeral-sequential node in a queue of contenders, shared by the lock
//! and the election.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::node::{CreateMode, DeleteScope, Expected, Node};
use crate::path::{parse_sequence, NodePath, SEQUENCE_DIGITS};
use crate::registry::Registry;
use crate::session::SessionState;
use crate::watch::{WatchEvent, WatchOptions};

/// The name a lock's contenders start with.
pub(crate) const LOCK: &str = "lock";

/// The name an election's candidates start with.
pub(crate) const CANDIDATE: &str = "candidate";

/// Whether `node` takes a turn in a queue of `kind`: an ephemeral node named
/// `<kind>-<16 hex digits>-<counter>`, as [`Contender::enqueue`] makes them. Anything else
/// under the directory (another tool's node, an implicit parent on etcd) is no contender:
/// taken for one, it would stand first in the queue for good (as Curator filters a lock's
/// children by its lock name).
pub(crate) fn is_contender(node: &Node, kind: &str) -> bool {
    let name = node.path.name();
    let rest = name.strip_prefix(kind).and_then(|r| r.strip_prefix('-'));
    node.is_ephemeral()
        && rest.is_some_and(|rest| {
            rest.len() == 16 + 1 + SEQUENCE_DIGITS
                && rest
                    .get(..16)
                    .is_some_and(|token| token.bytes().all(|b| b.is_ascii_hexdigit()))
                && rest.as_bytes().get(16) == Some(&b'-')
                && parse_sequence(name).is_some()
        })
}

/// The kind of queue our own node `name` stands in (what precedes its token).
fn kind_of(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}

/// A node we created in the queue; deleted on drop unless handed over.
pub(crate) struct Contender {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) node: Node,
    armed: bool,
    /// The runtime it was made on, for a drop outside any (see [`remove_in_background`]).
    runtime: Option<tokio::runtime::Handle>,
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
        let (creator, dir) = (registry, dir.clone());
        let span = tracing::debug_span!("recipe_create", prefix = %prefix);
        tokio::spawn(
            async move {
                let (created, unknown) = match creator
                    .create(&prefix, value, CreateMode::EphemeralSequential)
                    .await
                {
                    Err(error) if error.is_retryable() => {
                        // The create may have happened: adopt it rather than orphan it. Not
                        // found yet, it may still be applied (an etcd Txn in the leader's log,
                        // a request the client sends once connected): unknown.
                        match find_own(&*creator, &dir, &prefix).await {
                            Ok(Some(mine)) => (Ok(mine), false),
                            Ok(None) | Err(_) => (Err(error), true),
                        }
                    }
                    other => (other, false),
                };
                // Handed over as an armed contender, not a bare node: if the caller is gone
                // before it reads the reply (even after the send succeeded), dropping the
                // reply removes the node nobody will own.
                let created = created.map(|node| Contender {
                    registry: creator.clone(),
                    node,
                    armed: true,
                    runtime: tokio::runtime::Handle::try_current().ok(),
                });
                match reply.send(created) {
                    Err(Ok(orphan)) => drop(orphan),
                    // Whether the create happened is still unknown: look again until the
                    // queue can be read, and remove what is found (nobody owns it).
                    Err(Err(_)) | Ok(()) if unknown => {
                        remove_lost_create(creator, dir, prefix).await
                    }
                    _ => {}
                }
            }
            .instrument(span),
        );
        answer
            .await
            .unwrap_or_else(|_| Err(Error::unavailable("recipe create task ended")))
    }

    /// Waits until our node is the oldest in `dir`, watching only the node just before it.
    /// Returns `Err(Error::SessionExpired)` if our node disappears (session lost, deleted):
    /// a lost session ends the wait at once, since our ephemeral node went with it while the
    /// predecessor we watch may stay. A failure that passes (a connection suspended) keeps
    /// our place: the wait goes on with backoff while the session lasts, up to
    /// [`WAIT_RETRY_ATTEMPTS`] failures in a row, as Curator's waiters ride out `SUSPENDED`.
    pub(crate) async fn wait_for_turn(&self, wake_ups: &AtomicU64) -> Result<()> {
        let dir = self
            .node
            .path
            .parent()
            .ok_or_else(|| Error::InvalidArgument("contender at the root".into()))?;
        let kind = kind_of(self.node.path.name());
        let mut sessions = self.registry.session_events();
        let mut backoff = Backoff::new(REMOVE_RETRY_INITIAL, REMOVE_RETRY_MAX);
        let mut failures = 0u32;
        // Each round either returns or ends when the predecessor goes away (or continuity
        // was lost); the queue ahead of us only shrinks, and failures in a row are bounded.
        loop {
            match self.wait_round(&dir, kind, &mut sessions).await {
                Ok(true) => return self.still_owned(),
                Ok(false) => {
                    failures = 0;
                    backoff.reset();
                    wake_ups.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) if error.is_retryable() && failures < WAIT_RETRY_ATTEMPTS => {
                    failures += 1;
                    self.still_owned()?;
                    tracing::debug!(%error, failures, "recipe wait failed; keeping our place");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        status = sessions.next() => {
                            if let Some(error) = session_ended(status, self.node.ephemeral_owner) {
                                return Err(error);
                            }
                        }
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One look at the queue: `true` if our node is first; else waits until the node just
    /// before it goes away (or continuity is lost) and returns `false`.
    async fn wait_round(
        &self,
        dir: &NodePath,
        kind: &str,
        sessions: &mut futures::stream::BoxStream<'static, crate::session::SessionStatus>,
    ) -> Result<bool> {
        let children = self.registry.children(dir).await?;
        let queue: Vec<&Node> = children
            .nodes
            .iter()
            .filter(|n| is_contender(n, kind))
            .collect();
        let position = queue
            .iter()
            .position(|n| n.path == self.node.path)
            .ok_or(Error::SessionExpired)?;
        let Some(predecessor) = position.checked_sub(1).and_then(|p| queue.get(p)) else {
            return Ok(true);
        };
        let mut stream = self
            .registry
            .watch(&predecessor.path, WatchOptions::node())
            .await?;
        loop {
            tokio::select! {
                status = sessions.next() => {
                    if let Some(error) = session_ended(status, self.node.ephemeral_owner) {
                        return Err(error);
                    }
                },
                event = stream.next() => match event {
                    None => return Err(Error::Closed),
                    Some(Err(error)) => return Err(error),
                    Some(Ok(WatchEvent::Snapshot(s))) => {
                        if s.nodes.is_empty() {
                            return Ok(false);
                        }
                    }
                    // Continuity was lost (reconnect, new session): look at the queue again.
                    Some(Ok(WatchEvent::Resync { .. })) | Some(Ok(WatchEvent::Deleted(_))) => {
                        return Ok(false)
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// `Ok` unless the session that owns our node is known to be over: a read may still
    /// list the node first after its session was lost (the server not yet done removing it,
    /// or a client that gave the session up before the server did), and a holder told so
    /// would act on a lock the next contender is about to get.
    pub(crate) fn still_owned(&self) -> Result<()> {
        match session_ended(Some(self.registry.session()), self.node.ephemeral_owner) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Deletes our node now (idempotent; a node already gone is fine); see [`remove_node`].
    pub(crate) async fn remove(mut self) -> Result<()> {
        let outcome = remove_node(self.registry.clone(), &self.node).await;
        // Armed until the delete was answered: dropped midway, `drop` removes the node.
        self.armed = false;
        outcome
    }

    /// Hands the node over to a holder object that removes it itself.
    pub(crate) fn disarm(mut self) -> (Arc<dyn Registry>, Node) {
        self.armed = false;
        (self.registry.clone(), self.node.clone())
    }
}

/// Why a node of session `owner` (a contender's, a holder's) is gone, if session status
/// `status` (`None`: the registry closed) says so: a lost session took the node with it.
/// A session other than the node's counts as lost even without the `Lost` before it (a
/// subscriber that lagged is handed the latest status in place of those it missed), live
/// or not; the first status handed out may be the `Reestablished` of the node's own.
fn session_ended(
    status: Option<crate::session::SessionStatus>,
    owner: Option<crate::node::SessionId>,
) -> Option<Error> {
    let status = match status {
        None => return Some(Error::Closed),
        Some(status) => status,
    };
    match status.state {
        SessionState::Closed => Some(Error::Closed),
        SessionState::Lost => Some(Error::SessionExpired),
        _ if owner.is_some() && status.session_id.is_some() && status.session_id != owner => {
            Some(Error::SessionExpired)
        }
        _ => None,
    }
}

/// Retry delays and attempts of a removal that goes on in the background: about ten
/// minutes, far past any session TTL, after which the node has gone with its session.
const REMOVE_RETRY_INITIAL: Duration = Duration::from_millis(100);
const REMOVE_RETRY_MAX: Duration = Duration::from_secs(5);
const REMOVE_ATTEMPTS: usize = 128;

/// Failures that pass, in a row, that a waiter rides out in its place, with the removal's
/// backoff (at most a minute or two, past any session TTL: by then its node has gone with
/// its session if the connection never came back; a session event cuts a pause short).
const WAIT_RETRY_ATTEMPTS: u32 = 32;

/// Our `<kind>-<token>-` node in `dir`, if the queue shows one.
async fn find_own(
    registry: &dyn Registry,
    dir: &NodePath,
    prefix: &NodePath,
) -> Result<Option<Node>> {
    let children = match registry.children(dir).await {
        // No queue yet: our create (which makes the directory) has not been applied.
        Err(Error::NotFound { .. }) => return Ok(None),
        other => other?,
    };
    Ok(children
        .nodes
        .into_iter()
        .find(|n| n.path.name().starts_with(prefix.name())))
}

/// One delete of `node`: `Ok` once it is gone (or the registry closed, which ends its session).
async fn delete_once(registry: &dyn Registry, node: &Node) -> Result<()> {
    match registry
        .delete(&node.path, Expected::Any, DeleteScope::Node)
        .await
    {
        Ok(()) | Err(Error::NotFound { .. }) | Err(Error::Closed) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Whether `node`'s session has ended for sure, so the server removed it: a new session is
/// live, or the registry closed.
fn session_gone(registry: &dyn Registry, node: &Node) -> bool {
    let session = registry.session();
    session.state == SessionState::Closed
        || (session.state.is_live() && session.session_id != node.ephemeral_owner)
}

/// Deletes our node. If the delete fails for a reason that passes (connection suspended), the
/// error is returned and the delete goes on in the background until the node is gone or its
/// session ends (Curator's guaranteed delete): a node left in the queue would block every
/// later contender for as long as our session lives.
pub(crate) async fn remove_node(registry: Arc<dyn Registry>, node: &Node) -> Result<()> {
    match delete_once(&*registry, node).await {
        Err(error) if error.is_retryable() => {
            tracing::info!(path = %node.path, %error, "recipe node removal continues in the background");
            remove_in_background(registry, node.clone(), None);
            Err(error)
        }
        other => other,
    }
}

/// Deletes `node` in a background task (drop paths, where we cannot await), retrying with
/// backoff while failures pass, until it is gone or its session ends. The task runs on the
/// current runtime, or else on `runtime` (where the holder was made): a guard dropped on a
/// thread of its own must still free the lock, which would otherwise stay taken for as
/// long as the session lives.
pub(crate) fn remove_in_background(
    registry: Arc<dyn Registry>,
    node: Node,
    runtime: Option<&tokio::runtime::Handle>,
) {
    let handle = tokio::runtime::Handle::try_current()
        .ok()
        .or_else(|| runtime.cloned());
    let Some(handle) = handle else {
        tracing::warn!(path = %node.path, "recipe node dropped outside a tokio runtime; it stays until its session ends");
        return;
    };
    let span = tracing::debug_span!("recipe_remove", path = %node.path);
    handle.spawn(
        async move {
            let mut backoff = Backoff::new(REMOVE_RETRY_INITIAL, REMOVE_RETRY_MAX);
            for _ in 0..REMOVE_ATTEMPTS {
                if session_gone(&*registry, &node) {
                    return;
                }
                match delete_once(&*registry, &node).await {
                    Ok(()) => return,
                    Err(error) if error.is_retryable() => {
                        tracing::debug!(%error, "recipe node removal failed; retrying");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not remove recipe node");
                        return;
                    }
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            tracing::warn!("gave up removing recipe node; it goes when its session ends");
        }
        .instrument(span),
    );
}

/// How long a create whose caller gave up may still be applied: a request the client sends
/// once it is connected again (within a session's life) or a Txn committed after a leader
/// change. A node of ours that appears within it is removed.
const LATE_CREATE_WINDOW: Duration = Duration::from_secs(30);

/// After a create whose outcome is unknown: reads the queue again with backoff, and removes
/// our node if the create happened, until [`LATE_CREATE_WINDOW`] has passed with the queue
/// read and no node of ours in it.
async fn remove_lost_create(registry: Arc<dyn Registry>, dir: NodePath, prefix: NodePath) {
    let mut backoff = Backoff::new(REMOVE_RETRY_INITIAL, REMOVE_RETRY_MAX);
    let window = tokio::time::Instant::now() + LATE_CREATE_WINDOW;
    for _ in 0..REMOVE_ATTEMPTS {
        tokio::time::sleep(backoff.next_delay()).await;
        match find_own(&*registry, &dir, &prefix).await {
            Ok(Some(orphan)) => {
                // Left in place it heads the queue for the session's lifetime: say so.
                // (A retryable failure goes on in the background, and is logged there.)
                match remove_node(registry, &orphan).await {
                    Err(error) if !error.is_retryable() => {
                        tracing::warn!(path = %orphan.path, %error, "could not remove the node of a create whose answer was lost; it stays until its session ends");
                    }
                    _ => {}
                }
                return;
            }
            // Read after the window with no node of ours: the create was never applied.
            Ok(None) if tokio::time::Instant::now() >= window => return,
            Ok(None) => {}
            Err(error) if error.is_retryable() => {}
            Err(error) => {
                tracing::warn!(%prefix, %error, "cannot look for a recipe node whose create failed");
                return;
            }
        }
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        // A cancelled lock()/campaign() must not leave its node behind.
        if self.armed {
            remove_in_background(
                self.registry.clone(),
                self.node.clone(),
                self.runtime.as_ref(),
            );
        }
    }
}

/// Retry delays of a held node's watch that could not open or broke.
const WATCH_RETRY_INITIAL: Duration = Duration::from_millis(50);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Watches a held node and its session; flips `held` to false when either is lost.
pub(crate) struct HoldMonitor {
    registry: Arc<dyn Registry>,
    owner: Option<crate::node::SessionId>,
    held: Arc<AtomicBool>,
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
    /// The runtime the hold was taken on, for a holder dropped outside any.
    pub(crate) runtime: Option<tokio::runtime::Handle>,
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
            let mark_lost = |why: &str| {
                flag.store(false, Ordering::SeqCst);
                lost_tx.send_replace(true);
                tracing::warn!(path = %node.path, why, "recipe node lost");
            };
            let at_risk = |why: &str| {
                if !*lost_tx.borrow() {
                    lost_tx.send_replace(true);
                    tracing::warn!(path = %node.path, why, "recipe node at risk");
                }
            };
            let held_again = |why: &str| {
                let session = registry.session();
                if *lost_tx.borrow() && session.state.is_live() && session.session_id == owner {
                    lost_tx.send_replace(false);
                    tracing::info!(path = %node.path, why, "recipe node held again");
                }
            };
            // A watch that cannot open, or breaks, for a reason that passes (the connection
            // dropped right after the node was taken) leaves the hold at risk, unwatched, and
            // is opened again after a delay for as long as the session lives; only its first
            // read can show the node is still there.
            let mut stream = None;
            let mut opened_at = tokio::time::Instant::now();
            let mut read = false;
            let mut reopen_at: Option<tokio::time::Instant> = None;
            let mut backoff = Backoff::new(WATCH_RETRY_INITIAL, WATCH_RETRY_MAX);
            loop {
                if stream.is_none() && reopen_at.is_none() {
                    match registry.watch(&node.path, WatchOptions::node()).await {
                        Ok(opened) => {
                            stream = Some(opened);
                            opened_at = tokio::time::Instant::now();
                            read = false;
                        }
                        Err(error) if error.is_retryable() => {
                            tracing::debug!(%error, "cannot watch the held node; retrying");
                            at_risk("cannot watch it");
                            reopen_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                        }
                        Err(_) => {
                            mark_lost("cannot watch the held node");
                            return;
                        }
                    }
                }
                let next_event = async {
                    match stream.as_mut() {
                        Some(stream) => stream.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    status = sessions.next() => {
                        match session_ended(status, owner) {
                            Some(Error::Closed) => { mark_lost("registry closed"); return; }
                            Some(_) => { mark_lost("session lost"); return; }
                            None => {}
                        }
                        match status.map(|s| s.state) {
                            // The server may expire the session and hand the node's place to
                            // the next contender before this client hears of it (a ZooKeeper
                            // client learns of an expiry up to 0.4 TTL late; an etcd client
                            // only once a member answers again): the holder must stop now, as
                            // Curator's recipes do on SUSPENDED. The hold itself may survive.
                            Some(SessionState::Suspended) => at_risk("session suspended"),
                            // Back with the same session, and the node seen since the watch
                            // (re)opened: held again once a read made now shows it, as the
                            // watch may still owe what happened during the cut (a ZooKeeper
                            // watch reads again after the reconnection).
                            Some(state) if state.is_live() && read => {
                                match registry.get(&node.path).await {
                                    Ok(now) if now.create_order == node.create_order => {
                                        held_again("session resumed");
                                    }
                                    Ok(_) | Err(Error::NotFound { .. }) => {
                                        mark_lost("held node gone while cut off");
                                        return;
                                    }
                                    // Still at risk, and a watch that resumes where it broke
                                    // (etcd's) may never read again: a new one will.
                                    Err(error) => {
                                        tracing::debug!(%error, "cannot read the held node after the reconnection; watching it anew");
                                        stream = None;
                                        read = false;
                                        reopen_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                                    }
                                }
                            }
                            _ => {}
                        }
                    },
                    event = next_event => match event {
                        Some(Err(error)) if error.is_retryable() => {
                            tracing::debug!(%error, "watch on the held node broke; reopening");
                            at_risk("its watch broke");
                            stream = None;
                            read = false;
                            // Only a watch that held a while starts the delays over.
                            if opened_at.elapsed() >= WATCH_RETRY_MAX {
                                backoff.reset();
                            }
                            reopen_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                        }
                        None | Some(Err(_)) => { mark_lost("watch on the held node ended"); return; }
                        Some(Ok(WatchEvent::Deleted(_))) => { mark_lost("held node deleted"); return; }
                        Some(Ok(WatchEvent::Snapshot(s))) | Some(Ok(WatchEvent::Resync { snapshot: s, .. })) => {
                            if !s.nodes.iter().any(|n| n.create_order == node.create_order) {
                                mark_lost("held node missing");
                                return;
                            }
                            if !read {
                                // How long this watch holds counts from its first read.
                                opened_at = tokio::time::Instant::now();
                            }
                            read = true;
                            held_again("node read again");
                        }
                        Some(Ok(_)) => {}
                    },
                    () = tokio::time::sleep_until(reopen_at.unwrap_or_else(tokio::time::Instant::now)),
                        if reopen_at.is_some() => reopen_at = None,
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
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Whether the node and its session are still ours, as far as we know, and not at risk
    /// (exactly when [`lost`](HoldMonitor::lost) would wait).
    pub(crate) fn is_held(&self) -> bool {
        // Checked synchronously too, so a holder never believes in a session already lost.
        let session = self.registry.session();
        self.held.load(Ordering::SeqCst)
            && !*self.lost.borrow()
            && session.state.is_live()
            && session.session_id == self.owner
    }

    /// Resolves while the hold is lost or at risk (its session suspended, or its node
    /// unwatched); once the same session is back and a read since shows the node, a later call
    /// waits again.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::SessionId;
    use crate::session::SessionStatus;

    fn status(state: SessionState, session: i64) -> Option<SessionStatus> {
        Some(SessionStatus {
            state,
            epoch: 1,
            session_id: Some(SessionId(session)),
        })
    }

    #[test]
    fn a_wait_for_our_turn_ends_with_any_sign_of_a_new_session() {
        let owner = Some(SessionId(7));
        let ends = |s| session_ended(s, owner);
        assert!(ends(status(SessionState::Connected, 7)).is_none());
        assert!(ends(status(SessionState::Suspended, 7)).is_none());
        // The node was made in the session re-established before the wait began.
        assert!(ends(status(SessionState::Reestablished, 7)).is_none());
        assert!(matches!(
            ends(status(SessionState::Lost, 7)),
            Some(Error::SessionExpired)
        ));
        // A lagging subscriber may be handed the new session without the Lost before it.
        assert!(matches!(
            ends(status(SessionState::Reestablished, 8)),
            Some(Error::SessionExpired)
        ));
        assert!(matches!(
            ends(status(SessionState::Connected, 8)),
            Some(Error::SessionExpired)
        ));
        // The new session, already suspended by the time the lagging subscriber reads.
        assert!(matches!(
            ends(status(SessionState::Suspended, 8)),
            Some(Error::SessionExpired)
        ));
        assert!(matches!(
            ends(status(SessionState::Closed, 7)),
            Some(Error::Closed)
        ));
        assert!(matches!(ends(None), Some(Error::Closed)));
    }
}

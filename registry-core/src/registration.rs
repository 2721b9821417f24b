//! `Registration`: a self-healing ephemeral node, built only on the [`Registry`] trait so it
//! behaves the same on every backend.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::node::{CreateMode, Node, Revision};
use crate::path::{parse_sequence, NodePath};
use crate::registry::{check_value, Registry};
use crate::session::SessionState;
use crate::watch::{WatchEvent, WatchOptions};

mod shared_watch;
pub use shared_watch::RegistrationWatches;

/// Options of [`Registry::register`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// The last path segment is a name prefix; the server appends a 10-digit counter, and each
    /// re-creation gets a new one (Dapeng's `ip:port:version:` instances).
    pub sequential: bool,
}

impl RegisterOptions {
    /// A plain ephemeral registration at the given path.
    pub fn new() -> Self {
        Self::default()
    }

    /// An ephemeral-sequential registration (see [`RegisterOptions::sequential`]).
    pub fn sequential(mut self) -> Self {
        self.sequential = true;
        self
    }
}

/// Where a registration stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// The node exists, owned by the current session, as shown.
    Registered(Node),
    /// The node is missing or not ours (session lost, deleted by someone, stale node); it is
    /// being re-created. `reason` says what happened or what the last attempt failed with.
    Recreating {
        /// Why.
        reason: String,
    },
    /// Removed by [`Registration::deregister`], or stopped by drop or by closing the registry.
    Deregistered,
}

struct Shared {
    registry: Arc<dyn Registry>,
    /// The requested path (for sequential registrations: parent + name prefix).
    requested: NodePath,
    sequential: bool,
    value: Mutex<Bytes>,
    /// Serialises re-creation, value updates and removal.
    op: tokio::sync::Mutex<()>,
    /// Wakes the healer to check the node (a value write found it not ours).
    recheck: tokio::sync::Notify,
    status: watch::Sender<RegistrationStatus>,
    /// The parent watches to share; without them, one node watch of its own.
    watches: Option<RegistrationWatches>,
    /// `create_order` of the last node this registration created or adopted.
    last_created: Mutex<Option<u64>>,
    /// This registration among the process's (see [`CLAIMS`]).
    id: u64,
    /// The node this registration holds in [`CLAIMS`], if any.
    claimed: Mutex<Option<ClaimKey>>,
}

impl Drop for Shared {
    /// A registration gone without its removal running (dropped where no runtime could run
    /// it, or on one shutting down) lets go of its claim, else it would outrank older
    /// registrations of the node for good.
    fn drop(&mut self) {
        release_claim(self);
    }
}

/// A node of a session: its path and owner.
type ClaimKey = (NodePath, i64);

/// Which live registration of this process holds each node. Registering a path again in the
/// same session (`reg = registry.register(..)`, replacing the handle) adopts the node the
/// first registration made; the adopter holds it from then on, and the first one's removal
/// leaves it alone instead of deleting it from under the adopter. Session IDs are unique per
/// server (and the in-memory backend's per process), so nodes of different clients never
/// share a key.
static CLAIMS: Mutex<BTreeMap<ClaimKey, u64>> = Mutex::new(BTreeMap::new());

/// The ID of the next registration (see [`CLAIMS`]).
static NEXT_REGISTRATION: AtomicU64 = AtomicU64::new(1);

fn claims() -> std::sync::MutexGuard<'static, BTreeMap<ClaimKey, u64>> {
    CLAIMS.lock().unwrap_or_else(|p| p.into_inner())
}

fn claim_key(node: &Node) -> Option<ClaimKey> {
    node.ephemeral_owner
        .map(|owner| (node.path.clone(), owner.0))
}

/// Publishes `node` as this registration's, which takes it over from any older registration
/// of the process that held it (a newer one, made to replace this one, keeps it: after a
/// session loss both adopt the new node, in either order), and lets go of the node it held
/// before.
fn set_registered(shared: &Shared, node: Node) {
    if let Some(key) = claim_key(&node) {
        let mut claimed = shared.claimed.lock().unwrap_or_else(|p| p.into_inner());
        let mut claims = claims();
        if let Some(old) = claimed.take().filter(|old| *old != key) {
            if claims.get(&old) == Some(&shared.id) {
                claims.remove(&old);
            }
        }
        // Ids grow with creation: a larger one is a newer registration.
        if claims.get(&key).is_none_or(|holder| *holder <= shared.id) {
            claims.insert(key.clone(), shared.id);
            *claimed = Some(key);
        }
    }
    shared
        .status
        .send_replace(RegistrationStatus::Registered(node));
}

/// Whether another live registration of this process holds `node` (it adopted it).
fn held_by_another(shared: &Shared, node: &Node) -> bool {
    claim_key(node).is_some_and(|key| claims().get(&key).is_some_and(|id| *id != shared.id))
}

/// Lets go of the node this registration holds, unless another one took it over.
fn release_claim(shared: &Shared) {
    let claimed = shared
        .claimed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(key) = claimed {
        let mut claims = claims();
        if claims.get(&key) == Some(&shared.id) {
            claims.remove(&key);
        }
    }
}

/// A self-healing ephemeral node, returned by [`Registry::register`].
///
/// Guarantees: while this handle lives and the registry is open, the node is re-created after
/// its session is lost, after anyone deletes it, and when a node of an older session sits at
/// its path (a restarted process's, say); the value last given to
/// [`set_value`](Registration::set_value) is the one re-created. A node created after this
/// registration's last one (another live registration of the same plain path) is left alone:
/// this one reports `Recreating` until that node goes, so two live registrations of one path
/// take turns instead of replacing each other forever. [`deregister`](Registration::deregister) removes it and returns only when it
/// is gone; dropping the handle removes it best-effort in the background. A node adopted by
/// another registration of this process (the path registered again in the same session) is
/// that one's to remove: removing this one leaves it in place.
pub struct Registration {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// Registrations of the same node elsewhere (a [`DualRegistry`](crate::DualRegistry)'s
    /// secondary) that live, take values and end with this one.
    companions: Vec<Registration>,
    /// The runtime it was made on: a registration dropped outside any still removes its
    /// node there, which would otherwise stay for as long as the session lives.
    runtime: Option<tokio::runtime::Handle>,
}

fn lock_value(shared: &Shared) -> Bytes {
    shared
        .value
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

const RETRY_INITIAL: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);
const DEREGISTER_DEADLINE: Duration = Duration::from_secs(10);
/// How long a failed `register` tries to remove what it may have created.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(2);

impl Registration {
    /// Creates the node through `registry` and starts healing it, watching the node on its
    /// own. This is the implementation behind a backend's [`Registry::register`]; `registry`
    /// is that backend.
    pub async fn start(
        registry: Arc<dyn Registry>,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        Self::start_with(registry, None, path, value, options).await
    }

    /// As [`start`](Registration::start), but the registration hears of its node through its
    /// parent's children watch in `watches`, shared with the client's other registrations
    /// under that parent: one server-side watch per parent instead of one per node. For
    /// backends whose watchers are costly in numbers (etcd). The shared watch asks for
    /// deletions only, so writes under the parent cost nothing. A node put over ours without
    /// a deletion (only a raw etcd client can: it overwrites the key) is therefore noticed
    /// only at the next check of the node: a session change, a re-read of the parent (a
    /// `Resync`), or a [`set_value`](Registration::set_value), which then re-creates ours.
    pub async fn start_shared(
        registry: Arc<dyn Registry>,
        watches: &RegistrationWatches,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        Self::start_with(registry, Some(watches.clone()), path, value, options).await
    }

    /// The input errors of [`Registry::register`], before any I/O and before a backend says
    /// `Closed`: the value's size, the root, and a sequential prefix that leaves no room for
    /// the counter's digits.
    pub fn check_input(path: &NodePath, value: &Bytes, options: &RegisterOptions) -> Result<()> {
        check_value(path, value)?;
        if path.is_root() {
            return Err(Error::root("register"));
        }
        if options.sequential {
            path.check_sequential_prefix()?;
        }
        Ok(())
    }

    async fn start_with(
        registry: Arc<dyn Registry>,
        watches: Option<RegistrationWatches>,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        Self::check_input(path, &value, &options)?;
        let (status, _) = watch::channel(RegistrationStatus::Recreating {
            reason: "registering".into(),
        });
        let shared = Arc::new(Shared {
            registry,
            requested: path.clone(),
            sequential: options.sequential,
            value: Mutex::new(value),
            op: tokio::sync::Mutex::new(()),
            recheck: tokio::sync::Notify::new(),
            status,
            watches,
            last_created: Mutex::new(None),
            id: NEXT_REGISTRATION.fetch_add(1, Ordering::Relaxed),
            claimed: Mutex::new(None),
        });
        // Subscribed before the create, the healer need not read the node back: a running
        // parent watch hands on every later deletion, and a new one's first snapshot is either
        // older than the node (skipped as outdated) or shows it as it is. A sequential node's
        // path is known only after the create.
        let watched = match &shared.watches {
            Some(watches) if !shared.sequential => {
                Some((path.clone(), watches.watch_node(&shared.registry, path)))
            }
            _ => None,
        };
        if let Err(error) = ensure(&shared).await {
            // The create may have happened (its reply lost, or the value update after it
            // failed): one attempt to leave nothing behind, as `register` promises.
            if error.is_retryable() || matches!(error, Error::VersionMismatch { .. }) {
                // Awaited, not in the background: a caller that retries at once would race a
                // background delete of this session's node at the same path.
                let deadline = tokio::time::Instant::now() + CLEANUP_DEADLINE;
                if let Ok(nodes) = own_nodes(&shared).await {
                    for node in nodes.iter().filter(|n| !held_by_another(&shared, n)) {
                        let _ = delete_own(&*shared.registry, node, deadline).await;
                    }
                }
                release_claim(&shared);
            }
            return Err(error);
        }
        let (stop, stop_rx) = watch::channel(false);
        let span = tracing::info_span!("registration", path = %path);
        let task = tokio::spawn(heal(shared.clone(), stop_rx, watched).instrument(span));
        Ok(Registration {
            shared,
            stop,
            task: Some(task),
            companions: Vec::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Ties `companions` to this registration: [`set_value`](Registration::set_value),
    /// [`deregister`](Registration::deregister) and drop apply to all of them; path and status
    /// stay this one's.
    pub fn with_companions(mut self, companions: Vec<Registration>) -> Registration {
        self.companions.extend(companions);
        self
    }

    /// The node's current path (for sequential registrations, with its counter), if it exists.
    pub fn path(&self) -> Option<NodePath> {
        current_node(&self.shared).map(|n| n.path)
    }

    /// The path given to [`Registry::register`] (for sequential ones, the name prefix).
    pub fn requested_path(&self) -> &NodePath {
        &self.shared.requested
    }

    /// The current status.
    pub fn status(&self) -> RegistrationStatus {
        self.shared.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch_status(&self) -> watch::Receiver<RegistrationStatus> {
        self.shared.status.subscribe()
    }

    /// Waits until the node is registered again (or `timeout` passes) and returns it.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<Node> {
        let mut rx = self.shared.status.subscribe();
        let wait = async {
            loop {
                let status = rx.borrow_and_update().clone();
                match status {
                    RegistrationStatus::Registered(node) => return Ok(node),
                    RegistrationStatus::Deregistered => return Err(Error::Closed),
                    RegistrationStatus::Recreating { .. } => {}
                }
                if rx.changed().await.is_err() {
                    return Err(Error::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout {
                operation: format!("waiting for registration {}", self.shared.requested),
                after: timeout,
            })?
    }

    /// Replaces the value: written now if this session's node exists, and used for every
    /// re-creation. The node is read first and written at the version read, only while it is
    /// this session's, so the write does not land in another session's node; if the node is gone or not ours, the
    /// status turns `Recreating` and the node is re-created with the new value. Returns the
    /// write's error if the node could not be written now (the new value is still kept for
    /// re-creation): `VersionMismatch` if others wrote the node before each of three tries,
    /// which leaves it registered with their value. With companions (a [`DualRegistry`](crate::DualRegistry)'s
    /// other side), every side takes the new value and the first failure is returned.
    pub async fn set_value(&self, value: Bytes) -> Result<()> {
        check_value(&self.shared.requested, &value)?;
        // Every side keeps the new value even if another side's write fails.
        let mut outcome = self.set_own_value(value.clone()).await;
        for companion in &self.companions {
            let written = Box::pin(companion.set_value(value.clone())).await;
            if outcome.is_ok() {
                outcome = written;
            }
        }
        outcome
    }

    async fn set_own_value(&self, value: Bytes) -> Result<()> {
        let _op = self.shared.op.lock().await;
        *self
            .shared
            .value
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = value.clone();
        if current_node(&self.shared).is_none() {
            return Ok(());
        }
        let registry = &*self.shared.registry;
        let path = self.path().unwrap_or_else(|| self.shared.requested.clone());
        // Read first, then write at the version read: after our session went, another process
        // may hold a node at this path at the very version ours had, which a write by version
        // alone would take over (and we would report as registered). Bounded: each round loses
        // to a write made since its read.
        let mut lost = None;
        for _ in 0..3 {
            let node = match registry.get(&path).await {
                Ok(node) if owned_by_current_session(&self.shared, &node) => node,
                // Ours, but the session is not live (suspended): it may come back as it was,
                // and then nothing would re-create the node with the new value.
                Ok(node)
                    if node.ephemeral_owner.is_some()
                        && node.ephemeral_owner == registry.session().session_id =>
                {
                    return Err(Error::unavailable(format!(
                        "{path}: the session is not live; the new value is kept for the node"
                    )));
                }
                Ok(_) | Err(Error::NotFound { .. }) => {
                    lost = None;
                    break;
                }
                Err(error) => return Err(error),
            };
            // Owner-checked: a node another session put here since the read keeps its value
            // (on ZooKeeper, unless it came within the one round trip of its own check).
            match registry.set_owned(&node, value.clone()).await {
                Ok(Some(written)) => {
                    // An answer that comes after the session went is about the lost
                    // session's node: the healer re-creates it with the new value. (A
                    // suspended session may come back as it was, with the node.)
                    let session = registry.session();
                    let gone = matches!(session.state, SessionState::Lost | SessionState::Closed);
                    if !gone
                        && written.ephemeral_owner.is_some()
                        && written.ephemeral_owner == session.session_id
                    {
                        set_registered(&self.shared, written);
                    } else {
                        set_recreating(&self.shared, "session lost during the value write");
                    }
                    return Ok(());
                }
                Err(error @ Error::VersionMismatch { .. }) => lost = Some(error),
                Ok(None) | Err(Error::NotFound { .. }) => {
                    lost = None;
                    break;
                }
                Err(error) => return Err(error),
            }
        }
        // Still ours, but written by someone else before each of our writes: it stays
        // registered with the value it has, and the new one waits for the next re-creation
        // (nothing is wrong with the node, so the healer would not re-create it).
        if let Some(error) = lost {
            return Err(error);
        }
        // Not ours any more: the healer re-creates it with the new value. Woken here, as a
        // node put over ours without a deletion (a raw etcd write) reaches no shared watch.
        set_recreating(&self.shared, "node no longer this session's");
        self.shared.recheck.notify_one();
        Ok(())
    }

    /// Stops healing and deletes the node; returns once it is gone (or was never there, or
    /// another registration of this process adopted it and keeps it).
    /// Retryable failures are retried for up to 10 s. A future dropped before it returns
    /// leaves the removal to the background, as dropping the registration does.
    pub async fn deregister(mut self) -> Result<()> {
        // The healer is stopped only after the removal, which it cannot undo (see `ensure`),
        // and not waited for, having nothing left to do. Its node watch has fired by then, so
        // dropping it costs the server nothing; one dropped unfired first is a remove-watch
        // request queued ahead of the delete. Its handle stays in `self` until then, so a
        // deregister dropped midway leaves the removal to `drop`.
        // Companions (the other backend's, for a DualRegistry) are removed at the same time.
        let companions = std::mem::take(&mut self.companions)
            .into_iter()
            .map(|companion| Box::pin(companion.deregister()));
        let (outcome, removed) =
            futures::future::join(remove(&self.shared), futures::future::join_all(companions))
                .await;
        self.stop.send_replace(true);
        drop(self.task.take());
        removed
            .into_iter()
            .fold(outcome, |first, next| first.and(next))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        self.stop.send_replace(true);
        let shared = self.shared.clone();
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone());
        if let Some(handle) = runtime {
            // Its own span: the registration's ended with the healer, and a drop may happen
            // under any span of the caller's.
            let span =
                tracing::info_span!(parent: None, "deregistration", path = %shared.requested);
            handle.spawn(
                async move {
                    let _ = task.await;
                    if let Err(error) = remove(&shared).await {
                        tracing::warn!(%error, "best-effort deregistration on drop failed");
                    }
                }
                .instrument(span),
            );
        } else {
            tracing::warn!(path = %shared.requested, "registration dropped outside a tokio runtime; its node stays until its session ends");
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("requested", &self.shared.requested)
            .field("status", &*self.shared.status.borrow())
            .finish()
    }
}

fn current_node(shared: &Shared) -> Option<Node> {
    match &*shared.status.borrow() {
        RegistrationStatus::Registered(node) => Some(node.clone()),
        _ => None,
    }
}

/// Whether `node` is an ephemeral node of the registry's session while that session is live:
/// the nodes a registration leaves alone.
fn owned_by_current_session(shared: &Shared, node: &Node) -> bool {
    let session = shared.registry.session();
    session.state.is_live()
        && node.ephemeral_owner.is_some()
        && node.ephemeral_owner == session.session_id
}

/// The current session, while it is live (`None`: no node can be this session's now).
fn live_session(shared: &Shared) -> Option<crate::node::SessionId> {
    let session = shared.registry.session();
    session
        .state
        .is_live()
        .then_some(session.session_id)
        .flatten()
}

/// The live session, or why `ensure` gives up without one (see [`not_live`]).
fn require_live(shared: &Shared) -> Result<crate::node::SessionId> {
    live_session(shared).ok_or_else(|| not_live(shared))
}

/// Why `ensure` gives up without a live session: `Closed` once the registry is closed, else
/// `Unavailable` (the healer tries again once the session is live).
fn not_live(shared: &Shared) -> Error {
    match shared.registry.session().state {
        SessionState::Closed => Error::Closed,
        _ => Error::unavailable(
            "the session is not live: the registration's node cannot be judged now",
        ),
    }
}

/// Whether `node` was created after the last node this registration created.
fn created_after_ours(shared: &Shared, node: &Node) -> bool {
    shared
        .last_created
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some_and(|ours| node.create_order > ours)
}

fn set_recreating(shared: &Shared, reason: impl Into<String>) {
    let reason = reason.into();
    shared.status.send_if_modified(|status| match status {
        RegistrationStatus::Deregistered => false,
        _ => {
            *status = RegistrationStatus::Recreating { reason };
            true
        }
    });
}

/// Re-creations in flight at once in this process. After a session loss every registration
/// wakes at the same moment; letting thousands hit the server together makes them time out
/// and retry, while a bounded number finishes sooner. 256 keeps etcd's create batcher at
/// four full batches (64 measured twice as slow for 10k re-registrations).
const CONCURRENT_ENSURES: usize = 256;

static ENSURE_PERMITS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(CONCURRENT_ENSURES);

/// Makes sure the node exists and belongs to the current session; creates or replaces it.
async fn ensure(shared: &Shared) -> Result<Node> {
    let _permit = ENSURE_PERMITS.acquire().await.map_err(|_| Error::Closed)?;
    let _op = shared.op.lock().await;
    if matches!(*shared.status.borrow(), RegistrationStatus::Deregistered) {
        return Err(Error::Closed);
    }
    // Ownership is judged by the live session: while it is suspended (the permit and the
    // lock can take a while) our own node would look like another session's.
    require_live(shared)?;
    let registry = &*shared.registry;
    let node = if shared.sequential {
        ensure_sequential(shared).await?
    } else {
        ensure_plain(shared).await?
    };
    let node = if node.value != lock_value(shared) {
        let written = registry
            .set_owned(&node, lock_value(shared))
            .await?
            .ok_or_else(|| Error::NotFound {
                path: node.path.clone(),
            })?;
        // An owner check that reads before it writes (ZooKeeper) can land on a node another
        // session put there since: that node is not ours to publish, nor to remove later.
        if !owned_by_current_session(shared, &written) {
            return Err(if live_session(shared).is_some() {
                Error::AlreadyExists { path: written.path }
            } else {
                not_live(shared)
            });
        }
        written
    } else {
        node
    };
    *shared
        .last_created
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(node.create_order);
    set_registered(shared, node.clone());
    Ok(node)
}

async fn ensure_plain(shared: &Shared) -> Result<Node> {
    let registry = &*shared.registry;
    let path = &shared.requested;
    // Bounded: each round either creates, adopts, or removes one stale node.
    for _ in 0..4 {
        match registry
            .create(path, lock_value(shared), CreateMode::Ephemeral)
            .await
        {
            Ok(node) => return Ok(node),
            Err(Error::AlreadyExists { .. }) => {}
            Err(error) if error.is_retryable() => {
                // The create may have happened before the connection failed.
                if let Ok(node) = registry.get(path).await {
                    if owned_by_current_session(shared, &node) {
                        return Ok(node);
                    }
                }
                return Err(error);
            }
            Err(error) => return Err(error),
        }
        match registry.get(path).await {
            Ok(node) if owned_by_current_session(shared, &node) => return Ok(node),
            // Ours, seen while the session is not live (it went suspended since `ensure`
            // checked): never removed as stale.
            Ok(node)
                if node.is_ephemeral() && node.ephemeral_owner == registry.session().session_id =>
            {
                return Err(not_live(shared));
            }
            // Created after our last node, so by a session alive then (a stale one creates
            // nothing): a live registration of the same path elsewhere. The newer one keeps
            // the path and we wait for it to go; replacing it would start a fight in which
            // the two replace each other forever.
            Ok(node) if node.is_ephemeral() && created_after_ours(shared, &node) => {
                return Err(Error::AlreadyExists { path: path.clone() });
            }
            Ok(node) if node.is_ephemeral() => {
                tracing::info!(path = %path, owner = ?node.ephemeral_owner, "replacing a stale ephemeral node of another session");
                // By owner: by version, it could remove a live peer's node created at the
                // same version after the stale one expired.
                match registry.delete_owned(&node).await {
                    Ok(_) | Err(Error::NotFound { .. }) | Err(Error::VersionMismatch { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(_) => return Err(Error::AlreadyExists { path: path.clone() }),
            Err(Error::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    // The nodes we removed kept coming back: a live session re-creates them (a live
    // registration elsewhere). Like one created after ours, it keeps the path: removing it
    // again would only go on with the fight.
    tracing::info!(path = %path, "the node keeps being re-created by another session; leaving it");
    Err(Error::AlreadyExists { path: path.clone() })
}

/// Sequential nodes under the parent with our prefix, created by session `owner` (none for
/// `None`).
async fn own_sequential_nodes(
    shared: &Shared,
    owner: Option<crate::node::SessionId>,
) -> Result<Vec<Node>> {
    let Some(parent) = shared.requested.parent() else {
        return Ok(Vec::new());
    };
    let prefix = shared.requested.name();
    let children = match shared.registry.children(&parent).await {
        Ok(children) => children.nodes,
        Err(Error::NotFound { .. }) => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    Ok(children
        .into_iter()
        .filter(|n| {
            let name = n.path.name();
            name.len() == prefix.len() + crate::path::SEQUENCE_DIGITS
                && name.starts_with(prefix)
                && parse_sequence(name).is_some()
                && owner.is_some()
                && n.ephemeral_owner == owner
        })
        .collect())
}

async fn ensure_sequential(shared: &Shared) -> Result<Node> {
    let registry = &*shared.registry;
    if let Some(node) = current_node(shared) {
        if let Ok(now) = registry.get(&node.path).await {
            if owned_by_current_session(shared, &now) {
                return Ok(now);
            }
        }
    }
    // Adopt a node an earlier attempt of this session created (the reply may have been lost),
    // rather than leaving it orphaned next to a duplicate.
    // Without a live session none would be found, and a duplicate created next to ours.
    let session = require_live(shared)?;
    let mut own = own_sequential_nodes(shared, Some(session)).await?;
    if let Some(newest) = own.pop() {
        // Left over by a lost reply; one another registration of the prefix holds is its.
        for extra in own.iter().filter(|n| !held_by_another(shared, n)) {
            let _ = registry.delete_owned(extra).await;
        }
        return Ok(newest);
    }
    match registry
        .create(
            &shared.requested,
            lock_value(shared),
            CreateMode::EphemeralSequential,
        )
        .await
    {
        Ok(node) => Ok(node),
        Err(error) if error.is_retryable() => {
            if let Ok(mut own) = own_sequential_nodes(shared, live_session(shared)).await {
                if let Some(node) = own.pop() {
                    return Ok(node);
                }
            }
            Err(error)
        }
        Err(error) => Err(error),
    }
}

/// The background task: watches the node and the session and re-creates when needed.
/// `watched`: a watch of the node subscribed before it was created, if any.
async fn heal(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut watched: Option<(NodePath, crate::watch::WatchStream)>,
) {
    let registry = shared.registry.clone();
    let mut sessions = registry.session_events();
    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
    let mut needs_ensure = false;
    // A node watch of its own is let go when the session is lost, and opened again only once
    // the node is back: kept, every registration's watch would re-arm in the new session (a
    // sync and a read each) all at once, ahead of the re-creations it is there to guard.
    let mut parked = false;
    loop {
        if *stop.borrow() {
            return;
        }
        // Without a live session a create can only fail; the next Connected/Reestablished
        // wakes us, which keeps thousands of registrations from hammering a lost session.
        if needs_ensure && registry.session().state.is_live() {
            match ensure(&shared).await {
                Ok(node) => {
                    needs_ensure = false;
                    // The node is back (a live session came before its Reestablished): watch.
                    parked = false;
                    backoff.reset();
                    tracing::info!(path = %node.path, "registered");
                    if watched.as_ref().map(|(p, _)| p) != Some(&node.path) {
                        watched = None;
                    }
                }
                Err(Error::Closed) => break,
                // A sequential create that finds its generated name taken (ZooKeeper, after
                // a migration wrote that name) has no node to watch for: it is retried below.
                Err(Error::AlreadyExists { path }) if !shared.sequential => {
                    // Another registration (or a persistent node) holds the path: its
                    // deletion reaches the watch and wakes us, so no polling.
                    tracing::info!(%path, "path held by another session's node; waiting for it to go");
                    set_recreating(&shared, format!("{path} is held by another session's node"));
                    needs_ensure = false;
                    parked = false;
                }
                Err(error) => {
                    // Retryable failures are expected while a session turns over.
                    if error.is_retryable() {
                        tracing::info!(%error, "re-registration failed; retrying");
                    } else {
                        tracing::warn!(%error, "re-registration failed; retrying");
                    }
                    set_recreating(&shared, error.to_string());
                    if sleep_or_stop(&mut stop, backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
        }
        if let (None, Some(watches)) = (&watched, &shared.watches) {
            let path = current_node(&shared)
                .map(|n| n.path)
                .unwrap_or_else(|| shared.requested.clone());
            let stream = watches.watch_node(&registry, &path);
            // Subscribed first, then read: any later change reaches the stream.
            match registry.get(&path).await {
                Ok(node) if owned_by_current_session(&shared, &node) => {}
                Err(Error::Closed) => break,
                Ok(_) | Err(_) => needs_ensure = true,
            }
            watched = Some((path, stream));
        }
        if watched.is_none() && !parked {
            let current = current_node(&shared);
            let path = current
                .as_ref()
                .map(|n| n.path.clone())
                .unwrap_or_else(|| shared.requested.clone());
            let mut options = WatchOptions::node();
            // Every change since the node as we know it is replayed, so the watch need not
            // read it again first (a server that cannot replay sends a Resync instead).
            if let Some(node) = current.filter(|_| registry.capabilities().watch_from_revision) {
                options = options.after(Revision(node.modify_order));
            }
            match registry.watch(&path, options).await {
                Ok(stream) => watched = Some((path, stream)),
                Err(Error::Closed) => break,
                Err(error) => {
                    tracing::debug!(%error, "watching the registration failed; retrying");
                    if sleep_or_stop(&mut stop, backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let next_event = async {
            match watched.as_mut() {
                Some((_, stream)) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = shared.recheck.notified() => needs_ensure = true,
            // A pending re-creation is re-checked at least every second, bounding any wait on
            // a session event that raced our last look at the state.
            _ = tokio::time::sleep(Duration::from_secs(1)), if needs_ensure || parked => {
                // A Reestablished can be missed (a lagging subscriber is handed the latest
                // status in place of those it missed): a live session ends the wait for it.
                if parked && registry.session().state.is_live() {
                    parked = false;
                    needs_ensure = true;
                }
            }
            status = sessions.next() => match status {
                None => break,
                Some(status) => match status.state {
                    SessionState::Closed => break,
                    SessionState::Lost => {
                        set_recreating(&shared, "session lost");
                        if shared.watches.is_none() {
                            watched = None;
                            parked = true;
                        }
                    }
                    SessionState::Reestablished => {
                        needs_ensure = true;
                        parked = false;
                    }
                    SessionState::Connected if needs_ensure => {}
                    _ => {}
                },
            },
            event = next_event => match event {
                None | Some(Err(_)) => {
                    // A watch that ended tells us nothing about the node: check it.
                    if matches!(event, Some(Err(Error::Closed))) {
                        break;
                    }
                    watched = None;
                    needs_ensure = true;
                    // A watch that failed may fail again at once: not in a tight loop.
                    if matches!(event, Some(Err(_)))
                        && sleep_or_stop(&mut stop, backoff.next_delay()).await
                    {
                        return;
                    }
                }
                Some(Ok(WatchEvent::Snapshot(snapshot)))
                | Some(Ok(WatchEvent::Resync { snapshot, .. })) => {
                    let ours = snapshot
                        .nodes
                        .iter()
                        .any(|n| owned_by_current_session(&shared, n));
                    // A parent's re-read can be older than our node's last write (it was
                    // queued behind a burst): it says nothing about the node as it is now.
                    let predates = shared.watches.is_some()
                        && current_node(&shared)
                            .is_some_and(|now| snapshot.revision.0 < now.modify_order);
                    if !ours && !predates {
                        needs_ensure = true;
                    }
                }
                Some(Ok(WatchEvent::Deleted(gone))) => {
                    let stale = current_node(&shared).is_some_and(|now| earlier(&gone, &now));
                    if !stale {
                        set_recreating(&shared, "node deleted");
                        needs_ensure = true;
                    }
                }
                Some(Ok(WatchEvent::Created(node))) | Some(Ok(WatchEvent::Updated(node))) => {
                    if !owned_by_current_session(&shared, &node) {
                        needs_ensure = true;
                    }
                }
            },
        }
    }
    shared.status.send_replace(RegistrationStatus::Deregistered);
}

/// Whether deleted node `gone` was an incarnation before `now`: a late event about it (the lost
/// session's node, after ours was already re-created) says nothing about the current one. A
/// shared watch's deletion may carry only its revision (it asks for deletions only); one older
/// than our node's creation is an earlier incarnation's, as every write to ours, and its
/// deletion, come after that.
fn earlier(gone: &Node, now: &Node) -> bool {
    (gone.ephemeral_owner.is_some() && gone.ephemeral_owner != now.ephemeral_owner)
        || (gone.create_order != 0 && gone.create_order < now.create_order)
        || (gone.modify_order != 0 && gone.modify_order < now.create_order)
}

/// Sleeps for `delay`; returns true if asked to stop meanwhile.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.changed() => true,
        _ = tokio::time::sleep(delay) => *stop.borrow(),
    }
}

async fn remove(shared: &Shared) -> Result<()> {
    let _op = shared.op.lock().await;
    let deadline = tokio::time::Instant::now() + DEREGISTER_DEADLINE;
    let mut backoff = Backoff::new(RETRY_INITIAL, Duration::from_secs(1));
    // Which nodes to remove must be known: "none found" after a failed read would return
    // Ok with a node left behind.
    let listed = loop {
        match own_nodes(shared).await {
            Err(error) if error.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            // Closed: the session ended and its ephemeral nodes with it.
            Err(Error::Closed) => break Ok(Vec::new()),
            other => break other,
        }
    };
    shared.status.send_replace(RegistrationStatus::Deregistered);
    let outcome = remove_listed(shared, listed, deadline).await;
    release_claim(shared);
    outcome
}

async fn remove_listed(
    shared: &Shared,
    listed: Result<Vec<Node>>,
    deadline: tokio::time::Instant,
) -> Result<()> {
    for node in listed? {
        if held_by_another(shared, &node) {
            tracing::debug!(path = %node.path, "node left to the registration that adopted it");
            continue;
        }
        delete_own(&*shared.registry, &node, deadline).await?;
    }
    Ok(())
}

/// The nodes to remove: the registered one, or while not registered (a create whose reply
/// was lost, a create whose value update then failed) any node of this session at its path,
/// live or suspended.
async fn own_nodes(shared: &Shared) -> Result<Vec<Node>> {
    if let Some(node) = current_node(shared) {
        return Ok(vec![node]);
    }
    let Some(owner) = shared.registry.session().session_id else {
        return Ok(Vec::new());
    };
    if shared.sequential {
        return own_sequential_nodes(shared, Some(owner)).await;
    }
    Ok(vec![Node::empty(shared.requested.clone(), Some(owner))])
}

/// Deletes `node` if it is still its owner's, retrying until `deadline`; a node of another
/// owner is left alone (ours expired; someone else's sits there).
async fn delete_own(
    registry: &dyn Registry,
    node: &Node,
    deadline: tokio::time::Instant,
) -> Result<()> {
    let mut backoff = Backoff::new(RETRY_INITIAL, Duration::from_secs(1));
    loop {
        match registry.delete_owned(node).await {
            Ok(_) | Err(Error::NotFound { .. }) | Err(Error::Closed) => return Ok(()),
            Err(error)
                if (error.is_retryable() || matches!(error, Error::VersionMismatch { .. }))
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::SessionId;

    fn node(owner: Option<i64>, created: u64, modified: u64) -> Node {
        Node {
            create_order: created,
            modify_order: modified,
            ..Node::empty(NodePath::new("/svc/a").unwrap(), owner.map(SessionId))
        }
    }

    #[test]
    fn a_deletion_is_told_apart_from_the_current_incarnation() {
        let now = node(Some(2), 10, 12);
        // Reported in full: by owner, or by creation.
        assert!(earlier(&node(Some(1), 10, 11), &now));
        assert!(earlier(&node(Some(2), 5, 6), &now));
        assert!(!earlier(&node(Some(2), 10, 12), &now));
        // Reported by a deletions-only watch that never saw the node: key and delete revision.
        assert!(earlier(&node(None, 0, 9), &now));
        assert!(!earlier(&node(None, 0, 13), &now));
        // Nothing to go by: taken as ours, which a re-check then settles.
        assert!(!earlier(&node(None, 0, 0), &now));
    }
}

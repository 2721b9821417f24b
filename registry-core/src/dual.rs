//! `DualRegistry`: one registry made of two, for moving a live system from one backend to
//! another (ZooKeeper to etcd) without a moment where a consumer sees no instance.
//!
//! Writes and registrations go to both; reads, watches and the session come from the
//! primary. With [`DualOptions::merge_reads`], reads and watches show the union of both
//! trees (the primary's node wins where both have one), so a consumer on the new backend also
//! sees the providers that have not moved yet.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use tracing::Instrument;

use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::migrate::put_persistent;
use crate::node::{Children, CreateMode, DeleteScope, Expected, Node, Revision};
use crate::path::NodePath;
use crate::registration::{RegisterOptions, Registration};
use crate::registry::Registry;
use crate::session::SessionStatus;
use crate::watch::{ResyncReason, Snapshot, WatchEvent, WatchOptions, WatchStream, WatchedState};

/// Options of a [`DualRegistry`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DualOptions {
    /// Reads (`get`, `exists`, `children`) and watches show both trees merged; where both hold
    /// a node at one path, the primary's is shown. `children` lists the primary's nodes first,
    /// then those only the secondary has, each part by `create_order`: the two sides' orders
    /// are separate counters, so age is comparable only within a side (run recipes such as
    /// elections on one backend, not on a merged view). Off by default: reads come from the
    /// primary alone.
    pub merge_reads: bool,
}

impl DualOptions {
    /// Reads from the primary only.
    pub fn new() -> Self {
        Self::default()
    }

    /// These options with [`merge_reads`](DualOptions::merge_reads) set.
    pub fn with_merge_reads(mut self, yes: bool) -> Self {
        self.merge_reads = yes;
        self
    }
}

/// A [`Registry`] over two others, for a migration: a provider registers through it on both
/// the old and the new backend; a consumer reads through it from the new backend while
/// seeing the old one too.
///
/// Guarantees:
/// - A write (`create`, `set`, `delete`) goes to the primary first; only if that succeeds is
///   it applied to the secondary. The secondary gets the exact path the primary created (a
///   sequential create is not counted twice) and unconditional writes (versions differ between
///   backends; the primary's check is the one that counts). A persistent node's write never
///   lands in a live session's ephemeral node on the secondary: it fails there with
///   [`Error::AlreadyExists`] (a `create` is then undone as below).
/// - A failed `create` on the secondary is undone on the primary, so the call either happened
///   on both or on neither (except for missing parents the primary's create made: they stay,
///   empty and persistent, as after any create that fails once its parents exist); if the undo fails too, the error says so and names the node left
///   on the primary only (remove it, or re-copy). A create whose answer the secondary lost
///   is read back there: found as this client's, it counts as done; not found, an ephemeral
///   one is removed there if it can be (a persistent one unseen may stay: re-copy). A
///   sequential name the secondary already holds (a node of its own counter's) is never
///   written over: the primary's node is undone and the create made again under the
///   primary's next name, up to 8 times. A failed `set` or `delete` on the secondary is returned as the
///   error; the primary keeps the write (retry it, or re-copy with `regctl copy`): a retried
///   `delete` finishes on the secondary although the primary's node is gone, then returns
///   the primary's [`Error::NotFound`]. A `set` of
///   another session's ephemeral node is copied only where the secondary has a node at its
///   path: one created there would belong to this client and outlive its owner.
/// - Writes through one `DualRegistry` (and its clones) are applied one at a time, in the
///   order they were called. A write runs to its end, undo included, even when its caller
///   stops waiting (a timeout drops the call's future), and later writes wait for it: a
///   cancelled call never leaves a write on the primary alone, nor lands after a later one.
///   Nothing orders the writes of two processes across the two registries: when two of them
///   write one persistent path at about the same time, the secondary may end with the value
///   the primary replaced (a mirror's write can land before the late one too). Check with
///   [`diff`](crate::migrate::diff) before switching over (the runbook's last step), and
///   [`copy`](crate::migrate::copy) again where it differs.
/// - [`register`](Registry::register) registers on both; each side heals itself after its own
///   session loss; the returned handle's path and status are the primary's, and deregistering
///   or dropping it removes both. A sequential registration has the primary's generated name
///   on the secondary too (registered there as a plain one) where the secondary's sequential
///   creates move past taken names ([`Capabilities::sequential_skips_taken`]; not on
///   ZooKeeper) and no node holds that name there; otherwise the secondary generates one.
///   After the primary re-creates its node under a new name (a session loss), the secondary
///   keeps the first name.
/// - Sessions, capabilities and (unless merging) reads and watches are the primary's.
/// - With [`DualOptions::merge_reads`], a watch delivers a snapshot once both sides have
///   delivered theirs, then the changes of the merged view, and a `Resync` whenever either
///   side resyncs, and ends when either side's stream ends. Revisions are the primary's;
///   a watch asked to start after a revision starts with a `Resync`
///   (`StartNotReplayable`) of the merged view instead, as on any backend that cannot replay.
///   The merged view serves consumers during a migration; it is not a whole registry: a
///   node's events may come from either side, each with that side's `modify_order` (not
///   comparable across sides, so not ordered per path), and a node one side lost stays in
///   view while the other side holds it (an ephemeral node until both sessions end). Run
///   under the conformance suite, it fails the cases that need those (the watch model
///   check, session faults that hit one side).
///
/// Cloning is cheap: the clones share the two registries.
#[derive(Clone)]
pub struct DualRegistry {
    primary: Arc<dyn Registry>,
    secondary: Arc<dyn Registry>,
    options: DualOptions,
    /// Taken by each write before it starts, and held by its task until it ends.
    writes: Arc<tokio::sync::Mutex<()>>,
    /// Paths whose delete succeeded on the primary and failed on the secondary: a retry
    /// finds the primary's node gone and must still finish there. Only this registry's own
    /// failures: a path another client deleted on the primary alone is not ours to touch.
    unfinished_deletes: Arc<std::sync::Mutex<BTreeSet<NodePath>>>,
}

/// Failed secondary deletes remembered for a retry at most; beyond, one is left to a re-copy.
const UNFINISHED_DELETES: usize = 4096;

impl DualRegistry {
    fn unfinished_deletes(&self) -> std::sync::MutexGuard<'_, BTreeSet<NodePath>> {
        self.unfinished_deletes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Both sides hold `path` and its ancestors again (a create makes missing parents): no
    /// delete of theirs is left to finish, and a later one is no retry.
    fn written(&self, path: &NodePath) {
        let mut unfinished = self.unfinished_deletes();
        if unfinished.is_empty() {
            return;
        }
        unfinished.remove(path);
        for ancestor in path.ancestors() {
            unfinished.remove(&ancestor);
        }
    }

    /// Combines two open registries.
    pub fn new(
        primary: Arc<dyn Registry>,
        secondary: Arc<dyn Registry>,
        options: DualOptions,
    ) -> DualRegistry {
        DualRegistry {
            primary,
            secondary,
            options,
            writes: Arc::default(),
            unfinished_deletes: Arc::default(),
        }
    }

    /// The registry that reads, watches and sessions come from.
    pub fn primary(&self) -> &Arc<dyn Registry> {
        &self.primary
    }

    /// The registry that receives a copy of every write.
    pub fn secondary(&self) -> &Arc<dyn Registry> {
        &self.secondary
    }

    /// Copies `node` (as the primary now has it) to the secondary. A persistent node never
    /// lands in a live session's ephemeral node there ([`Error::AlreadyExists`]): its value
    /// would go with that session. An ephemeral node missing there is created only if it is
    /// this client's: another session's, created by this client, would outlive its owner.
    async fn put_secondary(&self, node: &Node) -> Result<()> {
        if !node.is_ephemeral() {
            return put_persistent(&*self.secondary, &node.path, node.value.clone(), None)
                .await
                .map(|_| ());
        }
        match self
            .secondary
            .set(&node.path, node.value.clone(), Expected::Any)
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::NotFound { .. })
                if node.ephemeral_owner == self.primary.session().session_id =>
            {
                self.secondary
                    .create(&node.path, node.value.clone(), CreateMode::Ephemeral)
                    .await
                    .map(|_| ())
            }
            Err(Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Whether `found` on the secondary is the node of `value` (`ephemeral` or not) this
    /// client created there.
    fn is_own_copy(&self, found: &Node, value: &Bytes, ephemeral: bool) -> bool {
        let owner = if ephemeral {
            match self.secondary.session().session_id {
                Some(session) => Some(session),
                None => return false,
            }
        } else {
            None
        };
        found.ephemeral_owner == owner && found.value == *value
    }

    /// Removes the ephemeral node at `path` on the secondary if this client's session holds
    /// it (a create there whose answer was lost); best effort, as the node goes with the
    /// session anyway.
    async fn remove_own_ephemeral(&self, path: &NodePath) {
        if let Some(session) = self.secondary.session().session_id {
            let own = Node::empty(path.clone(), Some(session));
            if let Err(error) = self.secondary.delete_owned(&own).await {
                tracing::warn!(%path, %error, "a create's node may stay on the secondary until its session ends");
            }
        }
    }
}

impl std::fmt::Debug for DualRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DualRegistry")
            .field("primary", &self.primary.capabilities().backend)
            .field("secondary", &self.secondary.capabilities().backend)
            .field("options", &self.options)
            .finish()
    }
}

#[async_trait]
impl Registry for DualRegistry {
    fn capabilities(&self) -> Capabilities {
        let primary = self.primary.capabilities();
        if self.options.merge_reads {
            primary.with_watch_from_revision(false)
        } else {
            primary
        }
    }

    fn session(&self) -> SessionStatus {
        self.primary.session()
    }

    fn session_events(&self) -> BoxStream<'static, SessionStatus> {
        self.primary.session_events()
    }

    #[tracing::instrument(level = "debug", skip(self, value), fields(path = %path))]
    async fn create(&self, path: &NodePath, value: Bytes, mode: CreateMode) -> Result<Node> {
        let (this, path) = (self.clone(), path.clone());
        self.on_both(async move {
            let created = this.create_on_both(&path, value, mode).await?;
            this.written(&created.path);
            Ok(created)
        })
        .await
    }

    async fn get(&self, path: &NodePath) -> Result<Node> {
        match self.primary.get(path).await {
            Err(Error::NotFound { .. }) if self.options.merge_reads => {
                self.secondary.get(path).await
            }
            other => other,
        }
    }

    async fn exists(&self, path: &NodePath) -> Result<bool> {
        if self.primary.exists(path).await? {
            return Ok(true);
        }
        if self.options.merge_reads {
            return self.secondary.exists(path).await;
        }
        Ok(false)
    }

    #[tracing::instrument(level = "debug", skip(self, value), fields(path = %path))]
    async fn set(&self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node> {
        let (this, path) = (self.clone(), path.clone());
        self.on_both(async move {
            let node = this.primary.set(&path, value, expected).await?;
            this.put_secondary(&node).await?;
            this.written(&path);
            Ok(node)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(path = %path))]
    async fn delete(&self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()> {
        let (this, path) = (self.clone(), path.clone());
        self.on_both(async move {
            let primary = this.primary.delete(&path, expected, scope).await;
            match &primary {
                Ok(()) => {}
                // A retry of this registry's delete whose secondary half failed.
                Err(Error::NotFound { .. }) if this.unfinished_deletes().contains(&path) => {}
                Err(_) => return primary,
            }
            match this.secondary.delete(&path, Expected::Any, scope).await {
                Ok(()) | Err(Error::NotFound { .. }) => {
                    this.unfinished_deletes().remove(&path);
                    primary
                }
                Err(error) => {
                    let mut unfinished = this.unfinished_deletes();
                    if unfinished.len() < UNFINISHED_DELETES {
                        unfinished.insert(path.clone());
                    }
                    Err(error)
                }
            }
        })
        .await
    }

    async fn children(&self, path: &NodePath) -> Result<Children> {
        let primary = self.primary.children(path).await;
        if !self.options.merge_reads {
            return primary;
        }
        let secondary = self.secondary.children(path).await;
        let (primary, secondary) = match (primary, secondary) {
            // A real failure wins over NotFound: the node may exist on the side that failed.
            (Err(error), _) if !matches!(error, Error::NotFound { .. }) => return Err(error),
            (_, Err(error)) if !matches!(error, Error::NotFound { .. }) => return Err(error),
            (Err(_), Err(_)) => return Err(Error::NotFound { path: path.clone() }),
            (Err(_), Ok(s)) => (Children::default(), s),
            (Ok(p), Err(_)) => (p, Children::default()),
            (Ok(p), Ok(s)) => (p, s),
        };
        // The two sides' create orders are different counters (a ZooKeeper zxid, an etcd
        // revision): only the primary's nodes are ordered against each other, and they come
        // first, so the oldest node is the one a primary-only client also sees as oldest.
        let mut nodes = primary.nodes;
        nodes.sort_by_key(|n| n.create_order);
        let on_primary: BTreeSet<NodePath> = nodes.iter().map(|n| n.path.clone()).collect();
        let mut only_secondary: Vec<Node> = secondary
            .nodes
            .into_iter()
            .filter(|n| !on_primary.contains(&n.path))
            .collect();
        only_secondary.sort_by_key(|n| n.create_order);
        nodes.extend(only_secondary);
        let mut skipped = primary.skipped;
        skipped.extend(secondary.skipped);
        skipped.sort();
        skipped.dedup_by(|a, b| a.name == b.name);
        Ok(Children {
            nodes,
            revision: primary.revision,
            skipped,
        })
    }

    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream> {
        // Before the merge drops `after`: refused as on every backend.
        options.after.map(Revision::check_watch_after).transpose()?;
        if !self.options.merge_reads {
            return self.primary.watch(path, options).await;
        }
        // The merge needs every write of both sides to tell which nodes either still has. The
        // merged view has no history to replay from: a start after a revision is a fresh one.
        let every_event = WatchOptions {
            deletions_only: false,
            after: None,
            ..options.clone()
        };
        let primary = self.primary.watch(path, every_event.clone()).await?;
        let secondary = self.secondary.watch(path, every_event).await?;
        let merged = merge_watches(primary, secondary);
        let merged = match options.after {
            Some(_) => start_not_replayable(merged),
            None => merged,
        };
        Ok(options.filter(merged))
    }

    #[tracing::instrument(level = "debug", skip(self, value), fields(path = %path))]
    async fn register(
        &self,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        let primary = self
            .primary
            .register(path, value.clone(), options.clone())
            .await?;
        let secondary = match primary.path() {
            Some(generated)
                if options.sequential && self.secondary.capabilities().sequential_skips_taken =>
            {
                self.register_named(path, &generated, value, options).await
            }
            _ => self.secondary.register(path, value, options).await,
        };
        match secondary {
            Ok(secondary) => {
                self.written(path);
                Ok(primary.with_companions(vec![secondary]))
            }
            Err(error) => match primary.deregister().await {
                Ok(()) => Err(error),
                Err(undo) => Err(half_done(path, "register", error, undo)),
            },
        }
    }

    async fn close(&self) -> Result<()> {
        let primary = self.primary.close().await;
        let secondary = self.secondary.close().await;
        primary.and(secondary)
    }
}

impl DualRegistry {
    /// Runs a write of both sides in a task of its own, so that a caller who stops waiting
    /// cannot stop it between the primary and the secondary, after the writes called before
    /// it, so that one finishing after its caller gave up cannot land after a later one.
    async fn on_both<T: Send + 'static>(
        &self,
        write: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        // Taken before the task starts: a caller gone while waiting for its turn wrote nothing.
        let turn = self.writes.clone().lock_owned().await;
        let task = tokio::spawn(
            async move {
                let outcome = write.await;
                drop(turn);
                outcome
            }
            .in_current_span(),
        );
        match task.await {
            Ok(outcome) => outcome,
            Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(Error::Closed),
        }
    }

    /// Registers on the secondary under `generated`, the primary's name for the sequential
    /// `path`: the two counters differ, and a merged view would show one provider twice.
    /// Only where the secondary's own sequential creates move past a taken name (on
    /// ZooKeeper, a name ahead of its counter would block every other client's next one),
    /// and only if no node holds the name there: a registration would replace another
    /// session's node, so the node is created first, then adopted. Otherwise the secondary
    /// generates a name of its own.
    async fn register_named(
        &self,
        path: &NodePath,
        generated: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        let created = match self
            .secondary
            .create(generated, value.clone(), CreateMode::Ephemeral)
            .await
        {
            Ok(created) => created,
            Err(Error::AlreadyExists { .. }) => {
                return self.secondary.register(path, value, options).await
            }
            // The create may have happened (its answer lost): adopted if so, as `register`
            // leaves nothing behind when it fails.
            Err(error) if error.is_retryable() => match self.secondary.get(generated).await {
                Ok(found) if self.is_own_copy(&found, &value, true) => found,
                _ => {
                    self.remove_own_ephemeral(generated).await;
                    return Err(error);
                }
            },
            Err(error) => return Err(error),
        };
        let registered = self
            .secondary
            .register(generated, value, RegisterOptions::new())
            .await;
        if registered.is_err() {
            let _ = self.secondary.delete_owned(&created).await;
        }
        registered
    }

    /// `create` on the primary, then on the secondary; undone on the primary if the
    /// secondary's fails, and made again under the primary's next name where a sequential
    /// one's name is taken on the secondary.
    async fn create_on_both(
        &self,
        path: &NodePath,
        value: Bytes,
        mode: CreateMode,
    ) -> Result<Node> {
        let mut round = 1;
        loop {
            let node = self.primary.create(path, value.clone(), mode).await?;
            let Err(error) = self.copy_created(&node, mode).await else {
                return Ok(node);
            };
            tracing::warn!(path = %node.path, %error, "secondary create failed; undoing it on the primary");
            if let Err(undo) = self.undo_create(&node).await {
                return Err(half_done(&node.path, "create", error, undo));
            }
            let name_taken = mode.is_sequential() && matches!(error, Error::AlreadyExists { .. });
            if !name_taken || round == SEQUENTIAL_ROUNDS {
                return Err(error);
            }
            round += 1;
        }
    }

    /// Creates on the secondary, at its exact path, the node the primary just created.
    async fn copy_created(&self, node: &Node, mode: CreateMode) -> Result<()> {
        let plain = if mode.is_ephemeral() {
            CreateMode::Ephemeral
        } else {
            CreateMode::Persistent
        };
        let error = match self
            .secondary
            .create(&node.path, node.value.clone(), plain)
            .await
        {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        match error {
            // A persistent node already there (copied or mirrored earlier) takes the value; a
            // live session's ephemeral node there refuses it (and the create is undone). Not
            // under a sequential name: the node there is another's, of the secondary's counter.
            Error::AlreadyExists { .. } if !mode.is_ephemeral() && !mode.is_sequential() => {
                put_persistent(&*self.secondary, &node.path, node.value.clone(), None)
                    .await
                    .map(|_| ())
            }
            // The create may have happened (its answer lost): read it back.
            error if error.is_retryable() => match self.secondary.get(&node.path).await {
                Ok(found) if self.is_own_copy(&found, &node.value, node.is_ephemeral()) => Ok(()),
                _ => {
                    if node.is_ephemeral() {
                        self.remove_own_ephemeral(&node.path).await;
                    }
                    Err(error)
                }
            },
            error => Err(error),
        }
    }

    /// Removes `node`, just created on the primary, as long as it is still the one created.
    /// An ephemeral node is removed while it belongs to this session, whatever writes others
    /// made to it meanwhile; a persistent one only at its version (after another writer's
    /// change it is no longer ours to remove).
    async fn undo_create(&self, node: &Node) -> Result<()> {
        if node.ephemeral_owner.is_none() {
            return match self
                .primary
                .delete(
                    &node.path,
                    Expected::Version(node.version),
                    DeleteScope::Node,
                )
                .await
            {
                Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
                Err(error) => Err(error),
            };
        }
        // A version mismatch here only means a write raced with the owner check.
        let mut round = 1;
        loop {
            match self.primary.delete_owned(node).await {
                Ok(_) => return Ok(()),
                Err(Error::VersionMismatch { .. }) if round < UNDO_ROUNDS => round += 1,
                Err(error) => return Err(error),
            }
        }
    }
}

/// Attempts at removing an ephemeral node that other writers keep changing.
const UNDO_ROUNDS: usize = 3;

/// Primary names a sequential create through a [`DualRegistry`] tries before it gives up on
/// finding one the secondary does not hold ([`Error::AlreadyExists`] then).
const SEQUENTIAL_ROUNDS: usize = 8;

/// The secondary's failure to `operation` at `path`, when undoing it on the primary failed
/// too: the node is left on the primary only, and the error says so.
fn half_done(path: &NodePath, operation: &str, error: Error, undo: Error) -> Error {
    tracing::error!(%path, %error, %undo, "left on the primary only");
    Error::Backend {
        backend: "dual",
        message: format!(
            "{operation} {path} failed on the secondary ({error}) and undoing it on the primary \
             failed too ({undo}): {path} is on the primary only"
        ),
        source: Some(Box::new(error)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Secondary,
}

/// The merged view of two watches and what it last delivered.
struct Merge {
    primary: WatchedState,
    secondary: WatchedState,
    primary_ready: bool,
    secondary_ready: bool,
    /// Whether the merged snapshot went out (then every snapshot of a side is a resync).
    started: bool,
}

impl Merge {
    fn merged(&self, path: &NodePath) -> Option<&Node> {
        self.primary.get(path).or_else(|| self.secondary.get(path))
    }

    fn snapshot(&self) -> Snapshot {
        let mut nodes: BTreeMap<NodePath, Node> = self
            .secondary
            .nodes()
            .map(|n| (n.path.clone(), n.clone()))
            .collect();
        nodes.extend(self.primary.nodes().map(|n| (n.path.clone(), n.clone())));
        Snapshot {
            nodes: nodes.into_values().collect(),
            revision: self.primary.revision(),
        }
    }

    /// Applies one side's event; returns what the merged view's consumer must see.
    fn apply(&mut self, side: Side, event: WatchEvent) -> Vec<WatchEvent> {
        let touched: BTreeSet<NodePath> = match &event {
            WatchEvent::Created(n) | WatchEvent::Updated(n) | WatchEvent::Deleted(n) => {
                std::iter::once(n.path.clone()).collect()
            }
            WatchEvent::Snapshot(_) | WatchEvent::Resync { .. } => BTreeSet::new(),
        };
        let before: Vec<Option<Node>> = touched.iter().map(|p| self.merged(p).cloned()).collect();
        let reason = match &event {
            WatchEvent::Resync { reason, .. } => Some(reason.clone()),
            _ => None,
        };
        let whole = matches!(event, WatchEvent::Snapshot(_) | WatchEvent::Resync { .. });
        match side {
            Side::Primary => {
                self.primary.apply(&event);
                self.primary_ready |= whole;
            }
            Side::Secondary => {
                self.secondary.apply(&event);
                self.secondary_ready |= whole;
            }
        }
        if !(self.primary_ready && self.secondary_ready) {
            return Vec::new();
        }
        if !self.started {
            self.started = true;
            return vec![WatchEvent::Snapshot(self.snapshot())];
        }
        if whole {
            return vec![WatchEvent::Resync {
                snapshot: self.snapshot(),
                reason: reason.unwrap_or(ResyncReason::Reconnected),
            }];
        }
        let mut out = Vec::new();
        for (path, before) in touched.iter().zip(before) {
            match (before, self.merged(path).cloned()) {
                (None, Some(now)) => out.push(WatchEvent::Created(now)),
                (Some(was), Some(now)) if was != now => out.push(WatchEvent::Updated(now)),
                (Some(was), None) => out.push(WatchEvent::Deleted(was)),
                _ => {}
            }
        }
        out
    }
}

/// `stream` with its first snapshot turned into a `Resync` (`StartNotReplayable`): what a
/// watch asked to start after a revision it cannot replay from begins with.
fn start_not_replayable(stream: WatchStream) -> WatchStream {
    let mut first = true;
    stream
        .map(move |item| {
            let starts = std::mem::replace(&mut first, false);
            match item {
                Ok(WatchEvent::Snapshot(snapshot)) if starts => Ok(WatchEvent::Resync {
                    snapshot,
                    reason: ResyncReason::StartNotReplayable,
                }),
                other => other,
            }
        })
        .boxed()
}

/// One stream showing the union of two watches of the same path and scope.
fn merge_watches(primary: WatchStream, secondary: WatchStream) -> WatchStream {
    // `None` marks a side's end: without it the merged stream would go on with a side gone
    // (its registry closed), showing that side's last nodes forever.
    let tagged = stream::select(
        primary
            .map(|item| (Side::Primary, Some(item)))
            .chain(stream::iter([(Side::Primary, None)])),
        secondary
            .map(|item| (Side::Secondary, Some(item)))
            .chain(stream::iter([(Side::Secondary, None)])),
    );
    let state = Merge {
        primary: WatchedState::new(),
        secondary: WatchedState::new(),
        primary_ready: false,
        secondary_ready: false,
        started: false,
    };
    let pending: VecDeque<Result<WatchEvent>> = VecDeque::new();
    stream::unfold(
        (tagged, state, pending, false),
        |(mut tagged, mut state, mut pending, mut ended)| async move {
            loop {
                if let Some(item) = pending.pop_front() {
                    return Some((item, (tagged, state, pending, ended)));
                }
                if ended {
                    return None;
                }
                match tagged.next().await {
                    None | Some((_, None)) => return None,
                    Some((_, Some(Err(error)))) => {
                        // Either side failing ends the merged stream, as one watch would.
                        ended = true;
                        pending.push_back(Err(error));
                    }
                    Some((side, Some(Ok(event)))) => {
                        pending.extend(state.apply(side, event).into_iter().map(Ok));
                    }
                }
            }
        },
    )
    .boxed()
}

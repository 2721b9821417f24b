//! Moving a tree between registries: [`diff`], [`copy`] and a live [`Mirror`], built only on
//! the [`Registry`] trait so they work between any two backends (ZooKeeper to etcd above all).
//!
//! All three deal in persistent nodes: ephemeral nodes belong to the sessions that created
//! them and move when their owners re-register (see [`DualRegistry`](crate::DualRegistry)).
//! Nodes are copied by name, so sequence counters are not: after copying `/q/item0000000005`,
//! a sequential create under `/q` in the target still starts from its own counter (etcd and
//! the in-memory backend skip names that are taken), so its names are unique but may sort
//! before copied ones. Order such nodes by `create_order`, or create them on one backend.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::node::{CreateMode, Node};
use crate::path::NodePath;
use crate::registry::Registry;
use crate::watch::{WatchEvent, WatchOptions};

/// Reads every persistent node at and below `root` (the root `/` itself excluded), by path.
///
/// Ephemeral nodes and whatever is below them are left out. A missing `root` gives an empty
/// map. Nodes deleted during the walk are skipped, so the result is a consistent picture
/// only of a tree that is not changing. A persistent child no [`NodePath`] can name (see
/// [`Children::skipped`](crate::Children::skipped)) fails the walk with an
/// [`Error::Backend`] that names it: a copy or diff that left it out would report success
/// for a tree it did not see whole.
pub async fn persistent_tree(
    registry: &dyn Registry,
    root: &NodePath,
) -> Result<BTreeMap<NodePath, Node>> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.clone()];
    while let Some(path) = pending.pop() {
        match registry.get(&path).await {
            Ok(node) if node.is_ephemeral() => continue,
            Ok(node) => {
                if !path.is_root() {
                    out.insert(path.clone(), node);
                }
            }
            Err(Error::NotFound { .. }) => continue,
            Err(error) => return Err(error),
        }
        match registry.children(&path).await {
            Ok(children) if children.skipped.iter().any(|s| !s.ephemeral) => {
                return Err(unnamable(&path, &children.skipped))
            }
            Ok(children) => pending.extend(
                children
                    .nodes
                    .into_iter()
                    .filter(|n| !n.is_ephemeral())
                    .map(|n| n.path),
            ),
            Err(Error::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(out)
}

/// Whether `node` is an implicit parent: an etcd key's parent that has no key of its own
/// (see [`Node::create_order`]). It reads as an empty persistent node, but only a create
/// gives it a value, and it goes with its last child.
fn is_implicit(node: &Node) -> bool {
    node.create_order == 0 && !node.path.is_root()
}

/// Whether `node` already holds `value` as a node of its own: nothing to write.
fn holds_value(node: &Node, value: &[u8]) -> bool {
    node.value == value && !is_implicit(node)
}

/// The error for persistent children of `parent` that no [`NodePath`] can name.
fn unnamable(parent: &NodePath, skipped: &[crate::SkippedChild]) -> Error {
    let names: Vec<&str> = skipped
        .iter()
        .filter(|s| !s.ephemeral)
        .map(|s| s.name.as_str())
        .collect();
    let first = names.first().copied().unwrap_or_default();
    let reason = match parent.join(first) {
        Err(error) => error.to_string(),
        Ok(_) => "not a valid name".to_owned(),
    };
    Error::Backend {
        backend: "migrate",
        message: format!(
            "{parent} has {} child(ren) this library cannot name, first {first:?} ({reason}); \
             rename or remove them, or work on a subtree without them",
            names.len()
        ),
        source: None,
    }
}

/// How a node differs between two trees (see [`diff`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DifferenceKind {
    /// In the source, not in the target.
    Missing,
    /// In the target, not in the source.
    Extra,
    /// In both, with different values.
    Different,
}

impl DifferenceKind {
    /// `missing`, `extra` or `different`.
    pub fn as_str(self) -> &'static str {
        match self {
            DifferenceKind::Missing => "missing",
            DifferenceKind::Extra => "extra",
            DifferenceKind::Different => "different",
        }
    }
}

/// One node that differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// How.
    pub kind: DifferenceKind,
    /// Where.
    pub path: NodePath,
}

/// The persistent nodes at and below `root` that are missing from, extra in, or different in
/// `to` compared with `from`, ordered by path. Values are compared byte for byte; versions and
/// orders are not (they are each backend's own). Empty means equal. A node the source has
/// that is only an implicit parent in the target (an etcd key's parent with no key of its
/// own, which goes with its last child) is missing there.
///
/// Fails with [`Error::NotFound`] if `root` exists in neither registry: a mistyped path or
/// chroot would otherwise compare equal.
pub async fn diff(
    from: &dyn Registry,
    to: &dyn Registry,
    root: &NodePath,
) -> Result<Vec<Difference>> {
    let source = persistent_tree(from, root).await?;
    let target = persistent_tree(to, root).await?;
    // A mistyped path or chroot must not pass for two equal trees.
    if source.is_empty()
        && target.is_empty()
        && !root.is_root()
        && !from.exists(root).await?
        && !to.exists(root).await?
    {
        return Err(Error::NotFound { path: root.clone() });
    }
    let mut out = Vec::new();
    for (path, node) in &source {
        let kind = match target.get(path) {
            None => DifferenceKind::Missing,
            Some(other) if other.value != node.value => DifferenceKind::Different,
            // An etcd parent with no key of its own goes with its last child.
            Some(other) if is_implicit(other) && !is_implicit(node) => DifferenceKind::Missing,
            Some(_) => continue,
        };
        out.push(Difference {
            kind,
            path: path.clone(),
        });
    }
    out.extend(
        target
            .keys()
            .filter(|p| !source.contains_key(*p))
            .map(|p| Difference {
                kind: DifferenceKind::Extra,
                path: p.clone(),
            }),
    );
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Options of [`copy`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyOptions {
    /// Count what would change, change nothing.
    pub dry_run: bool,
}

/// What a [`copy`] did (or, dry, would do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopySummary {
    /// Nodes created in the target.
    pub created: usize,
    /// Nodes whose value was replaced.
    pub updated: usize,
    /// Nodes already equal.
    pub unchanged: usize,
    /// Nodes deleted from the source (or turned ephemeral there) while the copy ran, so not
    /// copied.
    pub gone: usize,
}

/// Copies the persistent nodes at and below `root` from `from` to `to`, parents first.
///
/// Guarantees: idempotent and resumable: a node already equal is not written, so running it
/// again after an interruption finishes the job and never duplicates anything. Nodes only in
/// the target are left alone (a [`Mirror`] removes them). `progress(done, total)` is called
/// after each node. Nothing is written with [`CopyOptions::dry_run`].
///
/// Fails with [`Error::NotFound`] if `root` does not exist in the source (a mistyped path or
/// chroot would otherwise copy nothing, successfully), and with [`Error::ValueTooLarge`],
/// before reading the target, if a source value is over [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN)
/// (ZooKeeper holds values up to its 1 MiB `jute.maxbuffer`). Fails with [`Error::AlreadyExists`],
/// before writing anything (dry run or not), if the target holds a path of the source as an
/// ephemeral node: writing into it would tie the copied value to that node's session (and
/// nothing can be created below it), replacing it would remove a live registration; with
/// [`Error::EphemeralParent`] likewise if it holds a parent of `root` as one. A node that turns ephemeral (or gets an ephemeral
/// parent) after that check, once writing has begun, fails the copy with an
/// [`Error::Backend`] that names it and says how many nodes were written (its source is the
/// `AlreadyExists` or `EphemeralParent`); running the copy again once that session is gone
/// finishes the job.
///
/// Writers may keep writing both registries meanwhile (a [`DualRegistry`](crate::DualRegistry)):
/// each node is written from a fresh read of the source, created only while absent, and an
/// update that another write came between (the version moved by more than one) is redone
/// from fresh reads of both (bounded). So a copy does not leave an older value over a newer
/// one a writer put in both, nor bring back a node deleted from both before the copy read
/// the source again. (Nothing spans two registries: a node a writer deletes from both
/// within the round trip between that read and the copy's write can come back; `diff`
/// finds it.) A source node gone by then is counted in [`CopySummary::gone`].
pub async fn copy(
    from: &dyn Registry,
    to: &dyn Registry,
    root: &NodePath,
    options: CopyOptions,
    mut progress: impl FnMut(usize, usize) + Send,
) -> Result<CopySummary> {
    let source = persistent_tree(from, root).await?;
    if source.is_empty() && !root.is_root() && !from.exists(root).await? {
        return Err(Error::NotFound { path: root.clone() });
    }
    // A value no target takes must stop the copy before its first write, not halfway.
    for (path, node) in &source {
        crate::check_value(path, &node.value)?;
    }
    let total = source.len();
    let mut summary = CopySummary::default();
    // Every target node is read before the first write, so a conflict writes nothing.
    for parent in root.ancestors().into_iter().filter(|p| !p.is_root()) {
        match to.get(&parent).await {
            Ok(existing) if existing.is_ephemeral() => {
                return Err(Error::EphemeralParent {
                    path: root.clone(),
                    parent,
                })
            }
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    let mut writes = Vec::new();
    for (path, node) in &source {
        match to.get(path).await {
            Ok(existing) if existing.is_ephemeral() => {
                return Err(Error::AlreadyExists { path: path.clone() })
            }
            Ok(existing) if holds_value(&existing, &node.value) => {
                summary.unchanged += 1;
                progress(summary.unchanged, total);
            }
            // A keyless etcd parent gets its key: created.
            Ok(existing) if !is_implicit(&existing) => {
                summary.updated += 1;
                writes.push((path, true));
            }
            Ok(_) | Err(Error::NotFound { .. }) => {
                summary.created += 1;
                writes.push((path, false));
            }
            Err(error) => return Err(error),
        }
    }
    if options.dry_run {
        progress(total, total);
        return Ok(summary);
    }
    // Paths sort before their descendants, so each create finds its parent.
    let (planned, done_before) = (writes.len(), summary.unchanged);
    summary.created = 0;
    summary.updated = 0;
    for (done, (path, existed)) in writes.into_iter().enumerate() {
        match copy_node(from, to, path).await {
            Ok(Copied::Written) if existed => summary.updated += 1,
            Ok(Copied::Written) => summary.created += 1,
            Ok(Copied::Unchanged) => summary.unchanged += 1,
            Ok(Copied::Gone) => summary.gone += 1,
            // Not the up-front refusal, which means nothing was written: the caller must
            // know how far the copy got.
            Err(taken @ (Error::AlreadyExists { .. } | Error::EphemeralParent { .. })) => {
                return Err(Error::Backend {
                    backend: "copy",
                    message: format!(
                        "in the target, {path} (or a parent of it) became a live session's \
                         ephemeral node during the copy, after {} of {planned} nodes were \
                         written; copy again once it is gone",
                        summary.created + summary.updated
                    ),
                    source: Some(Box::new(taken)),
                })
            }
            // Not the up-front refusal either.
            Err(large @ Error::ValueTooLarge { .. }) => {
                return Err(Error::Backend {
                    backend: "copy",
                    message: format!(
                        "in the source, {path} grew over the value limit during the copy, after \
                         {} of {planned} nodes were written",
                        summary.created + summary.updated
                    ),
                    source: Some(Box::new(large)),
                })
            }
            Err(error) => return Err(error),
        }
        progress(done_before + done + 1, total);
    }
    Ok(summary)
}

/// Writes `value` at `path` as a persistent node, creating it if needed, the way `copy`
/// and [`Mirror`] write (and `regctl import`). Refuses with [`Error::AlreadyExists`] a path
/// the target holds as an ephemeral node (and [`Error::EphemeralParent`] one below such a
/// node): that node belongs to a live session, and a value written into it would go with
/// that session. The write is owner-checked ([`Registry::set_owned`]): a node replaced by a
/// session's ephemeral node after it was read is left alone and refused the same way (on
/// ZooKeeper, one replaced within the round trip of the check takes the value, and is
/// refused all the same). A node replaced otherwise is read again (bounded). `seen`: whether
/// a persistent node is there (`Some(Some(version))`) or not (`Some(None)`) as just read, or
/// `None` to read it first, in which case a node that already holds `value` is not written
/// (so a mirror of a registry into itself, or two mirrors in opposite directions, settle
/// instead of writing each other's writes forever). Returns whether it wrote.
pub async fn put_persistent(
    to: &dyn Registry,
    path: &NodePath,
    value: Bytes,
    mut seen: Option<Option<u64>>,
) -> Result<bool> {
    let persistent = Node::empty(path.clone(), None);
    // Bounded: each round loses at most one race with another writer.
    for _ in 0..3 {
        let exists = match seen.take() {
            Some(version) => version.is_some(),
            None => match to.get(path).await {
                Ok(node) if node.is_ephemeral() => {
                    return Err(Error::AlreadyExists { path: path.clone() })
                }
                Ok(node) if holds_value(&node, &value) => return Ok(false),
                Ok(_) => true,
                Err(Error::NotFound { .. }) => false,
                Err(error) => return Err(error),
            },
        };
        if exists {
            match to.set_owned(&persistent, value.clone()).await {
                Ok(Some(written)) if written.is_ephemeral() => {
                    tracing::warn!(%path, owner = ?written.ephemeral_owner, "a persistent write landed in a session's ephemeral node that replaced the node read");
                    return Err(Error::AlreadyExists { path: path.clone() });
                }
                Ok(Some(_)) => return Ok(true),
                // Gone or replaced (the create below finds out which), or an etcd parent
                // with no key of its own, which reads as an empty node but only a create
                // gives the value.
                Ok(None) => {}
                Err(Error::VersionMismatch { .. }) => continue,
                Err(error) => return Err(error),
            }
        }
        match to.create(path, value.clone(), CreateMode::Persistent).await {
            Ok(_) => return Ok(true),
            Err(Error::AlreadyExists { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    Err(Error::unavailable(format!(
        "{path} kept changing while being written"
    )))
}

/// What [`copy_node`] did.
enum Copied {
    Written,
    Unchanged,
    /// The source no longer has it as a persistent node.
    Gone,
}

/// Copies one node from a fresh read of `from` (see [`copy`]): created while absent in `to`,
/// else written owner-checked (never into a session's node) and kept only if no other write
/// came between the read and it; otherwise both are read again and the value written again
/// (bounded), so the last write is one of a fresh source value.
async fn copy_node(from: &dyn Registry, to: &dyn Registry, path: &NodePath) -> Result<Copied> {
    let persistent = Node::empty(path.clone(), None);
    // Bounded: each round loses at most one race with another writer.
    for _ in 0..3 {
        let value = match from.get(path).await {
            Ok(node) if !node.is_ephemeral() => node.value,
            Ok(_) | Err(Error::NotFound { .. }) => return Ok(Copied::Gone),
            Err(error) => return Err(error),
        };
        crate::check_value(path, &value)?;
        let read_version = match to.get(path).await {
            Ok(node) if node.is_ephemeral() => {
                return Err(Error::AlreadyExists { path: path.clone() })
            }
            Ok(node) if holds_value(&node, &value) => return Ok(Copied::Unchanged),
            // A keyless etcd parent takes a value only by a create.
            Ok(node) if !is_implicit(&node) => node.version,
            Ok(_) | Err(Error::NotFound { .. }) => {
                match to.create(path, value, CreateMode::Persistent).await {
                    Ok(_) => return Ok(Copied::Written),
                    Err(Error::AlreadyExists { .. } | Error::NotFound { .. }) => continue,
                    Err(error) => return Err(error),
                }
            }
            Err(error) => return Err(error),
        };
        match to.set_owned(&persistent, value).await {
            // On ZooKeeper, replaced by a session's node within the check's round trip.
            Ok(Some(written)) if written.is_ephemeral() => {
                tracing::warn!(%path, owner = ?written.ephemeral_owner, "a copied value landed in a session's ephemeral node that replaced the node read");
                return Err(Error::AlreadyExists { path: path.clone() });
            }
            // Every write moves the version by one: no other write came in between.
            Ok(Some(written)) if written.version == read_version.saturating_add(1) => {
                return Ok(Copied::Written)
            }
            // Another writer's value was in between (it may be newer than the one just
            // written), or the node went or became a session's: read both again.
            Ok(_) | Err(Error::VersionMismatch { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    Err(Error::unavailable(format!(
        "{path} kept changing while being copied"
    )))
}

/// Whether a failed [`put_persistent`] means the target holds the path (or a parent of it) as a live
/// session's ephemeral node, which a mirror leaves alone.
fn held_by_a_session(error: &Error) -> bool {
    matches!(
        error,
        Error::AlreadyExists { .. } | Error::EphemeralParent { .. }
    )
}

/// Deletes the persistent node at `path` and persistent nodes below it; ephemeral nodes (and
/// the nodes holding them) stay, since they belong to live sessions. True if nothing is left.
async fn remove_persistent(to: &dyn Registry, path: &NodePath) -> Result<bool> {
    match delete_if_persistent(to, path).await {
        Ok(gone) => return Ok(gone),
        Err(Error::NotEmpty { .. }) => {}
        Err(error) => return Err(error),
    }
    let mut below: Vec<NodePath> = persistent_tree(to, path).await?.into_keys().collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.depth()));
    let mut all_gone = true;
    for p in below {
        match delete_if_persistent(to, &p).await {
            Ok(gone) => all_gone &= gone,
            Err(Error::NotEmpty { .. }) => all_gone = false,
            Err(error) => return Err(error),
        }
    }
    Ok(all_gone)
}

/// Deletes the node at `path` only while it is persistent, in one step where the backend can
/// (a live session's ephemeral node there stays). True if no node is left at `path`.
async fn delete_if_persistent(to: &dyn Registry, path: &NodePath) -> Result<bool> {
    let persistent = Node::empty(path.clone(), None);
    match to.delete_owned(&persistent).await {
        Ok(true) | Err(Error::NotFound { .. }) => Ok(true),
        // Nothing there, or a session's node: which one decides what to report.
        Ok(false) => Ok(!to.exists(path).await?),
        Err(error) => Err(error),
    }
}

/// What a [`Mirror`] just did, as given to its observer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorChange {
    /// The target was made equal to a fresh read of the source.
    Synced {
        /// Persistent nodes in the source.
        nodes: usize,
        /// Nodes written to the target to get there.
        written: usize,
        /// Nodes deleted from the target to get there.
        deleted: usize,
        /// Source nodes not written: the target holds their paths (or a parent) as live
        /// sessions' ephemeral nodes (see [`MirrorChange::Held`]).
        held: usize,
        /// Target nodes not deleted although the source lacks them: live sessions'
        /// ephemeral nodes sit below them (see [`MirrorChange::Kept`]).
        kept: usize,
        /// Source nodes not written: their values are over the limit (see
        /// [`MirrorChange::TooLarge`]).
        too_large: usize,
    },
    /// A node was created or updated in the target.
    Put(NodePath),
    /// A node was deleted from the target.
    Deleted(NodePath),
    /// A node could not be deleted because live ephemeral nodes sit below it in the target;
    /// it is deleted once they are gone (tried every [`HELD_RETRY`]).
    Kept(NodePath),
    /// A source node was not written: the target holds its path, or a parent of it, as a live
    /// session's ephemeral node.
    Held(NodePath),
    /// A source node was not written: its value is over
    /// [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN), which no backend takes. The target keeps what
    /// it had there (nodes below it get an empty parent); the node is written when the source
    /// gives it a value within the limit.
    TooLarge(NodePath),
    /// Either side failed; the mirror starts over (fresh read, then follow) after `after`.
    Retrying {
        /// The failure.
        error: String,
        /// The wait before starting over.
        after: Duration,
    },
}

/// Where a [`Mirror`] stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorStatus {
    /// The target equals the source as of the last event applied, apart from the
    /// [`held`](MirrorStatus::held), [`kept`](MirrorStatus::kept) and
    /// [`too_large`](MirrorStatus::too_large) paths.
    pub synced: bool,
    /// Changes applied to the target since the start (puts and deletes).
    pub applied: u64,
    /// Full syncs since the start (the first one included).
    pub syncs: u64,
    /// The latest failure, if the mirror is retrying.
    pub last_error: Option<String>,
    /// Source paths not written because the target holds them (or a parent) as live
    /// sessions' ephemeral nodes; each is tried again every [`HELD_RETRY`] until it is
    /// written or gone from the source.
    pub held: usize,
    /// Target paths the source no longer has, not deleted because live sessions' ephemeral
    /// nodes sit below them; each is tried again every [`HELD_RETRY`] until it is deleted or
    /// back in the source.
    pub kept: usize,
    /// Source paths not written because their values are over
    /// [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN); each is written once the source's value is
    /// within it, or left once the source deletes it.
    pub too_large: usize,
}

/// Keeps the persistent nodes of a subtree of one registry copied into another, live.
///
/// Guarantees: first the target is made equal to the source (persistent nodes: written where
/// missing or different, deleted where only in the target unless live ephemeral nodes sit
/// below them, in which case they are kept and deleted once those are gone, tried every
/// [`HELD_RETRY`]); then every change the source's watch reports is applied. A full sync never
/// empties the target because the source's root is missing (a wrong path or chroot, a source
/// restarted without its data), nor deletes the target's root when the source's goes: it
/// reports [`MirrorChange::Retrying`] instead until the root exists, as it does while the
/// root exists in neither registry, so a mistyped path is never reported in sync (what the
/// source deletes
/// below the root before that is deleted in the target, as it happens). After a watch resync,
/// a stream end, or any failure on either side (a server restarting), it waits with capped
/// backoff and starts over with a full sync, so no change is lost for good. Ephemeral nodes
/// are never copied, and a path the target holds as a live session's ephemeral node is left
/// alone ([`MirrorChange::Held`]) and written once that node is gone (tried every
/// [`HELD_RETRY`]). A source value over [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN) is not
/// written ([`MirrorChange::TooLarge`]) and stops nothing else. Unlike [`copy`], which
/// refuses them, source nodes no [`NodePath`] can name are not mirrored (the source's watch
/// leaves them out, with a warning in the log); persistent ones in the target stop each sync
/// (reported as `Retrying`) until they are renamed or removed. Runs until
/// [`stop`](Mirror::stop) or drop.
pub struct Mirror {
    stop: watch::Sender<bool>,
    status: watch::Receiver<MirrorStatus>,
    task: Option<JoinHandle<()>>,
}

/// How often a mirror tries again the paths held by a live session's ephemeral node in the
/// target, and deleting the paths kept for live ephemeral nodes below them (nothing announces
/// that such a node went).
pub const HELD_RETRY: Duration = Duration::from_secs(1);

/// Retry delays of a mirror whose source or target failed.
const MIRROR_RETRY_INITIAL: Duration = Duration::from_millis(100);
const MIRROR_RETRY_MAX: Duration = Duration::from_secs(5);

impl Mirror {
    /// Starts mirroring `root` from `from` into `to` in a background task.
    pub fn start(from: Arc<dyn Registry>, to: Arc<dyn Registry>, root: NodePath) -> Mirror {
        Self::start_with_observer(from, to, root, |_| {})
    }

    /// [`start`](Mirror::start), calling `observer` with each thing the mirror does.
    pub fn start_with_observer(
        from: Arc<dyn Registry>,
        to: Arc<dyn Registry>,
        root: NodePath,
        observer: impl Fn(MirrorChange) + Send + Sync + 'static,
    ) -> Mirror {
        let (stop, stop_rx) = watch::channel(false);
        let (status_tx, status) = watch::channel(MirrorStatus::default());
        let span = tracing::info_span!("mirror", root = %root);
        let task = tokio::spawn(
            run_mirror(from, to, root, stop_rx, status_tx, Box::new(observer)).instrument(span),
        );
        Mirror {
            stop,
            status,
            task: Some(task),
        }
    }

    /// The current status.
    pub fn status(&self) -> MirrorStatus {
        self.status.borrow().clone()
    }

    /// Waits until the target is in sync (or `timeout` passes).
    pub async fn wait_synced(&self, timeout: Duration) -> Result<()> {
        let mut rx = self.status.clone();
        let synced = tokio::time::timeout(timeout, rx.wait_for(|s| s.synced)).await;
        match synced {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout {
                operation: "waiting for the mirror to sync".into(),
                after: timeout,
            }),
        }
    }

    /// Stops following the source and returns the final status. Changes made to the source
    /// after this are not copied.
    pub async fn stop(mut self) -> MirrorStatus {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.status.borrow().clone()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("status", &*self.status.borrow())
            .finish()
    }
}

type Observer = Box<dyn Fn(MirrorChange) + Send + Sync>;

async fn run_mirror(
    from: Arc<dyn Registry>,
    to: Arc<dyn Registry>,
    root: NodePath,
    mut stop: watch::Receiver<bool>,
    status: watch::Sender<MirrorStatus>,
    observer: Observer,
) {
    let mut backoff = Backoff::new(MIRROR_RETRY_INITIAL, MIRROR_RETRY_MAX);
    loop {
        let outcome = tokio::select! {
            outcome = follow(&*from, &*to, &root, &status, &observer, &mut backoff) => outcome,
            _ = stop.wait_for(|s| *s) => return,
        };
        status.send_modify(|s| s.synced = false);
        let error = match outcome {
            Ok(()) => "the source's watch ended".to_owned(),
            Err(Error::Closed) => {
                tracing::info!("a registry was closed; mirror stops");
                return;
            }
            Err(error) => error.to_string(),
        };
        let after = backoff.next_delay();
        tracing::warn!(%error, ?after, "mirror starts over");
        status.send_modify(|s| s.last_error = Some(error.clone()));
        observer(MirrorChange::Retrying { error, after });
        tokio::select! {
            _ = tokio::time::sleep(after) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One round: watch the source, sync on every snapshot, apply changes; returns when the
/// stream ends or fails (the caller starts a new round).
async fn follow(
    from: &dyn Registry,
    to: &dyn Registry,
    root: &NodePath,
    status: &watch::Sender<MirrorStatus>,
    observer: &Observer,
    backoff: &mut Backoff,
) -> Result<()> {
    let mut events = from.watch(root, WatchOptions::subtree()).await?;
    let mut unequal = Unequal::default();
    let mut retry = tokio::time::interval_at(tokio::time::Instant::now() + HELD_RETRY, HELD_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let item = tokio::select! {
            item = events.next() => item,
            _ = retry.tick(), if !unequal.held.is_empty() || !unequal.kept.is_empty() => {
                retry_held(from, to, &mut unequal, status, observer).await?;
                retry_kept(to, &mut unequal.kept, status, observer).await?;
                status.send_modify(|s| unequal.report(s));
                continue;
            }
        };
        let Some(item) = item else {
            break;
        };
        match item? {
            WatchEvent::Snapshot(snapshot) | WatchEvent::Resync { snapshot, .. } => {
                let source_missing = snapshot.nodes.is_empty();
                let desired: BTreeMap<NodePath, Bytes> = snapshot
                    .nodes
                    .into_iter()
                    .filter(|n| !n.is_ephemeral() && !n.path.is_root())
                    .map(|n| (n.path, n.value))
                    .collect();
                unequal = Unequal::default();
                let change = sync(to, root, &desired, source_missing, &mut unequal).await?;
                tracing::info!(?change, "mirror in sync");
                status.send_modify(|s| {
                    s.synced = true;
                    s.syncs += 1;
                    s.last_error = None;
                    unequal.report(s);
                });
                backoff.reset();
                observer(change);
            }
            WatchEvent::Created(node) | WatchEvent::Updated(node) => {
                if node.is_ephemeral() || node.path.is_root() {
                    continue;
                }
                // Back in the source: no longer to delete, whatever the put finds.
                unequal.forget(&node.path);
                let change = match put_persistent(to, &node.path, node.value, None).await {
                    Ok(true) => MirrorChange::Put(node.path),
                    // Already equal (the target's own write coming back, say): no change.
                    Ok(false) => {
                        status.send_modify(|s| unequal.report(s));
                        continue;
                    }
                    Err(error) => unequal.not_written(node.path, error)?,
                };
                status.send_modify(|s| {
                    s.applied += 1;
                    unequal.report(s);
                });
                observer(change);
            }
            WatchEvent::Deleted(node) => {
                if node.is_ephemeral() || node.path.is_root() {
                    continue;
                }
                if node.path == *root {
                    // As in a full sync: a missing source root is no order to delete the
                    // target's (what the source deleted below it first is gone already).
                    // Starting over reports it until the root is back.
                    return Err(Error::unavailable(format!(
                        "{root} was deleted in the source; not deleting it in the target"
                    )));
                }
                unequal.forget(&node.path);
                let change = if remove_persistent(to, &node.path).await? {
                    MirrorChange::Deleted(node.path)
                } else {
                    unequal.kept.insert(node.path.clone());
                    MirrorChange::Kept(node.path)
                };
                status.send_modify(|s| {
                    s.applied += 1;
                    unequal.report(s);
                });
                observer(change);
            }
        }
    }
    Ok(())
}

/// Paths where a mirror's target differs from its source, by the reason it must.
#[derive(Default)]
struct Unequal {
    /// See [`MirrorStatus::held`].
    held: BTreeSet<NodePath>,
    /// See [`MirrorStatus::kept`].
    kept: BTreeSet<NodePath>,
    /// See [`MirrorStatus::too_large`].
    too_large: BTreeSet<NodePath>,
}

impl Unequal {
    fn report(&self, status: &mut MirrorStatus) {
        status.held = self.held.len();
        status.kept = self.kept.len();
        status.too_large = self.too_large.len();
    }

    /// The source has just written or deleted `path`: whatever kept it unequal is past.
    fn forget(&mut self, path: &NodePath) {
        self.held.remove(path);
        self.kept.remove(path);
        self.too_large.remove(path);
    }

    /// Files a failed [`put_persistent`] of `path` under its reason, or returns the error
    /// if the mirror must start over for it.
    fn not_written(&mut self, path: NodePath, error: Error) -> Result<MirrorChange> {
        if held_by_a_session(&error) {
            tracing::warn!(%path, %error, "not mirrored: the target holds it as a live session's ephemeral node");
            self.held.insert(path.clone());
            return Ok(MirrorChange::Held(path));
        }
        if let Error::ValueTooLarge { .. } = error {
            tracing::warn!(%path, %error, "not mirrored: the value is over the limit");
            self.too_large.insert(path.clone());
            return Ok(MirrorChange::TooLarge(path));
        }
        Err(error)
    }
}

/// Writes again the source's nodes at the `held` paths; a path written, or no longer a
/// persistent node in the source, leaves the set.
async fn retry_held(
    from: &dyn Registry,
    to: &dyn Registry,
    unequal: &mut Unequal,
    status: &watch::Sender<MirrorStatus>,
    observer: &Observer,
) -> Result<()> {
    for path in unequal.held.clone() {
        let node = match from.get(&path).await {
            Ok(node) if !node.is_ephemeral() => node,
            // Its deletion reaches the mirror through the watch.
            Ok(_) | Err(Error::NotFound { .. }) => {
                unequal.held.remove(&path);
                continue;
            }
            Err(error) => return Err(error),
        };
        match put_persistent(to, &path, node.value, None).await {
            Ok(_) => {
                unequal.held.remove(&path);
                tracing::info!(%path, "held path written: the session's node is gone");
                status.send_modify(|s| s.applied += 1);
                observer(MirrorChange::Put(path));
            }
            Err(error) if held_by_a_session(&error) => {}
            // Grown over the limit meanwhile: skipped like any such value.
            Err(error @ Error::ValueTooLarge { .. }) => {
                unequal.held.remove(&path);
                observer(unequal.not_written(path, error)?);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Deletes again the `kept` paths (the source has none of them); a path gone from the target
/// leaves the set.
async fn retry_kept(
    to: &dyn Registry,
    kept: &mut BTreeSet<NodePath>,
    status: &watch::Sender<MirrorStatus>,
    observer: &Observer,
) -> Result<()> {
    let mut deepest_first: Vec<NodePath> = kept.iter().cloned().collect();
    deepest_first.sort_by_key(|p| std::cmp::Reverse(p.depth()));
    for path in deepest_first {
        if remove_persistent(to, &path).await? {
            kept.remove(&path);
            tracing::info!(%path, "kept path deleted: the live nodes below it are gone");
            status.send_modify(|s| s.applied += 1);
            observer(MirrorChange::Deleted(path));
        }
    }
    Ok(())
}

/// Makes the persistent nodes of `to` under `root` equal to `desired`, adding to `unequal`
/// the paths it could not write or delete. Refuses (a retryable error) to empty the target
/// when nothing at all exists at `root` in the source, and to report a sync while `root`
/// exists in neither (more likely a mistyped path or chroot than a tree to keep equal).
async fn sync(
    to: &dyn Registry,
    root: &NodePath,
    desired: &BTreeMap<NodePath, Bytes>,
    source_missing: bool,
    unequal: &mut Unequal,
) -> Result<MirrorChange> {
    let current = persistent_tree(to, root).await?;
    // A missing source root is far likelier a wrong path or chroot, or a source that came
    // back empty, than a tree someone meant to delete: deleting the target would lose it.
    if source_missing && !current.is_empty() {
        return Err(Error::unavailable(format!(
            "{root} does not exist in the source; not deleting the {} nodes under it in the \
             target (create {root} in the source to mirror an empty tree)",
            current.len()
        )));
    }
    // Nothing on either side is no tree to keep equal, likelier a mistyped path or chroot:
    // not in sync until it exists.
    if source_missing && !root.is_root() {
        return Err(Error::unavailable(format!(
            "{root} exists in neither registry; waiting for it in the source (check the path \
             and chroot)"
        )));
    }
    let mut written = 0;
    for (path, value) in desired {
        if !current.get(path).is_some_and(|n| holds_value(n, value)) {
            // A path missing from `current` may be an ephemeral node there: `put` reads it.
            let seen = current.get(path).map(|node| Some(node.version));
            match put_persistent(to, path, value.clone(), seen).await {
                Ok(true) => written += 1,
                Ok(false) => {}
                Err(error) => {
                    unequal.not_written(path.clone(), error)?;
                }
            }
        }
    }
    let mut extra: Vec<&NodePath> = current
        .keys()
        .filter(|p| !desired.contains_key(*p))
        .collect();
    extra.sort_by_key(|p| std::cmp::Reverse(p.depth()));
    let mut deleted = 0;
    for path in extra {
        // Only while still persistent: it may have turned into a session's node since read.
        match delete_if_persistent(to, path).await {
            Ok(true) => deleted += 1,
            // Now a session's node at the path: not ours to delete.
            Ok(false) => {}
            // Live ephemerals below it: deleted once they go.
            Err(Error::NotEmpty { .. }) => {
                unequal.kept.insert(path.clone());
            }
            Err(error) => return Err(error),
        }
    }
    Ok(MirrorChange::Synced {
        nodes: desired.len(),
        written,
        deleted,
        held: unequal.held.len(),
        kept: unequal.kept.len(),
        too_large: unequal.too_large.len(),
    })
}

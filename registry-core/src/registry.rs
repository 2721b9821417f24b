//! The `Registry` trait: the contract every backend implements and the conformance suite
//! enforces.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::capabilities::Capabilities;
use crate::error::Result;
use crate::node::{Children, CreateMode, DeleteScope, Expected, Node};
use crate::path::NodePath;
use crate::registration::{RegisterOptions, Registration};
use crate::session::SessionStatus;
use crate::watch::{WatchOptions, WatchStream};

/// Largest value a node may hold, in bytes, on every backend (checked before any I/O; well
/// under ZooKeeper's 1 MiB `jute.maxbuffer` and etcd's 1.5 MiB request limit).
pub const MAX_VALUE_LEN: usize = 512 * 1024;

/// Returns [`Error::ValueTooLarge`](crate::Error::ValueTooLarge) if `value` is over
/// [`MAX_VALUE_LEN`]; every backend calls this before any I/O.
pub fn check_value(path: &NodePath, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(crate::Error::ValueTooLarge {
            path: path.clone(),
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// A client of a hierarchical registry of nodes (ZooKeeper's model, which Dapeng's tree
/// uses), with sessions, ephemeral nodes, ordered sequential children and watches.
///
/// Object-safe; used as `Arc<dyn Registry>`. Every method is cancel-safe in the sense that
/// dropping its future never leaves a half-written tree behind (it may or may not have
/// happened, as with any remote call). A client of a server backend lives on the Tokio
/// runtime it was connected on (its connections' tasks run there, as a `tonic` channel's or
/// a `sqlx` pool's do): once that runtime ends, its calls fail with
/// [`Unavailable`](crate::Error::Unavailable); connect on the runtime that will use it.
///
/// # The tree
/// Nodes are addressed by [`NodePath`]. Every node except the root has a parent; parents
/// that were never created explicitly (for example etcd keys written by other tools) behave
/// as existing, empty, persistent nodes with `version` 0 and `create_order` 0. The root `/`
/// always exists and cannot be written or deleted.
///
/// # Versions and order
/// [`Node::version`] is 0 at creation and grows by one per [`set`](Registry::set).
/// [`Node::create_order`] grows with global creation order, so sorting by it sorts by age: a
/// node created after another's creation completed has a larger one; creates that were in
/// flight together may share one (etcd batches them into one Txn).
///
/// Sequential nodes are named `<name><counter>` with a 10-digit zero-padded counter kept per
/// parent, strictly increasing in creation order and unique under any number of concurrent
/// creators, for the life of that parent. Numbers need not start at 0 nor be consecutive
/// (ZooKeeper's counter also moves on every other child created). Whether it starts again
/// when the parent is deleted and created again is up to the backend (ZooKeeper and memory:
/// yes; etcd: no, its counter outlives the parent), so never compare counters across a
/// parent's re-creation.
///
/// # Sessions and ephemeral nodes
/// Each client holds one session at a time ([`session`](Registry::session)). Ephemeral nodes
/// belong to the session that created them, are visible to every client, and are deleted when
/// that session ends (closed, expired, lost). Ephemeral nodes never have children. When a
/// session is lost the client opens a new one by itself: [`SessionState::Lost`] then
/// [`SessionState::Reestablished`] with a larger epoch.
///
/// # Errors
/// Input errors are returned before any I/O, and before anything else is checked: a closed
/// client gives them too. Failures are typed ([`Error`](crate::Error)); retryable ones say so
/// ([`Error::is_retryable`](crate::Error::is_retryable)). After [`close`](Registry::close)
/// every call with valid input returns [`Error::Closed`](crate::Error::Closed).
///
/// # Tracing
/// Each call of `create`, `get`, `exists`, `set`, `set_owned`, `delete`, `delete_owned`, `children`,
/// `watch`, `register` and `close` runs in a `debug` span named after the method, with a
/// `path` field (the node's path), under the backend crate's target (`registry_etcd`,
/// `registry_zk`, `registry_core::memory`), so `RUST_LOG=registry_etcd=debug` shows every
/// request with its path. Background tasks (session, keep-alive, watches, registrations)
/// run in their own spans.
///
/// [`SessionState::Lost`]: crate::SessionState::Lost
/// [`SessionState::Reestablished`]: crate::SessionState::Reestablished
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// What this backend guarantees beyond the common contract.
    fn capabilities(&self) -> Capabilities;

    /// The current session status.
    fn session(&self) -> SessionStatus;

    /// Every session transition from now on, starting with the current status, in order;
    /// the stream ends after [`SessionState::Closed`](crate::SessionState::Closed).
    fn session_events(&self) -> BoxStream<'static, SessionStatus>;

    /// Creates a node and returns it as created.
    ///
    /// Missing parents are created first as empty persistent nodes. For sequential modes the
    /// last segment of `path` is a name prefix and the returned node's path carries the
    /// counter. A sequential create never replaces a node already holding the generated name
    /// (one created under that exact name): etcd and the in-memory backend move on to the next
    /// free number; ZooKeeper, whose counter does not move past it, fails with
    /// `AlreadyExists` naming it. Errors: [`AlreadyExists`](crate::Error::AlreadyExists),
    /// [`EphemeralParent`](crate::Error::EphemeralParent) if the parent (or any ancestor) is
    /// ephemeral, [`ValueTooLarge`](crate::Error::ValueTooLarge), `InvalidArgument` for the
    /// root.
    async fn create(&self, path: &NodePath, value: Bytes, mode: CreateMode) -> Result<Node>;

    /// Reads a node; [`NotFound`](crate::Error::NotFound) if it does not exist.
    async fn get(&self, path: &NodePath) -> Result<Node>;

    /// Whether a node exists.
    async fn exists(&self, path: &NodePath) -> Result<bool>;

    /// Writes a node's value if its version matches `expected`, and returns the node as
    /// written (version + 1). Errors: [`NotFound`](crate::Error::NotFound),
    /// [`VersionMismatch`](crate::Error::VersionMismatch) (nothing written),
    /// [`ValueTooLarge`](crate::Error::ValueTooLarge).
    async fn set(&self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node>;

    /// Deletes a node (and with [`DeleteScope::Recursive`] everything below it) if its
    /// version matches `expected`. Errors: [`NotFound`](crate::Error::NotFound),
    /// [`VersionMismatch`](crate::Error::VersionMismatch),
    /// [`NotEmpty`](crate::Error::NotEmpty) for [`DeleteScope::Node`] with children,
    /// `InvalidArgument` for the root. A recursive delete racing with creators deletes what
    /// it finds; it never leaves a child without its parent. It is one atomic step, so a
    /// call cut short (its future dropped, a lost connection) removed all of the subtree or
    /// none of it; except on ZooKeeper for a subtree whose paths add up to more than 512 KiB
    /// (one request's limit), which goes deepest first over several requests, and on a
    /// `DualRegistry`, whose two sides are deleted one after the other.
    async fn delete(&self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()>;

    /// Deletes the node at `node.path` if it still belongs to `node.ephemeral_owner` (`None`:
    /// a persistent node), whatever its version now; `Ok(false)` if there is no node there or
    /// it has another owner, which is then left alone. Errors: as for
    /// [`delete`](Registry::delete) with [`DeleteScope::Node`];
    /// [`VersionMismatch`](crate::Error::VersionMismatch) only means a write raced with the
    /// check (where a backend cannot check and delete in one step) and is worth retrying.
    /// [`Registration::deregister`] removes its node with this.
    #[tracing::instrument(level = "debug", skip_all, fields(path = %node.path, owner = ?node.ephemeral_owner))]
    async fn delete_owned(&self, node: &Node) -> Result<bool> {
        if node.path.is_root() {
            return Err(crate::Error::root("delete"));
        }
        let Some(version) = owned_version(self, node).await? else {
            return Ok(false);
        };
        match self.delete(&node.path, version, DeleteScope::Node).await {
            Ok(()) => Ok(true),
            Err(crate::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Writes `value` into the node at `node.path` if it still belongs to
    /// `node.ephemeral_owner` (`None`: a persistent node), whatever its version now, and
    /// returns it as written; `Ok(None)` if there is no node there or it has another owner,
    /// which is then left alone. etcd and the in-memory backend check and write in one step.
    /// ZooKeeper cannot compare an owner in a write: it reads the owner, then writes at the
    /// version read, so a node replaced at that same version within that one round trip is
    /// written (the returned node's owner then shows it), and
    /// [`VersionMismatch`](crate::Error::VersionMismatch) only means a write raced with the
    /// check and is worth retrying. Errors: as for [`set`](Registry::set).
    /// [`Registration::set_value`] writes with this.
    #[tracing::instrument(level = "debug", skip_all, fields(path = %node.path, owner = ?node.ephemeral_owner))]
    async fn set_owned(&self, node: &Node, value: Bytes) -> Result<Option<Node>> {
        check_value(&node.path, &value)?;
        if node.path.is_root() {
            return Err(crate::Error::root("write"));
        }
        let Some(version) = owned_version(self, node).await? else {
            return Ok(None);
        };
        match self.set(&node.path, value, version).await {
            Ok(written) => Ok(Some(written)),
            Err(crate::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The direct children of a node, ordered by creation order, with the revision they were
    /// read at; [`NotFound`](crate::Error::NotFound) if the node does not exist. Children
    /// another tool wrote under names no [`NodePath`] takes are named in
    /// [`Children::skipped`](crate::Children::skipped), never dropped unseen.
    async fn children(&self, path: &NodePath) -> Result<Children>;

    /// Watches `path` with the given scope.
    ///
    /// The stream yields first a [`Snapshot`](crate::WatchEvent::Snapshot) of every node in
    /// scope (the watched path need not exist), then `Created` / `Updated` / `Deleted` events
    /// for nodes in scope, in commit order, without duplicates and without a gap after the
    /// snapshot. The events of one atomic change (a recursive delete on etcd) come deletions
    /// first, children before parents, then writes, parents before children: no event shows
    /// a node below one already reported deleted, or before its parent's creation. Where the
    /// backend cannot guarantee continuity (reconnect, session loss,
    /// compaction, a consumer too slow), it yields a [`Resync`](crate::WatchEvent::Resync)
    /// with a fresh snapshot, so a consumer applying every item converges to the server's state.
    /// Backends without [`Capabilities::exact_events`] deliver the net change between reads:
    /// first every `Deleted`, children before parents, then `Created` and `Updated` ordered by
    /// the revision each stands for (a creation's, a write's), so a parent's `Created` comes
    /// before its children's; a `Created` node may carry a write made after its creation.
    ///
    /// With [`WatchOptions::deletions_only`] the stream leaves out `Created` and `Updated`
    /// (its snapshots and resyncs still show every node in scope). A `Deleted` node the
    /// stream showed is reported as shown or later; one it never showed may carry only its
    /// path and, in `modify_order`, the delete's revision.
    ///
    /// The stream never ends silently: it ends when dropped, after an error item it cannot
    /// recover from, or when the registry is closed. Dropping it releases the server-side
    /// watch. Buffering per stream is bounded. A consumer that falls behind gets a `Resync`
    /// ([`ResyncReason::Lagged`](crate::ResyncReason::Lagged)) instead of unbounded memory.
    /// On backends without [`Capabilities::exact_events`] the stream waits for it instead and
    /// then delivers the net change of what happened meanwhile: nothing is dropped, so no
    /// resync is needed.
    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream>;

    /// Registers an ephemeral node that heals itself, and returns once it exists.
    ///
    /// The node is re-created after its session is lost, after anyone deletes it, and when a
    /// node of another (older) session sits at its path. See [`Registration`] for updates,
    /// status and removal. With [`RegisterOptions::sequential`] the last segment is a name
    /// prefix (Dapeng's `ip:port:version:`) and every re-creation gets a new counter.
    /// Errors: input errors, [`EphemeralParent`](crate::Error::EphemeralParent),
    /// [`AlreadyExists`](crate::Error::AlreadyExists) when a persistent node holds the path
    /// or a live registration of another session re-creates its node as fast as this one
    /// removes it, and the first attempt's failure (nothing is left behind then). A future dropped before it returns
    /// may leave its node created with nothing healing it: the node goes with the session,
    /// and a later `register` of the same path in this session adopts it. A registration
    /// that adopts a node of another live registration of this process (the same path
    /// registered again, replacing the handle) holds it from then on: the other one's removal
    /// leaves it in place.
    async fn register(
        &self,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration>;

    /// Closes the client: deletes the ephemeral nodes of its session, ends every watch stream
    /// and session stream, stops every background task. Once it returns `Ok`, the server has
    /// deleted those nodes. If the server cannot be told (unreachable), everything local is
    /// still released and it returns [`Unavailable`](crate::Error::Unavailable): the nodes
    /// then go when the session's TTL runs out. Idempotent: a later call does nothing and returns
    /// `Ok`; only the first call's result says whether the nodes were deleted at once.
    async fn close(&self) -> Result<()>;
}

/// The version to write or delete `node` at, if the node at its path has `node`'s owner:
/// the owner check of the default `delete_owned` and `set_owned`, a read before the write.
async fn owned_version<R: Registry + ?Sized>(
    registry: &R,
    node: &Node,
) -> Result<Option<Expected>> {
    match registry.get(&node.path).await {
        Ok(now) => {
            Ok((now.ephemeral_owner == node.ephemeral_owner)
                .then_some(Expected::Version(now.version)))
        }
        Err(crate::Error::NotFound { .. }) => Ok(None),
        Err(error) => Err(error),
    }
}

//! A live local copy of part of the tree, kept current by one watch: what Curator's
//! `CuratorCache` is to ZooKeeper, on any backend, built only on [`Registry`].

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::persistent::{PersistentItem, PersistentWatch};
use crate::{Error, Node, NodePath, Registry, Result, WatchEvent, WatchScope, WatchedState};

/// How many changes a [`TreeCache::events`] listener may be behind; one further behind misses
/// some.
pub const EVENTS_BUFFER: usize = 1024;

/// A change of a [`TreeCache`]'s copy, node by node, as a listener (Curator's
/// `CuratorCacheListener`) sees it: a re-read after a break is compared with the copy it
/// replaces, so a listener never sees a snapshot, only what changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheEvent {
    /// A node the copy did not hold.
    Created(Node),
    /// A node the copy held, now different.
    Updated {
        /// As the copy held it.
        old: Node,
        /// As it is now.
        new: Node,
    },
    /// A node the copy held is gone (as the copy held it, value included).
    Deleted(Node),
    /// This listener fell more than [`EVENTS_BUFFER`] changes behind, and `count` changes were
    /// dropped for it: the copy ([`TreeCache::borrow`]) holds their result.
    Missed {
        /// How many.
        count: u64,
    },
}

/// What a [`TreeCache`] holds at one moment.
#[derive(Clone, Debug, Default)]
pub struct CachedTree {
    state: WatchedState,
    stale: bool,
    generation: u64,
    failure: Option<Arc<Error>>,
}

impl CachedTree {
    /// The node at `path`, if the copy holds it.
    pub fn get(&self, path: &NodePath) -> Option<&Node> {
        self.state.get(path)
    }

    /// The direct children of `parent` the copy holds, in creation order (as
    /// [`Registry::children`] lists them).
    pub fn children(&self, parent: &NodePath) -> Vec<&Node> {
        self.state.children(parent)
    }

    /// Every node of the copy, ordered by path.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.state.nodes()
    }

    /// True while the copy may be behind the server: the session is not live, or the watch
    /// is being opened again and its first snapshot is not in yet. Readers keep getting the
    /// last known copy meanwhile.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Grows by one with every change of the nodes or of [`is_stale`](CachedTree::is_stale);
    /// an event that changes neither (a resync that finds what the copy held) leaves it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Why the cache stopped following the server, if a failure that retrying cannot mend
    /// ended it (say [`PermissionDenied`](Error::PermissionDenied) on the watched range):
    /// the copy is then stale for good. `None` while it follows, and after a close.
    pub fn failure(&self) -> Option<&Error> {
        self.failure.as_deref()
    }
}

/// A live copy of the nodes a watch of `root` covers, for readers that must not go to the
/// server on every read (a consumer's view of a service, an operator's dashboard).
///
/// Guarantees: once [`open`](TreeCache::open) returns, the copy holds the watch's snapshot,
/// then every change the watch reports, in order; when the watch breaks or the session is
/// not live, the copy is marked stale, kept for readers, and replaced by a fresh snapshot as
/// soon as a new watch delivers one (so it holds every change made meanwhile). A failure that
/// retrying cannot mend ends the following, stale, with [`CachedTree::failure`] saying why.
/// [`events`](TreeCache::events) tells listeners each change node by node, a re-read included.
/// Reads take a read lock and never wait on the server. Dropping the cache stops its task and
/// releases its watch.
///
/// ```
/// # async fn demo() -> registry_core::Result<()> {
/// use std::{sync::Arc, time::Duration};
/// use registry_core::{Bytes, CreateMode, MemoryOptions, MemoryRegistry, MemoryStore};
/// use registry_core::{NodePath, Registry, TreeCache, WatchScope};
///
/// let registry: Arc<dyn Registry> =
///     Arc::new(MemoryRegistry::connect(&MemoryStore::new(), MemoryOptions::default()).await?);
/// let services = NodePath::new("/soa/runtime/services")?;
/// let cache = TreeCache::open(registry.clone(), &services, WatchScope::Subtree).await?;
/// let instance = NodePath::new("/soa/runtime/services/Goods/10.0.0.1:9090")?;
/// registry.create(&instance, Bytes::new(), CreateMode::Ephemeral).await?;
/// cache.wait_for(Duration::from_secs(5), |tree| tree.get(&instance).is_some()).await?;
/// let goods = NodePath::new("/soa/runtime/services/Goods")?;
/// assert_eq!(cache.children(&goods).len(), 1);
/// # Ok(())
/// # }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(demo()).unwrap();
/// ```
pub struct TreeCache {
    root: NodePath,
    tree: watch::Receiver<CachedTree>,
    /// What [`TreeCache::events`] subscribes to; weak, so listeners' streams end with the
    /// cache's task.
    events: broadcast::WeakSender<CacheEvent>,
    task: JoinHandle<()>,
}

impl TreeCache {
    /// Watches what `scope` covers of `root` and returns once the first snapshot is in the
    /// copy. Errors: the watch's own (an invalid path, [`Closed`](Error::Closed), ...), or
    /// [`Timeout`](Error::Timeout) when no snapshot comes within
    /// [`FIRST_SNAPSHOT`](crate::persistent::FIRST_SNAPSHOT).
    pub async fn open(
        registry: Arc<dyn Registry>,
        root: &NodePath,
        scope: WatchScope,
    ) -> Result<TreeCache> {
        let (watch, states) =
            PersistentWatch::open(registry.clone(), vec![(root.clone(), scope)]).await?;
        let state = states.into_iter().next().unwrap_or_default();
        let (tx, tree) = watch::channel(CachedTree {
            state,
            stale: watch.is_stale(),
            generation: 1,
            failure: None,
        });
        let (events_tx, _) = broadcast::channel(EVENTS_BUFFER);
        let events = events_tx.downgrade();
        let span = tracing::info_span!("tree_cache", root = %root);
        let task = tokio::spawn(follow(watch, tx, events_tx).instrument(span));
        Ok(TreeCache {
            root: root.clone(),
            tree,
            events,
            task,
        })
    }

    /// The watched root.
    pub fn root(&self) -> &NodePath {
        &self.root
    }

    /// The copy as it is now, under a read lock: keep it short (never across an `.await`),
    /// as the cache's task waits for it to apply the next change.
    pub fn borrow(&self) -> watch::Ref<'_, CachedTree> {
        self.tree.borrow()
    }

    /// The node at `path`, if the copy holds it.
    pub fn get(&self, path: &NodePath) -> Option<Node> {
        self.tree.borrow().get(path).cloned()
    }

    /// The direct children of `parent` the copy holds, in creation order.
    pub fn children(&self, parent: &NodePath) -> Vec<Node> {
        self.tree
            .borrow()
            .children(parent)
            .into_iter()
            .cloned()
            .collect()
    }

    /// Whether the copy may be behind the server (see [`CachedTree::is_stale`]).
    pub fn is_stale(&self) -> bool {
        self.tree.borrow().is_stale()
    }

    /// A receiver that is marked changed whenever the copy's
    /// [`generation`](CachedTree::generation) grows from now on. Take it before reading the
    /// copy it is to keep up with, so that no change falls in between.
    pub fn changes(&self) -> watch::Receiver<CachedTree> {
        let mut changes = self.tree.clone();
        // From now on: a change before this call would wake the first `changed()` at once.
        changes.borrow_and_update();
        changes
    }

    /// Every change of the copy after this call, exactly once, node by node and in the order
    /// applied: deletions of one re-read children first, then creations and updates parents
    /// first. Each comes after the copy holds it, so a copy read after the call may already
    /// hold changes still to be told; [`listen`](TreeCache::listen) gives the copy the
    /// changes start from. A node deleted and created again between two reads of a backend
    /// that reports net changes (ZooKeeper) is told as `Updated` (its `create_order`
    /// differs). A listener more than [`EVENTS_BUFFER`] changes behind gets a
    /// [`CacheEvent::Missed`] in place of what it missed. Ends, after what was told before,
    /// when the cache stops following (its registry closed, a
    /// [`failure`](CachedTree::failure)) or is dropped; empty if it already stopped.
    pub fn events(&self) -> BoxStream<'static, CacheEvent> {
        self.listen_with(|_| ()).1
    }

    /// The copy as it is now and every change after it, exactly once (as
    /// [`events`](TreeCache::events) tells them): a listener that keeps state derived from
    /// the copy starts from this one, with no change both in it and told, and none in
    /// neither. Clones the copy.
    pub fn listen(&self) -> (CachedTree, BoxStream<'static, CacheEvent>) {
        self.listen_with(CachedTree::clone)
    }

    /// Subscribes under the copy's read lock: the task applies and tells each change under
    /// its write lock, so the subscription falls exactly between two changes.
    fn listen_with<T>(
        &self,
        read: impl FnOnce(&CachedTree) -> T,
    ) -> (T, BoxStream<'static, CacheEvent>) {
        let tree = self.tree.borrow();
        let read = read(&tree);
        let Some(sender) = self.events.upgrade() else {
            return (read, Box::pin(stream::empty()));
        };
        let receiver = sender.subscribe();
        drop(tree);
        let events = stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(event) => Some((event, receiver)),
                Err(broadcast::error::RecvError::Lagged(count)) => {
                    Some((CacheEvent::Missed { count }, receiver))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        (read, Box::pin(events))
    }

    /// Waits until the copy satisfies `done`, for at most `bound`. `done` sees the copy now,
    /// then the latest copy after each change (changes that come together are seen as one,
    /// so a state that held only in between may be missed). [`Timeout`](Error::Timeout)
    /// after `bound`; [`Closed`](Error::Closed) if the cache stopped following (its registry
    /// closed, or a [`failure`](CachedTree::failure)) with `done` still false.
    pub async fn wait_for(
        &self,
        bound: Duration,
        done: impl Fn(&CachedTree) -> bool,
    ) -> Result<()> {
        let mut changes = self.tree.clone();
        let waited = tokio::time::timeout(bound, async {
            loop {
                if done(&changes.borrow_and_update()) {
                    return Ok(());
                }
                if changes.changed().await.is_err() {
                    return Err(Error::Closed);
                }
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            Err(Error::Timeout {
                operation: format!("waiting on the cache of {}", self.root),
                after: bound,
            })
        })
    }
}

impl Drop for TreeCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for TreeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tree = self.tree.borrow();
        f.debug_struct("TreeCache")
            .field("root", &self.root)
            .field("nodes", &tree.state.len())
            .field("stale", &tree.stale)
            .field("generation", &tree.generation)
            .finish()
    }
}

/// The cache's task: applies the watch's items. Ends when the registry closes, on a failure
/// that retrying cannot mend, or when the cache is dropped.
async fn follow(
    mut watch: PersistentWatch,
    tx: watch::Sender<CachedTree>,
    events: broadcast::Sender<CacheEvent>,
) {
    while let Some(item) = watch.next().await {
        let event = match item {
            Ok(PersistentItem::Event { event, .. }) => event,
            Ok(PersistentItem::Staleness) => {
                set_stale(&tx, watch.is_stale());
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "the cache's watch failed for good; it stays stale");
                fail(&tx, error);
                return;
            }
        };
        let replaces = matches!(event, WatchEvent::Snapshot(_) | WatchEvent::Resync { .. });
        let stale = watch.is_stale();
        tx.send_if_modified(|tree| {
            let mut changes = Vec::new();
            let changed = if replaces {
                let mut next = WatchedState::new();
                next.apply(&event);
                compare(&tree.state, &next, &mut changes);
                let changed = !changes.is_empty();
                tree.state = next;
                changed
            } else {
                changes.extend(change(&tree.state, &event));
                tree.state.apply(&event);
                // A deletion of a node the copy lacks, or a write of what it holds, is none.
                !changes.is_empty()
            };
            // Told under the write lock: a listener subscribes under the read lock, so each
            // change is either in the copy it started from or told to it, never both.
            if events.receiver_count() > 0 {
                for change in changes {
                    // The last listener gone meanwhile is no error.
                    let _ = events.send(change);
                }
            }
            let changed = changed || tree.stale != stale;
            tree.stale = stale;
            if changed {
                tree.generation += 1;
            }
            changed
        });
    }
    set_stale(&tx, true);
}

/// What `event` changes of `copy`, before it is applied (nothing, for a write that leaves a
/// node as the copy holds it or a deletion of a node it does not hold).
fn change(copy: &WatchedState, event: &WatchEvent) -> Option<CacheEvent> {
    match event {
        WatchEvent::Created(node) | WatchEvent::Updated(node) => {
            written(copy.get(&node.path), node)
        }
        WatchEvent::Deleted(node) => copy.get(&node.path).cloned().map(CacheEvent::Deleted),
        WatchEvent::Snapshot(_) | WatchEvent::Resync { .. } => None,
    }
}

/// What finding `node` where the copy held `was` means: created, updated, or nothing.
fn written(was: Option<&Node>, node: &Node) -> Option<CacheEvent> {
    match was {
        None => Some(CacheEvent::Created(node.clone())),
        Some(old) if old != node => Some(CacheEvent::Updated {
            old: old.clone(),
            new: node.clone(),
        }),
        Some(_) => None,
    }
}

/// The changes from `old` to `new`, in the order the contract gives one atomic change's
/// events: deletions children first (reverse path order puts every node after its
/// descendants), then creations and updates parents first.
fn compare(old: &WatchedState, new: &WatchedState, changes: &mut Vec<CacheEvent>) {
    let gone: Vec<&Node> = old.nodes().filter(|n| new.get(&n.path).is_none()).collect();
    changes.extend(gone.into_iter().rev().cloned().map(CacheEvent::Deleted));
    changes.extend(
        new.nodes()
            .filter_map(|node| written(old.get(&node.path), node)),
    );
}

/// Marks the copy stale (or fresh), a change only if it was not already.
fn set_stale(tx: &watch::Sender<CachedTree>, stale: bool) {
    tx.send_if_modified(|tree| {
        let changed = tree.stale != stale;
        if changed {
            tree.stale = stale;
            tree.generation += 1;
        }
        changed
    });
}

/// Ends the following: the copy stays stale, with `error` as the reason.
fn fail(tx: &watch::Sender<CachedTree>, error: Error) {
    tx.send_modify(|tree| {
        tree.stale = true;
        tree.failure = Some(Arc::new(error));
        tree.generation += 1;
    });
}

//! A live local copy of part of the tree, kept current by one watch: what Curator's
//! `CuratorCache` is to ZooKeeper, on any backend, built only on [`Registry`].

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{
    Backoff, Error, Node, NodePath, Registry, Result, SessionState, WatchEvent, WatchOptions,
    WatchScope, WatchStream, WatchedState,
};

/// How long [`TreeCache::open`] waits for the watch's first snapshot.
const FIRST_SNAPSHOT: Duration = Duration::from_secs(30);

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
        let mut children: Vec<&Node> = self
            .state
            .below(parent)
            .filter(|n| n.path.is_child_of(parent))
            .collect();
        children.sort_by_key(|n| n.create_order);
        children
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
    task: JoinHandle<()>,
}

impl TreeCache {
    /// Watches what `scope` covers of `root` and returns once the first snapshot is in the
    /// copy. Errors: the watch's own (an invalid path, [`Closed`](Error::Closed), ...), or
    /// [`Timeout`](Error::Timeout) when no snapshot comes within 30 s.
    pub async fn open(
        registry: Arc<dyn Registry>,
        root: &NodePath,
        scope: WatchScope,
    ) -> Result<TreeCache> {
        // Every event, from a snapshot: a copy built from fewer would be wrong and say fresh.
        let options = WatchOptions::scoped(scope);
        let mut stream = registry.watch(root, options.clone()).await?;
        let first = match tokio::time::timeout(FIRST_SNAPSHOT, stream.next()).await {
            Ok(Some(Ok(first @ (WatchEvent::Snapshot(_) | WatchEvent::Resync { .. })))) => first,
            Ok(Some(Ok(other))) => {
                return Err(Error::Backend {
                    backend: "tree cache",
                    message: format!("the watch of {root} began with {other:?}, not a snapshot"),
                    source: None,
                })
            }
            Ok(Some(Err(error))) => return Err(error),
            Ok(None) => return Err(Error::unavailable(format!("the watch of {root} ended"))),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: format!("first snapshot of {root}"),
                    after: FIRST_SNAPSHOT,
                })
            }
        };
        let mut state = WatchedState::new();
        state.apply(&first);
        let (tx, tree) = watch::channel(CachedTree {
            state,
            stale: !registry.session().state.is_live(),
            generation: 1,
            failure: None,
        });
        let span = tracing::info_span!("tree_cache", root = %root);
        let task =
            tokio::spawn(follow(registry, root.clone(), options, stream, tx).instrument(span));
        Ok(TreeCache {
            root: root.clone(),
            tree,
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

/// The cache's task: applies the watch's items, and watches anew after a break or a lost
/// session. Ends when the registry closes (or the cache is dropped).
async fn follow(
    registry: Arc<dyn Registry>,
    root: NodePath,
    options: WatchOptions,
    mut stream: WatchStream,
    tx: watch::Sender<CachedTree>,
) {
    let mut sessions = registry.session_events();
    let mut live = registry.session().state.is_live();
    // A new watch's snapshot not in yet: the copy mixes the old state with what came since.
    let mut awaiting = false;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::select! {
            // Session first: a loss queued with stream items changes what they mean.
            biased;
            status = sessions.next() => {
                let Some(status) = status.filter(|s| s.state != SessionState::Closed) else {
                    set_stale(&tx, true);
                    return;
                };
                let was_live = std::mem::replace(&mut live, status.state.is_live());
                if live && !was_live {
                    // Back after a cut: what changed meanwhile may still be on its way, and
                    // no backend says when it has all come. A new watch starts with a
                    // snapshot read now, so the copy is fresh once that is in.
                    backoff.reset();
                    let Some(next) = reopen(&*registry, &root, &options, &mut backoff, &tx).await
                    else {
                        return;
                    };
                    (stream, awaiting) = (next, true);
                    continue;
                }
                set_stale(&tx, !live || awaiting);
            }
            item = stream.next() => {
                let event = match item {
                    Some(Ok(event)) => event,
                    Some(Err(Error::Closed)) => {
                        set_stale(&tx, true);
                        return;
                    }
                    Some(Err(error)) if !error.is_retryable() => {
                        tracing::warn!(%error, "the cache's watch failed for good; it stays stale");
                        fail(&tx, error);
                        return;
                    }
                    ended => {
                        match ended {
                            Some(Err(error)) => {
                                tracing::warn!(%error, "the cache's watch failed; watching again");
                            }
                            _ => tracing::debug!("the cache's watch ended; watching again"),
                        }
                        let Some(next) = reopen(&*registry, &root, &options, &mut backoff, &tx).await
                        else {
                            return;
                        };
                        (stream, awaiting) = (next, true);
                        continue;
                    }
                };
                backoff.reset();
                let replaces = matches!(event, WatchEvent::Snapshot(_) | WatchEvent::Resync { .. });
                if replaces {
                    tracing::debug!("cache resynced");
                    awaiting = false;
                }
                let stale = !live || !registry.session().state.is_live() || awaiting;
                tx.send_if_modified(|tree| {
                    let changed = if replaces {
                        let mut next = WatchedState::new();
                        next.apply(&event);
                        let changed = !next.nodes().eq(tree.state.nodes());
                        tree.state = next;
                        changed
                    } else {
                        tree.state.apply(&event);
                        true
                    };
                    let changed = changed || tree.stale != stale;
                    tree.stale = stale;
                    if changed {
                        tree.generation += 1;
                    }
                    changed
                });
            }
        }
    }
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

/// Marks the copy stale and opens a new watch of `root`, retried with `backoff` until one
/// opens; `None` once the registry is closed or a failure that retrying cannot mend came.
async fn reopen(
    registry: &dyn Registry,
    root: &NodePath,
    options: &WatchOptions,
    backoff: &mut Backoff,
    tx: &watch::Sender<CachedTree>,
) -> Option<WatchStream> {
    set_stale(tx, true);
    loop {
        tokio::time::sleep(backoff.next_delay()).await;
        match registry.watch(root, options.clone()).await {
            Ok(stream) => return Some(stream),
            Err(Error::Closed) => return None,
            Err(error) if !error.is_retryable() => {
                tracing::warn!(%error, "watching again failed for good; the cache stays stale");
                fail(tx, error);
                return None;
            }
            Err(error) => tracing::warn!(%error, "watching again failed; retrying"),
        }
    }
}

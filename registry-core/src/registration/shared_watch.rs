//! Children watches shared by one client's registrations, one per parent node.
//!
//! A registration must hear of its node going. One node watch each costs the server
//! a watcher per registration, and a session loss then sends a burst of events to thousands of
//! watchers at once: etcd queues 128 responses per gRPC stream and retries the rest every
//! 10 ms, which made re-registering 10k nodes take seconds longer than the writes themselves.
//! Registrations under one parent (a service's instances) share a single children watch here
//! instead, and each gets the events of its own path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::node::Node;
use crate::path::NodePath;
use crate::registry::Registry;
use crate::watch::{Snapshot, WatchEvent, WatchOptions, WatchStream};

/// Events buffered per registration; one that falls further behind is cut off, and its
/// registration then checks its node itself.
const EVENTS_PER_NODE: usize = 64;

/// What a subscriber's channel carries. Boxed: a tokio channel allocates its first block of
/// 32 slots up front, which for the item itself (~100 bytes) was about half of what a
/// registration keeps in memory, while a registration hears of its node rarely.
type Item = Box<Result<WatchEvent>>;

type Subscribers = HashMap<NodePath, Vec<mpsc::Sender<Item>>>;

/// The children watches a client's registrations share, one per parent (see
/// [`Registration::start_shared`](crate::Registration::start_shared)). Cheap to clone; a
/// parent's watch lives while a registration under it does.
#[derive(Clone, Default)]
pub struct RegistrationWatches {
    parents: Arc<Mutex<HashMap<NodePath, Weak<ParentWatch>>>>,
}

impl std::fmt::Debug for RegistrationWatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parents = self.parents.lock().map(|p| p.len()).unwrap_or(0);
        f.debug_struct("RegistrationWatches")
            .field("parents", &parents)
            .finish()
    }
}

impl RegistrationWatches {
    /// No watches yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The events of `path` from now on, through its parent's shared children watch (opened
    /// by the first subscriber). No snapshot comes first unless the parent's watch is new:
    /// read the node after subscribing to learn its state. The stream ends when the shared
    /// watch does (its last item is the error, if any) or when this subscriber lags.
    pub(crate) fn watch_node(&self, registry: &Arc<dyn Registry>, path: &NodePath) -> WatchStream {
        let Some(parent) = path.parent() else {
            return futures::stream::empty().boxed();
        };
        let (sender, receiver) = mpsc::channel(EVENTS_PER_NODE);
        let watch = {
            let mut parents = self.parents.lock().unwrap_or_else(|p| p.into_inner());
            // A watch that ended after this lookup refuses the subscriber (see `add`).
            let live = parents
                .get(&parent)
                .and_then(Weak::upgrade)
                .filter(|w| w.fanout.add(path.clone(), sender.clone()));
            match live {
                Some(watch) => watch,
                None => {
                    parents.retain(|_, w| w.strong_count() > 0);
                    let watch = Arc::new(ParentWatch::start(
                        registry.clone(),
                        parent.clone(),
                        (path.clone(), sender),
                    ));
                    parents.insert(parent, Arc::downgrade(&watch));
                    watch
                }
            }
        };
        let subscription = Subscription {
            receiver,
            watch,
            path: path.clone(),
        };
        futures::stream::unfold(subscription, |mut s| async move {
            let item = *s.receiver.recv().await?;
            Some((item, s))
        })
        .boxed()
    }
}

/// One registration's share of a parent watch; leaving it unsubscribes.
struct Subscription {
    receiver: mpsc::Receiver<Item>,
    watch: Arc<ParentWatch>,
    path: NodePath,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.receiver.close();
        self.watch.fanout.prune(&self.path);
    }
}

/// A parent's children watch; stopped when the last subscriber leaves.
struct ParentWatch {
    fanout: Arc<Fanout>,
    task: JoinHandle<()>,
}

impl ParentWatch {
    /// Starts the watch with its `first` subscriber in place, so even a watch that fails at
    /// once reaches it.
    fn start(
        registry: Arc<dyn Registry>,
        parent: NodePath,
        first: (NodePath, mpsc::Sender<Item>),
    ) -> ParentWatch {
        let fanout = Arc::new(Fanout::default());
        fanout.add(first.0, first.1);
        // Not under the first subscriber's span: the watch outlives that registration.
        let span = tracing::debug_span!(parent: None, "registration_watch", parent = %parent);
        let task = tokio::spawn(follow(registry, parent, fanout.clone()).instrument(span));
        ParentWatch { fanout, task }
    }
}

impl Drop for ParentWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(registry: Arc<dyn Registry>, parent: NodePath, fanout: Arc<Fanout>) {
    // A registration acts on its node going, not on writes to it (see `heal`): so the server
    // sends nothing per register, and a parent with many registrations (a busy service's
    // instances, each registering and updating) wakes this task only when one goes.
    let options = WatchOptions::children().deletions_only();
    let mut stream = match registry.watch(&parent, options).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(%error, "cannot watch the registrations' parent");
            fanout.end(Some(error));
            return;
        }
    };
    // Ends with the stream: when the registry closes or the watch fails.
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => fanout.dispatch(event),
            Err(error) => {
                fanout.end(Some(error));
                return;
            }
        }
    }
    fanout.end(None);
}

/// The subscribers of one parent watch, by node path.
#[derive(Default)]
struct Fanout {
    subscribers: Mutex<Subscribers>,
    ended: AtomicBool,
}

impl Fanout {
    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes `sender` to `path`'s events; false (and nothing kept) if the watch has
    /// ended, so the caller starts another. Checked under the lock `end` takes the
    /// subscribers with, so a subscriber is either ended by `end` or refused here.
    fn add(&self, path: NodePath, sender: mpsc::Sender<Item>) -> bool {
        let mut subscribers = self.lock();
        if self.ended.load(Ordering::SeqCst) {
            return false;
        }
        subscribers.entry(path).or_default().push(sender);
        true
    }

    fn prune(&self, path: &NodePath) {
        let mut subscribers = self.lock();
        if let Some(senders) = subscribers.get_mut(path) {
            senders.retain(|s| !s.is_closed());
            if senders.is_empty() {
                subscribers.remove(path);
            }
        }
    }

    /// Hands each subscriber the part of `event` about its node: a change of its path, or a
    /// (re)read of the parent cut down to its node.
    fn dispatch(&self, event: WatchEvent) {
        let mut subscribers = self.lock();
        // A (re)read of the parent: each subscriber gets it cut down to its node.
        let mut per_node = |snapshot: &Snapshot, wrap: &dyn Fn(Snapshot) -> WatchEvent| {
            let by_path: HashMap<&NodePath, &Node> =
                snapshot.nodes.iter().map(|n| (&n.path, n)).collect();
            for (path, senders) in subscribers.iter_mut() {
                let own = Snapshot {
                    nodes: by_path
                        .get(path)
                        .map(|n| vec![(*n).clone()])
                        .unwrap_or_default(),
                    revision: snapshot.revision,
                };
                send_all(senders, wrap(own));
            }
        };
        match event {
            WatchEvent::Snapshot(snapshot) => per_node(&snapshot, &WatchEvent::Snapshot),
            WatchEvent::Resync { snapshot, reason } => {
                per_node(&snapshot, &|own| WatchEvent::Resync {
                    snapshot: own,
                    reason: reason.clone(),
                })
            }
            WatchEvent::Created(ref node)
            | WatchEvent::Updated(ref node)
            | WatchEvent::Deleted(ref node) => {
                // Only this path's entry can have emptied: a change costs the same however
                // many registrations share the parent (a session loss brings one per node).
                if let Some(senders) = subscribers.get_mut(&node.path) {
                    send_all(senders, event.clone());
                    if senders.is_empty() {
                        subscribers.remove(&node.path);
                    }
                }
                return;
            }
        }
        subscribers.retain(|_, senders| !senders.is_empty());
    }

    /// The watch is over: every subscriber gets `error` (if any) and then the end.
    fn end(&self, error: Option<Error>) {
        let subscribers = {
            let mut subscribers = self.lock();
            self.ended.store(true, Ordering::SeqCst);
            std::mem::take(&mut *subscribers)
        };
        if let Some(error) = error {
            for sender in subscribers.values().flatten() {
                // Closed is passed on as such: it tells a registration to stop.
                let copy = match &error {
                    Error::Closed => Error::Closed,
                    other => Error::unavailable(format!("registrations' parent watch: {other}")),
                };
                let _ = sender.try_send(Box::new(Err(copy)));
            }
        }
    }
}

/// Sends to every sender; one that is gone or full is dropped (a full one then sees its
/// stream end and its registration re-checks the node).
fn send_all(senders: &mut Vec<mpsc::Sender<Item>>, event: WatchEvent) {
    senders.retain(|s| s.try_send(Box::new(Ok(event.clone()))).is_ok());
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
    use crate::node::CreateMode;
    use crate::{DeleteScope, Expected};

    async fn next(events: &mut WatchStream) -> Option<Result<WatchEvent>> {
        tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s")
    }

    /// A registration acts only on its node going, so no write wakes it: the next event its
    /// subscriber gets after its own create and another client's update is that client's
    /// delete.
    #[tokio::test]
    async fn a_subscriber_is_handed_deletions_only() {
        let store = MemoryStore::new();
        let ours: Arc<dyn Registry> = Arc::new(
            MemoryRegistry::connect(&store, MemoryOptions::default())
                .await
                .unwrap(),
        );
        let other = MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap();
        let parent = NodePath::new("/svc").unwrap();
        let node = parent.join("a").unwrap();
        ours.create(&parent, Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
        let watches = RegistrationWatches::new();
        let mut events = watches.watch_node(&ours, &node);
        // A new parent watch starts with its read of the parent.
        match next(&mut events).await {
            Some(Ok(WatchEvent::Snapshot(s))) => assert!(s.nodes.is_empty(), "{s:?}"),
            other => panic!("expected the first snapshot, got {other:?}"),
        }
        ours.create(&node, Bytes::from("v"), CreateMode::Ephemeral)
            .await
            .unwrap();
        other
            .set(&node, Bytes::from("w"), Expected::Any)
            .await
            .unwrap();
        other
            .delete(&node, Expected::Any, DeleteScope::Node)
            .await
            .unwrap();
        match next(&mut events).await {
            Some(Ok(WatchEvent::Deleted(gone))) => assert_eq!(gone.path, node),
            other => panic!("expected the other client's delete, got {other:?}"),
        }
    }
}

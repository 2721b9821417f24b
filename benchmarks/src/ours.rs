//! Our layer: a `Registry` of either backend, and the watchers scenarios share with the raw
//! side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use registry_core::{
    Bytes, CreateMode, Error, NodePath, Registry, WatchEvent, WatchOptions, WatchedState,
};
use registry_etcd::{EtcdOptions, EtcdRegistry};
use registry_zk::{ZkOptions, ZkRegistry};
use tokio::sync::mpsc::UnboundedSender;

use crate::raw::Seen;
use crate::util::{within, BenchResult, Ctx, Task};

/// Events one watcher task handles at most.
const MAX_WATCH_EVENTS: usize = 10_000_000;

/// The backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// etcd.
    Etcd,
    /// ZooKeeper.
    Zk,
}

impl Backend {
    /// The name used in rows.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Etcd => "etcd",
            Backend::Zk => "zookeeper",
        }
    }
}

/// A client of our layer.
#[derive(Clone)]
pub struct Ours {
    /// The registry as applications use it.
    pub reg: Arc<dyn Registry>,
}

/// A path from a string the bench built itself.
pub fn path(s: &str) -> BenchResult<NodePath> {
    NodePath::new(s).ctx(format!("path {s:?}"))
}

impl Ours {
    /// Connects to `target` (etcd endpoint or ZooKeeper connect string) with session TTL
    /// `ttl`.
    pub async fn connect(backend: Backend, target: &str, ttl: Duration) -> BenchResult<Ours> {
        match backend {
            Backend::Etcd => {
                let reg = EtcdRegistry::connect(EtcdOptions::new([target]).with_session_ttl(ttl))
                    .await
                    .ctx(format!("connect our etcd registry to {target}"))?;
                Ok(Ours { reg: Arc::new(reg) })
            }
            Backend::Zk => {
                let reg = ZkRegistry::connect(ZkOptions::new([target]).with_session_ttl(ttl))
                    .await
                    .ctx(format!("connect our zookeeper registry to {target}"))?;
                Ok(Ours { reg: Arc::new(reg) })
            }
        }
    }

    /// Creates a persistent node (and its parents) unless it exists.
    pub async fn mkdir(&self, at: &str) -> BenchResult<()> {
        match self
            .reg
            .create(&path(at)?, Bytes::new(), CreateMode::Persistent)
            .await
        {
            Ok(_) | Err(Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(format!("create {at}: {e}")),
        }
    }

    /// Watches one node; every change is sent as `(index, value, when)` (`None`: deleted).
    /// Returns once the first snapshot arrived (the watch is in place).
    pub async fn watch_node(
        &self,
        at: &str,
        index: usize,
        tx: UnboundedSender<Seen>,
    ) -> BenchResult<Task> {
        let mut stream = self
            .reg
            .watch(&path(at)?, WatchOptions::node())
            .await
            .ctx(format!("watch {at}"))?;
        within(
            Duration::from_secs(10),
            format!("snapshot of {at}"),
            async {
                match stream.next().await {
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => Err(format!("watch {at}: {e}")),
                    None => Err(format!("watch {at} ended")),
                }
            },
        )
        .await?;
        Ok(Task::spawn(async move {
            for _ in 0..MAX_WATCH_EVENTS {
                let Some(Ok(event)) = stream.next().await else {
                    return;
                };
                let now = Instant::now();
                let seen = match event {
                    WatchEvent::Created(n) | WatchEvent::Updated(n) => Some(n.value),
                    WatchEvent::Deleted(_) => None,
                    WatchEvent::Resync { snapshot, .. } | WatchEvent::Snapshot(snapshot) => {
                        snapshot.nodes.into_iter().next().map(|n| n.value)
                    }
                };
                if tx.send((index, seen, now)).is_err() {
                    return;
                }
            }
        }))
    }

    /// Watches the children of `parent`; sends how many exist (and when) whenever that
    /// changes. Returns once the first snapshot arrived.
    pub async fn watch_children(
        &self,
        parent: &str,
        tx: UnboundedSender<(usize, Instant)>,
    ) -> BenchResult<Task> {
        let mut stream = self
            .reg
            .watch(&path(parent)?, WatchOptions::children())
            .await
            .ctx(format!("watch children of {parent}"))?;
        let mut state = WatchedState::new();
        within(
            Duration::from_secs(10),
            format!("snapshot of {parent}"),
            async {
                match stream.next().await {
                    Some(Ok(first)) => {
                        state.apply(&first);
                        Ok(())
                    }
                    Some(Err(e)) => Err(format!("watch {parent}: {e}")),
                    None => Err(format!("watch {parent} ended")),
                }
            },
        )
        .await?;
        Ok(Task::spawn(async move {
            for _ in 0..MAX_WATCH_EVENTS {
                let Some(Ok(event)) = stream.next().await else {
                    return;
                };
                let before = state.len();
                state.apply(&event);
                if state.len() != before && tx.send((state.len(), Instant::now())).is_err() {
                    return;
                }
            }
        }))
    }
}

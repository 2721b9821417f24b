//! Watches on ZooKeeper: converging snapshots over re-armed one-shot watches.
//!
//! Each stream's task reads everything in scope, arming a one-shot watch on every node it
//! reads (data watches on nodes, child watches on parents, an existence watch on a missing
//! root). When any watch fires, or the connection comes back, it drops the rest, reads again
//! and emits only the net difference from what it already delivered: `Deleted` children
//! before parents, then `Created`/`Updated` in `mzxid` order; a node deleted and re-created
//! in between (another `czxid`) is reported as both. A change undone between two reads is
//! not seen (`Capabilities::exact_events` is false). After a session loss the next read is
//! delivered as a `Resync`. A stream's buffer holds [`WATCH_BUFFER`] items; a consumer that
//! falls behind is sent one `Resync` (`Lagged`) once it catches up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use registry_core::{
    Backoff, Error, Node, NodePath, Result, ResyncReason, Revision, SessionId, SessionState,
    Snapshot, WatchEvent, WatchScope, WatchStream,
};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use zookeeper_client as zk;

use crate::error::map;
use crate::Shared;

/// Items buffered per watch stream before the consumer counts as lagging.
pub const WATCH_BUFFER: usize = 4096;

type Armed = FuturesUnordered<BoxFuture<'static, zk::WatchedEvent>>;

pub(crate) fn node_of(path: NodePath, data: Vec<u8>, stat: &zk::Stat) -> Node {
    Node {
        path,
        value: Bytes::from(data),
        version: u64::try_from(stat.version).unwrap_or(0),
        create_order: u64::try_from(stat.czxid).unwrap_or(0),
        modify_order: u64::try_from(stat.mzxid).unwrap_or(0),
        ephemeral_owner: (stat.ephemeral_owner != 0).then_some(SessionId(stat.ephemeral_owner)),
    }
}

struct Read {
    nodes: BTreeMap<NodePath, Node>,
    armed: Armed,
    revision: u64,
}

fn arm(armed: &Armed, watcher: zk::OneshotWatcher) {
    armed.push(Box::pin(watcher.changed()));
}

/// Reads a node with a data watch; a missing node gets an existence watch instead.
async fn read_node(client: &zk::Client, path: &NodePath, read: &mut Read) -> Result<bool> {
    // Bounded: a node that keeps appearing and vanishing between the two calls gives up.
    for _ in 0..8 {
        match client.get_and_watch_data(path.as_str()).await {
            Ok((data, stat, watcher)) => {
                arm(&read.armed, watcher);
                read.revision = read.revision.max(u64::try_from(stat.mzxid).unwrap_or(0));
                if !path.is_root() {
                    read.nodes
                        .insert(path.clone(), node_of(path.clone(), data, &stat));
                }
                return Ok(true);
            }
            Err(zk::Error::NoNode) => match client.check_and_watch_stat(path.as_str()).await {
                Ok((None, watcher)) => {
                    arm(&read.armed, watcher);
                    return Ok(false);
                }
                Ok((Some(_), _)) => continue,
                Err(e) => return Err(map(e, "watch", path)),
            },
            Err(e) => return Err(map(e, "watch", path)),
        }
    }
    Err(Error::unavailable(format!(
        "zookeeper watch {path}: node keeps changing"
    )))
}

async fn read_children(
    client: &zk::Client,
    path: &NodePath,
    read: &mut Read,
) -> Result<Vec<NodePath>> {
    match client.get_and_watch_children(path.as_str()).await {
        Ok((names, stat, watcher)) => {
            arm(&read.armed, watcher);
            read.revision = read.revision.max(u64::try_from(stat.pzxid).unwrap_or(0));
            Ok(names.iter().filter_map(|n| path.join(n).ok()).collect())
        }
        Err(zk::Error::NoNode) => Ok(Vec::new()),
        Err(e) => Err(map(e, "watch children", path)),
    }
}

/// Reads everything in scope, arming a watch on each part read.
async fn read_scope(client: &zk::Client, root: &NodePath, scope: WatchScope) -> Result<Read> {
    let mut read = Read {
        nodes: BTreeMap::new(),
        armed: FuturesUnordered::new(),
        revision: 0,
    };
    match scope {
        WatchScope::Node => {
            read_node(client, root, &mut read).await?;
        }
        WatchScope::Children => {
            if read_node_exists(client, root, &mut read).await? {
                for child in read_children(client, root, &mut read).await? {
                    read_node(client, &child, &mut read).await?;
                }
            }
        }
        WatchScope::Subtree => {
            let mut pending = vec![root.clone()];
            while let Some(path) = pending.pop() {
                if read_node(client, &path, &mut read).await? {
                    pending.extend(read_children(client, &path, &mut read).await?);
                }
            }
        }
    }
    Ok(read)
}

/// Like `read_node` but keeps the node out of the results (children scope).
async fn read_node_exists(client: &zk::Client, root: &NodePath, read: &mut Read) -> Result<bool> {
    let before = read.nodes.clone();
    let exists = read_node(client, root, read).await?;
    read.nodes = before;
    Ok(exists)
}

/// The events that turn `old` into `new`.
fn diff(old: &BTreeMap<NodePath, Node>, new: &BTreeMap<NodePath, Node>) -> Vec<WatchEvent> {
    let mut deleted: Vec<&Node> = Vec::new();
    let mut changed: Vec<WatchEvent> = Vec::new();
    for (path, before) in old {
        match new.get(path) {
            None => deleted.push(before),
            Some(after) if after.create_order != before.create_order => {
                deleted.push(before);
                changed.push(WatchEvent::Created(after.clone()));
            }
            Some(after)
                if after.modify_order != before.modify_order || after.version != before.version =>
            {
                changed.push(WatchEvent::Updated(after.clone()));
            }
            Some(_) => {}
        }
    }
    for (path, after) in new {
        if !old.contains_key(path) {
            changed.push(WatchEvent::Created(after.clone()));
        }
    }
    deleted.sort_by(|a, b| b.path.cmp(&a.path));
    changed.sort_by_key(|e| match e {
        WatchEvent::Created(n) | WatchEvent::Updated(n) => (n.modify_order, n.path.clone()),
        _ => (0, NodePath::root()),
    });
    deleted
        .into_iter()
        .map(|n| WatchEvent::Deleted(n.clone()))
        .chain(changed)
        .collect()
}

/// Opens a watch stream.
pub(crate) fn open(
    shared: Arc<Shared>,
    root: NodePath,
    scope: WatchScope,
    replay: bool,
) -> WatchStream {
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let span = tracing::debug_span!("zk_watch", path = %root, ?scope);
    tokio::spawn(run(shared, root, scope, replay, tx).instrument(span));
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}

enum Wake {
    Changed,
    Reconnected,
    Stop,
}

async fn run(
    shared: Arc<Shared>,
    root: NodePath,
    scope: WatchScope,
    replay: bool,
    tx: mpsc::Sender<Result<WatchEvent>>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut sessions = shared.tracker.subscribe();
    // The first item is the state at subscription: not a change.
    let _ = sessions.next().await;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut delivered: Option<BTreeMap<NodePath, Node>> = None;
    let mut epoch = shared.tracker.status().epoch;
    let mut lagged = false;
    let mut first_reason = replay.then_some(ResyncReason::StartNotReplayable);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let client = match shared.client() {
            Ok(c) => c,
            Err(_) => return,
        };
        let read = match read_scope(&client, &root, scope).await {
            Ok(read) => read,
            Err(Error::Closed) => return,
            // Retrying cannot fix these: the consumer gets the error and the stream ends.
            Err(error @ (Error::PermissionDenied { .. } | Error::AuthFailed(_))) => {
                tracing::warn!(%error, "watch read refused; ending the stream");
                let _ = tx.send(Err(error)).await;
                return;
            }
            Err(error) => {
                tracing::debug!(%error, "watch read failed; retrying");
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                continue;
            }
        };
        backoff.reset();
        let now_epoch = shared.tracker.status().epoch;
        let snapshot = || Snapshot {
            nodes: read.nodes.values().cloned().collect(),
            revision: Revision(read.revision),
        };
        let items: Vec<WatchEvent> = match &delivered {
            None => vec![match first_reason.take() {
                Some(reason) => WatchEvent::Resync {
                    snapshot: snapshot(),
                    reason,
                },
                None => WatchEvent::Snapshot(snapshot()),
            }],
            Some(_) if now_epoch != epoch => vec![WatchEvent::Resync {
                snapshot: snapshot(),
                reason: ResyncReason::SessionReestablished,
            }],
            Some(_) if lagged => vec![WatchEvent::Resync {
                snapshot: snapshot(),
                reason: ResyncReason::Lagged,
            }],
            Some(old) => diff(old, &read.nodes),
        };
        epoch = now_epoch;
        lagged = false;
        for item in items {
            match tx.try_send(Ok(item)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    lagged = true;
                    break;
                }
            }
        }
        delivered = Some(read.nodes);
        if lagged {
            // Wait for room, then read again and deliver a Resync.
            if tx.reserve().await.is_err() {
                return;
            }
            continue;
        }
        let mut armed = read.armed;
        match wait(&mut armed, &mut sessions, &mut shutdown, &tx).await {
            Wake::Stop => return,
            Wake::Changed | Wake::Reconnected => {}
        }
    }
}

async fn wait(
    armed: &mut Armed,
    sessions: &mut futures::stream::BoxStream<'static, registry_core::SessionStatus>,
    shutdown: &mut watch::Receiver<bool>,
    tx: &mpsc::Sender<Result<WatchEvent>>,
) -> Wake {
    loop {
        tokio::select! {
            _ = tx.closed() => return Wake::Stop,
            _ = shutdown.changed() => return Wake::Stop,
            fired = armed.next(), if !armed.is_empty() => {
                let _ = fired;
                return Wake::Changed;
            }
            status = sessions.next() => match status {
                None => return Wake::Stop,
                Some(s) if s.state == SessionState::Closed => return Wake::Stop,
                Some(s) if s.state.is_live() => return Wake::Reconnected,
                Some(_) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str, czxid: u64, mzxid: u64) -> Node {
        Node {
            path: NodePath::new(path).unwrap(),
            value: Bytes::new(),
            version: 0,
            create_order: czxid,
            modify_order: mzxid,
            ephemeral_owner: None,
        }
    }

    fn map(nodes: &[Node]) -> BTreeMap<NodePath, Node> {
        nodes.iter().map(|n| (n.path.clone(), n.clone())).collect()
    }

    #[test]
    fn diff_reports_net_changes_in_order() {
        let old = map(&[n("/a", 1, 1), n("/a/b", 2, 2), n("/c", 3, 3), n("/d", 4, 4)]);
        let new = map(&[n("/a", 1, 9), n("/c", 7, 7), n("/d", 4, 4), n("/e", 8, 8)]);
        let events: Vec<String> = diff(&old, &new)
            .iter()
            .map(|e| match e {
                WatchEvent::Created(n) => format!("+{}", n.path),
                WatchEvent::Updated(n) => format!("~{}", n.path),
                WatchEvent::Deleted(n) => format!("-{}", n.path),
                _ => String::new(),
            })
            .collect();
        assert_eq!(events, ["-/c", "-/a/b", "+/c", "+/e", "~/a"]);
    }
}

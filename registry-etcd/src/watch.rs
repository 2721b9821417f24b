//! Watches: a snapshot read, then etcd's watch from the snapshot's revision + 1, resumed
//! after any break from the last fully delivered revision + 1.
//!
//! One task per stream feeds a bounded channel of [`WATCH_BUFFER`] items. When it is full,
//! the task waits for room with the response it holds, and stops reading from etcd meanwhile.
//! A compacted resume point ends in a fresh read and a `Resync` (`Compacted`).
//!
//! The etcd watches of all streams of a client share one gRPC stream (see the private `hub`
//! module): a new watch costs a create request, not a stream. A stream task that falls
//! behind the shared stream (a consumer that stopped reading) is cut off by it and continues
//! with a `Resync` (`Lagged`) from a fresh read: memory stays bounded and writers are never
//! slowed. A broken shared stream makes every task resume from its last revision + 1.
//!
//! Failures retrying cannot fix (a read or a watch the user may not make) end the stream
//! with the error; the others are retried with backoff for as long as the client lives.
//!
//! A deleted node is reported as last delivered, from the task's copy of the scope: etcd's
//! `prev_kv` would cost the server a read per event and watcher. Only a stream started after a
//! revision, which has no snapshot to start the copy from, asks etcd for it. A
//! deletions-only stream asks etcd to leave out puts (`NoPut`), so its copy never learns of
//! nodes written after its read: their deletions carry the key and the delete's revision.
//! Its resume point moves only with deletions and with etcd's progress notifications (every
//! 10 minutes by default), so after a break it may resume from further back than a stream of
//! every event would, or from a compacted revision, which ends in a `Resync` (`Compacted`).
//! Asking for progress (etcd's `RequestProgress`) would move it sooner, but servers without
//! the fix for etcd-io/etcd#15220 (Debian's 3.4.23 among them) may answer it ahead of events
//! still queued for the stream: a resume point taken from that answer would skip them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchFilterType,
    WatchOptions as EtcdWatchOptions,
};
use futures::StreamExt;
use registry_core::{
    Backoff, Error, Node, NodePath, Result, ResyncReason, Snapshot, WatchEvent, WatchOptions,
    WatchScope, WatchStream,
};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::error::{map, watch_refused};
use crate::hub::Ended;
use crate::keys::{subtree_end, Keys};
use crate::Shared;

/// Items buffered per watch stream before the consumer counts as lagging.
pub const WATCH_BUFFER: usize = 4096;

/// Reads every node in scope at one revision.
pub(crate) async fn read_scope(
    shared: &Shared,
    root: &NodePath,
    scope: WatchScope,
) -> Result<(Vec<Node>, i64)> {
    let keys = &shared.keys;
    let mut ops = Vec::new();
    if !root.is_root() {
        ops.push(TxnOp::get(keys.node(root), None));
    }
    if scope != WatchScope::Node {
        ops.push(TxnOp::get(
            keys.below(root),
            Some(GetOptions::new().with_prefix()),
        ));
    }
    let response = shared
        .txn(Txn::new().and_then(ops), "watch read", root)
        .await?;
    let revision = response.header().map_or(0, |h| h.revision());
    let mut nodes = Vec::new();
    for op in response.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            nodes.extend(
                get.kvs()
                    .iter()
                    .filter_map(|kv| keys.node_of(kv))
                    .filter(|n| scope.covers(root, &n.path)),
            );
        }
    }
    nodes.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((nodes, revision))
}

fn watch_range(keys: &Keys, watched: &Watched, prev_kv: bool) -> (String, EtcdWatchOptions) {
    let (root, scope) = (&watched.root, watched.scope);
    let mut options = EtcdWatchOptions::new().with_progress_notify();
    if prev_kv {
        options = options.with_prev_key();
    }
    if watched.deletions_only {
        options = options.with_filters([WatchFilterType::NoPut]);
    }
    match (scope, root.is_root()) {
        (WatchScope::Node, _) => (keys.node(root), options),
        (WatchScope::Children, _) | (WatchScope::Subtree, true) => {
            (keys.below(root), options.with_prefix())
        }
        (WatchScope::Subtree, false) => {
            let key = keys.node(root);
            let end = subtree_end(&key);
            (key, options.with_range(end))
        }
    }
}

/// What a stream watches.
struct Watched {
    root: NodePath,
    scope: WatchScope,
    /// Puts are left out on the server (see [`WatchOptions::deletions_only`]).
    deletions_only: bool,
}

enum Break {
    /// The stream failed; resume from the last delivered revision.
    Resume,
    /// Start over from a fresh read.
    Resync(ResyncReason),
    /// The server refused the watch for good: end the stream with this error.
    Refused(Error),
    /// The consumer is gone or the registry closed.
    Stop,
}

/// Opens a watch stream; `after` starts after a past revision instead of with a snapshot.
pub(crate) fn open(
    shared: Arc<Shared>,
    root: NodePath,
    options: &WatchOptions,
    after: Option<i64>,
) -> WatchStream {
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let scope = options.scope;
    let span = tracing::debug_span!("etcd_watch", path = %root, ?scope, deletions_only = options.deletions_only);
    let shutdown = shared.shutdown.subscribe();
    let watched = Watched {
        root,
        scope,
        deletions_only: options.deletions_only,
    };
    tokio::spawn(run(shared, watched, after, tx, shutdown).instrument(span));
    tokio_stream_from(rx)
}

fn tokio_stream_from(rx: mpsc::Receiver<Result<WatchEvent>>) -> WatchStream {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}

async fn run(
    shared: Arc<Shared>,
    watched: Watched,
    after: Option<i64>,
    tx: mpsc::Sender<Result<WatchEvent>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), RETRY_MAX);
    // None: the first read is the Snapshot; Some(reason): a Resync.
    let mut pending: Option<Option<ResyncReason>> = if after.is_some() { None } else { Some(None) };
    let mut last = after.unwrap_or(0);
    // What was delivered, to report deleted nodes; unknown until a snapshot is read.
    let mut known: Option<HashMap<NodePath, Node>> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if let Some(reason) = pending.take() {
            match read_scope(&shared, &watched.root, watched.scope).await {
                Ok((nodes, revision)) => {
                    known = Some(nodes.iter().map(|n| (n.path.clone(), n.clone())).collect());
                    let snapshot = Snapshot {
                        nodes,
                        revision: registry_core::Revision(u64::try_from(revision).unwrap_or(0)),
                    };
                    let item = match reason {
                        None => WatchEvent::Snapshot(snapshot),
                        Some(reason) => WatchEvent::Resync { snapshot, reason },
                    };
                    if tx.send(Ok(item)).await.is_err() {
                        return;
                    }
                    last = revision;
                    backoff.reset();
                }
                Err(Error::Closed) => return,
                // Retrying cannot fix these (the user may not read the scope): the consumer
                // gets the error and the stream ends, as the contract says. Anything else (a
                // reset stream surfaces as an unclassified error) is retried.
                Err(error @ (Error::PermissionDenied { .. } | Error::AuthFailed(_))) => {
                    return end_with(&tx, &mut shutdown, error).await
                }
                Err(error) => {
                    tracing::debug!(%error, "watch read failed; retrying");
                    // Still owed as it was: nothing was delivered in between.
                    pending = Some(reason);
                    if sleep_or_stop(&tx, &mut shutdown, backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let mut established = None;
        match follow(
            &shared,
            &watched,
            &mut last,
            &mut known,
            &tx,
            &mut shutdown,
            &mut established,
        )
        .await
        {
            Break::Stop => return,
            Break::Refused(error) => return end_with(&tx, &mut shutdown, error).await,
            Break::Resync(reason) => {
                tracing::info!(?reason, "watch resyncs");
                pending = Some(Some(reason));
            }
            Break::Resume => {
                let held =
                    established.map_or(Duration::ZERO, |at: tokio::time::Instant| at.elapsed());
                let delay = resume_delay(&mut backoff, held);
                if sleep_or_stop(&tx, &mut shutdown, delay).await {
                    return;
                }
            }
        }
    }
}

/// The longest wait before a watch resumes or re-reads. A resumed watch that held this long
/// after etcd confirmed it starts the delays over at its next break; one that breaks (or is
/// never confirmed) right after each resume keeps backing off.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The wait before resuming a watch that held for `held`. One that held a while worked: its
/// break starts the delays over, instead of every later break waiting the longest delay.
fn resume_delay(backoff: &mut Backoff, held: Duration) -> Duration {
    if held >= RETRY_MAX {
        backoff.reset();
    }
    backoff.next_delay()
}

async fn sleep_or_stop(
    tx: &mpsc::Sender<Result<WatchEvent>>,
    shutdown: &mut watch::Receiver<bool>,
    delay: Duration,
) -> bool {
    tokio::select! {
        _ = tx.closed() => true,
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// Ends the stream with `error`, a failure retrying cannot fix.
async fn end_with(
    tx: &mpsc::Sender<Result<WatchEvent>>,
    shutdown: &mut watch::Receiver<bool>,
    error: Error,
) {
    tracing::warn!(%error, "watch refused; ending the stream");
    // Waits for room behind what the consumer has not read yet, unless the registry closes.
    tokio::select! {
        _ = tx.send(Err(error)) => {}
        _ = shutdown.changed() => {}
    }
}

/// Follows etcd's watch from `last + 1`, delivering whole revisions and advancing `last`;
/// `established`: when etcd confirmed the watch.
#[allow(clippy::too_many_arguments)]
async fn follow(
    shared: &Shared,
    watched: &Watched,
    last: &mut i64,
    known: &mut Option<HashMap<NodePath, Node>>,
    tx: &mpsc::Sender<Result<WatchEvent>>,
    shutdown: &mut watch::Receiver<bool>,
    established: &mut Option<tokio::time::Instant>,
) -> Break {
    let (root, scope) = (&watched.root, watched.scope);
    let (key, options) = watch_range(&shared.keys, watched, known.is_none());
    // Saturating: `last` may come from a server's header (lib.rs bounds the caller's).
    let options = options.with_start_revision(last.saturating_add(1));
    // Dropped on return, which cancels the watch on the server.
    let Some(mut subscription) = shared.watch_hub().subscribe(key, options) else {
        return if *shutdown.borrow() {
            Break::Stop
        } else {
            Break::Resume
        };
    };
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return Break::Stop,
            _ = shutdown.changed() => return Break::Stop,
            message = subscription.recv() => message,
        };
        let Some(response) = message else {
            // The hub ended this watch: it fell behind, logging in again failed, or the
            // shared stream broke.
            return match subscription.ended() {
                Some(Ended::Lagged) => Break::Resync(ResyncReason::Lagged),
                Some(Ended::Login(error)) => match map(error, "watch login", Some(root)) {
                    error @ (Error::AuthFailed(_) | Error::PermissionDenied { .. }) => {
                        Break::Refused(error)
                    }
                    error => {
                        tracing::debug!(%error, "logging in again for the watch failed; resuming");
                        Break::Resume
                    }
                },
                None => Break::Resume,
            };
        };
        if response.canceled() {
            if response.compact_revision() > 0 {
                return Break::Resync(ResyncReason::Compacted);
            }
            // A create refused for good (the user may not read the whole watched range).
            if let Some(error) = watch_refused(response.cancel_reason(), root) {
                return Break::Refused(error);
            }
            return Break::Resume;
        }
        if response.created() {
            *established = Some(tokio::time::Instant::now());
        }
        let events = response.events();
        if events.is_empty() {
            // A progress notification: everything up to the header's revision was sent.
            if let Some(h) = response.header() {
                if !response.created() {
                    *last = (*last).max(h.revision());
                }
            }
            continue;
        }
        let mut newest = *last;
        let mut items = Vec::with_capacity(events.len());
        for event in events {
            let Some(kv) = event.kv() else { continue };
            newest = newest.max(kv.mod_revision());
            let Some(node) = shared.keys.node_of(kv) else {
                continue;
            };
            if !scope.covers(root, &node.path) {
                continue;
            }
            let item = match event.event_type() {
                EventType::Put => {
                    if let Some(known) = known.as_mut() {
                        known.insert(node.path.clone(), node.clone());
                    }
                    if kv.version() == 1 {
                        WatchEvent::Created(node)
                    } else {
                        WatchEvent::Updated(node)
                    }
                }
                EventType::Delete => {
                    let mut gone = known
                        .as_mut()
                        .and_then(|known| known.remove(&node.path))
                        .or_else(|| event.prev_kv().and_then(|prev| shared.keys.node_of(prev)))
                        .unwrap_or(node.clone());
                    gone.modify_order = node.modify_order;
                    WatchEvent::Deleted(gone)
                }
            };
            items.push((kv.mod_revision(), item));
        }
        in_tree_order(&mut items);
        // Waiting for room drops nothing: one response can hold more events than the stream
        // buffers (a recursive delete, a resumed watch catching up), and a consumer that keeps
        // reading must get them all. One that stalls is cut off by the hub once its
        // subscription's buffer is full, and resyncs as `Lagged` then.
        for (_, item) in items {
            let sent = tokio::select! {
                sent = tx.send(Ok(item)) => sent.is_ok(),
                _ = shutdown.changed() => false,
            };
            if !sent {
                return Break::Stop;
            }
        }
        // etcd sends all events of a revision in one response (no fragmenting requested).
        *last = newest;
    }
}

/// Orders the events of each revision as the other backends report one change: deletions
/// first, children before parents, then writes, parents before children. etcd lists a
/// revision's events by key, which puts a recursive delete's parent ahead of what was below
/// it; a revision is atomic, so any order within it is a true one.
fn in_tree_order(items: &mut [(i64, WatchEvent)]) {
    let rank = |event: &WatchEvent| -> (u8, usize) {
        match event {
            WatchEvent::Deleted(n) => (0, usize::MAX - n.path.depth()),
            WatchEvent::Created(n) | WatchEvent::Updated(n) => (1, n.path.depth()),
            WatchEvent::Snapshot(_) | WatchEvent::Resync { .. } => (1, 0),
        }
    };
    // Stable: events of one revision and rank keep etcd's order.
    items.sort_by_key(|(revision, event)| (*revision, rank(event)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revision_reports_deletions_children_first_then_writes_parents_first() {
        let node = |path: &str| Node::empty(NodePath::new(path).unwrap(), None);
        let deleted = |path: &str| WatchEvent::Deleted(node(path));
        let created = |path: &str| WatchEvent::Created(node(path));
        // As etcd lists them: by key within each revision.
        let mut items = vec![
            (5, created("/a")),
            (5, created("/a/b")),
            (7, deleted("/a")),
            (7, deleted("/a/b")),
            (7, deleted("/a/b/c")),
            (7, deleted("/a/d")),
            (8, created("/x/y")),
            (8, deleted("/z")),
            (8, created("/x")),
        ];
        in_tree_order(&mut items);
        let order: Vec<(i64, String)> = items
            .iter()
            .map(|(revision, event)| match event {
                WatchEvent::Deleted(n) => (*revision, format!("-{}", n.path)),
                WatchEvent::Created(n) => (*revision, format!("+{}", n.path)),
                other => panic!("{other:?}"),
            })
            .collect();
        let expected = [
            (5, "+/a"),
            (5, "+/a/b"),
            (7, "-/a/b/c"),
            (7, "-/a/b"),
            (7, "-/a/d"),
            (7, "-/a"),
            (8, "-/z"),
            (8, "+/x"),
            (8, "+/x/y"),
        ];
        let expected: Vec<(i64, String)> =
            expected.iter().map(|(r, s)| (*r, s.to_string())).collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn a_watch_that_held_resumes_after_the_shortest_delay() {
        let mut backoff = Backoff::new(Duration::from_millis(50), RETRY_MAX);
        // Breaks right after each resume keep backing off up to the longest delay.
        for _ in 0..8 {
            resume_delay(&mut backoff, Duration::ZERO);
        }
        assert!(resume_delay(&mut backoff, Duration::from_millis(100)) >= RETRY_MAX / 2);
        assert!(resume_delay(&mut backoff, RETRY_MAX) <= Duration::from_millis(50));
    }
}

//! Watches on ZooKeeper: converging snapshots over re-armed one-shot watches.
//!
//! Each stream's task reads everything in scope, arming a one-shot watch on every node it
//! reads (data watches on nodes, child watches on parents, an existence watch on a missing
//! root). When any watch fires, or the connection comes back, it drops the rest, reads again
//! and emits only the net difference from what it already delivered: `Deleted` children
//! before parents, then `Created` and `Updated` ordered by the zxid each stands for (a
//! creation's `czxid`, a write's `mzxid`), so a parent comes before its children; a node
//! deleted and re-created in between (another `czxid`) is reported as both. A change undone
//! between two reads is not seen (`Capabilities::exact_events` is false). After a session
//! loss the next read is delivered as a `Resync` (a read made through the new session's
//! client before the session's change is reported comes as one too, so a second one may
//! follow). A stream's buffer holds [`WATCH_BUFFER`] items; when it is full the task waits
//! for room before it reads again, so a consumer that falls behind holds up its own stream and
//! then gets the net change of what happened meanwhile: nothing is dropped, and no `Resync`
//! (`Lagged`) is needed, however many changes one round brings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::{self, FuturesUnordered, StreamExt};
use futures::Future;
use registry_core::{
    Backoff, Error, Node, NodePath, Result, ResyncReason, Revision, SessionId, SessionState,
    Snapshot, WatchEvent, WatchScope, WatchStream,
};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use zookeeper_client as zk;

use crate::error::map;
use crate::Shared;

/// Reads (or child lists) of one watch in flight at once.
const READS_IN_FLIGHT: usize = 256;

/// Rounds of listing and reading one `follow` makes before falling back to a full read.
const FOLLOW_ROUNDS: usize = 32;

/// Items buffered per watch stream before the consumer counts as lagging.
pub const WATCH_BUFFER: usize = 4096;

pub(crate) fn node_of(path: NodePath, data: impl Into<Bytes>, stat: &zk::Stat) -> Node {
    Node {
        path,
        value: data.into(),
        version: crate::version::from_zk(stat.version),
        create_order: u64::try_from(stat.czxid).unwrap_or(0),
        modify_order: u64::try_from(stat.mzxid).unwrap_or(0),
        ephemeral_owner: owner_session(stat.ephemeral_owner),
    }
}

/// The session owning a node, from its stat's `ephemeralOwner`. Besides 0, ZooKeeper marks
/// two kinds of node that no session owns there: a container (`i64::MIN`) and a node with a
/// TTL (top byte `0xFF`, the TTL below it). Both outlive their creator's session, so they are
/// persistent here (a migration copies them). A session ID starts with its server's ID, and
/// ZooKeeper refuses server ID 255 with TTL nodes enabled; with them off (its default), an
/// ensemble that uses ID 255 would have that server's sessions' nodes read as persistent:
/// keep server IDs below 255.
pub(crate) fn owner_session(ephemeral_owner: i64) -> Option<SessionId> {
    const EXTENDED: u64 = 0xFF00_0000_0000_0000;
    let persistent = ephemeral_owner == 0
        || ephemeral_owner == i64::MIN
        || ephemeral_owner as u64 & EXTENDED == EXTENDED;
    (!persistent).then_some(SessionId(ephemeral_owner))
}

/// Children a stream leaves out because their path is not a valid `NodePath` (another client
/// may create nodes deeper or with longer paths than it allows): each of the first
/// [`WARNED_MAX`] such names is warned about once per stream, not at every listing; past
/// that, one warning says more are skipped unnamed (a stream lives long, and names that
/// change with every restart must not grow it without end).
struct Skipped {
    warned: std::collections::BTreeSet<String>,
    /// Whether the warning that more names are skipped unnamed was given.
    overflowed: bool,
    /// Whether the client has a chroot (see [`crate::servers_own`]).
    chrooted: bool,
}

/// Invalid child names a stream remembers having warned about.
const WARNED_MAX: usize = 1024;

impl Skipped {
    fn new(chrooted: bool) -> Skipped {
        Skipped {
            warned: Default::default(),
            overflowed: false,
            chrooted,
        }
    }

    /// `parent`'s child `name` as a `NodePath`, or `None` (warned about the first time).
    fn child(&mut self, parent: &NodePath, name: &str) -> Option<NodePath> {
        if crate::servers_own(parent, name, self.chrooted) {
            return None;
        }
        match parent.join(name) {
            Ok(child) => Some(child),
            Err(error) => {
                let path = format!("{parent}/{name}");
                if self.warned.len() >= WARNED_MAX && !self.warned.contains(&path) {
                    if !std::mem::replace(&mut self.overflowed, true) {
                        tracing::warn!(%parent, limit = WARNED_MAX, "watch skips more children that are not valid paths; not naming each");
                    }
                    return None;
                }
                if self.warned.insert(path) {
                    tracing::warn!(%parent, child = name, %error, "watch skips a child: not a valid path");
                }
                None
            }
        }
    }
}

/// What a one-shot watch was set on, so a fired watch says what to read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WatchKind {
    /// A data watch on an existing node (fires on change and deletion).
    Data,
    /// A child watch (fires when children come or go, and on the node's deletion).
    Children,
    /// An existence watch on the missing root.
    Exists,
}

/// A watch that fired.
struct Fired {
    path: NodePath,
    kind: WatchKind,
    event: zk::WatchedEvent,
}

type Armed = FuturesUnordered<BoxFuture<'static, Fired>>;
/// Watches set while reading, armed once the read is done (a `Vec` can cross awaits).
type NewWatches = Vec<BoxFuture<'static, Fired>>;

fn arm(armed: &mut NewWatches, path: &NodePath, kind: WatchKind, watcher: zk::OneshotWatcher) {
    let path = path.clone();
    armed.push(Box::pin(async move {
        let event = watcher.changed().await;
        Fired { path, kind, event }
    }));
}

/// What the reads of one stream use: its session's client and the deadline of each request.
struct Reader {
    client: zk::Client,
    timeout: Duration,
}

impl Reader {
    /// Runs `request` with the deadline: a stalled connection must not hold the stream's
    /// task until the client gives up on the session (~1.4x its TTL). A timeout is retried
    /// as a lost connection is.
    async fn within<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, zk::Error>>,
    ) -> std::result::Result<T, zk::Error> {
        tokio::time::timeout(self.timeout, request)
            .await
            .unwrap_or(Err(zk::Error::Timeout))
    }
}

struct Read {
    nodes: BTreeMap<NodePath, Node>,
    armed: NewWatches,
    revision: u64,
}

/// Returns once the server answering `reader` has applied every write committed before the
/// sync reached the leader.
async fn sync(reader: &Reader, root: &NodePath) -> Result<()> {
    match reader.within(reader.client.sync(root.as_str())).await {
        Ok(()) | Err(zk::Error::NoNode) => Ok(()),
        Err(e) => Err(map(e, "sync", root)),
    }
}

/// Reads the watched root with a data watch; a missing root gets an existence watch instead.
/// `gone`: its watch just reported it deleted, so its existence is asked first (one request,
/// where a read would fail and need a second).
async fn read_root(
    reader: &Reader,
    path: &NodePath,
    gone: bool,
    read: &mut Read,
) -> Result<Option<Node>> {
    if gone {
        match reader
            .within(reader.client.check_and_watch_stat(path.as_str()))
            .await
        {
            Ok((None, watcher)) => {
                arm(&mut read.armed, path, WatchKind::Exists, watcher);
                return Ok(None);
            }
            // Back already: read below (its existence watch is let go).
            Ok((Some(_), _)) => {}
            Err(e) => return Err(map(e, "watch", path)),
        }
    }
    // Bounded: a node that keeps appearing and vanishing between the two calls gives up.
    for _ in 0..8 {
        match reader
            .within(reader.client.get_and_watch_data(path.as_str()))
            .await
        {
            Ok((data, stat, watcher)) => {
                arm(&mut read.armed, path, WatchKind::Data, watcher);
                read.revision = read.revision.max(u64::try_from(stat.mzxid).unwrap_or(0));
                return Ok(Some(node_of(path.clone(), data, &stat)));
            }
            Err(zk::Error::NoNode) => match reader
                .within(reader.client.check_and_watch_stat(path.as_str()))
                .await
            {
                Ok((None, watcher)) => {
                    arm(&mut read.armed, path, WatchKind::Exists, watcher);
                    return Ok(None);
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

/// Reads nodes below the root with data watches, pipelined and sent in the order given. A
/// node gone meanwhile is left out without a watch: its parent's child watch, armed before,
/// reports it if it comes back. Those in `unwatched` are read without one (theirs is still
/// armed: another would pile up on it).
async fn read_nodes(
    reader: &Reader,
    paths: Vec<NodePath>,
    unwatched: &std::collections::BTreeSet<NodePath>,
    armed: &mut NewWatches,
    revision: &mut u64,
) -> Result<BTreeMap<NodePath, Option<Node>>> {
    let mut results = stream::iter(paths)
        .map(|path| async move {
            let result = if unwatched.contains(&path) {
                reader
                    .within(reader.client.get_data(path.as_str()))
                    .await
                    .map(|(data, stat)| (data, stat, None))
            } else {
                reader
                    .within(reader.client.get_and_watch_data(path.as_str()))
                    .await
                    .map(|(data, stat, watcher)| (data, stat, Some(watcher)))
            };
            (path, result)
        })
        .buffer_unordered(READS_IN_FLIGHT);
    let mut found = BTreeMap::new();
    while let Some((path, result)) = results.next().await {
        match result {
            Ok((data, stat, watcher)) => {
                if let Some(watcher) = watcher {
                    arm(armed, &path, WatchKind::Data, watcher);
                }
                *revision = (*revision).max(u64::try_from(stat.mzxid).unwrap_or(0));
                let node = node_of(path.clone(), data, &stat);
                found.insert(path, Some(node));
            }
            Err(zk::Error::NoNode) => {
                found.insert(path, None);
            }
            Err(e) => return Err(map(e, "watch", &path)),
        }
    }
    Ok(found)
}

/// Lists children with child watches, pipelined: for each parent its `czxid` (which
/// incarnation was listed) and children, or `None` if it is gone.
async fn list_children(
    reader: &Reader,
    parents: Vec<NodePath>,
    armed: &mut NewWatches,
    revision: &mut u64,
    skipped: &mut Skipped,
) -> Result<Vec<(NodePath, Option<(u64, Vec<NodePath>)>)>> {
    let mut results = stream::iter(parents)
        .map(|path| async move {
            let result = reader
                .within(reader.client.get_and_watch_children(path.as_str()))
                .await;
            (path, result)
        })
        .buffer_unordered(READS_IN_FLIGHT);
    let mut listed = Vec::new();
    while let Some((path, result)) = results.next().await {
        match result {
            Ok((names, stat, watcher)) => {
                arm(armed, &path, WatchKind::Children, watcher);
                *revision = (*revision).max(u64::try_from(stat.pzxid).unwrap_or(0));
                let children = names
                    .iter()
                    .filter_map(|n| skipped.child(&path, n))
                    .collect();
                let czxid = u64::try_from(stat.czxid).unwrap_or(0);
                listed.push((path, Some((czxid, children))));
            }
            Err(zk::Error::NoNode) => listed.push((path, None)),
            Err(e) => return Err(map(e, "watch children", &path)),
        }
    }
    Ok(listed)
}

/// Full reads of a scope made again when one mixed incarnations, before giving up.
const SCOPE_READS: usize = 4;

/// Reads everything in scope, arming a watch on each part read. A read made level by level
/// can mix incarnations (a parent read, then deleted and created again before it was listed,
/// with the new one's children): such a read is made again. The watches it armed are kept:
/// they still cover what they were set on (a fired one only causes a re-read).
async fn read_scope(
    reader: &Reader,
    root: &NodePath,
    scope: WatchScope,
    root_gone: bool,
    skipped: &mut Skipped,
) -> Result<Read> {
    let mut earlier: NewWatches = Vec::new();
    for attempt in 0..SCOPE_READS {
        let gone = root_gone && attempt == 0;
        let (mut read, consistent) = read_scope_once(reader, root, scope, gone, skipped).await?;
        if consistent {
            read.armed.append(&mut earlier);
            return Ok(read);
        }
        earlier.append(&mut read.armed);
    }
    Err(Error::unavailable(format!(
        "zookeeper watch {root}: the tree kept changing under the read"
    )))
}

/// One full read of the scope, and whether every parent was still at the incarnation it
/// was read at when listed and after its children were read.
async fn read_scope_once(
    reader: &Reader,
    root: &NodePath,
    scope: WatchScope,
    root_gone: bool,
    skipped: &mut Skipped,
) -> Result<(Read, bool)> {
    let mut read = Read {
        nodes: BTreeMap::new(),
        armed: Vec::new(),
        revision: 0,
    };
    let Some(node) = read_root(reader, root, root_gone, &mut read).await? else {
        return Ok((read, true));
    };
    let root_created = node.create_order;
    if scope == WatchScope::Node {
        if !root.is_root() {
            read.nodes.insert(root.clone(), node);
        }
        return Ok((read, true));
    }
    if scope == WatchScope::Subtree && !root.is_root() {
        read.nodes.insert(root.clone(), node);
    }
    let read_at = |nodes: &BTreeMap<NodePath, Node>, parent: &NodePath| {
        if parent == root {
            Some(root_created)
        } else {
            nodes.get(parent).map(|n| n.create_order)
        }
    };
    let mut consistent = true;
    // Level by level: list the parents, then read the children found, and then the parents
    // again (without another watch): a parent deleted and created again since it was read
    // can be listed, or have children read, at its new incarnation. ZooKeeper answers a
    // session's requests in order, so the parents' second answers are the newer ones.
    let mut parents = vec![root.clone()];
    while !parents.is_empty() {
        let listed = list_children(
            reader,
            parents,
            &mut read.armed,
            &mut read.revision,
            skipped,
        )
        .await?;
        let mut children = Vec::new();
        let mut again = std::collections::BTreeSet::new();
        for (parent, found) in listed {
            // Gone by now is no mix: nothing is read below it, and its watches have fired.
            if let Some((czxid, _)) = &found {
                consistent &= Some(*czxid) == read_at(&read.nodes, &parent);
            }
            let found = found.map(|(_, c)| c).unwrap_or_default();
            if !found.is_empty() {
                again.insert(parent);
            }
            children.extend(found);
        }
        let reading = children.into_iter().chain(again.iter().cloned()).collect();
        let found =
            read_nodes(reader, reading, &again, &mut read.armed, &mut read.revision).await?;
        // A parent deleted since its children were read leaves them out (no orphan; the
        // watches armed on them report what comes next); one created again is a mix.
        let mut gone = std::collections::BTreeSet::new();
        for parent in &again {
            match found.get(parent) {
                Some(Some(now)) if Some(now.create_order) == read_at(&read.nodes, parent) => {}
                Some(None) => {
                    gone.insert(parent.clone());
                }
                _ => consistent = false,
            }
        }
        parents = Vec::new();
        for (path, node) in found {
            if again.contains(&path) || path.parent().is_some_and(|p| gone.contains(&p)) {
                continue;
            }
            if let Some(node) = node {
                read.nodes.insert(path.clone(), node);
                if scope == WatchScope::Subtree {
                    parents.push(path);
                }
            }
        }
    }
    Ok((read, consistent))
}

/// What fired watches changed: the new state of each path they cover (`None`: gone), from
/// re-reading only those paths. `Ok(None)` when only a full read can tell (the root or the
/// session changed, or the tree kept changing under the reads).
async fn follow(
    reader: &Reader,
    root: &NodePath,
    scope: WatchScope,
    fired: Vec<Fired>,
    nodes: &BTreeMap<NodePath, Node>,
    armed: &mut NewWatches,
    skipped: &mut Skipped,
) -> Result<Option<BTreeMap<NodePath, Option<Node>>>> {
    let mut to_list = Vec::new();
    let mut to_read = Vec::new();
    for fired in fired {
        let root_itself = fired.path == *root && fired.kind != WatchKind::Children;
        if fired.event.event_type == zk::EventType::Session || root_itself {
            return Ok(None);
        }
        match fired.kind {
            WatchKind::Children => to_list.push(fired.path),
            WatchKind::Data | WatchKind::Exists => to_read.push(fired.path),
        }
    }
    let mut changes: BTreeMap<NodePath, Option<Node>> = BTreeMap::new();
    // Read to check an incarnation, not because their own watch fired: read without a watch.
    let mut unwatched = std::collections::BTreeSet::new();
    // The incarnation (`czxid`) each parent was listed at in this call; `None`: it was gone.
    let mut listed: BTreeMap<NodePath, Option<u64>> = BTreeMap::new();
    let mut revision = 0;
    // A path is listed or read again only when a later answer shows the earlier one stale (a
    // parent gone when listed but back when read, a child gone when read but listed since):
    // skipping those loses the re-created node's watch. A tree that keeps changing under us
    // is left to a full read.
    for _ in 0..FOLLOW_ROUNDS {
        to_list.sort();
        to_list.dedup();
        for (parent, children) in list_children(
            reader,
            std::mem::take(&mut to_list),
            armed,
            &mut revision,
            skipped,
        )
        .await?
        {
            let czxid = children.as_ref().map(|(czxid, _)| *czxid);
            // The root listed at another incarnation than the one held (deleted and made
            // again): its children here belong to a root not yet reported, and the held
            // ones to one not yet reported gone. Only a full read orders that.
            if scope == WatchScope::Subtree
                && parent == *root
                && nodes.get(root).map(|n| n.create_order) != czxid
            {
                return Ok(None);
            }
            listed.insert(parent.clone(), czxid);
            let children: std::collections::BTreeSet<NodePath> = children
                .map(|(_, children)| children)
                .unwrap_or_default()
                .into_iter()
                .collect();
            // Known children no longer listed are gone (with what was below them).
            for known in children_of(nodes, &parent) {
                if !children.contains(known) {
                    remove_below(nodes, known, &mut changes);
                    changes.insert(known.clone(), None);
                }
            }
            // Read what we hold no node for: new children, any read as gone before, and any
            // held from an older incarnation of the parent (created before it).
            to_read.extend(children.into_iter().filter(|c| {
                held(nodes, &changes, c)
                    .is_none_or(|held| czxid.is_some_and(|parent| held.create_order < parent))
            }));
        }
        to_read.sort();
        to_read.dedup();
        if to_read.is_empty() {
            return Ok(Some(changes));
        }
        // A node read at a new incarnation may sit under a newer incarnation of its parent
        // than the one held (re-created since it was listed, or not listed in this call): the
        // parent is read (again) in the same pipeline, after its children, so its answer is at
        // least as new as theirs (a session's requests are answered in order).
        let mut after: Vec<NodePath> = Vec::new();
        if scope == WatchScope::Subtree {
            for path in &to_read {
                let Some(parent) = path.parent() else {
                    continue;
                };
                let new = held(nodes, &changes, path).is_none() || listed.contains_key(&parent);
                if new && parent != *root && parent.is_within(root) {
                    after.push(parent);
                }
            }
            after.sort();
            after.dedup();
            // Read once, at the end; one that is not due a read of its own keeps its armed
            // watch and is read without another.
            for parent in &after {
                match to_read.binary_search(parent) {
                    Ok(at) => {
                        to_read.remove(at);
                    }
                    Err(_) if held(nodes, &changes, parent).is_some() => {
                        unwatched.insert(parent.clone());
                    }
                    Err(_) => {}
                }
            }
        }
        // Deepest first: a parent after its children, and so after theirs.
        let reading: Vec<NodePath> = std::mem::take(&mut to_read)
            .into_iter()
            .chain(after.iter().rev().cloned())
            .collect();
        for (path, node) in read_nodes(reader, reading, &unwatched, armed, &mut revision).await? {
            // A node already held, read at another incarnation (deleted and created again
            // since): its parent may have been too. Unless read after it just now, the parent
            // is read again in the next round (an earlier answer may predate the child's).
            let recreated = node.as_ref().is_some_and(|new| {
                held(nodes, &changes, &path).is_some_and(|old| old.create_order != new.create_order)
            });
            if recreated && scope == WatchScope::Subtree {
                if let Some(parent) = path.parent().filter(|p| p != root && p.is_within(root)) {
                    if after.binary_search(&parent).is_err() {
                        if held(nodes, &changes, &parent).is_some() {
                            unwatched.insert(parent.clone());
                        }
                        to_read.push(parent);
                    }
                }
            }
            match &node {
                Some(new) if scope == WatchScope::Subtree => {
                    // Its children need a list (and child watch) of this incarnation.
                    let covered = match listed.get(&path) {
                        Some(at) => *at == Some(new.create_order),
                        None => nodes
                            .get(&path)
                            .is_some_and(|old| old.create_order == new.create_order),
                    };
                    if !covered {
                        to_list.push(path.clone());
                    }
                }
                Some(_) => {}
                None => remove_below(nodes, &path, &mut changes),
            }
            changes.insert(path, node);
        }
        if scope == WatchScope::Subtree {
            to_read.extend(mismatched(root, nodes, &mut changes));
        }
        if to_list.is_empty() && to_read.is_empty() {
            return Ok(Some(changes));
        }
    }
    Ok(None)
}

/// Reads made at different moments can mix incarnations when a parent and what is below it
/// are deleted and created again quickly: a child read before its parent went, the parent
/// read after it came back. A child is created after its parent (a higher or, in one
/// transaction, the same `czxid`), so any node of the state `changes` leads to that sits
/// under a missing parent or one created after it is not reported: it is dropped (not
/// delivered yet) or reported gone, and returned to be read again where the parent is there
/// (a gone parent's creation fires the watch armed on it).
fn mismatched(
    root: &NodePath,
    nodes: &BTreeMap<NodePath, Node>,
    changes: &mut BTreeMap<NodePath, Option<Node>>,
) -> Vec<NodePath> {
    // What changed, and what was delivered below a parent that changed incarnation or went.
    let mut check: std::collections::BTreeSet<NodePath> = changes.keys().cloned().collect();
    for (path, after) in changes.iter() {
        let moved = nodes.get(path).is_some_and(|old| {
            after
                .as_ref()
                .is_none_or(|new| new.create_order != old.create_order)
        });
        if moved {
            check.extend(below(nodes, path).cloned());
        }
    }
    let now = |changes: &BTreeMap<NodePath, Option<Node>>, path: &NodePath| {
        held(nodes, changes, path).map(|n| n.create_order)
    };
    let mut again = Vec::new();
    // Sorted: a parent is settled before what is below it.
    for path in check {
        let Some(created) = now(changes, &path) else {
            continue;
        };
        let Some(parent) = path.parent().filter(|p| p != root && p.is_within(root)) else {
            continue;
        };
        let parent_created = now(changes, &parent);
        if parent_created.is_some_and(|parent| parent <= created) {
            continue;
        }
        if nodes.contains_key(&path) {
            changes.insert(path.clone(), None);
        } else {
            changes.remove(&path);
        }
        if parent_created.is_some() {
            again.push(path);
        }
    }
    again
}

/// `path` as this call has it so far: its change if it has one, else as delivered.
fn held<'n>(
    nodes: &'n BTreeMap<NodePath, Node>,
    changes: &'n BTreeMap<NodePath, Option<Node>>,
    path: &NodePath,
) -> Option<&'n Node> {
    match changes.get(path) {
        Some(after) => after.as_ref(),
        None => nodes.get(path),
    }
}

/// The known nodes directly below `parent`.
fn children_of<'n>(
    nodes: &'n BTreeMap<NodePath, Node>,
    parent: &NodePath,
) -> impl Iterator<Item = &'n NodePath> + 'n {
    let parent = parent.clone();
    below(nodes, &parent).filter(move |p| p.parent().as_ref() == Some(&parent))
}

/// The known nodes anywhere below `path`: the keys starting with `path/`, which sort together
/// right after `path` and any sibling that only shares its text (`/a-b` before `/a/`).
fn below<'n>(
    nodes: &'n BTreeMap<NodePath, Node>,
    path: &NodePath,
) -> impl Iterator<Item = &'n NodePath> + 'n {
    let prefix = if path.is_root() {
        "/".to_owned()
    } else {
        format!("{path}/")
    };
    let end = prefix.clone();
    nodes
        .range(path.clone()..)
        .map(|(p, _)| p)
        .skip_while(move |p| !p.as_str().starts_with(&prefix) && p.as_str() < prefix.as_str())
        .take_while(move |p| p.as_str().starts_with(&end))
}

fn remove_below(
    nodes: &BTreeMap<NodePath, Node>,
    path: &NodePath,
    changes: &mut BTreeMap<NodePath, Option<Node>>,
) {
    for gone in below(nodes, path) {
        changes.insert(gone.clone(), None);
    }
}

/// The events that turn `old` into `new`.
fn diff(old: &BTreeMap<NodePath, Node>, new: &BTreeMap<NodePath, Node>) -> Vec<WatchEvent> {
    let mut paths: Vec<&NodePath> = old.keys().chain(new.keys()).collect();
    paths.sort();
    paths.dedup();
    events(paths.into_iter().map(|p| (old.get(p), new.get(p))))
}

/// The events for `(before, after)` states of paths: `Deleted` children before parents, then
/// `Created`/`Updated` in `czxid`/`mzxid` order; a re-created node (another `czxid`) is both.
fn events<'n>(
    states: impl Iterator<Item = (Option<&'n Node>, Option<&'n Node>)>,
) -> Vec<WatchEvent> {
    let mut deleted: Vec<&Node> = Vec::new();
    let mut changed: Vec<WatchEvent> = Vec::new();
    for state in states {
        match state {
            (Some(before), None) => deleted.push(before),
            (Some(before), Some(after)) if after.create_order != before.create_order => {
                deleted.push(before);
                changed.push(WatchEvent::Created(after.clone()));
            }
            (Some(before), Some(after))
                if after.modify_order != before.modify_order || after.version != before.version =>
            {
                changed.push(WatchEvent::Updated(after.clone()));
            }
            (None, Some(after)) => changed.push(WatchEvent::Created(after.clone())),
            _ => {}
        }
    }
    deleted.sort_by(|a, b| b.path.cmp(&a.path));
    // A creation counts at its `czxid`: a parent written after its child was created is
    // still reported before it.
    changed.sort_by_key(|e| match e {
        WatchEvent::Created(n) => (n.create_order, n.path.clone()),
        WatchEvent::Updated(n) => (n.modify_order, n.path.clone()),
        _ => (0, NodePath::root()),
    });
    deleted
        .into_iter()
        .map(|n| WatchEvent::Deleted(n.clone()))
        .chain(changed)
        .collect()
}

/// What a stream's channel carries. Boxed: a tokio channel allocates its first block of 32
/// slots up front, which for the item itself (~100 bytes) was a quarter of what a
/// registration (one stream each) keeps in memory.
type Item = Box<Result<WatchEvent>>;

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
        rx.recv().await.map(|item| (*item, rx))
    })
    .boxed()
}

enum Wake {
    Changed(Fired),
    Reconnected,
    Stop,
}

async fn run(
    shared: Arc<Shared>,
    root: NodePath,
    scope: WatchScope,
    replay: bool,
    tx: mpsc::Sender<Item>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut sessions = shared.tracker.subscribe();
    // The first item is the state at subscription: not a change.
    let _ = sessions.next().await;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut delivered: Option<BTreeMap<NodePath, Node>> = None;
    let mut epoch = shared.tracker.status().epoch;
    // The ZooKeeper session whose reads were delivered last: told by the client that reads,
    // not by the tracker, whose new epoch can lag behind the new session's client.
    let mut read_in: Option<zk::SessionId> = None;
    let mut first_reason = replay.then_some(ResyncReason::StartNotReplayable);
    let mut skipped = Skipped::new(shared.options.namespace.is_some());
    let timeout = shared.options.request_timeout;
    // The root's own watch reported it deleted: the next full read asks for its existence
    // first.
    let mut root_gone = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let reader = match shared.client() {
            Ok(client) => Reader { client, timeout },
            Err(_) => return,
        };
        // A new session can be served by a follower behind the server that answered the
        // last session's reads (within a session, ZooKeeper never goes back): sync first, so
        // a resync never shows an older tree than the one delivered.
        let resumed = delivered.is_some()
            && (shared.tracker.status().epoch != epoch
                || read_in != Some(reader.client.session_id()));
        let read = match stoppable(
            async {
                if resumed {
                    sync(&reader, &root).await?;
                }
                read_scope(
                    &reader,
                    &root,
                    scope,
                    std::mem::take(&mut root_gone),
                    &mut skipped,
                )
                .await
            },
            &mut shutdown,
            &tx,
        )
        .await
        {
            None => return,
            Some(Ok(read)) => read,
            Some(Err(Error::Closed)) => return,
            // Retrying cannot fix these: the consumer gets the error and the stream ends.
            Some(Err(error @ (Error::PermissionDenied { .. } | Error::AuthFailed(_)))) => {
                tracing::warn!(%error, "watch read refused; ending the stream");
                tokio::select! {
                    _ = tx.send(Box::new(Err(error))) => {}
                    _ = shutdown.wait_for(|closing| *closing) => {}
                }
                return;
            }
            Some(Err(error)) => {
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
            // A new session, as the tracker or the client read through tells first.
            Some(_) if now_epoch != epoch || read_in != Some(reader.client.session_id()) => {
                vec![WatchEvent::Resync {
                    snapshot: snapshot(),
                    reason: ResyncReason::SessionReestablished,
                }]
            }
            Some(old) => diff(old, &read.nodes),
        };
        epoch = now_epoch;
        read_in = Some(reader.client.session_id());
        if !deliver(&tx, items, &mut shutdown).await {
            return;
        }
        delivered = Some(read.nodes);
        let mut armed: Armed = read.armed.into_iter().collect();
        // Follow changes by re-reading only what fired, until only a full read can tell.
        loop {
            let first = match wait(&mut armed, &mut sessions, &mut shutdown, &tx).await {
                Wake::Stop => return,
                Wake::Reconnected => break,
                Wake::Changed(fired) => fired,
            };
            let mut fired = vec![first];
            // Watches that fired together are followed together (bounded, so a steady stream
            // of changes still gets delivered).
            while fired.len() < READS_IN_FLIGHT {
                match armed.next().now_or_never() {
                    Some(Some(more)) => fired.push(more),
                    _ => break,
                }
            }
            root_gone = fired.iter().any(|f| {
                f.path == root
                    && f.kind != WatchKind::Children
                    && f.event.event_type == zk::EventType::NodeDeleted
            });
            let Some(nodes) = delivered.as_mut() else {
                break;
            };
            let reader = match shared.client() {
                Ok(client) => Reader { client, timeout },
                Err(_) => return,
            };
            // A new session's client, before its Reconnected reached us: only a full read,
            // synced first, may show what it serves.
            if read_in != Some(reader.client.session_id()) {
                break;
            }
            let mut new_watches = Vec::new();
            let following = follow(
                &reader,
                &root,
                scope,
                fired,
                nodes,
                &mut new_watches,
                &mut skipped,
            );
            let Some(followed) = stoppable(following, &mut shutdown, &tx).await else {
                return;
            };
            armed.extend(new_watches);
            let changes = match followed {
                Ok(Some(changes)) => changes,
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, "following a change failed; reading everything again");
                    break;
                }
            };
            let items = events(
                changes
                    .iter()
                    .map(|(p, after)| (nodes.get(p), after.as_ref())),
            );
            for (path, after) in changes {
                match after {
                    Some(node) => nodes.insert(path, node),
                    None => nodes.remove(&path),
                };
            }
            if !deliver(&tx, items, &mut shutdown).await {
                return;
            }
        }
    }
}

/// Runs a read unless the registry closes or the consumer drops the stream first (`None`):
/// the task must not hold its client for either (close waits for every clone).
async fn stoppable<T>(
    read: impl Future<Output = T>,
    shutdown: &mut watch::Receiver<bool>,
    tx: &mpsc::Sender<Item>,
) -> Option<T> {
    tokio::select! {
        read = read => Some(read),
        _ = shutdown.wait_for(|closing| *closing) => None,
        _ = tx.closed() => None,
    }
}

/// Sends a round's items in order, waiting for room as the consumer reads; false once it is
/// gone or the registry closes (the task must not hold its client for a stalled consumer:
/// close waits for every clone). Waiting drops nothing: the items are held already (a round
/// is at most the scope, which the task holds anyway), and a one-shot watch queues nothing
/// meanwhile, so the next round's net change covers whatever happens while the task waits.
async fn deliver(
    tx: &mpsc::Sender<Item>,
    items: Vec<WatchEvent>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    for item in items {
        let sent = tokio::select! {
            sent = tx.send(Box::new(Ok(item))) => sent.is_ok(),
            _ = shutdown.wait_for(|closing| *closing) => false,
        };
        if !sent {
            return false;
        }
    }
    true
}

async fn wait(
    armed: &mut Armed,
    sessions: &mut futures::stream::BoxStream<'static, registry_core::SessionStatus>,
    shutdown: &mut watch::Receiver<bool>,
    tx: &mpsc::Sender<Item>,
) -> Wake {
    loop {
        tokio::select! {
            _ = tx.closed() => return Wake::Stop,
            _ = shutdown.changed() => return Wake::Stop,
            fired = armed.next(), if !armed.is_empty() => {
                if let Some(fired) = fired {
                    return Wake::Changed(fired);
                }
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
    fn skipped_names_are_remembered_within_a_bound() {
        let mut skipped = Skipped::new(false);
        let parent = NodePath::new("/svc").unwrap();
        for i in 0..3 * WARNED_MAX {
            assert!(skipped.child(&parent, &format!("..{i}/x")).is_none());
            assert!(skipped.warned.len() <= WARNED_MAX);
        }
        assert!(skipped.overflowed);
        assert!(skipped.child(&parent, "ok").is_some());
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

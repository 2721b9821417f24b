//! Watches: what a watch covers, the events it yields, and a view that applies them.

use std::collections::BTreeMap;

use futures::stream::BoxStream;
use futures::StreamExt;

use crate::error::Result;
use crate::node::{Node, Revision};
use crate::path::NodePath;

/// Which nodes a watch on a path covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum WatchScope {
    /// The node itself.
    #[default]
    Node,
    /// The node's direct children (not the node, not grandchildren).
    Children,
    /// The node and every node below it.
    Subtree,
}

impl WatchScope {
    /// Whether `candidate` is covered by a watch of this scope on `root`.
    pub fn covers(self, root: &NodePath, candidate: &NodePath) -> bool {
        match self {
            WatchScope::Node => candidate == root,
            WatchScope::Children => candidate.is_child_of(root),
            WatchScope::Subtree => candidate.is_within(root),
        }
    }
}

/// Options of [`Registry::watch`](crate::Registry::watch). Built with the constructors and
/// builder methods (non-exhaustive: options may be added without breaking callers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchOptions {
    /// What the watch covers.
    pub scope: WatchScope,
    /// Start after this revision instead of with a snapshot: the first item is then the first
    /// change after it (no [`WatchEvent::Snapshot`]). Only backends whose
    /// [`Capabilities::watch_from_revision`](crate::Capabilities::watch_from_revision) is true
    /// honour it exactly; the others start with a [`WatchEvent::Resync`].
    pub after: Option<Revision>,
    /// Leave out `Created` and `Updated` events: the stream carries its snapshots, resyncs and
    /// `Deleted` events only (see [`Registry::watch`](crate::Registry::watch)). etcd then
    /// sends no writes at all; the other backends drop them in the client.
    pub deletions_only: bool,
}

impl WatchOptions {
    /// Watch what `scope` covers.
    pub fn scoped(scope: WatchScope) -> Self {
        WatchOptions {
            scope,
            ..Self::default()
        }
    }

    /// Watch the node itself.
    pub fn node() -> Self {
        Self::default()
    }

    /// Watch the direct children.
    pub fn children() -> Self {
        Self::scoped(WatchScope::Children)
    }

    /// Watch the node and its whole subtree.
    pub fn subtree() -> Self {
        Self::scoped(WatchScope::Subtree)
    }

    /// Start after `revision` (e.g. [`Children::revision`](crate::Children::revision)). One
    /// past [`Revision::MAX_WATCH_AFTER`] is refused as
    /// [`InvalidArgument`](crate::Error::InvalidArgument) by `watch`.
    pub fn after(mut self, revision: Revision) -> Self {
        self.after = Some(revision);
        self
    }

    /// Only deletions (see [`WatchOptions::deletions_only`]): for a consumer that acts only
    /// when nodes go, such as a registration's healer, which then costs nothing per write.
    pub fn deletions_only(mut self) -> Self {
        self.deletions_only = true;
        self
    }

    /// Whether a stream with these options carries `event` (see
    /// [`deletions_only`](WatchOptions::deletions_only)).
    pub fn keeps(&self, event: &WatchEvent) -> bool {
        !(self.deletions_only && matches!(event, WatchEvent::Created(_) | WatchEvent::Updated(_)))
    }

    /// `stream` without the events these options leave out; for backends that cannot leave
    /// them out on the server.
    pub fn filter(&self, stream: WatchStream) -> WatchStream {
        if !self.deletions_only {
            return stream;
        }
        let options = self.clone();
        stream
            .filter(move |item| {
                std::future::ready(item.as_ref().map_or(true, |event| options.keeps(event)))
            })
            .boxed()
    }
}

/// Every node in scope at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The nodes in scope, ordered by path.
    pub nodes: Vec<Node>,
    /// The revision the snapshot was read at.
    pub revision: Revision,
}

/// Why a watch had to start over from a fresh snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// The connection was lost and re-established; events in between may be missing.
    Reconnected,
    /// The session was lost and a new one opened.
    SessionReestablished,
    /// The server compacted the history the watch needed (etcd).
    Compacted,
    /// The consumer fell too far behind and the buffered events were dropped.
    Lagged,
    /// The watch was asked to start after a revision the backend cannot replay from.
    StartNotReplayable,
}

/// One item of a watch stream.
///
/// Guarantees of a stream (see [`Registry::watch`](crate::Registry::watch)): the first item is
/// a `Snapshot` (or, when started with [`WatchOptions::after`], a change or a `Resync`); then
/// changes in commit order with no duplicates; a `Resync` whenever continuity was broken. A
/// consumer that applies every item with [`WatchedState::apply`] holds exactly the server's
/// state once the stream is quiet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// What was in scope when the watch started.
    Snapshot(Snapshot),
    /// A node came into existence (in scope).
    Created(Node),
    /// A node's value was written.
    Updated(Node),
    /// A node was deleted; the node as last delivered (or as last seen by the server).
    Deleted(Node),
    /// Continuity was broken: replace everything known with this snapshot.
    Resync {
        /// The fresh state.
        snapshot: Snapshot,
        /// Why.
        reason: ResyncReason,
    },
}

/// A watch's stream: events, or an error item after which the stream ends.
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// The state a consumer rebuilds from a watch stream: path to node.
///
/// Guarantees: applying a stream's items in order yields the state the stream describes;
/// `Snapshot` and `Resync` replace the state wholesale.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchedState {
    nodes: BTreeMap<NodePath, Node>,
    revision: Revision,
}

impl WatchedState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event.
    pub fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Snapshot(snapshot) | WatchEvent::Resync { snapshot, .. } => {
                self.nodes = snapshot
                    .nodes
                    .iter()
                    .map(|n| (n.path.clone(), n.clone()))
                    .collect();
                self.revision = snapshot.revision;
            }
            WatchEvent::Created(node) | WatchEvent::Updated(node) => {
                self.revision = self.revision.max(Revision(node.modify_order));
                self.nodes.insert(node.path.clone(), node.clone());
            }
            WatchEvent::Deleted(node) => {
                // A delete is a change too: its node carries the delete's revision where the
                // backend knows it (etcd, memory), else the node's last write.
                self.revision = self.revision.max(Revision(node.modify_order));
                self.nodes.remove(&node.path);
            }
        }
    }

    /// The nodes, ordered by path.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// The node at `path`, if present.
    pub fn get(&self, path: &NodePath) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// The nodes below `path` (not `path` itself), ordered by path; a range of the map, so
    /// the cost follows the subtree, not the whole state.
    pub fn below<'a>(&'a self, path: &NodePath) -> impl Iterator<Item = &'a Node> + 'a {
        crate::path::range_below(&self.nodes, path).map(|(_, node)| node)
    }

    /// The direct children of `path`, in creation order (as
    /// [`Registry::children`](crate::Registry::children) lists them).
    pub fn children(&self, path: &NodePath) -> Vec<&Node> {
        crate::path::children_in(&self.nodes, path)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The latest revision applied (snapshot revision or newest change).
    pub fn revision(&self) -> Revision {
        self.revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str, create: u64, modify: u64) -> Node {
        Node {
            path: NodePath::new(path).unwrap(),
            value: bytes::Bytes::new(),
            version: 0,
            create_order: create,
            modify_order: modify,
            ephemeral_owner: None,
        }
    }

    #[test]
    fn below_is_the_subtree_and_nothing_that_only_shares_a_prefix() {
        let mut state = WatchedState::new();
        state.apply(&WatchEvent::Snapshot(Snapshot {
            nodes: ["/a", "/a-b", "/a/x", "/a/x/y", "/a/y", "/a0", "/b"]
                .iter()
                .map(|p| node(p, 1, 1))
                .collect(),
            revision: Revision(1),
        }));
        let below = |p: &str| -> Vec<&str> {
            state
                .below(&NodePath::new(p).unwrap())
                .map(|n| n.path.as_str())
                .collect()
        };
        assert_eq!(below("/a"), ["/a/x", "/a/x/y", "/a/y"]);
        assert_eq!(below("/a/x"), ["/a/x/y"]);
        assert_eq!(below("/b"), Vec::<&str>::new());
        assert_eq!(below("/").len(), 7);
    }

    #[test]
    fn a_delete_advances_the_revision() {
        let mut state = WatchedState::new();
        state.apply(&WatchEvent::Snapshot(Snapshot {
            nodes: vec![node("/a", 3, 3)],
            revision: Revision(4),
        }));
        state.apply(&WatchEvent::Created(node("/b", 5, 5)));
        // Deleted at revision 6: the node as delivered, with the delete's revision.
        state.apply(&WatchEvent::Deleted(node("/a", 3, 6)));
        assert_eq!(state.len(), 1);
        // Resuming after 5 would deliver the delete of /a a second time.
        assert_eq!(state.revision(), Revision(6));
        // A backend that only knows the node's last write never moves it back.
        state.apply(&WatchEvent::Deleted(node("/b", 5, 5)));
        assert_eq!(state.revision(), Revision(6));
        assert!(state.is_empty());
    }
}

//! `Node` and the small value types of the contract: versions, orders, modes, revisions.

use bytes::Bytes;
use std::fmt;

use crate::path::NodePath;

/// Identity of a session (etcd: the first lease of the session's block, see
/// `registry_etcd::session_of_lease`; ZooKeeper session id; in-memory session number).
///
/// Guarantees: two live sessions of one backend never share an id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub i64);

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({:#x})", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A point in a backend's history (etcd revision, ZooKeeper zxid, in-memory commit counter).
///
/// Guarantees: revisions of one backend only grow; a read at revision `r` reflects every
/// change committed at or before `r`. Revisions of different backends are not comparable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Revision(pub u64);

impl Revision {
    /// The last revision a watch can start after ([`WatchOptions::after`]) on every backend:
    /// etcd's revisions are `i64`, and a watch starts at the next one.
    ///
    /// [`WatchOptions::after`]: crate::WatchOptions::after
    pub const MAX_WATCH_AFTER: Revision = Revision(i64::MAX as u64 - 1);

    /// `self` if a watch can start after it, else the
    /// [`InvalidArgument`](crate::Error::InvalidArgument) every backend gives for it, before
    /// any I/O (a revision past [`MAX_WATCH_AFTER`](Revision::MAX_WATCH_AFTER) is never
    /// reached, so such a watch would wait for good).
    pub fn check_watch_after(self) -> crate::Result<Revision> {
        if self > Self::MAX_WATCH_AFTER {
            return Err(crate::Error::InvalidArgument(format!(
                "watch revision {} is out of range (at most {})",
                self.0,
                Self::MAX_WATCH_AFTER.0
            )));
        }
        Ok(self)
    }
}

/// One node of the tree, as read at some revision.
#[derive(Clone, PartialEq, Eq)]
pub struct Node {
    /// Where the node is.
    pub path: NodePath,
    /// Its value: arbitrary bytes, possibly empty or containing NUL.
    pub value: Bytes,
    /// 0 when created, +1 on every write of the value (the same on every backend; ZooKeeper
    /// keeps 32 bits, so there it wraps to 0 after 2^32 writes).
    pub version: u64,
    /// Increasing in global creation order (etcd create_revision, ZooKeeper czxid): a node
    /// created after another's creation completed has a larger `create_order`. Nodes created
    /// together in one atomic step share one (the etcd backend puts concurrent ephemeral
    /// creates in one Txn). 0 only for implicit parents that were never created (etcd keys
    /// written by other tools without their parents).
    pub create_order: u64,
    /// The revision of the last write to this node (etcd mod_revision, ZooKeeper mzxid).
    pub modify_order: u64,
    /// The session that owns the node if it is ephemeral; `None` for persistent nodes.
    pub ephemeral_owner: Option<SessionId>,
}

impl Node {
    /// An empty node at `path` owned by `owner`, with version and orders 0: how an implicit
    /// parent or the root reads, and the node to name to
    /// [`delete_owned`](crate::Registry::delete_owned) or
    /// [`set_owned`](crate::Registry::set_owned) when only its path and owner matter.
    pub fn empty(path: NodePath, owner: Option<SessionId>) -> Node {
        Node {
            path,
            value: Bytes::new(),
            version: 0,
            create_order: 0,
            modify_order: 0,
            ephemeral_owner: owner,
        }
    }

    /// Whether the node is ephemeral (owned by a session).
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral_owner.is_some()
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Node");
        d.field("path", &self.path.as_str());
        match std::str::from_utf8(&self.value) {
            Ok(s) if s.len() <= 64 => d.field("value", &s),
            _ => d.field("value_len", &self.value.len()),
        };
        d.field("version", &self.version)
            .field("create_order", &self.create_order)
            .field("modify_order", &self.modify_order)
            .field("ephemeral_owner", &self.ephemeral_owner)
            .finish()
    }
}

/// How [`Registry::create`](crate::Registry::create) makes a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CreateMode {
    /// Lives until deleted.
    Persistent,
    /// Lives until deleted or until the creating session ends.
    Ephemeral,
    /// Persistent, named `<given name><10-digit counter>`.
    PersistentSequential,
    /// Ephemeral, named `<given name><10-digit counter>`.
    EphemeralSequential,
}

impl CreateMode {
    /// Whether nodes of this mode are owned by the session.
    pub fn is_ephemeral(self) -> bool {
        matches!(
            self,
            CreateMode::Ephemeral | CreateMode::EphemeralSequential
        )
    }

    /// Whether the server appends a sequence counter to the name.
    pub fn is_sequential(self) -> bool {
        matches!(
            self,
            CreateMode::PersistentSequential | CreateMode::EphemeralSequential
        )
    }
}

/// The condition of a write: any version, or exactly this one (compare-and-set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Expected {
    /// Write whatever the current version is.
    #[default]
    Any,
    /// Write only if the node's version is this; otherwise
    /// [`Error::VersionMismatch`](crate::Error::VersionMismatch). A version the backend
    /// cannot ask for (ZooKeeper: `u32::MAX` and above, etcd: `i64::MAX` and above) is not
    /// an input error: it never matches.
    Version(u64),
}

/// What [`Registry::delete`](crate::Registry::delete) removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DeleteScope {
    /// The node only; fails with [`Error::NotEmpty`](crate::Error::NotEmpty) if it has
    /// children.
    #[default]
    Node,
    /// The node and everything below it.
    Recursive,
}

/// The direct children of a node, as read at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Children {
    /// The children, ordered by [`Node::create_order`] (oldest first).
    pub nodes: Vec<Node>,
    /// The revision the list was read at: a watch started after it misses nothing. On
    /// ZooKeeper it is the list's own last change (its `pzxid`): the children's values are
    /// read after the list, so one may carry a later `modify_order`.
    pub revision: Revision,
    /// Children the server holds under names no [`NodePath`] takes, left out of `nodes`,
    /// ordered by name: written by other tools, such as an etcd key with `//` or a trailing
    /// `/`, or a ZooKeeper node deeper or with a longer path than a `NodePath` allows. Always
    /// empty on the in-memory backend. Tools that must see every persistent node (a
    /// migration) refuse to go on past a persistent one.
    pub skipped: Vec<SkippedChild>,
}

/// A child no [`NodePath`] can name (see [`Children::skipped`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SkippedChild {
    /// Its name, lossily decoded.
    pub name: String,
    /// Whether it is a live session's ephemeral node (as far as the backend could tell; an
    /// unknown one counts as persistent).
    pub ephemeral: bool,
}

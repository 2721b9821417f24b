//! How paths map onto etcd keys, and keys and values back onto nodes.
//!
//! A node's key is `namespace + path`, so etcdctl shows the tree as is. Bookkeeping keys
//! (sequence counters) are `namespace + "\u{1}seq" + parent`: the control character cannot
//! occur in a path, so they never collide with a node, never fall under a node's `path + "/"`
//! prefix, and are skipped wherever keys are turned back into paths.

use bytes::Bytes;
use etcd_client::KeyValue;
use registry_core::{Node, NodePath, SessionId};

#[derive(Clone, Debug)]
pub(crate) struct Keys {
    namespace: String,
}

impl Keys {
    /// Keys under `namespace`. The root as namespace is none: the public field of
    /// `EtcdOptions` can hold it (only `with_namespace` filters it), and its "/" prefix would
    /// make keys like "//a".
    pub(crate) fn new(namespace: Option<&NodePath>) -> Self {
        Keys {
            namespace: namespace
                .filter(|n| !n.is_root())
                .map(|n| n.to_string())
                .unwrap_or_default(),
        }
    }

    /// The key of a node (not the root, which has none).
    pub(crate) fn node(&self, path: &NodePath) -> String {
        format!("{}{}", self.namespace, path)
    }

    /// The prefix under which every descendant of `path` lives.
    pub(crate) fn below(&self, path: &NodePath) -> String {
        if path.is_root() {
            format!("{}/", self.namespace)
        } else {
            format!("{}{}/", self.namespace, path)
        }
    }

    /// The counter of sequential children of `parent`.
    pub(crate) fn sequence(&self, parent: &NodePath) -> String {
        format!("{}\u{1}seq{}", self.namespace, parent)
    }

    /// The path a key names, if it is a node key of this namespace.
    pub(crate) fn path(&self, key: &[u8]) -> Option<NodePath> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(self.namespace.as_str())?;
        if !rest.starts_with('/') || rest == "/" {
            return None;
        }
        NodePath::new(rest).ok()
    }

    /// [`Keys::path`] of a key the caller owns: without a namespace the key's bytes become
    /// the path's, uncopied. The key back if it names no path.
    fn path_owned(&self, key: Vec<u8>) -> Result<NodePath, Vec<u8>> {
        if !self.namespace.is_empty() {
            return self.path(&key).ok_or(key);
        }
        let key = String::from_utf8(key).map_err(|e| e.into_bytes())?;
        if !key.starts_with('/') || key == "/" {
            return Err(key.into_bytes());
        }
        NodePath::from_string(key).map_err(|(key, _)| key.into_bytes())
    }

    /// [`Keys::node_of`] consuming the pair, so its key and value are moved, not copied
    /// (a `children` of many nodes spent a measurable share of its client time copying);
    /// the key back if it names no node.
    pub(crate) fn node_of_owned(&self, kv: KeyValue) -> Result<Node, Vec<u8>> {
        let (version, created, modified, lease) = (
            kv.version(),
            kv.create_revision(),
            kv.mod_revision(),
            kv.lease(),
        );
        let (key, value) = kv.into_key_value();
        Ok(node_from(
            self.path_owned(key)?,
            Bytes::from(value),
            version,
            created,
            modified,
            lease,
        ))
    }

    /// The node a key-value pair holds, if it is a node of this namespace.
    pub(crate) fn node_of(&self, kv: &KeyValue) -> Option<Node> {
        Some(node_from(
            self.path(kv.key())?,
            Bytes::copy_from_slice(kv.value()),
            kv.version(),
            kv.create_revision(),
            kv.mod_revision(),
            kv.lease(),
        ))
    }
}

/// Our version of a key whose etcd version (1 at creation) is `etcd_version`.
pub(crate) fn version_of(etcd_version: i64) -> u64 {
    u64::try_from(etcd_version).unwrap_or(1).saturating_sub(1)
}

/// The node a key holds, from etcd's fields of that key: every node the backend returns is
/// built here, so a node returned by a write equals what a read would return.
pub(crate) fn node_from(
    path: NodePath,
    value: Bytes,
    etcd_version: i64,
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
) -> Node {
    Node {
        path,
        value,
        version: version_of(etcd_version),
        create_order: u64::try_from(create_revision).unwrap_or(0),
        modify_order: u64::try_from(mod_revision).unwrap_or(0),
        ephemeral_owner: owner_of(lease),
    }
}

/// The session owning a key under `lease` (0: none, a persistent key).
pub(crate) fn owner_of(lease: i64) -> Option<SessionId> {
    (lease != 0).then(|| crate::session::session_of_lease(lease))
}

/// A node that exists only because keys exist below it (written by other tools).
pub(crate) fn implicit(path: NodePath) -> Node {
    Node::empty(path, None)
}

/// The end of the key range holding `key` and every key under `key + "/"`.
pub(crate) fn subtree_end(key: &str) -> Vec<u8> {
    let mut end = key.as_bytes().to_vec();
    end.push(b'0'); // '0' follows '/'
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bookkeeping_never_parses_as_a_path() {
        let k = Keys::new(NodePath::new("/ns").ok().as_ref());
        let a = NodePath::new("/a").unwrap();
        assert_eq!(k.node(&a), "/ns/a");
        assert_eq!(k.below(&a), "/ns/a/");
        assert_eq!(k.below(&NodePath::root()), "/ns/");
        assert!(k.path(k.sequence(&a).as_bytes()).is_none());
        assert!(!k.sequence(&a).starts_with(&k.below(&NodePath::root())));
        assert_eq!(k.path(b"/ns/a/b"), NodePath::new("/a/b").ok());
        assert!(k.path(b"/other/a").is_none());
        assert!(k.path(b"/nsx/a").is_none());
        let root = Keys::new(None);
        assert!(root.path(root.sequence(&a).as_bytes()).is_none());
    }

    #[test]
    fn a_root_namespace_is_no_namespace() {
        // What `EtcdOptions { namespace: Some(NodePath::root()), .. }` gives, past the check
        // of `with_namespace`: it made keys like "//a".
        let keys = Keys::new(Some(&NodePath::root()));
        let a = NodePath::new("/a").unwrap();
        let none = Keys::new(None);
        assert_eq!(keys.node(&a), "/a");
        assert_eq!(keys.below(&NodePath::root()), "/");
        assert_eq!(keys.below(&a), none.below(&a));
        assert_eq!(keys.sequence(&a), none.sequence(&a));
        assert_eq!(keys.path(b"/a"), Some(a));
    }
}

//! `NodePath`: the validated absolute path of a node, shared by every backend.
//!
//! A path is checked once, when it is parsed; the rest of the workspace never handles raw
//! strings as paths. The rules are the union of what ZooKeeper and etcd can store faithfully,
//! so a tree written through one backend can be copied to the other unchanged:
//!
//! - absolute: starts with `/`; the root is `/` itself;
//! - no trailing `/` (except the root), no empty segment (`//`);
//! - no `.` or `..` segment (ZooKeeper rejects them);
//! - no control characters (U+0000–U+001F, U+007F–U+009F), no characters ZooKeeper refuses
//!   (U+E000–U+F8FF, U+FFF0–U+FFFF, and everything above U+FFFF: Java stores those as
//!   surrogate pairs, U+D800–U+DFFF, which its path check refuses);
//! - the first segment may not be `zookeeper` (ZooKeeper reserves `/zookeeper`);
//! - at most [`MAX_PATH_LEN`] bytes of UTF-8 and at most [`MAX_DEPTH`] segments.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, InvalidPath};

/// Longest path accepted, in bytes of UTF-8 (namespace/chroot not included).
pub const MAX_PATH_LEN: usize = 1024;

/// Deepest path accepted, in segments.
pub const MAX_DEPTH: usize = 64;

/// Digits appended to a sequential node's name (ZooKeeper's `%010d` format).
pub const SEQUENCE_DIGITS: usize = 10;

/// A validated absolute node path such as `/soa/runtime/services/Foo`.
///
/// Guarantees: every value of this type satisfies the rules in the [module docs](self); it
/// is cheap to clone and compares, hashes and orders as its string form.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePath(String);

impl NodePath {
    /// The root path `/`.
    pub fn root() -> Self {
        NodePath("/".to_owned())
    }

    /// Parses and validates `path`; the error says which rule was broken and where.
    pub fn new(path: impl AsRef<str>) -> Result<Self, Error> {
        let path = path.as_ref();
        validate(path).map_err(|reason| Error::InvalidPath {
            path: truncate_for_error(path),
            reason,
        })?;
        Ok(NodePath(path.to_owned()))
    }

    /// The path as a string, always starting with `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the root path `/`.
    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The parent path; `None` for the root.
    pub fn parent(&self) -> Option<NodePath> {
        if self.is_root() {
            return None;
        }
        match self.0.rfind('/') {
            Some(0) => Some(NodePath::root()),
            Some(i) => Some(NodePath(self.0[..i].to_owned())),
            None => None,
        }
    }

    /// The last segment; empty for the root.
    pub fn name(&self) -> &str {
        match self.0.rfind('/') {
            Some(i) => &self.0[i + 1..],
            None => "",
        }
    }

    /// The segments from the root down (none for the root).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// Number of segments (0 for the root).
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// Whether this path, read as a sequential node's parent and name prefix, leaves room
    /// for the counter's [`SEQUENCE_DIGITS`]: every generated name has the same length, so
    /// counter 0's is checked. The input error every backend gives for a sequential create
    /// or registration, before any I/O. The root has no name to prefix and passes.
    pub fn check_sequential_prefix(&self) -> Result<(), Error> {
        match self.parent() {
            Some(parent) => parent.join(&sequential_name(self.name(), 0)).map(drop),
            None => Ok(()),
        }
    }

    /// This path with one more segment `name`; `name` must be a single valid segment
    /// (no `/`), and the result must satisfy every path rule.
    pub fn join(&self, name: &str) -> Result<NodePath, Error> {
        if name.contains('/') {
            return Err(Error::InvalidPath {
                path: truncate_for_error(name),
                reason: InvalidPath::SlashInName,
            });
        }
        if self.is_root() {
            NodePath::new(format!("/{name}"))
        } else {
            NodePath::new(format!("{}/{name}", self.0))
        }
    }

    /// Whether `self` is a direct child of `parent`.
    pub fn is_child_of(&self, parent: &NodePath) -> bool {
        self.parent().as_ref() == Some(parent)
    }

    /// Whether `self` is `ancestor` or lies anywhere below it.
    pub fn is_within(&self, ancestor: &NodePath) -> bool {
        if ancestor.is_root() || self == ancestor {
            return true;
        }
        self.0.len() > ancestor.0.len()
            && self.0.starts_with(&ancestor.0)
            && self.0.as_bytes()[ancestor.0.len()] == b'/'
    }

    /// The ancestors of this path from the root down, excluding `self`.
    pub fn ancestors(&self) -> Vec<NodePath> {
        let mut out = Vec::new();
        let mut cur = self.parent();
        while let Some(p) = cur {
            cur = p.parent();
            out.push(p);
        }
        out.reverse();
        out
    }

    /// The sequence number of a sequential node's name (its last [`SEQUENCE_DIGITS`] digits),
    /// if the name ends with that many ASCII digits.
    pub fn sequence(&self) -> Option<u64> {
        parse_sequence(self.name())
    }
}

/// The sequence number at the end of a sequential node name, if it ends with
/// [`SEQUENCE_DIGITS`] ASCII digits.
///
/// Never panics: the tail is checked byte-wise before it is read as text, since its start
/// may fall inside a multi-byte character (e.g. `"ü123456789"`).
pub fn parse_sequence(name: &str) -> Option<u64> {
    let bytes = name.as_bytes();
    let start = bytes.len().checked_sub(SEQUENCE_DIGITS)?;
    let tail = bytes.get(start..)?;
    if !tail.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // All-ASCII tail, so `start` is a char boundary and `get` succeeds.
    name.get(start..)?.parse().ok()
}

/// Formats a sequential node name: `prefix` followed by the zero-padded counter.
pub fn sequential_name(prefix: &str, counter: u64) -> String {
    format!("{prefix}{counter:0width$}", width = SEQUENCE_DIGITS)
}

fn truncate_for_error(path: &str) -> String {
    const SHOWN: usize = 128;
    if path.len() <= SHOWN {
        return path.escape_debug().to_string();
    }
    let mut end = SHOWN;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", path[..end].escape_debug())
}

fn forbidden_char(c: char) -> bool {
    matches!(c,
        '\u{0000}'..='\u{001F}'
        | '\u{007F}'..='\u{009F}'
        | '\u{E000}'..='\u{F8FF}'
        // Specials, and above U+FFFF what ZooKeeper sees as surrogate pairs and refuses
        // after the round trip.
        | '\u{FFF0}'..)
}

/// The entries of a map keyed by path that lie strictly below `path`, in path order. Every
/// path below `/a` starts with `/a/` and those sort together, so this is a range of the map:
/// its cost follows the subtree, not the map.
pub(crate) fn range_below<'a, V>(
    map: &'a std::collections::BTreeMap<NodePath, V>,
    path: &NodePath,
) -> impl Iterator<Item = (&'a NodePath, &'a V)> + 'a {
    let prefix = if path.is_root() {
        "/".to_owned()
    } else {
        format!("{path}/")
    };
    map.range::<str, _>((
        std::ops::Bound::Included(prefix.as_str()),
        std::ops::Bound::Unbounded,
    ))
    .take_while(move |(p, _)| p.as_str().starts_with(prefix.as_str()))
}

/// The direct children of `parent` among the nodes of `map`, in creation order: the order
/// [`Registry::children`](crate::Registry::children) lists them in.
pub(crate) fn children_in<'a>(
    map: &'a std::collections::BTreeMap<NodePath, crate::Node>,
    parent: &NodePath,
) -> Vec<&'a crate::Node> {
    let mut children: Vec<&crate::Node> = range_below(map, parent)
        .map(|(_, node)| node)
        .filter(|node| node.path.is_child_of(parent))
        .collect();
    children.sort_by_key(|node| node.create_order);
    children
}

fn validate(path: &str) -> Result<(), InvalidPath> {
    if path.is_empty() {
        return Err(InvalidPath::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(InvalidPath::TooLong {
            len: path.len(),
            max: MAX_PATH_LEN,
        });
    }
    if !path.starts_with('/') {
        return Err(InvalidPath::NotAbsolute);
    }
    if let Some((offset, c)) = path.char_indices().find(|&(_, c)| forbidden_char(c)) {
        return Err(InvalidPath::ForbiddenCharacter {
            offset,
            character: c,
        });
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(InvalidPath::TrailingSlash);
    }
    let mut depth = 0;
    for (index, segment) in path[1..].split('/').enumerate() {
        depth += 1;
        match segment {
            "" => return Err(InvalidPath::EmptySegment { index }),
            "." | ".." => {
                return Err(InvalidPath::RelativeSegment {
                    index,
                    segment: segment.to_owned(),
                })
            }
            "zookeeper" if index == 0 => return Err(InvalidPath::Reserved),
            _ => {}
        }
    }
    if depth > MAX_DEPTH {
        return Err(InvalidPath::TooDeep {
            depth,
            max: MAX_DEPTH,
        });
    }
    Ok(())
}

impl fmt::Display for NodePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePath({:?})", self.0)
    }
}

impl FromStr for NodePath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        NodePath::new(s)
    }
}

impl TryFrom<&str> for NodePath {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self, Error> {
        NodePath::new(s)
    }
}

impl TryFrom<String> for NodePath {
    type Error = Error;
    /// Validates like [`NodePath::new`] and keeps the string (no copy).
    fn try_from(s: String) -> Result<Self, Error> {
        NodePath::from_string(s).map_err(|(s, reason)| Error::InvalidPath {
            path: truncate_for_error(&s),
            reason,
        })
    }
}

impl NodePath {
    /// Validates like [`NodePath::new`] and keeps the string (no copy); an invalid one comes
    /// back whole with the reason, for callers that report what they could not name.
    pub fn from_string(s: String) -> Result<NodePath, (String, InvalidPath)> {
        match validate(&s) {
            Ok(()) => Ok(NodePath(s)),
            Err(reason) => Err((s, reason)),
        }
    }
}

// Consistent with Eq/Ord/Hash, which are those of the inner string: lets ordered maps of
// paths be searched by string prefix.
impl std::borrow::Borrow<str> for NodePath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for NodePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(path: &str) -> InvalidPath {
        match NodePath::new(path) {
            Err(Error::InvalidPath { reason, .. }) => reason,
            other => panic!("{path:?}: expected InvalidPath, got {other:?}"),
        }
    }

    #[test]
    fn accepts_dapeng_paths() {
        for p in [
            "/",
            "/soa",
            "/soa/runtime/services/com.today.Goods/192.168.1.121:9081:1.0.0:0000000022",
            "/a b/ü/x-y_z",
        ] {
            assert_eq!(
                NodePath::new(p).map(|p| p.to_string()).ok(),
                Some(p.to_owned())
            );
        }
    }

    #[test]
    fn rejects_with_reason() {
        assert_eq!(reason(""), InvalidPath::Empty);
        assert_eq!(reason("a/b"), InvalidPath::NotAbsolute);
        assert_eq!(reason("/a/"), InvalidPath::TrailingSlash);
        assert_eq!(reason("/a//b"), InvalidPath::EmptySegment { index: 1 });
        assert!(matches!(
            reason("/a/./b"),
            InvalidPath::RelativeSegment { index: 1, .. }
        ));
        assert!(matches!(
            reason("/.."),
            InvalidPath::RelativeSegment { index: 0, .. }
        ));
        assert!(matches!(
            reason("/a\0b"),
            InvalidPath::ForbiddenCharacter { offset: 2, .. }
        ));
        assert!(matches!(
            reason("/a\nb"),
            InvalidPath::ForbiddenCharacter { .. }
        ));
        assert!(matches!(
            reason("/a\u{E000}"),
            InvalidPath::ForbiddenCharacter { .. }
        ));
        assert!(matches!(
            reason("/a\u{FFFF}"),
            InvalidPath::ForbiddenCharacter { .. }
        ));
        assert_eq!(reason("/zookeeper"), InvalidPath::Reserved);
        assert_eq!(reason("/zookeeper/quota"), InvalidPath::Reserved);
        assert!(NodePath::new("/a/zookeeper").is_ok());
        let long = format!("/{}", "x".repeat(MAX_PATH_LEN));
        assert!(matches!(reason(&long), InvalidPath::TooLong { .. }));
        let at_limit = format!("/{}", "x".repeat(MAX_PATH_LEN - 1));
        assert!(NodePath::new(at_limit).is_ok());
        let deep = "/a".repeat(MAX_DEPTH + 1);
        assert!(matches!(reason(&deep), InvalidPath::TooDeep { .. }));
        assert!(NodePath::new("/a".repeat(MAX_DEPTH)).is_ok());
    }

    #[test]
    fn navigation() {
        let p = NodePath::new("/a/b/c").unwrap();
        assert_eq!(p.name(), "c");
        assert_eq!(p.parent().unwrap().as_str(), "/a/b");
        assert_eq!(
            NodePath::new("/a").unwrap().parent(),
            Some(NodePath::root())
        );
        assert_eq!(NodePath::root().parent(), None);
        assert_eq!(p.join("d").unwrap().as_str(), "/a/b/c/d");
        assert_eq!(NodePath::root().join("x").unwrap().as_str(), "/x");
        assert!(p.join("x/y").is_err());
        assert!(p.join("").is_err());
        assert!(p.is_child_of(&NodePath::new("/a/b").unwrap()));
        assert!(!p.is_child_of(&NodePath::new("/a").unwrap()));
        assert!(p.is_within(&NodePath::new("/a").unwrap()));
        assert!(!NodePath::new("/ab")
            .unwrap()
            .is_within(&NodePath::new("/a").unwrap()));
        assert!(p.is_within(&NodePath::root()));
        assert_eq!(p.depth(), 3);
        let anc: Vec<_> = p.ancestors().iter().map(|a| a.to_string()).collect();
        assert_eq!(anc, ["/", "/a", "/a/b"]);
    }

    #[test]
    fn beyond_the_bmp_is_refused() {
        // ZooKeeper's server refuses these (InvalidArgument after the request went out).
        for (path, offset, character) in [
            ("/a\u{1F600}b", 2, '\u{1F600}'),
            ("/x/\u{10000}", 3, '\u{10000}'),
            ("/\u{10FFFF}", 1, '\u{10FFFF}'),
        ] {
            assert_eq!(
                reason(path),
                InvalidPath::ForbiddenCharacter { offset, character },
                "{path:?}"
            );
        }
        // The edges of the allowed ranges stay valid.
        for path in ["/\u{D7FF}", "/\u{F900}", "/\u{FFEF}", "/\u{A0}", "/中文"] {
            assert!(NodePath::new(path).is_ok(), "{path:?}");
        }
    }

    #[test]
    fn sequences() {
        assert_eq!(
            sequential_name("1.2.3.4:80:1.0.0:", 22),
            "1.2.3.4:80:1.0.0:0000000022"
        );
        assert_eq!(parse_sequence("1.2.3.4:80:1.0.0:0000000022"), Some(22));
        assert_eq!(parse_sequence("x123"), None);
        assert_eq!(NodePath::new("/s/n0000000007").unwrap().sequence(), Some(7));
    }

    #[test]
    fn sequence_of_non_ascii_names_never_panics() {
        // The old code sliced the &str at len-10, inside 'ü' (2 bytes) or '€' (3 bytes).
        for name in [
            "ü123456789",
            "ü12345678",
            "€12345678",
            "€1234567",
            "x€1234567",
            "😀123456",
            "😀12345678",
            "üü",
            "ü",
        ] {
            assert_eq!(parse_sequence(name), None, "{name:?}");
            // Names beyond U+FFFF are no valid segment (see `beyond_the_bmp_is_refused`).
            if let Ok(path) = NodePath::new(format!("/q/{name}")) {
                assert_eq!(path.sequence(), None, "{name:?}");
            }
        }
        assert_eq!(parse_sequence("ü0000000042"), Some(42));
        assert_eq!(parse_sequence("€😀9999999999"), Some(9_999_999_999));
        assert_eq!(NodePath::new("/q/ü0000000003").unwrap().sequence(), Some(3));
    }
}

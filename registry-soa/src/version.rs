//! Version compatibility: a consumer built against X may call an instance of version Y when
//! the major versions are equal and Y >= X.
//!
//! Y >= X compares as semantic versions, as the notes ask. Dapeng's Java consumer
//! (`SoaConnectionPoolImpl.checkVersion`) accepts every version in some releases and compares
//! `minor * 10 + patch` in others, which calls 1.0.10 from 1.1.0, refuses 1.1.0 from 1.0.12
//! and throws on a version without three numbers; we keep the semantic rule, which never
//! calls an older instance.

use std::cmp::Ordering;

/// Most dotted parts a version may have (`1.2.3.4`).
const MAX_PARTS: usize = 4;

/// A version as compatibility compares it: 1 to 4 dotted numbers, missing parts as 0 (`1.0`
/// equals `1.0.0`), then an optional `-pre.release` that ranks below the release
/// (`1.0.0-SNAPSHOT` < `1.0.0`, as in semantic versioning); a `+build` suffix is ignored.
/// Borrows its text and parses without allocating, so selection can compare versions per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Numbers<'a> {
    parts: [u64; MAX_PARTS],
    /// The pre-release identifiers; `None` for a release.
    pre: Option<&'a str>,
}

impl<'a> Numbers<'a> {
    /// `None` unless `version` is 1 to 4 dotted numbers with an optional `-...` and `+...`.
    pub(crate) fn parse(version: &'a str) -> Option<Numbers<'a>> {
        let version = version.split_once('+').map_or(version, |(v, _)| v);
        let (core, pre) = match version.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (version, None),
        };
        let mut parts = [0u64; MAX_PARTS];
        for (i, part) in core.split('.').enumerate() {
            *parts.get_mut(i)? = part.parse().ok()?;
        }
        Some(Numbers { parts, pre })
    }

    /// Whether an instance of version `self` can serve a consumer built against `wanted`.
    pub(crate) fn serves(&self, wanted: &Numbers<'_>) -> bool {
        self.parts[0] == wanted.parts[0] && self.precedence(wanted) != Ordering::Less
    }

    /// Semantic-versioning precedence: numbers, then a release above its pre-releases, then
    /// pre-release identifiers one by one.
    fn precedence(&self, other: &Numbers<'_>) -> Ordering {
        self.parts
            .cmp(&other.parts)
            .then_with(|| match (self.pre, other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => pre_release_precedence(a, b),
            })
    }
}

/// Compares pre-release texts identifier by identifier: numeric ones by value and below
/// alphanumeric ones, those in ASCII order; when one runs out first it ranks lower.
fn pre_release_precedence(a: &str, b: &str) -> Ordering {
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        let order = match (a.next(), b.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match (numeric(x), numeric(y)) {
                // By value without overflow: fewer significant digits is smaller.
                (true, true) => {
                    let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                    x.len().cmp(&y.len()).then_with(|| x.cmp(y))
                }
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
                (false, false) => x.cmp(y),
            },
        };
        if order != Ordering::Equal {
            return order;
        }
    }
}

/// Compares two versions by semantic-versioning precedence (`1.0` equals `1.0.0`,
/// `1.0.0-SNAPSHOT` is below `1.0.0`, `+build` is ignored); `None` if either is not 1 to 4
/// dotted numbers with optional suffixes.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    Some(Numbers::parse(a)?.precedence(&Numbers::parse(b)?))
}

/// Whether an instance of version `instance` can serve a consumer built against `wanted`.
/// An empty `wanted` (a caller that names no version) is served by every instance, as in
/// [`ServiceView::select`](crate::ServiceView::select). Otherwise the majors must be equal and
/// `instance >= wanted` by [`compare`] (so a release serves its pre-releases' callers, not the
/// reverse). Versions that are not dotted numbers are compatible only when identical.
pub fn compatible(wanted: &str, instance: &str) -> bool {
    if wanted.is_empty() {
        return true;
    }
    match (Numbers::parse(wanted), Numbers::parse(instance)) {
        (Some(w), Some(i)) => i.serves(&w),
        _ => wanted == instance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_major_and_not_older() {
        assert!(compatible("1.0.0", "1.0.0"));
        assert!(compatible("1.0.0", "1.2.0"));
        assert!(compatible("1.2", "1.2.0"));
        assert!(!compatible("1.2.0", "1.1.9"));
        assert!(!compatible("1.0.0", "2.0.0"));
        assert!(!compatible("2.0.0", "1.9.0"));
        assert!(compatible("1.0.0-SNAPSHOT", "1.0.0"));
        assert!(compatible("1.0.0-SNAPSHOT", "1.0.0-SNAPSHOT"));
        assert!(compatible("1.0.0-SNAPSHOT", "1.0.1-SNAPSHOT"));
        assert!(compatible("1.0.0+build.7", "1.0.0"));
        assert!(compatible("abc", "abc"));
        assert!(!compatible("abc", "1.0.0"));
        assert_eq!(compare("1.10.0", "1.9.0"), Some(Ordering::Greater));
    }

    #[test]
    fn pre_releases_rank_below_their_release() {
        // The notes: Y >= X "as a semantic version"; a 1.0.0 caller must not get a snapshot.
        assert!(!compatible("1.0.0", "1.0.0-SNAPSHOT"));
        assert!(!compatible("1.0.0-rc.2", "1.0.0-rc.1"));
        assert!(compatible("1.0.0-rc.1", "1.0.0-rc.2"));
        // semver.org's example order.
        let ordered = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
        ];
        for pair in ordered.windows(2) {
            assert_eq!(compare(pair[0], pair[1]), Some(Ordering::Less), "{pair:?}");
            assert_eq!(
                compare(pair[1], pair[0]),
                Some(Ordering::Greater),
                "{pair:?}"
            );
        }
        assert_eq!(compare("1.0.0+a", "1.0.0+b"), Some(Ordering::Equal));
        assert_eq!(
            compare(
                "1.0.0-99999999999999999999999",
                "1.0.0-100000000000000000000000"
            ),
            Some(Ordering::Less)
        );
    }

    #[test]
    fn malformed_versions_are_not_numbers() {
        for bad in [
            "",
            ".",
            "1..0",
            "1.2.3.4.5",
            "1.x",
            "-1",
            "1.0.",
            "99999999999999999999",
        ] {
            assert_eq!(Numbers::parse(bad), None, "{bad:?}");
        }
        assert_eq!(compare("1.2.3.4", "1.2.3.4"), Some(Ordering::Equal));
        // No caller version takes any instance, as selection does.
        assert!(compatible("", ""));
        assert!(compatible("", "1.0.0"));
        assert!(compatible("", "custom"));
        assert!(!compatible("1.0.0", ""));
    }
}

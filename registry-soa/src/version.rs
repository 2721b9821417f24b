//! Version compatibility: a consumer built against X may call an instance of version Y when
//! the major versions are equal and Y >= X.

use std::cmp::Ordering;

/// Most dotted parts a version may have (`1.2.3.4`).
const MAX_PARTS: usize = 4;

/// A dotted numeric version, missing parts as 0 (`1.0` equals `1.0.0`). Parsed without
/// allocating, so selection can compare versions per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Numbers([u64; MAX_PARTS]);

impl Numbers {
    /// `None` unless `version` is 1 to 4 dotted numbers (a `-...` or `+...` suffix ignored).
    pub(crate) fn parse(version: &str) -> Option<Numbers> {
        let core = version.split(['-', '+']).next()?;
        let mut parts = [0u64; MAX_PARTS];
        for (i, part) in core.split('.').enumerate() {
            *parts.get_mut(i)? = part.parse().ok()?;
        }
        Some(Numbers(parts))
    }

    /// Whether an instance of version `self` can serve a consumer built against `wanted`.
    pub(crate) fn serves(self, wanted: Numbers) -> bool {
        self.0[0] == wanted.0[0] && self >= wanted
    }
}

/// Compares two dotted numeric versions (`1.0` equals `1.0.0`); `None` if either is not one.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    Some(Numbers::parse(a)?.cmp(&Numbers::parse(b)?))
}

/// Whether an instance of version `instance` can serve a consumer built against `wanted`.
/// An empty `wanted` (a caller that names no version) is served by every instance, as in
/// [`ServiceView::select`](crate::ServiceView::select). Versions that are not dotted numbers
/// are compatible only when identical.
pub fn compatible(wanted: &str, instance: &str) -> bool {
    if wanted.is_empty() {
        return true;
    }
    match (Numbers::parse(wanted), Numbers::parse(instance)) {
        (Some(w), Some(i)) => i.serves(w),
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
        assert!(compatible("abc", "abc"));
        assert!(!compatible("abc", "1.0.0"));
        assert_eq!(compare("1.10.0", "1.9.0"), Some(Ordering::Greater));
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

//! Version compatibility: a consumer built against X may call an instance of version Y when
//! the major versions are equal and Y >= X.

use std::cmp::Ordering;

fn numbers(version: &str) -> Option<Vec<u64>> {
    let core = version.split(['-', '+']).next()?;
    let parts: Option<Vec<u64>> = core.split('.').map(|p| p.parse().ok()).collect();
    parts.filter(|p| !p.is_empty() && p.len() <= 4)
}

/// Compares two dotted numeric versions (`1.0` equals `1.0.0`); `None` if either is not one.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    let (mut a, mut b) = (numbers(a)?, numbers(b)?);
    let len = a.len().max(b.len());
    a.resize(len, 0);
    b.resize(len, 0);
    Some(a.cmp(&b))
}

/// Whether an instance of version `instance` can serve a consumer built against `wanted`.
/// Versions that are not dotted numbers are compatible only when identical.
pub fn compatible(wanted: &str, instance: &str) -> bool {
    match (numbers(wanted), numbers(instance)) {
        (Some(w), Some(i)) => w[0] == i[0] && compare(instance, wanted) != Some(Ordering::Less),
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
}

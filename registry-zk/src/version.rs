//! Node versions between the contract (`u64`) and ZooKeeper (a signed 32-bit counter).
//!
//! ZooKeeper increments a znode's `version` as an `int` that wraps to negative after 2^31
//! writes (and compares it with the expected version bit for bit). Read as `u32`, the
//! counter keeps growing by one per write until 2^32 writes, where it wraps to 0; so the
//! contract's version of a znode is its counter's 32 bits read unsigned.

/// The contract's version of a znode version: its bits read as unsigned.
pub(crate) fn from_zk(version: i32) -> u64 {
    u64::from(version as u32)
}

/// The znode version to send for an expected `version`; `None` if no request can ask for
/// exactly it: above `u32::MAX` no znode holds it, and `u32::MAX` itself is sent as -1,
/// which ZooKeeper reads as "any version". Such an expectation is reported as not met.
pub(crate) fn to_zk(version: u64) -> Option<i32> {
    u32::try_from(version)
        .ok()
        .filter(|v| *v != u32::MAX)
        .map(|v| v as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_past_i32_max_keep_growing() {
        assert_eq!(from_zk(0), 0);
        assert_eq!(from_zk(i32::MAX), 2_147_483_647);
        // One write after i32::MAX the server holds i32::MIN.
        assert_eq!(from_zk(i32::MIN), 2_147_483_648);
        assert_eq!(from_zk(-1), u64::from(u32::MAX));
    }

    #[test]
    fn expected_versions_round_trip_and_out_of_range_is_none() {
        for v in [0, 1, 2_147_483_647, 2_147_483_648, u64::from(u32::MAX) - 1] {
            let sent = to_zk(v).unwrap_or_else(|| panic!("{v} not sendable"));
            assert_eq!(from_zk(sent), v);
        }
        assert_eq!(to_zk(2_147_483_648), Some(i32::MIN));
        // -1 would match any version.
        assert_eq!(to_zk(u64::from(u32::MAX)), None);
        assert_eq!(to_zk(u64::from(u32::MAX) + 1), None);
        assert_eq!(to_zk(u64::MAX), None);
    }
}

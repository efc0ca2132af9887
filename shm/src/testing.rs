//! Helpers for tests (ours and downstream crates'): a random runtime id per test, so names
//! never collide and leftovers are easy to find.

use crate::name::SegmentName;

/// A fresh random runtime id for one test.
pub fn test_runtime() -> u64 {
    crate::platform::random_u64()
}

/// Names in `/dev/shm` that belong to runtime `rt` (should be empty after a test).
pub fn leftovers(rt: u64) -> Vec<SegmentName> {
    crate::segment::list()
        .map(|(ours, _)| ours.into_iter().filter(|n| n.runtime == rt).collect())
        .unwrap_or_default()
}

//! The wall clock, read in one place: agreed instants (`usable_since`) are Unix milliseconds by
//! the proposer's clock, and every peer reads them against its own.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, Unix milliseconds (0 for a clock before 1970).
pub fn unix_ms() -> u64 {
    unix_nanos() / 1_000_000
}

/// Now, Unix nanoseconds: also a seed that differs between peers and runs.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

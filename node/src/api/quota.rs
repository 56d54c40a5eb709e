//! What requests may hold while they wait, so that a flood of them costs the member bounded
//! memory and never blocks it: client writes admitted and not yet answered (count and bytes),
//! linearizable reads waiting, range listings being built. A request that does not fit is
//! refused at once with `429 overloaded` and `Retry-After`, before it buffers anything; the
//! consensus thread never waits for room.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;

/// Writes larger than this are "large": together they may fill at most
/// [`LARGE_SHARE_NUM`]/[`LARGE_SHARE_DEN`] of the write budget, so that a flood of large
/// values leaves room for small writes (a counter, a lock) beside it.
pub const LARGE_WRITE: u64 = 64 << 10;
const LARGE_SHARE_NUM: u64 = 3;
const LARGE_SHARE_DEN: u64 = 4;

/// One bounded resource: units in use out of a limit, mirrored in a gauge.
pub struct Quota {
    limit: u64,
    used: AtomicU64,
    gauge: Gauge,
}

impl Quota {
    /// A quota of `limit` units.
    pub fn new(limit: u64, gauge: Gauge) -> Arc<Self> {
        Arc::new(Quota {
            limit,
            used: AtomicU64::new(0),
            gauge,
        })
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes `n` units if the total stays within `ceiling`.
    fn try_take_within(self: &Arc<Self>, n: u64, ceiling: u64) -> Option<Held> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= ceiling)
            })
            .ok()?;
        self.gauge.inc_by(n as i64);
        Some(Held { quota: self.clone(), n })
    }

    /// Takes `n` units, however many, if nothing else is held.
    fn try_take_alone(self: &Arc<Self>, n: u64) -> Option<Held> {
        self.used
            .compare_exchange(0, n, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.gauge.inc_by(n as i64);
        Some(Held { quota: self.clone(), n })
    }

    /// Takes `n` units if they fit.
    pub fn try_take(self: &Arc<Self>, n: u64) -> Option<Held> {
        self.try_take_within(n, self.limit)
    }
}

/// Units held until dropped.
pub struct Held {
    quota: Arc<Quota>,
    n: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.quota.used.fetch_sub(self.n, Ordering::AcqRel);
        self.quota.gauge.dec_by(self.n as i64);
    }
}

/// The write budget: writes admitted and not yet answered, by count and by bytes.
pub struct WriteBudget {
    /// Writes.
    pub count: Arc<Quota>,
    /// Their key and value bytes.
    pub bytes: Arc<Quota>,
}

/// Why a write did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRefused {
    /// Too many writes.
    Count,
    /// Too many bytes (for large writes: their share of them).
    Bytes,
}

impl WriteBudget {
    /// Admits a write of `bytes` or says which limit it would pass.
    pub fn admit(&self, bytes: u64) -> Result<(Held, Held), WriteRefused> {
        let ceiling = if bytes > LARGE_WRITE {
            self.bytes.limit() / LARGE_SHARE_DEN * LARGE_SHARE_NUM
        } else {
            self.bytes.limit()
        };
        // A single write larger than the ceiling would never fit: let it in when nothing
        // else is held rather than refuse it forever (the value limit bounds it anyway).
        let bytes_held = self
            .bytes
            .try_take_within(bytes, ceiling)
            .or_else(|| self.bytes.try_take_alone(bytes))
            .ok_or(WriteRefused::Bytes)?;
        let count_held = self.count.try_take(1).ok_or(WriteRefused::Count)?;
        Ok((count_held, bytes_held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(count: u64, bytes: u64) -> WriteBudget {
        WriteBudget {
            count: Quota::new(count, Gauge::default()),
            bytes: Quota::new(bytes, Gauge::default()),
        }
    }

    #[test]
    fn a_quota_gives_back_what_was_held_when_dropped() {
        let gauge = Gauge::default();
        let q = Quota::new(10, gauge.clone());
        let a = q.try_take(6).unwrap();
        assert!(q.try_take(5).is_none());
        let b = q.try_take(4).unwrap();
        assert_eq!(gauge.get(), 10);
        drop(a);
        assert_eq!(gauge.get(), 4);
        assert!(q.try_take(6).is_some());
        drop(b);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn large_writes_leave_a_quarter_of_the_bytes_to_small_ones() {
        let b = budget(1000, 4 << 20);
        let mut held = Vec::new();
        while let Ok(h) = b.admit(1 << 20) {
            held.push(h);
        }
        assert_eq!(held.len(), 3, "large writes stop at three quarters");
        assert_eq!(b.admit(1 << 20).err(), Some(WriteRefused::Bytes));
        for _ in 0..100 {
            held.push(b.admit(1000).expect("small writes still fit"));
        }
    }

    #[test]
    fn the_count_limit_holds_and_refuses_without_keeping_bytes() {
        let b = budget(2, 1 << 20);
        let _one = b.admit(10).unwrap();
        let _two = b.admit(10).unwrap();
        assert_eq!(b.admit(10).err(), Some(WriteRefused::Count));
        assert_eq!(
            b.bytes.used.load(Ordering::Acquire),
            20,
            "the refused write holds no bytes"
        );
    }

    #[test]
    fn a_write_larger_than_the_budget_passes_alone() {
        let b = budget(10, 1 << 20);
        let alone = b.admit(2 << 20).expect("nothing else is held");
        assert_eq!(b.admit(2 << 20).err(), Some(WriteRefused::Bytes));
        drop(alone);
        assert!(b.admit(2 << 20).is_ok());
    }
}

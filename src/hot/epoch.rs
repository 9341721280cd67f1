//! The roots epoch: tells the request spans created before a stall ended from those created
//! after, without a clock read per request.
//!
//! Every root record is stamped with [`current`] when its span is created; [`advance`] starts
//! a new epoch when a stall's end is noted (by the blocked thread as its flagged poll ends,
//! or by the watchdog). A root stamped below the epoch a stall's end started was created
//! before that end. A root only loads the epoch, a cache line that stays shared between the
//! workers, where a counter bumped by every root made them take turns owning it.

use std::sync::atomic::{AtomicU64, Ordering};

/// The current epoch; starts at 1.
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// The current epoch (one relaxed load).
#[inline]
pub(crate) fn current() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// Starts a new epoch and returns it: every root created from now on is stamped with it or a
/// later one, every root created before with an earlier one.
pub(crate) fn advance() -> u64 {
    EPOCH.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
}

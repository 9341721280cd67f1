//! The watchdog's doze: while every worker of the runtime is parked, nothing can stall and a
//! delay probe would only measure how fast the OS wakes a parked thread, so the watchdog
//! sleeps for [`IDLE_SAMPLE_INTERVALS`] sample intervals instead of one, and the first worker
//! that unparks wakes it up.
//!
//! On an idle runtime this turns two thread wake-ups per sample interval (the watchdog's, and
//! the worker that runs the probe) into three per doze, which is most of what looplag costs
//! an idle process. Stall detection loses nothing: a stall needs a worker that unparked, and
//! that worker wakes the watchdog before it polls anything.
//!
//! # No lost wake-up
//!
//! Each side stores, issues a `SeqCst` fence, then loads (Dekker's pattern): the watchdog
//! sets `dozing`, then checks that every slot is parked; a worker clears its slot's `parked`
//! (in `Slot::unpark`), then reads `dozing`. The two fences are ordered one way or the
//! other, so at least one side sees the other's store: either the watchdog cancels its doze
//! or the worker wakes it. A wake-up that arrives after the doze was cancelled only makes
//! the watchdog tick once early. (Fences rather than `SeqCst` accesses: loom checks this
//! handshake, and it models `SeqCst` fences exactly but `SeqCst` accesses only as
//! acquire/release.)
//!
//! The worker's side costs a fence (an `mfence` on x86, once per unpark, which already
//! follows a system call) and one load of a line that only changes when the watchdog dozes
//! or wakes; the wake itself (a futex wake) happens at most once per doze.

use std::sync::Mutex;
use std::thread::Thread;

use crate::hot::sync::{fence, AtomicBool, Ordering};

/// While the runtime is idle, the watchdog wakes (and probes the delay) once per this many
/// sample intervals.
pub(crate) const IDLE_SAMPLE_INTERVALS: u32 = 20;

/// Shared by the watchdog thread and the runtime's unpark hook.
#[derive(Debug)]
pub(crate) struct Doze {
    dozing: AtomicBool,
    /// The thread to wake; only locked by the watchdog when it starts and stops, and tried
    /// (never waited for) by a worker that wakes it.
    watchdog: Mutex<Option<Thread>>,
}

impl Doze {
    pub(crate) fn new() -> Self {
        Doze {
            dozing: AtomicBool::new(false),
            watchdog: Mutex::new(None),
        }
    }

    /// A worker just unparked (after `Slot::unpark`): wake the watchdog if it dozes.
    /// Returns whether this call woke it.
    #[inline]
    pub(crate) fn worker_unparked(&self) -> bool {
        fence(Ordering::SeqCst);
        self.dozing.load(Ordering::Relaxed) && self.wake()
    }

    #[cold]
    fn wake(&self) -> bool {
        if !self.dozing.swap(false, Ordering::AcqRel) {
            return false; // another worker got there first
        }
        // `try_lock` fails only while `set_watchdog` runs, which the watchdog thread calls
        // before its first doze and after its last: `dozing` cannot have been set by the
        // thread being registered or removed, so no doze goes unwoken.
        if let Ok(watchdog) = self.watchdog.try_lock() {
            if let Some(thread) = watchdog.as_ref() {
                thread.unpark();
            }
        }
        true
    }

    /// The watchdog thread registers itself (`Some`) when it starts, and leaves (`None`).
    pub(crate) fn set_watchdog(&self, thread: Option<Thread>) {
        match self.watchdog.lock() {
            Ok(mut watchdog) => *watchdog = thread,
            Err(poisoned) => *poisoned.into_inner() = thread,
        }
    }

    /// The watchdog wants to doze: announces it, then asks `all_parked`, which reads the
    /// slots' park state. Returns whether the doze stands; when it does not, the
    /// announcement is withdrawn.
    pub(crate) fn begin(&self, all_parked: impl FnOnce() -> bool) -> bool {
        self.dozing.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if all_parked() {
            true
        } else {
            self.end();
            false
        }
    }

    /// Whether the doze still stands (no worker has woken the watchdog).
    pub(crate) fn dozing(&self) -> bool {
        self.dozing.load(Ordering::Acquire)
    }

    /// The watchdog is awake again.
    pub(crate) fn end(&self) {
        self.dozing.store(false, Ordering::Release);
    }
}

#[cfg(all(test, looplag_loom))]
mod loom_tests {
    //! The handshake between a dozing watchdog and a worker that unparks, under every
    //! interleaving loom finds (`scripts/test.sh` runs it with the slot protocol's).

    use loom::sync::Arc;
    use loom::thread;

    use super::Doze;
    use crate::hot::sync::{AtomicBool, Ordering};

    #[test]
    fn loom_doze_never_misses_an_unparking_worker() {
        loom::model(|| {
            let doze = Arc::new(Doze::new());
            // The worker's slot: parked when the watchdog decides to doze.
            let parked = Arc::new(AtomicBool::new(true));

            let worker = {
                let doze = Arc::clone(&doze);
                let parked = Arc::clone(&parked);
                thread::spawn(move || {
                    // `Slot::unpark`'s store, then the unpark hook's call.
                    parked.store(false, Ordering::Release);
                    doze.worker_unparked()
                })
            };
            let dozes = doze.begin(|| parked.load(Ordering::Acquire));
            let woke_it = worker.join().expect("worker");

            // A doze that stands while the worker unparked must be ended by that worker;
            // a doze that does not stand is withdrawn.
            if dozes {
                assert!(woke_it, "the watchdog dozes through a worker's unpark");
            }
            assert!(!doze.dozing(), "the doze flag is left set");
        });
    }
}

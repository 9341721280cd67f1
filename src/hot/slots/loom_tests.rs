//! Model checking of the slot protocol between a worker (the slot's owner) and the watchdog.
//!
//! Run with `RUSTFLAGS="--cfg looplag_loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib
//! loom` (scripts/test.sh does, with `LOOM_MAX_PREEMPTIONS` bounding the search). loom runs
//! every interleaving of the two threads' atomic operations (up to the preemption bound),
//! including the stale reads the memory orderings allow, and the clock is a counter that
//! ticks on every read (`clock.rs`, `cfg(all(test, looplag_loom))`).
//!
//! The watchdog side below is the watchdog's real sequence, reduced to what touches the
//! slot: `snapshot`, `flag` from the exact busy word, a clock read, then `flagged_end`
//! (still running, or ended at a time) as often as it re-checks the stall. Invariants:
//!
//! 1. a snapshot is never torn: `FLAGGED` only with `BUSY`, the timestamp is one the owner
//!    wrote, and the entered spans are the owner's, outermost first;
//! 2. the watchdog never flags a poll that already ended: once the owner's `poll_end` for a
//!    poll happens-before the flag attempt, the flag fails;
//! 3. a flagged poll's end, as the watchdog obtains it, is never before its start; it is
//!    either the end the owner published (read inside `poll_end`, so between the owner's
//!    clock reads just before and just after it) or the time of the watchdog's own flag;
//! 4. once the watchdog sees a flagged poll ended, it never sees it running again.

use loom::sync::atomic::AtomicUsize;
use loom::sync::Arc;
use loom::thread;

use super::{Slot, Snapshot, BUSY, FLAGGED, TS_MASK};
use crate::clock;
use crate::hot::sync::Ordering;

/// What the owner did in one poll: its start timestamp and clock reads bracketing its end.
#[derive(Clone, Copy, Debug)]
struct Poll {
    start: u64,
    before_end: u64,
    after_end: u64,
    /// The activity word as the owner read it right after the call that ended the poll.
    word_after: u64,
}

/// What the watchdog concluded about one poll it flagged.
#[derive(Clone, Copy, Debug)]
struct Flagged {
    start: u64,
    /// How many of the owner's polls were known (through `ended`) to be over when the
    /// watchdog tried to flag this one.
    known_ended: usize,
    flagged_at: u64,
    /// `None`: still running at the watchdog's last look.
    end: Option<u64>,
}

/// How the owner delimits its polls.
#[derive(Clone, Copy)]
enum Protocol {
    /// tokio's task poll hooks (`--cfg tokio_unstable`): `task_poll_start` / `poll_end`.
    PollHooks,
    /// Stable builds: a poll is a span entered at the base depth (with a nested span).
    Spans,
}

/// The owner: `polls` polls, publishing after each how many are over.
fn owner(slot: &Slot, protocol: Protocol, polls: u64, ended: &AtomicUsize) -> Vec<Poll> {
    let mut done = Vec::new();
    for poll in 0..polls {
        match protocol {
            Protocol::PollHooks => slot.task_poll_start(poll + 1, std::panic::Location::caller()),
            Protocol::Spans => {
                slot.unpark();
                slot.enter(10 + poll);
                slot.enter(20 + poll);
            }
        }
        // The owner reads its own latest store (possibly with the watchdog's flag on it).
        let start = slot.word.load(Ordering::Relaxed) & TS_MASK;
        let before_end = clock::raw();
        let word_after = match protocol {
            Protocol::PollHooks => {
                slot.poll_end();
                slot.word.load(Ordering::Relaxed)
            }
            Protocol::Spans => {
                slot.exit(20 + poll);
                slot.exit(10 + poll);
                let word_after = slot.word.load(Ordering::Relaxed);
                slot.park();
                word_after
            }
        };
        let after_end = clock::raw();
        ended.store(done.len() + 1, Ordering::Release);
        done.push(Poll {
            start,
            before_end,
            after_end,
            word_after,
        });
    }
    done
}

/// The watchdog: `rounds` scans; a busy, unflagged poll is flagged at once (as if it had
/// passed the threshold), then re-checked `rechecks` times (the doubling re-reports).
fn watchdog(
    slot: &Slot,
    protocol: Protocol,
    rounds: usize,
    rechecks: usize,
    ended: &AtomicUsize,
) -> (Vec<Snapshot>, Vec<Flagged>) {
    let mut snapshots = Vec::new();
    let mut flagged = Vec::new();
    for _ in 0..rounds {
        let snapshot = slot.snapshot();
        snapshots.push(snapshot);
        if let Protocol::Spans = protocol {
            let spans: Vec<u64> = slot.entered_spans(snapshot.depth).collect();
            check_entered(&spans);
        }
        if !snapshot.busy() || snapshot.flagged() || snapshot.parked {
            continue;
        }
        let known_ended = ended.load(Ordering::Acquire);
        if !slot.flag(snapshot.word) {
            continue;
        }
        let flagged_word = snapshot.word | FLAGGED;
        let flagged_at = clock::raw();
        let mut end = None;
        for _ in 0..rechecks {
            let flag = super::Flag {
                word: flagged_word,
                at: flagged_at,
            };
            end = slot.flagged_end(&flag).map(|end| end.at);
            if end.is_some() {
                // Invariant 4: an ended poll stays ended.
                assert_ne!(
                    slot.word(),
                    flagged_word,
                    "a flagged poll came back to life"
                );
                break;
            }
        }
        flagged.push(Flagged {
            start: snapshot.start(),
            known_ended,
            flagged_at,
            end,
        });
    }
    (snapshots, flagged)
}

/// Invariant 1 for the span stack: ids are the owner's, outermost first.
fn check_entered(spans: &[u64]) {
    match spans {
        [] => {}
        [outer] => assert!((10..20).contains(outer), "{spans:?}"),
        [outer, inner] => {
            assert!((10..20).contains(outer), "{spans:?}");
            assert!((20..30).contains(inner), "{spans:?}");
        }
        _ => panic!("more spans than the owner entered: {spans:?}"),
    }
}

/// Checks invariants 1 to 3 once both threads are done.
fn check(polls: &[Poll], snapshots: &[Snapshot], flagged: &[Flagged]) {
    for snapshot in snapshots {
        assert!(
            !snapshot.flagged() || snapshot.busy(),
            "FLAGGED without BUSY: {snapshot:?}"
        );
        assert!(
            snapshot.start() == 0 || polls.iter().any(|p| p.start == snapshot.start()),
            "torn or invented timestamp {snapshot:?} (polls {polls:?})"
        );
        assert_eq!(snapshot.word & !(TS_MASK | BUSY | FLAGGED), 0);
    }
    for poll in polls {
        // The owner's own view: once its poll_end ran, its slot is idle (a flag lands only
        // on the busy word, which poll_end's store follows in the modification order).
        assert_eq!(
            poll.word_after & (BUSY | FLAGGED),
            0,
            "the owner still sees its poll running after ending it: {poll:?}"
        );
    }
    for flag in flagged {
        let index = polls
            .iter()
            .position(|p| p.start == flag.start)
            .unwrap_or_else(|| panic!("flagged a poll the owner never ran: {flag:?}"));
        let poll = polls[index];
        // Invariant 2.
        assert!(
            flag.known_ended <= index,
            "flagged poll {index} after it was known to be over: {flag:?}"
        );
        assert!(flag.flagged_at > flag.start, "{flag:?}");
        // Invariant 3. The owner always finishes its polls, and the watchdog re-checks long
        // enough to see some of them end; when it did, the end is sound.
        if let Some(end) = flag.end {
            assert!(end >= flag.start, "end before start: {flag:?}");
            if end != flag.flagged_at {
                assert!(
                    poll.before_end <= end && end <= poll.after_end,
                    "a published end outside the owner's poll_end: {flag:?} {poll:?}"
                );
            }
        }
    }
}

fn run(protocol: Protocol, polls: u64, rounds: usize, rechecks: usize) {
    loom::model(move || {
        let slot = Arc::new(Slot::new(
            1,
            matches!(protocol, Protocol::PollHooks),
            Some(false),
        ));
        let ended = Arc::new(AtomicUsize::new(0));
        let (owner_slot, owner_ended) = (Arc::clone(&slot), Arc::clone(&ended));
        let worker = thread::spawn(move || owner(&owner_slot, protocol, polls, &owner_ended));
        let (snapshots, flagged) = watchdog(&slot, protocol, rounds, rechecks, &ended);
        let polls = match worker.join() {
            Ok(polls) => polls,
            Err(_) => panic!("the owner thread panicked"),
        };
        check(&polls, &snapshots, &flagged);
        // Every poll is over: the slot is idle and its last word is the last poll's start.
        let last = slot.snapshot();
        assert_eq!(last.start(), polls.last().map_or(0, |p| p.start));
        assert!(
            !last.busy() && !last.flagged(),
            "the slot is left busy: {last:?} after {polls:?}; watchdog saw {snapshots:?} \
             and flagged {flagged:?}"
        );
    });
}

/// One poll (poll hooks) flagged while it runs or as it ends, then re-checked twice.
#[test]
fn loom_poll_hooks_one_poll_flag_and_end() {
    run(Protocol::PollHooks, 1, 1, 2);
}

/// Two polls back to back (poll hooks), two watchdog scans: the second poll may be flagged
/// after the first ended, and must never get the first one's end.
#[test]
fn loom_poll_hooks_two_polls_two_scans() {
    run(Protocol::PollHooks, 2, 2, 1);
}

/// Stable protocol: a poll is a span entered at the base depth, with a nested span; park
/// after it. The watchdog also reads the span stack.
#[test]
fn loom_spans_one_poll_flag_and_end() {
    run(Protocol::Spans, 1, 1, 2);
}

/// Stable protocol, two polls, two scans.
#[test]
fn loom_spans_two_polls_two_scans() {
    run(Protocol::Spans, 2, 2, 1);
}

/// The race of the slot protocol, stripped to one atomic: a plain load/store pair (the
/// owner's `poll_end`) against a compare-exchange from the busy value (the watchdog's flag).
/// By RMW atomicity the last value is idle whichever wins. Upstream loom 0.7.3 fails this
/// (tokio-rs/loom#254); the vendored loom (vendor/loom/PATCHED.md) passes it.
#[test]
fn loom_patched_rmw_atomicity() {
    use loom::sync::atomic::AtomicU64;
    loom::model(|| {
        let word = Arc::new(AtomicU64::new(0));
        let owner_word = Arc::clone(&word);
        let owner = thread::spawn(move || {
            for start in [1u64, 2] {
                owner_word.store(start | BUSY, Ordering::Release);
                let current = owner_word.load(Ordering::Relaxed);
                if current & BUSY != 0 {
                    owner_word.store(current & TS_MASK, Ordering::Release);
                }
                let after = owner_word.load(Ordering::Relaxed);
                assert_eq!(after & BUSY, 0, "{after:x}");
            }
        });
        for _ in 0..2 {
            let seen = word.load(Ordering::Acquire);
            if seen & BUSY != 0 && seen & FLAGGED == 0 {
                let _ = word.compare_exchange(
                    seen,
                    seen | FLAGGED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        if owner.join().is_err() {
            panic!("the owner thread panicked");
        }
        let last = word.load(Ordering::Acquire);
        assert_eq!(last & BUSY, 0, "{last:x}");
    });
}

/// The victim window (stable protocol, multi-thread runtime): a flagged poll's end opens a
/// window for that poll only, the next poll sees it with the stalled poll's start, the
/// owner's park closes it, and once the watchdog has closed it, it stays closed.
#[test]
fn loom_victim_window_belongs_to_its_stall_and_closes() {
    static SEEN_IN_WINDOW: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    loom::model(|| {
        let slot = Arc::new(Slot::new(1, false, Some(false)));
        let owner_slot = Arc::clone(&slot);
        let worker = thread::spawn(move || {
            let slot = &owner_slot;
            slot.unpark();
            let mut starts = Vec::new();
            let mut windows = Vec::new();
            for id in [10, 11] {
                windows.push(slot.enter(id));
                starts.push(slot.word.load(Ordering::Relaxed) & TS_MASK);
                slot.exit(id);
            }
            slot.park();
            (starts, windows)
        });
        let mut flagged = None;
        for _ in 0..3 {
            let seen = slot.snapshot();
            if seen.busy() && !seen.flagged() && slot.flag(seen.word) {
                let flag_word = seen.word | FLAGGED;
                flagged = Some(flag_word);
                // As the watchdog: the window is looked at once the poll is seen ended, which
                // happens-after the owner opened it (if it saw the flag).
                let flag = super::Flag {
                    word: flag_word,
                    at: clock::raw(),
                };
                while slot.flagged_end(&flag).is_none() {
                    thread::yield_now();
                }
                // Open for a while: the owner may run a poll in it meanwhile.
                thread::yield_now();
                slot.close_window(flag_word);
                assert!(slot.window_closed(flag_word), "closed by the watchdog");
                break;
            }
        }
        let (starts, windows) = match worker.join() {
            Ok(result) => result,
            Err(_) => panic!("the owner thread panicked"),
        };
        assert!(windows[0].is_none(), "the first poll follows no stall");
        if let Some(poll) = windows[1] {
            SEEN_IN_WINDOW.store(true, std::sync::atomic::Ordering::Relaxed);
            let flag_word = flagged.expect("a window only after a flagged poll");
            assert_eq!(poll.stall, flag_word & TS_MASK, "the window of that stall");
            assert_eq!(poll.stall, starts[0], "the first poll was the stalled one");
            assert_eq!(poll.start, starts[1]);
        }
        if let Some(flag_word) = flagged {
            assert!(slot.window_closed(flag_word), "the park closed it");
        }
    });
    assert!(
        SEEN_IN_WINDOW.load(std::sync::atomic::Ordering::Relaxed),
        "some interleaving ran a poll in the window"
    );
}

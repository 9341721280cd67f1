//! Keeps a span in the registry while the watchdog asks `tracing-opentelemetry` about it.
//!
//! `tracing_opentelemetry::get_otel_context` looks the span up again in the registry and
//! panics ("registry should have a span for the current ID") if it is gone. A span the
//! watchdog found open can close on its worker thread at any moment, and the registry
//! removes it right after the layers' `on_close`: found under a stall storm, where the
//! watchdog thread panicked (caught, but the panic hook ran, printed a backtrace and, with
//! `RUST_BACKTRACE` set, kept ~40 MB of symbol tables alive) and lost that tick.
//!
//! # The protocol
//!
//! Every thread that closes spans owns a cell, registered once, holding the id of the span it
//! closed last. The watchdog looks spans up only inside [`while_no_span_closes`]:
//!
//! - a closer ([`closing`], from looplag's `on_close`) writes the span's id into its cell,
//!   then reads the number of lookups in progress; if there is one, it waits for it to end
//!   before returning (and before the registry can remove the span);
//! - the watchdog counts its lookup in, and before looking a span up asks
//!   [`may_be_closing`], which reads the cells; for an announced span it skips the
//!   `tracing-opentelemetry` part.
//!
//! All four accesses are `SeqCst` (Dekker's pattern), so they fall in one total order:
//! either the closer sees the lookup (and waits, so the span outlives it), or the watchdog
//! sees the closer's id (and leaves the span alone). The scan comes before the registry lookup: a span whose id has already left
//! its closer's cell (the thread closed another span since) is already marked removed in
//! the registry, so the lookup does not find it. A cell keeps its id after the close, so a
//! later span with the same id (ids are reused once the registry's slot generation wraps)
//! can be skipped by mistake: it only loses that stall's parent or victim link.
//!
//! A closer pays a locked swap on its own cache line and one load of a line that only
//! changes around lookups; it never waits unless a lookup (a few microseconds, only while a stall is
//! handled) is in progress, and touches no shared lock.
//!
//! A thread whose cell is gone (it is exiting) and the watchdog's own thread during a lookup
//! fall back to marking the span [`Closing`] in its extensions, under a read-write lock the
//! watchdog holds exclusively around each lookup.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

/// Extension marking a span whose `on_close` has run on a thread without a cell: the
/// registry may remove it any time.
pub(crate) struct Closing;

/// The fallback path's lock; also serialises the watchdogs' lookups.
static GATE: RwLock<()> = RwLock::new(());
/// Lookups in progress.
static LOOKUPS: AtomicUsize = AtomicUsize::new(0);
/// Every thread's cell.
static CELLS: Mutex<Vec<Arc<Closer>>> = Mutex::new(Vec::new());

/// One thread's cell.
#[derive(Default)]
struct Closer {
    /// The id of the span the thread closes, or closed last (0: none yet).
    closing: AtomicU64,
    /// The thread has exited.
    dead: AtomicBool,
}

/// The calling thread's cell, registered on first use.
struct Mine(Arc<Closer>);

impl Mine {
    fn register() -> Self {
        let closer = Arc::new(Closer::default());
        cells().push(Arc::clone(&closer));
        Mine(closer)
    }
}

impl Drop for Mine {
    fn drop(&mut self) {
        self.0.dead.store(true, Ordering::Release);
    }
}

thread_local! {
    /// The current thread is the watchdog, inside a lookup.
    static LOOKING_UP: Cell<bool> = const { Cell::new(false) };
    static MINE: Mine = Mine::register();
}

fn cells() -> MutexGuard<'static, Vec<Arc<Closer>>> {
    CELLS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Watchdog side: runs `lookup` (which must ask [`may_be_closing`] before looking a span
/// up) while no announced span can finish closing.
pub(crate) fn while_no_span_closes<R>(lookup: impl FnOnce() -> R) -> R {
    let _exclusive = GATE.write().unwrap_or_else(PoisonError::into_inner);
    LOOKUPS.fetch_add(1, Ordering::SeqCst);
    let _ = LOOKING_UP.try_with(|flag| flag.set(true));
    // Counted out even if `lookup` panics (the watchdog catches it): closers wait while the
    // count is not zero.
    let _counted = LookupCounted;
    lookup()
}

/// Ends a lookup when dropped.
struct LookupCounted;

impl Drop for LookupCounted {
    fn drop(&mut self) {
        let _ = LOOKING_UP.try_with(|flag| flag.set(false));
        LOOKUPS.fetch_sub(1, Ordering::Release);
    }
}

/// Watchdog side, inside [`while_no_span_closes`]: whether a thread announced that it is
/// closing span `id` (or closed it last).
pub(crate) fn may_be_closing(id: u64) -> bool {
    let mut cells = cells();
    cells.retain(|cell| !cell.dead.load(Ordering::Acquire));
    cells
        .iter()
        .any(|cell| cell.closing.load(Ordering::SeqCst) == id)
}

/// Layer side, from `on_close` of span `id`, before the registry can remove it.
/// `mark_closing` inserts [`Closing`]; it only runs on the fallback paths.
pub(crate) fn closing(id: u64, mark_closing: impl FnOnce()) {
    if LOOKING_UP.try_with(Cell::get).unwrap_or(false) {
        // The watchdog closing a span its own lookup made: it holds the gate already.
        mark_closing();
        return;
    }
    // A `SeqCst` swap rather than a store and a fence: on x86 a locked instruction on the
    // thread's own cache line is a full barrier and costs less than `mfence`.
    let announced = MINE
        .try_with(|mine| mine.0.closing.swap(id, Ordering::SeqCst))
        .is_ok();
    if !announced {
        let _shared = GATE.read().unwrap_or_else(PoisonError::into_inner);
        mark_closing();
        return;
    }
    if LOOKUPS.load(Ordering::SeqCst) != 0 {
        wait_for_lookups();
    }
}

#[cold]
fn wait_for_lookups() {
    while LOOKUPS.load(Ordering::Acquire) != 0 {
        std::thread::yield_now();
    }
}

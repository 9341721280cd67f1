//! Keeps a span in the registry while the watchdog asks `tracing-opentelemetry` about it.
//!
//! `tracing_opentelemetry::get_otel_context` looks the span up again in the registry and
//! panics ("registry should have a span for the current ID") if it is gone. A span the
//! watchdog found open can close on its worker thread at any moment, and the registry
//! removes it right after the layers' `on_close`: found under a stall storm, where the
//! watchdog thread panicked (caught, but the panic hook ran, printed a backtrace and, with
//! `RUST_BACKTRACE` set, kept ~40 MB of symbol tables alive) and lost that tick.
//!
//! The protocol, with one process-wide read-write lock:
//! - the watchdog holds it exclusively around each lookup ([`while_no_span_closes`]) and
//!   skips the OpenTelemetry part for a span marked [`Closing`];
//! - looplag's `on_close` marks the span [`Closing`] while holding it shared ([`mark`]).
//!
//! A span that began closing before the watchdog took the lock is marked, so it is skipped;
//! one that begins closing during the lookup waits in `on_close`, before the registry can
//! remove it, until the lookup is over. Closers share the lock, so they never wait for one
//! another, and wait for the watchdog only during its lookups (a few microseconds, only
//! while a stall is handled).

use std::cell::Cell;
use std::sync::{PoisonError, RwLock};

/// Extension marking a span whose `on_close` has run: the registry may remove it any time.
pub(crate) struct Closing;

static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    /// The current thread holds the gate exclusively (it is the watchdog, in a lookup).
    static LOOKING_UP: Cell<bool> = const { Cell::new(false) };
}

/// Watchdog side: runs `lookup` while no span can finish closing.
pub(crate) fn while_no_span_closes<R>(lookup: impl FnOnce() -> R) -> R {
    let _exclusive = GATE.write().unwrap_or_else(PoisonError::into_inner);
    let _ = LOOKING_UP.try_with(|flag| flag.set(true));
    let result = lookup();
    let _ = LOOKING_UP.try_with(|flag| flag.set(false));
    result
}

/// Layer side, from `on_close`: runs `mark_closing` (which inserts [`Closing`]) once no
/// lookup is in progress. On the watchdog thread inside a lookup (a span created and closed
/// by the lookup itself) it runs at once, since that thread already holds the gate.
pub(crate) fn mark(mark_closing: impl FnOnce()) {
    if LOOKING_UP.try_with(Cell::get).unwrap_or(false) {
        mark_closing();
        return;
    }
    let _shared = GATE.read().unwrap_or_else(PoisonError::into_inner);
    mark_closing();
}

//! The `tracing` layer: keeps each worker's slot up to date on span enter/exit, and marks
//! the requests that waited on a stall as their first poll after it starts (`victims`).
//!
//! Enter and exit do one thread-local read and a few atomic stores on runtime worker
//! threads, and one thread-local read elsewhere. Creating a span costs the layer nothing. A
//! closing span is announced to the watchdog (`hot::close_gate`). The watchdog reaches span
//! data through the subscriber the layer was registered with (`access.rs`). `filter.rs` is
//! the opt-in per-layer filter ([`LoopLag::filtered_layer`](crate::LoopLag::filtered_layer)).

use tracing::span::Id;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::hot::close_gate::{self, Closing};
use crate::hot::slots;
use crate::victims;

mod access;
mod filter;

pub(crate) use access::{access, SpanAccess, SpanInfo};
pub use filter::SpanFilter;

/// The `tracing` layer of looplag; get one from [`LoopLag::layer`](crate::LoopLag::layer).
///
/// Add it to a `tracing_subscriber::Registry`-based subscriber, next to
/// `tracing-opentelemetry`'s layer. It keeps per-thread state for the watchdog and records
/// nothing by itself: it never filters.
///
/// # Request spans
///
/// The requests a stall held up are marked on the stalled worker, when their first poll
/// after the stall starts: the layer then adds the victim event and the link to the local
/// root span of the span the poll enters (one per request under tower-http's
/// `TraceLayer`). Nothing is recorded when a span is created. A layer from an instance built
/// with [`max_victims(0)`](crate::Builder::max_victims) marks none.
///
/// # Layer order
///
/// Either order marks the victims. Prefer adding it **before** `tracing-opentelemetry`'s
/// layer: `registry().with(looplag.layer()).with(tracing_opentelemetry::layer())`. A layer
/// added first sees a span close first, and looplag's `on_close` waits there for a watchdog
/// lookup of that span (the culprit's span when a stall is detected, see the crate's
/// `close_gate` module) to finish. Added after, the watchdog can still be reading a closing
/// span's OpenTelemetry data while `tracing-opentelemetry` closes it; release builds are fine
/// either way, but in debug builds `tracing-opentelemetry`'s own debug assertion ("OtelDataLock
/// should not be held by anything else when closing spans") can then fire, rarely (the
/// culprit's span must close within the microseconds of that lookup), on the closing thread.
///
/// # Examples
///
/// ```
/// use tracing_subscriber::layer::SubscriberExt;
///
/// let looplag = looplag::LoopLag::builder().build()?;
/// let subscriber = tracing_subscriber::registry().with(looplag.layer());
/// tracing::subscriber::with_default(subscriber, || {
///     tracing::info_span!("request").in_scope(|| { /* ... */ });
/// });
/// # Ok::<(), looplag::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LoopLagLayer {
    /// Whether this layer marks victims (off when the instance that made the layer has
    /// `max_victims(0)`).
    victims: bool,
}

impl Default for LoopLagLayer {
    /// A layer that marks victims, as [`LoopLag::layer`](crate::LoopLag::layer) makes it
    /// with the default `max_victims`.
    fn default() -> Self {
        LoopLagLayer::new(true)
    }
}

impl LoopLagLayer {
    pub(crate) fn new(victims: bool) -> Self {
        LoopLagLayer { victims }
    }
}

impl<S> Layer<S> for LoopLagLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    /// Remembers the subscriber so the watchdog can reach span data.
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        access::register::<S>(subscriber);
    }

    /// Records the entered span in the worker's slot; a poll that starts in a stalled
    /// worker's victim window marks its request (see `victims`).
    #[inline]
    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        slots::with_current(|slot| {
            if let Some(poll) = slot.enter(id.into_u64()) {
                if self.victims {
                    mark_victim(slot, poll, id, &ctx);
                }
            }
        });
    }

    /// Records the exited span in the worker's slot.
    #[inline]
    fn on_exit(&self, id: &Id, _ctx: Context<'_, S>) {
        slots::with_current(|slot| slot.exit(id.into_u64()));
    }

    /// Announces the span closing to the watchdog (see `close_gate`).
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        close_gate::closing(id.into_u64(), || {
            if let Some(span) = ctx.span(&id) {
                span.extensions_mut().insert(Closing);
            }
        });
    }
}

/// A poll entering span `id` started on `slot` in its victim window: marks the span's
/// local root (rare: only right after a stall).
#[cold]
#[inline(never)]
fn mark_victim<S>(slot: &slots::Slot, poll: slots::WindowPoll, id: &Id, ctx: &Context<'_, S>)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let root = || {
        let span = ctx.span(id)?;
        let root = span.scope().from_root().next()?;
        Some(root.id().into_u64())
    };
    victims::poll_in_window(slot, poll, root, |root| {
        access()?.entered_context(&access::span_id(root)?)
    });
}

//! The `tracing` layer: keeps each worker's slot up to date on span enter/exit, and tracks
//! in-flight local root spans (the victims of a stall).
//!
//! Enter and exit do one thread-local read and a few atomic stores on runtime worker
//! threads, and one thread-local read elsewhere. Root tracking happens when a root span is
//! created, never on enter/exit; a closing span is announced to the watchdog (`close_gate`)
//! and looked up in the closing thread's own index of the roots it created, which retires
//! the entry of a root (see [`Roots`]). The watchdog reaches
//! span data through the [`Dispatch`] the layer was registered with, using lookup functions
//! monomorphised for the subscriber type (the same technique `tracing-opentelemetry` uses
//! for its `Span` extension).

use std::collections::HashSet;

use tracing::span::{Attributes, Id};
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::hot::close_gate::{self, Closing};
use crate::hot::{epoch, slots};
use crate::victims;
use crate::victims::roots::{roots, Roots};

mod access;
mod filter;

pub(crate) use access::{access, SpanAccess, SpanInfo};
pub use filter::SpanFilter;

/// The `tracing` layer of looplag; get one from [`LoopLag::layer`](crate::LoopLag::layer),
/// which wraps it in its per-layer [`SpanFilter`].
///
/// Add it to a `tracing_subscriber::Registry`-based subscriber, next to
/// `tracing-opentelemetry`'s layer. It keeps per-thread state for the watchdog and records
/// nothing by itself: it never filters for other layers, and it never calls OpenTelemetry
/// from a hook. Added bare (without the filter), it would take the default interest in
/// every callsite, events included.
///
/// # Request spans
///
/// For marking the victims of a stall, the layer records every local root span (a span with
/// no parent in the process: one per request under tower-http's `TraceLayer`) when it is
/// created, in a per-thread index, without touching the span's data (about 30 ns per root
/// span in BENCHMARKS.md). A layer from an instance built with
/// [`max_victims(0)`](crate::Builder::max_victims) records none: creating a span then costs
/// it nothing, and no instance in the process marks victims through that layer.
///
/// # Layer order
///
/// Add it **before** `tracing-opentelemetry`'s layer:
/// `registry().with(looplag.layer()).with(tracing_opentelemetry::layer())`. A layer added
/// first sees a span close first, and looplag's `on_close` waits there for a watchdog lookup
/// of that span (see the crate's `close_gate` module) to finish. Added after, the watchdog
/// can still be reading a closing span's OpenTelemetry data while `tracing-opentelemetry`
/// closes it; release builds are fine either way, but in debug builds
/// `tracing-opentelemetry`'s own debug assertion ("OtelDataLock should not be held by
/// anything else when closing spans") can then fire, rarely, on the closing thread.
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
    /// Whether local root spans are recorded for victim marking (off when the instance that
    /// made the layer has `max_victims(0)`).
    track_roots: bool,
}

impl Default for LoopLagLayer {
    /// A layer that records request spans for victim marking, as
    /// [`LoopLag::layer`](crate::LoopLag::layer) makes it with the default `max_victims`.
    fn default() -> Self {
        LoopLagLayer::new(true)
    }
}

impl LoopLagLayer {
    pub(crate) fn new(track_roots: bool) -> Self {
        LoopLagLayer { track_roots }
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

    /// Starts tracking a new local root span.
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if !self.track_roots {
            return;
        }
        let is_root = if attrs.is_root() {
            true
        } else if attrs.parent().is_some() || slots::inside_entered_span() {
            // A contextual span created while a span is entered on this worker has that
            // span as its parent; knowing it from the slot spares the registry lookup behind
            // `current_span` (≈ 25 ns per contextual child span).
            false
        } else {
            ctx.current_span().id().is_none()
        };
        if !is_root {
            return;
        }
        let is_open = |id: u64| access::span_id(id).is_some_and(|id| ctx.span(&id).is_some());
        roots().insert(id.into_u64(), epoch::current(), &is_open);
    }

    /// Records the entered span in the worker's slot.
    #[inline]
    fn on_enter(&self, id: &Id, _ctx: Context<'_, S>) {
        slots::with_current(|slot| slot.enter(id.into_u64()));
    }

    /// Records the exited span in the worker's slot.
    #[inline]
    fn on_exit(&self, id: &Id, _ctx: Context<'_, S>) {
        slots::with_current(|slot| slot.exit(id.into_u64()));
    }

    /// Announces the span closing to the watchdog (see `close_gate`) and retires its root
    /// record if it is a root created on this thread (one hash probe of the thread's index,
    /// see `Roots` in this module). A closing root is first marked as the victim of any
    /// stall it waited on that the watchdog has not finished yet (see `victims`; one relaxed
    /// load when there is none).
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let raw = id.into_u64();
        let root = if self.track_roots {
            Roots::closing(raw)
        } else {
            None
        };
        if victims::any_pending() {
            // A root closing on another thread than its creator's is not in this thread's
            // index: find it by id (only while a stall is pending).
            let root = root.clone().or_else(|| {
                let is_root = ctx.span(&id)?.parent().is_none();
                is_root
                    .then(|| roots().find(&HashSet::from([raw])).into_iter().next())
                    .flatten()
            });
            if let Some(root) = root {
                victims::root_closing(&root, || access()?.closing_root_context(&root));
            }
        }
        close_gate::closing(raw, || {
            if let Some(span) = ctx.span(&id) {
                span.extensions_mut().insert(Closing);
            }
        });
        // The root's record dies here (its table entry goes dead), after the victim marking.
        drop(root);
    }
}

//! The `tracing` layer: keeps each worker's slot up to date on span enter/exit, and marks
//! the requests that waited on a stall as their first poll after it starts (`victims`).
//!
//! Enter and exit do one thread-local read and a few atomic stores on runtime worker
//! threads, and one thread-local read elsewhere. Creating a span costs the layer nothing. A
//! closing span is announced to the watchdog (`hot::close_gate`). The watchdog reaches span
//! data through the subscriber the layer was registered with (`access.rs`).
//!
//! Interest: the layer takes part in tracing-subscriber's per-layer filtering through a
//! `Filtered` it holds (`filter.rs`), so it asks for spans at or above `span_level` and for no
//! event, and never switches on a callsite the other layers had off. Only the filter pass
//! (callsite registration, `enabled`, span creation, events) goes through that `Filtered`;
//! enter, exit and close come to the layer directly, without the registry lookup per enter and
//! exit that `Filtered` would do.

use std::any::TypeId;
use std::fmt;

use tracing::span::{Attributes, Id};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::{Filtered, LevelFilter};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

use crate::hot::close_gate::{self, Closing};
use crate::hot::slots;
use crate::victims;

mod access;
mod filter;

pub(crate) use access::{access, SpanAccess, SpanInfo};

/// The `tracing` layer of looplag; get one from [`looplag::layer`](crate::layer) or
/// [`LoopLag::layer`](crate::LoopLag::layer).
///
/// Add it to a `tracing_subscriber::Registry`-based subscriber, next to
/// `tracing-opentelemetry`'s layer. It keeps per-thread state for the watchdog and records
/// nothing by itself.
///
/// # What it asks for
///
/// It is a per-layer-filtered layer: it asks for no event, so adding it never turns on an
/// event callsite (a `debug!` in a hot loop) that the other layers' filters had off, and
/// for spans at or above [`span_level`](crate::Builder::span_level) (by default `DEBUG`, the
/// level of tower-http's request spans). Such a span exists even when no other layer wants
/// it, so that a stall in it has its request (see that setting for the cost). Every span the
/// subscriber creates, whatever its level, is seen when a poll enters it. Enter and exit
/// reach the layer directly, not through `tracing_subscriber`'s `Filtered`, so they cost two
/// slot writes and no registry lookup. Per-layer filtering needs
/// `tracing_subscriber::Registry` at the root of the subscriber, as
/// `tracing_subscriber::registry()` gives.
///
/// The type parameter is the subscriber the layer is added to; it is inferred from
/// `.with(..)`.
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
/// use tracing_subscriber::filter::LevelFilter;
/// use tracing_subscriber::layer::SubscriberExt;
/// use tracing_subscriber::Layer;
///
/// let looplag = looplag::LoopLag::builder().build()?;
/// let subscriber = tracing_subscriber::registry()
///     .with(looplag.layer())
///     .with(tracing_subscriber::fmt::layer().with_filter(LevelFilter::INFO));
/// tracing::subscriber::with_default(subscriber, || {
///     // No layer wants DEBUG events: the callsite stays off, looplag or not.
///     assert!(!tracing::enabled!(tracing::Level::DEBUG));
///     assert!(tracing::enabled!(tracing::Level::INFO));
///     tracing::info_span!("request").in_scope(|| { /* ... */ });
/// });
/// # Ok::<(), looplag::Error>(())
/// ```
pub struct LoopLagLayer<S = Registry> {
    /// Whether this layer marks victims (off when the instance that made the layer has
    /// `max_victims(0)`).
    victims: bool,
    /// The least severe span level the layer asks for.
    span_level: Level,
    /// looplag's per-layer filter around a layer that does nothing: it takes the filter pass
    /// for this layer (see the module's comment).
    interest: Filtered<filter::Silent, filter::SpanFilter, S>,
}

impl<S> Default for LoopLagLayer<S> {
    /// A layer that marks victims and asks for spans at or above
    /// [`DEFAULT_SPAN_LEVEL`](crate::DEFAULT_SPAN_LEVEL), as
    /// [`LoopLag::layer`](crate::LoopLag::layer) makes it with the default settings.
    fn default() -> Self {
        LoopLagLayer::new(true, crate::config::DEFAULT_SPAN_LEVEL)
    }
}

impl<S> Clone for LoopLagLayer<S> {
    /// The same settings; the copy takes its own place in the subscriber it is added to.
    fn clone(&self) -> Self {
        LoopLagLayer::new(self.victims, self.span_level)
    }
}

impl<S> fmt::Debug for LoopLagLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopLagLayer")
            .field("victims", &self.victims)
            .field("span_level", &self.span_level)
            .finish_non_exhaustive()
    }
}

impl<S> LoopLagLayer<S> {
    pub(crate) fn new(victims: bool, span_level: Level) -> Self {
        LoopLagLayer {
            victims,
            span_level,
            interest: Filtered::new(filter::Silent, filter::SpanFilter::new(span_level)),
        }
    }

    /// The least severe span level this layer asks for (see
    /// [`span_level`](crate::Builder::span_level)).
    ///
    /// ```
    /// let layer: looplag::LoopLagLayer = looplag::LoopLagLayer::default();
    /// assert_eq!(layer.span_level(), looplag::DEFAULT_SPAN_LEVEL);
    /// ```
    pub fn span_level(&self) -> Level {
        self.span_level
    }
}

impl<S> Layer<S> for LoopLagLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + 'static,
{
    /// Remembers the subscriber so the watchdog can reach span data.
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        access::register::<S>(subscriber);
        self.interest.on_register_dispatch(subscriber);
    }

    /// Takes the layer's place among the subscriber's per-layer filters.
    fn on_layer(&mut self, subscriber: &mut S) {
        self.interest.on_layer(subscriber);
    }

    /// Adds looplag's interest to the per-layer filters' sum (see `filter.rs`).
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.interest.register_callsite(metadata)
    }

    /// Records looplag's filter decision for the span or event; never disables it for the
    /// other layers.
    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.interest.enabled(metadata, ctx)
    }

    /// Never disables an event for the other layers.
    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.interest.event_enabled(event, ctx)
    }

    /// Consumes looplag's filter decision for the new span (nothing is recorded).
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        self.interest.on_new_span(attrs, id, ctx);
    }

    /// Consumes looplag's filter decision for the event (looplag takes no event).
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        self.interest.on_event(event, ctx);
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.interest.max_level_hint()
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

    /// The layer itself, or what its `Filtered` answers: that is how the subscriber finds the
    /// layer's per-layer filter.
    ///
    /// # Safety
    ///
    /// As for [`Layer::downcast_raw`]: the pointer returned for a `TypeId` points to a value
    /// of that type, here `self` or one that `Filtered::downcast_raw` returns.
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded with the same contract.
        unsafe { self.interest.downcast_raw(id) }
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

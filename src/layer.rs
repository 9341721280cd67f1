//! The `tracing` layer: keeps each worker's slot up to date on span enter/exit, and marks
//! the requests that waited on a stall as their first poll after it starts (`victims`).
//!
//! Enter and exit do one thread-local read and a few atomic stores on runtime worker
//! threads, and one thread-local read elsewhere. Creating a span costs the layer nothing. A
//! closing span is announced to the watchdog (`close_gate`). The watchdog reaches span data
//! through the [`Dispatch`] the layer was registered with, using lookup functions
//! monomorphised for the subscriber type (the same technique `tracing-opentelemetry` uses
//! for its `Span` extension).

use std::sync::{Mutex, MutexGuard, OnceLock};

use tracing::span::Id;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::close_gate::{self, Closing};
use crate::slots;
use crate::victims;

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

/// What the watchdog learns about the span a stalled thread is in.
#[derive(Debug)]
pub(crate) struct SpanInfo {
    /// The span's name.
    pub(crate) name: &'static str,
    /// The span's OpenTelemetry context, when `tracing-opentelemetry` is installed and sees
    /// the span.
    pub(crate) context: Option<opentelemetry::Context>,
    /// The span id of the local root of the span's trace.
    pub(crate) root: Option<u64>,
}

/// Span lookups, monomorphised for the subscriber the layer was registered with.
#[derive(Clone, Copy)]
struct Lookups {
    span_info: fn(&Dispatch, u64) -> Option<SpanInfo>,
    root_context: fn(&Dispatch, u64) -> Option<opentelemetry::Context>,
    is_open: fn(&Dispatch, u64) -> bool,
}

impl Lookups {
    fn of<S>() -> Self
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        Lookups {
            span_info: span_info::<S>,
            root_context: root_context::<S>,
            is_open: is_open::<S>,
        }
    }
}

/// Process-wide state shared by every `LoopLagLayer` and every watchdog.
pub(crate) struct Shared {
    dispatch: Mutex<Option<(tracing::dispatcher::WeakDispatch, Lookups)>>,
}

pub(crate) fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        dispatch: Mutex::new(None),
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A handle on the subscriber the layer lives in.
pub(crate) struct SpanAccess {
    dispatch: Dispatch,
    lookups: Lookups,
}

impl Shared {
    /// The installed subscriber, if the layer is installed and the subscriber still alive.
    pub(crate) fn access(&self) -> Option<SpanAccess> {
        let guard = lock(&self.dispatch);
        let (weak, lookups) = guard.as_ref()?;
        Some(SpanAccess {
            dispatch: weak.upgrade()?,
            lookups: *lookups,
        })
    }
}

impl SpanAccess {
    /// Name, OpenTelemetry context and root of the open span `id` (watchdog thread).
    pub(crate) fn span_info(&self, id: u64) -> Option<SpanInfo> {
        close_gate::while_no_span_closes(|| (self.lookups.span_info)(&self.dispatch, id))
    }

    /// The OpenTelemetry context of the local root span `id`, if it is open and not closing
    /// (watchdog thread).
    pub(crate) fn open_root_context(&self, id: u64) -> Option<opentelemetry::Context> {
        close_gate::while_no_span_closes(|| (self.lookups.root_context)(&self.dispatch, id))
    }

    /// Whether the span `id` is still open.
    pub(crate) fn is_open(&self, id: u64) -> bool {
        (self.lookups.is_open)(&self.dispatch, id)
    }

    /// The OpenTelemetry context of the span `id`, asked on a thread inside one of its
    /// descendants (or itself): it cannot close meanwhile, so no gate is needed.
    fn entered_context(&self, id: &Id) -> Option<opentelemetry::Context> {
        tracing_opentelemetry::get_otel_context(id, &self.dispatch)
    }
}

fn span_id(id: u64) -> Option<Id> {
    (id != 0).then(|| Id::from_u64(id))
}

fn span_info<S>(dispatch: &Dispatch, id: u64) -> Option<SpanInfo>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let subscriber = dispatch.downcast_ref::<S>()?;
    // `get_otel_context` looks the span up again and panics if it is gone: only ask about
    // a span that is not closing (see `close_gate`: the caller holds the gate, and the
    // closers' announcements are read before the registry lookup).
    let announced = close_gate::may_be_closing(id);
    let id = span_id(id)?;
    // Holding `span` keeps the registry slot, so `id` cannot be reused meanwhile.
    let span = subscriber.span(&id)?;
    let root = span
        .scope()
        .from_root()
        .next()
        .map(|root| root.id().into_u64());
    // No extensions are held during `get_otel_context`: it locks them.
    let closing = announced || span.extensions().get::<Closing>().is_some();
    let context = if closing {
        None
    } else {
        tracing_opentelemetry::get_otel_context(&id, dispatch)
    };
    let name = span.name();
    drop(span);
    Some(SpanInfo {
        name,
        context,
        root,
    })
}

/// The OpenTelemetry context of the open local root `id`; the caller holds the close gate,
/// and the closers' announcements are read first (see `close_gate`).
fn root_context<S>(dispatch: &Dispatch, id: u64) -> Option<opentelemetry::Context>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let subscriber = dispatch.downcast_ref::<S>()?;
    if close_gate::may_be_closing(id) {
        return None;
    }
    let id = span_id(id)?;
    // The registry's ids are not reused for a long time (its slab keeps a generation per
    // slot), and a root never has a parent.
    let span = subscriber.span(&id)?;
    let closing = span.extensions().get::<Closing>().is_some();
    if span.parent().is_some() || closing {
        return None;
    }
    let context = tracing_opentelemetry::get_otel_context(&id, dispatch);
    drop(span);
    context
}

fn is_open<S>(dispatch: &Dispatch, id: u64) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let Some(subscriber) = dispatch.downcast_ref::<S>() else {
        return false;
    };
    span_id(id).is_some_and(|id| subscriber.span(&id).is_some())
}

impl<S> Layer<S> for LoopLagLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    /// Remembers the subscriber so the watchdog can reach span data.
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        *lock(&shared().dispatch) = Some((subscriber.downgrade(), Lookups::of::<S>()));
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
        shared().access()?.entered_context(&span_id(root)?)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// Span info finds the local root of a nested span, and a closed span is not open.
    #[test]
    fn span_info_names_the_root_of_a_nested_span() {
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(LoopLagLayer::new(true)));
        tracing::dispatcher::with_default(&dispatch, || {
            let root = tracing::info_span!("request");
            let child = tracing::info_span!(parent: &root, "child");
            let access = shared()
                .access()
                .expect("the layer registered its subscriber");
            let root_id = root.id().expect("root id").into_u64();
            let child_id = child.id().expect("child id").into_u64();
            let info = access.span_info(child_id).expect("the child is open");
            assert_eq!(info.name, "child");
            assert_eq!(info.root, Some(root_id));
            assert!(info.context.is_none(), "no OpenTelemetry layer here");
            assert!(access.is_open(root_id));
            drop(child);
            drop(root);
            assert!(!access.is_open(root_id), "a closed span is not open");
        });
    }
}

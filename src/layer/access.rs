//! The watchdog's view of span data: the subscriber the layer was registered with, and
//! lookups monomorphised for its type (the same technique `tracing-opentelemetry` uses for
//! its `Span` extension). Every lookup of a span that may be closing goes through the close
//! gate (`hot::close_gate`).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::span::Id;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::registry::LookupSpan;

use crate::hot::close_gate::{self, Closing};
use crate::victims::roots::{roots, RootInfo};

/// What the watchdog learns about the span a stalled thread is in.
#[derive(Debug)]
pub(crate) struct SpanInfo {
    /// The span's name.
    pub(crate) name: &'static str,
    /// The span's OpenTelemetry context, when `tracing-opentelemetry` is installed.
    pub(crate) context: Option<opentelemetry::Context>,
    /// The local root of the span's trace.
    pub(crate) root: Option<Arc<RootInfo>>,
}

/// Span lookups, monomorphised for the subscriber the layer was registered with.
#[derive(Clone, Copy)]
struct Lookups {
    span_info: fn(&Dispatch, u64) -> Option<SpanInfo>,
    root_id_of: fn(&Dispatch, u64) -> Option<u64>,
    root_context: fn(&Dispatch, &RootInfo, bool) -> Option<opentelemetry::Context>,
}

impl Lookups {
    fn of<S>() -> Self
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        Lookups {
            span_info: span_info::<S>,
            root_id_of: root_id_of::<S>,
            root_context: root_context::<S>,
        }
    }
}

/// The subscriber the layer was last registered with, and its lookups.
static DISPATCH: Mutex<Option<(tracing::dispatcher::WeakDispatch, Lookups)>> = Mutex::new(None);

/// Remembers the subscriber a layer was registered with (called from
/// `on_register_dispatch`).
pub(crate) fn register<S>(subscriber: &Dispatch)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    *lock(&DISPATCH) = Some((subscriber.downgrade(), Lookups::of::<S>()));
}

/// The installed subscriber, if the layer is installed and the subscriber still alive.
pub(crate) fn access() -> Option<SpanAccess> {
    let guard = lock(&DISPATCH);
    let (weak, lookups) = guard.as_ref()?;
    Some(SpanAccess {
        dispatch: weak.upgrade()?,
        lookups: *lookups,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A handle on the subscriber the layer lives in, for the watchdog thread.
pub(crate) struct SpanAccess {
    dispatch: Dispatch,
    lookups: Lookups,
}

impl SpanAccess {
    /// Name, OpenTelemetry context and root of the open span `id`.
    pub(crate) fn span_info(&self, id: u64) -> Option<SpanInfo> {
        close_gate::while_no_span_closes(|| (self.lookups.span_info)(&self.dispatch, id))
    }

    /// The span id of the local root of the open span `id` (`id` itself for a root).
    pub(crate) fn root_id_of(&self, id: u64) -> Option<u64> {
        (self.lookups.root_id_of)(&self.dispatch, id)
    }

    /// The OpenTelemetry context of an in-flight root, if it is still open.
    pub(crate) fn root_context(&self, root: &RootInfo) -> Option<opentelemetry::Context> {
        close_gate::while_no_span_closes(|| {
            (self.lookups.root_context)(&self.dispatch, root, false)
        })
    }

    /// The OpenTelemetry context of a root, asked from its own `on_close`: the span cannot
    /// finish closing meanwhile, so no gate is needed.
    pub(super) fn closing_root_context(&self, root: &RootInfo) -> Option<opentelemetry::Context> {
        (self.lookups.root_context)(&self.dispatch, root, true)
    }
}

pub(super) fn span_id(id: u64) -> Option<Id> {
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
    let root_id = span
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
    let root = root_id.and_then(|root_id| {
        roots()
            .find(&HashSet::from([root_id]))
            .into_iter()
            .find(|root| !root.closed.load(Ordering::Acquire))
    });
    Some(SpanInfo {
        name,
        context,
        root,
    })
}

fn root_id_of<S>(dispatch: &Dispatch, id: u64) -> Option<u64>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let subscriber = dispatch.downcast_ref::<S>()?;
    let id = span_id(id)?;
    let span = subscriber.span(&id)?;
    let root = span.scope().from_root().next()?;
    Some(root.id().into_u64())
}

/// The OpenTelemetry context of an in-flight root. `own_close`: asked from the root's own
/// `on_close`, where it cannot finish closing meanwhile; otherwise the caller holds the close
/// gate and the closers' announcements are read first (see `close_gate`).
fn root_context<S>(
    dispatch: &Dispatch,
    root: &RootInfo,
    own_close: bool,
) -> Option<opentelemetry::Context>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let subscriber = dispatch.downcast_ref::<S>()?;
    if !own_close && (root.closed.load(Ordering::Acquire) || close_gate::may_be_closing(root.id)) {
        return None;
    }
    let id = span_id(root.id)?;
    // A root that closed on another thread than its creator's is not marked closed, but
    // its span is gone: the registry's ids are not reused for a long time (its slab keeps
    // a generation per slot), and a root never has a parent.
    let span = subscriber.span(&id)?;
    let closing = span.extensions().get::<Closing>().is_some();
    // Not a closing span: see `span_info` and `close_gate`.
    if span.parent().is_some() || closing {
        return None;
    }
    let context = tracing_opentelemetry::get_otel_context(&id, dispatch);
    drop(span);
    context
}

//! The watchdog's view of span data: the subscriber the layer was registered with, and
//! lookups monomorphised for its type (the same technique `tracing-opentelemetry` uses for
//! its `Span` extension). Every lookup of a span that may be closing goes through the close
//! gate (`hot::close_gate`).

use std::sync::{Mutex, MutexGuard};

use tracing::span::Id;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::registry::LookupSpan;

use crate::hot::close_gate::{self, Closing};
use crate::victims::SpanLookups;

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

/// The subscriber the layer was last registered with, and its lookups.
static DISPATCH: Mutex<Option<(tracing::dispatcher::WeakDispatch, Lookups)>> = Mutex::new(None);

/// Remembers the subscriber a layer was registered with (from `on_register_dispatch`).
pub(super) fn register<S>(subscriber: &Dispatch)
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

/// A handle on the subscriber the layer lives in.
pub(crate) struct SpanAccess {
    dispatch: Dispatch,
    lookups: Lookups,
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
    pub(super) fn entered_context(&self, id: &Id) -> Option<opentelemetry::Context> {
        tracing_opentelemetry::get_otel_context(id, &self.dispatch)
    }
}

impl SpanLookups for SpanAccess {
    fn open_root_context(&self, id: u64) -> Option<opentelemetry::Context> {
        SpanAccess::open_root_context(self, id)
    }

    fn is_open(&self, id: u64) -> bool {
        SpanAccess::is_open(self, id)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::LoopLagLayer;
    use tracing_subscriber::layer::SubscriberExt;

    /// Span info finds the local root of a nested span, and a closed span is not open.
    #[test]
    fn span_info_names_the_root_of_a_nested_span() {
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(LoopLagLayer::default()));
        tracing::dispatcher::with_default(&dispatch, || {
            let root = tracing::info_span!("request");
            let child = tracing::info_span!(parent: &root, "child");
            let access = access().expect("the layer registered its subscriber");
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

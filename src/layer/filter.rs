//! looplag's per-layer filter: the layer asks for spans at or above
//! [`span_level`](crate::Builder::span_level) and for no event.
//!
//! `LoopLagLayer` holds it in a `tracing_subscriber` `Filtered` around [`Silent`] and sends
//! that the filter pass. A per-layer filter only decides what its own layer sees: in a
//! subscriber whose other layers have per-layer filters too, a callsite is live when one of
//! the filters wants it, so an event callsite never goes live because of looplag, and a span
//! callsite only when it is at or above the level (see
//! [`callsite_enabled`](SpanFilter::callsite_enabled) for why such a span callsite is
//! "sometimes" rather than "always"). A layer's own `register_callsite` or `enabled` cannot
//! do this: they filter for every layer, and the default interest of an unfiltered layer,
//! "always", switches every callsite on.

use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::Layer;

/// A layer that does nothing: what `Filtered` wraps, so that the filter pass has a layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Silent;

impl<S: tracing::Subscriber> Layer<S> for Silent {}

/// The per-layer filter of looplag's layer: spans at or above a level, never an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpanFilter {
    level: Level,
}

impl SpanFilter {
    pub(crate) fn new(level: Level) -> Self {
        SpanFilter { level }
    }

    /// A span at or above the level (in `tracing`, a more verbose level compares greater).
    fn wants(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_span() && *metadata.level() <= self.level
    }
}

impl<S> Filter<S> for SpanFilter {
    /// Passes spans at or above the level; never an event.
    fn enabled(&self, metadata: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        self.wants(metadata)
    }

    /// `never` for events and for spans below the level: decided once per callsite.
    ///
    /// `sometimes`, not `always`, for spans at or above it, so that the subscriber asks every
    /// per-layer filter again each time such a span is created. With `always`,
    /// tracing-subscriber 0.3 skips that pass and reads the per-layer decisions left on the
    /// thread by the last pass, which a `tracing::enabled!` (or `log_enabled!` through
    /// `tracing-log`) for other metadata may have written: the span is then lost to
    /// looplag, and to every other per-layer-filtered layer (tokio-rs/tracing#2519, fix
    /// proposed in tokio-rs/tracing#3572). The price is one filter pass per span created.
    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.wants(metadata) {
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }

    /// Never an event.
    fn event_enabled(&self, _event: &tracing::Event<'_>, _cx: &Context<'_, S>) -> bool {
        false
    }

    /// The span level.
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.level))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interest_in(filter: SpanFilter, metadata: &'static Metadata<'static>) -> Interest {
        <SpanFilter as Filter<tracing_subscriber::Registry>>::callsite_enabled(&filter, metadata)
    }

    #[test]
    fn spans_at_or_above_the_level_and_no_event() {
        struct Callsite;
        impl tracing::Callsite for Callsite {
            fn set_interest(&self, _: Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!("not used")
            }
        }
        static CALLSITE: Callsite = Callsite;
        macro_rules! metadata {
            ($level:expr, $kind:expr) => {{
                static FIELDS: &[&str] = &[];
                static META: Metadata<'static> = Metadata::new(
                    "test",
                    "test",
                    $level,
                    None,
                    None,
                    None,
                    tracing::field::FieldSet::new(
                        FIELDS,
                        tracing_core::identify_callsite!(&CALLSITE),
                    ),
                    $kind,
                );
                &META
            }};
        }
        use tracing::metadata::Kind;
        let filter = SpanFilter::new(Level::DEBUG);
        assert!(interest_in(filter, metadata!(Level::ERROR, Kind::SPAN)).is_sometimes());
        assert!(interest_in(filter, metadata!(Level::INFO, Kind::SPAN)).is_sometimes());
        assert!(interest_in(filter, metadata!(Level::DEBUG, Kind::SPAN)).is_sometimes());
        assert!(interest_in(filter, metadata!(Level::TRACE, Kind::SPAN)).is_never());
        assert!(interest_in(filter, metadata!(Level::ERROR, Kind::EVENT)).is_never());
        assert!(interest_in(filter, metadata!(Level::DEBUG, Kind::EVENT)).is_never());
        assert!(interest_in(filter, metadata!(Level::ERROR, Kind::HINT)).is_never());
        let warn = SpanFilter::new(Level::WARN);
        assert!(interest_in(warn, metadata!(Level::WARN, Kind::SPAN)).is_sometimes());
        assert!(interest_in(warn, metadata!(Level::INFO, Kind::SPAN)).is_never());
    }
}

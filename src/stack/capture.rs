//! The watchdog's side of stack capture: the per-minute budget, the signal round trip to the
//! blocked thread, and the hand-off to the symbolizer thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::symbolizer::{Symbolized, Symbolizer};
use super::{StackSupport, ThreadTarget};
use crate::report::StackCapture;

/// How long the watchdog waits for the blocked thread to run the stack signal's handler.
const CAPTURE_TIMEOUT: Duration = Duration::from_millis(100);

/// Once its caches are warm the symbolizer answers within a millisecond or two; the
/// watchdog waits that long so that the first report usually names the culprit.
const FIRST_REPORT_WAIT: Duration = Duration::from_millis(3);

/// Takes stacks for one watchdog, within its budget.
pub(crate) struct Capturer {
    support: StackSupport,
    budget: StackBudget,
    /// Started at the first captured stack: no thread while nothing stalls.
    symbolizer: Option<Symbolizer>,
    /// Function path prefixes of library code, for the culprit frame.
    library_prefixes: Arc<[String]>,
}

impl Capturer {
    pub(crate) fn new(
        support: StackSupport,
        per_minute: u32,
        library_prefixes: Arc<[String]>,
        now: Instant,
    ) -> Self {
        Capturer {
            support,
            budget: StackBudget::new(per_minute, now),
            symbolizer: None,
            library_prefixes,
        }
    }

    /// Takes the stack of `target` for stall `id` (microseconds) and queues it for the
    /// symbolizer thread, so that reading debug info never delays a report or the next
    /// detection. [`StackCapture::Symbolizing`] when the symbols are not ready yet: they come
    /// from [`ready`](Capturer::ready) later. The culprit frame comes with the symbols.
    pub(crate) fn capture(&mut self, id: u64, target: &ThreadTarget, now: Instant) -> Symbolized {
        let no_stack = Symbolized::without_frames;
        match self.support {
            StackSupport::Disabled => return no_stack(StackCapture::Disabled),
            StackSupport::Unsupported => return no_stack(StackCapture::Unsupported),
            StackSupport::Enabled => {}
        }
        if !self.budget.take(now) {
            let suppressed = self.budget.suppressed;
            return no_stack(StackCapture::RateLimited { suppressed });
        }
        match super::capture(target, CAPTURE_TIMEOUT) {
            Ok(raw) => {
                let prefixes = &self.library_prefixes;
                let symbolizer = self
                    .symbolizer
                    .get_or_insert_with(|| Symbolizer::start(Arc::clone(prefixes)));
                match symbolizer.submit(id, raw) {
                    Ok(()) => symbolizer
                        .wait(id, FIRST_REPORT_WAIT)
                        .unwrap_or_else(|| no_stack(StackCapture::Symbolizing)),
                    Err(why) => no_stack(why),
                }
            }
            Err(err) => no_stack(StackCapture::Failed(err.to_string())),
        }
    }

    /// The stacks symbolized since the last call, by stall id.
    pub(crate) fn ready(&mut self) -> Vec<(u64, Symbolized)> {
        match &mut self.symbolizer {
            Some(symbolizer) => symbolizer.ready(),
            None => Vec::new(),
        }
    }
}

/// Token bucket for stack captures: `per_minute` tokens, refilled continuously.
#[derive(Debug)]
struct StackBudget {
    per_minute: u32,
    tokens: f64,
    refilled_at: Instant,
    suppressed: u64,
}

impl StackBudget {
    fn new(per_minute: u32, now: Instant) -> Self {
        StackBudget {
            per_minute,
            tokens: f64::from(per_minute),
            refilled_at: now,
            suppressed: 0,
        }
    }

    /// Takes a token if one is left; otherwise counts a suppressed capture.
    fn take(&mut self, now: Instant) -> bool {
        let capacity = f64::from(self.per_minute);
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * capacity / 60.0).min(capacity);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_its_rate_and_counts_what_it_refuses() {
        let start = Instant::now();
        let mut budget = StackBudget::new(2, start);
        assert!(budget.take(start));
        assert!(budget.take(start));
        assert!(!budget.take(start));
        assert_eq!(budget.suppressed, 1);
        // Half a minute refills one token of two per minute.
        assert!(budget.take(start + Duration::from_secs(30)));
        assert!(!budget.take(start + Duration::from_secs(30)));
        assert_eq!(budget.suppressed, 2);
    }
}

//! The watchdog's side of stack capture: the per-minute budget, and the hand-off to the
//! capture and symbolizer threads (see `symbolizer`), so that taking a stack never delays a
//! report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::symbolizer::{Symbolized, Symbolizer};
use super::{StackSupport, ThreadTarget};
use crate::report::StackCapture;

/// How long the capture thread waits for the blocked thread to run the stack signal's
/// handler (a thread that blocks the signal, or is stopped, never does).
const CAPTURE_TIMEOUT: Duration = Duration::from_millis(100);

/// Takes stacks for one watchdog, within its budget.
pub(crate) struct Capturer {
    support: StackSupport,
    budget: StackBudget,
    /// Started at the first stack asked for: no thread while nothing stalls.
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

    /// Asks the capture thread for the stack of `target` for stall `id`, within the budget,
    /// and returns at once: [`StackCapture::Symbolizing`] when the request is queued (the
    /// stack, or why there is none, comes from [`ready`](Capturer::ready) later), or why no
    /// stack will come. The capture thread signals the blocked thread microseconds later,
    /// while it is still blocked; a thread that cannot take the signal costs that thread
    /// the capture timeout, never the watchdog.
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
        let prefixes = &self.library_prefixes;
        let symbolizer = self
            .symbolizer
            .get_or_insert_with(|| Symbolizer::start(CAPTURE_TIMEOUT, Arc::clone(prefixes)));
        match symbolizer.request(id, target) {
            Ok(()) => no_stack(StackCapture::Symbolizing),
            Err(why) => no_stack(why),
        }
    }

    /// The stacks taken and symbolized (or failed) since the last call, by stall id.
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

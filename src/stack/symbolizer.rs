//! Two threads that take and name stacks off the watchdog thread, so that no report ever
//! waits for a stack.
//!
//! - The **capture thread** (`looplag-stacks`) does nothing but the signal round trip: it
//!   takes a request from the watchdog, sends the stack signal to the blocked thread and
//!   waits for its handler (up to the capture timeout, when the thread blocks the signal or
//!   is stopped), then unwinds the copy. It is idle between requests, so the signal leaves
//!   microseconds after detection and the stack is taken while the thread is still blocked.
//! - The **symbolizer thread** (`looplag-symbolizer`) turns the raw stacks into named
//!   frames. Symbolizing reads debug info, lazily and slowly the first time each part of a
//!   large binary is touched (hundreds of milliseconds in debug builds); on its own thread
//!   it delays neither a report nor the next capture.
//!
//! Both hand their results, or why there is none, to the watchdog through one bounded
//! queue, which the watchdog drains on every tick ([`ready`](Symbolizer::ready)).

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use crate::report::{Culprit, StackCapture, StackFrame};
use crate::stack::{RawStack, ThreadTarget};

/// A stack with its culprit frame, as the symbolizer thread hands it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Symbolized {
    pub(crate) stack: StackCapture,
    pub(crate) culprit: Culprit,
}

impl Symbolized {
    /// No frames (yet): `stack` says why.
    pub(crate) fn without_frames(stack: StackCapture) -> Self {
        Symbolized {
            stack,
            culprit: Culprit::NoStack,
        }
    }
}

/// Stacks waiting to be taken, or symbolized, at most; more are reported as failed captures.
const QUEUE: usize = 64;

/// The watchdog's end of the capture and symbolizer threads.
#[derive(Debug)]
pub(crate) struct Symbolizer {
    requests: Option<SyncSender<(u64, ThreadTarget)>>,
    results: Option<Receiver<(u64, Symbolized)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Symbolizer {
    /// Closes the queues and waits for both threads to end (the capture in hand, at most
    /// the capture timeout, and the stack in hand or the loading of the symbols, first), so
    /// a stopped watchdog leaves no thread behind.
    fn drop(&mut self) {
        self.requests = None;
        self.results = None;
        for thread in self.threads.drain(..) {
            // A panic on these threads has nothing left to report; never panic here.
            let _ = thread.join();
        }
    }
}

impl Symbolizer {
    /// Starts both threads; the symbolizer first loads the symbols of the running binary,
    /// and finds each stack's culprit with `library_prefixes`. A capture waits at most
    /// `capture_timeout` for the blocked thread's handler.
    pub(crate) fn start(capture_timeout: Duration, library_prefixes: Arc<[String]>) -> Self {
        let (request_tx, request_rx) = mpsc::sync_channel::<(u64, ThreadTarget)>(QUEUE);
        let (raw_tx, raw_rx) = mpsc::sync_channel::<(u64, Box<RawStack>)>(QUEUE);
        let (result_tx, result_rx) = mpsc::sync_channel(QUEUE);
        let capture_results = result_tx.clone();
        let symbolizer = std::thread::Builder::new()
            .name("looplag-symbolizer".to_string())
            .spawn(move || {
                crate::stack::warm_up();
                // Ends when the capture thread drops its sender.
                for (id, raw) in raw_rx {
                    if result_tx
                        .send((id, symbolized(&raw, &library_prefixes)))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        let Ok(symbolizer) = symbolizer else {
            return Symbolizer {
                requests: None,
                results: None,
                threads: Vec::new(),
            };
        };
        let capture = std::thread::Builder::new()
            .name("looplag-stacks".to_string())
            .spawn(move || {
                // Ends when the watchdog drops its sender.
                for (id, target) in request_rx {
                    let failed = match crate::stack::capture(&target, capture_timeout) {
                        Ok(raw) => match raw_tx.try_send((id, Box::new(raw))) {
                            Ok(()) => None,
                            Err(TrySendError::Full(_)) => {
                                Some("the symbolizer is behind: stack dropped".to_string())
                            }
                            Err(TrySendError::Disconnected(_)) => {
                                Some("the symbolizer thread has stopped".to_string())
                            }
                        },
                        Err(err) => Some(err.to_string()),
                    };
                    if let Some(why) = failed {
                        if capture_results
                            .send((id, Symbolized::without_frames(StackCapture::Failed(why))))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        match capture {
            Ok(capture) => Symbolizer {
                requests: Some(request_tx),
                results: Some(result_rx),
                threads: vec![capture, symbolizer],
            },
            // The symbolizer ends with its queue, dropped with the closure that failed.
            Err(_) => Symbolizer {
                requests: None,
                results: None,
                threads: vec![symbolizer],
            },
        }
    }

    /// Queues a capture of `target` as stall `id`; says why not when it cannot. The stack,
    /// or why there is none, comes later from [`ready`](Symbolizer::ready).
    pub(crate) fn request(&self, id: u64, target: &ThreadTarget) -> Result<(), StackCapture> {
        let Some(requests) = &self.requests else {
            return Err(StackCapture::Failed(
                "the stack capture thread could not be started".to_string(),
            ));
        };
        match requests.try_send((id, target.clone())) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(StackCapture::Failed(
                "the stack capture thread is behind: stack dropped".to_string(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(StackCapture::Failed(
                "the stack capture thread has stopped".to_string(),
            )),
        }
    }

    /// The stacks taken and symbolized (or failed) since the last call, by stall id.
    pub(crate) fn ready(&mut self) -> Vec<(u64, Symbolized)> {
        let mut ready = Vec::new();
        if let Some(results) = &self.results {
            while let Ok(result) = results.try_recv() {
                ready.push(result);
            }
        }
        ready
    }
}

/// The frames of `raw`, symbolized, with a marker when outer frames were cut, and their
/// culprit.
pub(crate) fn symbolized(raw: &RawStack, library_prefixes: &[String]) -> Symbolized {
    let mut frames = crate::stack::symbolize(raw);
    if raw.is_truncated() {
        frames.push(StackFrame {
            function: "... (outer frames cut)".to_string(),
            file: None,
            line: None,
            address: 0,
        });
    }
    let culprit = super::culprit::find(&frames, library_prefixes);
    Symbolized {
        stack: StackCapture::Captured(frames),
        culprit,
    }
}

//! A thread that turns captured stacks into named frames, off the watchdog thread.
//!
//! Symbolizing reads debug info, lazily and slowly the first time each part of a large
//! binary is touched (hundreds of milliseconds in debug builds). Done on the watchdog, it
//! would delay reports and miss the next stalls; so the watchdog only captures the raw stack
//! (microseconds) and hands it over here through a bounded queue.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use std::sync::Arc;

use crate::report::{Culprit, StackCapture, StackFrame};
use crate::stack::RawStack;

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

/// Stacks waiting to be symbolized at most; more are reported as failed captures.
const QUEUE: usize = 64;

/// The watchdog's end of the symbolizer thread.
#[derive(Debug)]
pub(crate) struct Symbolizer {
    requests: Option<SyncSender<(u64, Box<RawStack>)>>,
    results: Option<Receiver<(u64, Symbolized)>>,
    /// Results received while waiting for another stall's.
    early: Vec<(u64, Symbolized)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Symbolizer {
    /// Closes the queue and waits for the thread to end (it finishes the stack in hand, or
    /// the loading of the symbols, first), so a stopped watchdog leaves no thread behind.
    fn drop(&mut self) {
        self.requests = None;
        self.results = None;
        if let Some(thread) = self.thread.take() {
            // A panic on the symbolizer thread has nothing left to report; never panic here.
            let _ = thread.join();
        }
    }
}

impl Symbolizer {
    /// Starts the thread, which first loads the symbols of the running binary; it finds
    /// each stack's culprit with `library_prefixes`.
    pub(crate) fn start(library_prefixes: Arc<[String]>) -> Self {
        let (request_tx, request_rx) = mpsc::sync_channel::<(u64, Box<RawStack>)>(QUEUE);
        let (result_tx, result_rx) = mpsc::sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("looplag-symbolizer".to_string())
            .spawn(move || {
                crate::stack::warm_up();
                // Ends when the watchdog drops its sender.
                for (id, raw) in request_rx {
                    if result_tx
                        .send((id, symbolized(&raw, &library_prefixes)))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        match spawned {
            Ok(thread) => Symbolizer {
                requests: Some(request_tx),
                results: Some(result_rx),
                early: Vec::new(),
                thread: Some(thread),
            },
            Err(_) => Symbolizer {
                requests: None,
                results: None,
                early: Vec::new(),
                thread: None,
            },
        }
    }

    /// Queues `raw` for symbolizing as stall `id`; says why not when it cannot.
    pub(crate) fn submit(&self, id: u64, raw: RawStack) -> Result<(), StackCapture> {
        let Some(requests) = &self.requests else {
            return Err(StackCapture::Failed(
                "the symbolizer thread could not be started".to_string(),
            ));
        };
        match requests.try_send((id, Box::new(raw))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(StackCapture::Failed(
                "the symbolizer is behind: stack dropped".to_string(),
            )),
            Err(TrySendError::Disconnected(_)) => Err(StackCapture::Failed(
                "the symbolizer thread has stopped".to_string(),
            )),
        }
    }

    /// Waits up to `timeout` for stall `id`'s stack; results for other stalls that arrive
    /// meanwhile are kept for [`ready`](Symbolizer::ready).
    pub(crate) fn wait(&mut self, id: u64, timeout: std::time::Duration) -> Option<Symbolized> {
        let results = self.results.as_ref()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match results.recv_timeout(left) {
                Ok((got, stack)) if got == id => return Some(stack),
                Ok(other) => self.early.push(other),
                Err(_) => return None,
            }
        }
    }

    /// The stacks symbolized since the last call.
    pub(crate) fn ready(&mut self) -> Vec<(u64, Symbolized)> {
        let mut ready = std::mem::take(&mut self.early);
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

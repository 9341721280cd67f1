//! Per-thread slots: the only state the hot path touches.
//!
//! Each runtime worker thread owns one [`Slot`], found through a thread-local pointer. The
//! owner writes it with plain relaxed/release atomic stores; the watchdog thread reads it.
//! No lock, no allocation and at most one clock read per poll on the owner's side.
//!
//! # The activity word
//!
//! `word` packs the state the watchdog needs into one atomic, so one load is a consistent
//! snapshot:
//!
//! - bits 0..62: raw clock value at the start of the current (or last) poll. Every poll gets
//!   a fresh, strictly larger value, so the value also identifies the poll;
//! - bit 62 (`BUSY`): the thread is inside that poll;
//! - bit 63 (`FLAGGED`): the watchdog has declared that poll a stall.
//!
//! The owner sets `BUSY` with a new timestamp at poll start and clears it at poll end. The
//! watchdog sets `FLAGGED` only with a compare-exchange from the exact busy value it saw, so
//! it can never flag a poll that already ended. At poll end the owner checks the flag it
//! loaded: when set, it reads the clock once and publishes the end in `end` before clearing
//! `BUSY`. If the flag lands between the owner's load and store (a window of nanoseconds),
//! the owner misses it and the watchdog sees `end` older than the poll start; the end then
//! lies between the two, which bracket the watchdog's own compare-exchange, and the
//! watchdog uses the time of that compare-exchange.
//!
//! # Poll boundaries
//!
//! With tokio's task poll hooks (`--cfg tokio_unstable`) a poll is exactly what tokio calls a
//! poll. On stable builds a poll is the time a span is entered at the thread's base depth:
//! an instrumented task enters its span when its poll starts and exits when the poll
//! returns. The base depth is the depth at the last unpark, so a runtime driven from inside
//! an entered span (`span.in_scope(|| rt.block_on(..))`) still sees its polls.

use std::cell::{Cell, RefCell};
use std::panic::Location;
use std::ptr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::hot::sync::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// The thread is inside a poll.
pub(crate) const BUSY: u64 = 1 << 62;
/// The watchdog declared the current poll a stall.
pub(crate) const FLAGGED: u64 = 1 << 63;
/// The timestamp bits of the activity word.
pub(crate) use crate::clock::TS_MASK;
const _: () = assert!(TS_MASK == BUSY - 1);
/// How many entered spans a slot remembers; deeper spans are counted, not recorded.
pub(crate) const STACK_DEPTH: usize = 32;
/// The id [`Slot::enter`] and [`Slot::exit`] take for a poll of a future that no span
/// covers but looplag wraps itself (the body of `#[looplag::test]`): `tracing`'s span ids
/// are never 0, and [`Slot::entered_spans`] leaves it out.
pub(crate) const NO_SPAN: u64 = 0;
/// The state bits of [`Slot::window`]; the bits above hold the start of the stalled poll
/// whose end opened the window, so that each stall has its own window.
const WINDOW_STATE: u64 = 0b11;
/// The victim window: none open.
const WINDOW_NONE: u64 = 0;
/// The victim window is open: the polls starting now were queued behind the stall.
const WINDOW_OPEN: u64 = 1;
/// The victim window is open and the worker has parked once since the stall ended.
const WINDOW_PARKED: u64 = 2;
/// The victim window is closed.
const WINDOW_CLOSED: u64 = 3;
/// A park that slept less than this after a stall found work already waiting in tokio's
/// driver (timers that expired and I/O that became ready during the stall): the polls after
/// it still belong to the stall's backlog. A longer one slept: what woke it came later. The
/// time the thread waited for a CPU (a preempted thread on a busy machine) is not sleep.
const IMMEDIATE_UNPARK: Duration = Duration::from_millis(1);

static NEXT_THREAD_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    static THREAD_UID: Cell<u64> = const { Cell::new(0) };
    /// Fast-path pointer to the calling thread's slot (kept alive by [`OWNER`]); null when
    /// the thread has no slot. Constant-initialised and without a destructor, so reading it
    /// is one thread-local load: no lazy-initialisation or destroyed-state check.
    static SLOT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
    static OWNER: Owner = const { Owner { slot: RefCell::new(None) } };
}

/// A process-unique id of the calling thread (never reused, unlike OS thread ids).
pub(crate) fn thread_uid() -> u64 {
    THREAD_UID
        .try_with(|uid| {
            let current = uid.get();
            if current != 0 {
                return current;
            }
            let fresh = NEXT_THREAD_UID.fetch_add(1, Ordering::Relaxed);
            uid.set(fresh);
            fresh
        })
        .unwrap_or(0)
}

/// Keeps the calling thread's slot alive for as long as [`SLOT`] points to it.
struct Owner {
    slot: RefCell<Option<Arc<Slot>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // `SLOT` has no destructor, so it is still there while thread-locals are torn down.
        SLOT.set(ptr::null());
        if let Some(slot) = self.slot.get_mut().take() {
            slot.dead.store(true, Ordering::Release);
        }
    }
}

/// Runs `f` with the calling thread's slot, if it has one. This is the hot path's entry:
/// one thread-local read and a null check when the thread has no slot.
#[inline]
pub(crate) fn with_current<R>(f: impl FnOnce(&Slot) -> R) -> Option<R> {
    let slot = SLOT.get();
    if slot.is_null() {
        None
    } else {
        // SAFETY: `slot` points into the `Arc` held by `OWNER`, and the pointer is cleared
        // before that `Arc` is dropped or replaced (`Drop for Owner`, `register_with`). The
        // slot is only accessed through shared references and atomics.
        Some(f(unsafe { &*slot }))
    }
}

/// One runtime worker thread's state.
///
/// Many fields, on purpose: the owner's hot-path atomics and the identity the watchdog reads
/// (thread, worker, CPU clock, signal target) sit in one allocation reached through one
/// thread-local pointer; splitting them would add a pointer chase to every enter and exit.
pub(crate) struct Slot {
    word: AtomicU64,
    end: AtomicU64,
    /// The owner's CPU time (ns) when a flagged poll ended, published with `end`.
    end_cpu: AtomicU64,
    /// The victim window after a flagged poll ended: the poll's start shifted left by 2, and
    /// the state (`WINDOW_*`). Open from the end until the worker has run the backlog the
    /// stall left (see `window_park`); the requests whose polls start in it are marked
    /// (`victims`). Written by the owner, closed by either.
    window: AtomicU64,
    /// Raw clock of the first park in the open window (owner only).
    window_park_at: AtomicU64,
    /// The owner's run-queue delay (ns) then (owner only).
    window_park_delay: AtomicU64,
    depth: AtomicUsize,
    base: AtomicUsize,
    stack: [AtomicU64; STACK_DEPTH],
    parked: AtomicBool,
    task_id: AtomicU64,
    spawned_at: AtomicPtr<Location<'static>>,
    dead: AtomicBool,
    /// The looplag instance whose hooks registered this slot.
    pub(crate) instance: u64,
    /// Poll boundaries come from tokio's task poll hooks, not from spans.
    pub(crate) poll_hooks: bool,
    /// The slot belongs to a current-thread runtime, whose thread may also run code outside
    /// the runtime (before and after `block_on`).
    current_thread: bool,
    /// `tokio::runtime::worker_index()` when the slot was registered.
    pub(crate) worker_index: Option<usize>,
    /// `thread_uid()` of the owner.
    pub(crate) thread_uid: u64,
    /// The owner's OS thread id (Linux `gettid`), or its `thread_uid` elsewhere.
    pub(crate) os_tid: i64,
    /// The owner's thread name, or `""`.
    pub(crate) thread_name: String,
    /// Where to send the stack signal.
    pub(crate) stack_target: crate::stack::ThreadTarget,
    /// The owner's CPU clock (Linux), valid while the slot is not dead.
    pub(crate) cpu_clock: Option<crate::diagnose::CpuClock>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("thread_name", &self.thread_name)
            .field("os_tid", &self.os_tid)
            .field("worker_index", &self.worker_index)
            .field("word", &self.word.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A poll the watchdog flagged: the flagged activity word and the raw time of the flag.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Flag {
    pub(crate) word: u64,
    pub(crate) at: u64,
}

/// When a flagged poll ended.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PollEnd {
    /// Raw clock of the end.
    pub(crate) at: u64,
    /// The owner's CPU time at the end, when it published one.
    pub(crate) cpu: Option<Duration>,
}

/// A poll that started in an open victim window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WindowPoll {
    /// Raw clock of the poll's start.
    pub(crate) start: u64,
    /// Raw clock of the start of the stalled poll whose window it is.
    pub(crate) stall: u64,
}

/// Whether a victim window value is open.
#[inline]
fn window_open(window: u64) -> bool {
    matches!(window & WINDOW_STATE, WINDOW_OPEN | WINDOW_PARKED)
}

/// What the watchdog reads of a slot in one go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) word: u64,
    pub(crate) depth: usize,
    pub(crate) parked: bool,
}

impl Snapshot {
    pub(crate) fn busy(&self) -> bool {
        self.word & BUSY != 0
    }
    pub(crate) fn flagged(&self) -> bool {
        self.word & FLAGGED != 0
    }
    pub(crate) fn start(&self) -> u64 {
        self.word & TS_MASK
    }
}

impl Slot {
    /// A slot for the calling thread. `current_thread` says whether it drives a
    /// current-thread runtime; `None` asks the runtime context (inside a runtime hook).
    fn new(instance: u64, poll_hooks: bool, current_thread: Option<bool>) -> Self {
        let thread_uid = thread_uid();
        let current_thread = current_thread.unwrap_or_else(|| {
            tokio::runtime::Handle::try_current().is_ok_and(|handle| {
                matches!(
                    handle.runtime_flavor(),
                    tokio::runtime::RuntimeFlavor::CurrentThread
                )
            })
        });
        let worker_index = match tokio::runtime::worker_index() {
            Some(index) => Some(index),
            None if current_thread => Some(0),
            None => None,
        };
        Slot {
            word: AtomicU64::new(0),
            end: AtomicU64::new(0),
            end_cpu: AtomicU64::new(0),
            window: AtomicU64::new(WINDOW_NONE),
            window_park_at: AtomicU64::new(0),
            window_park_delay: AtomicU64::new(0),
            depth: AtomicUsize::new(0),
            base: AtomicUsize::new(0),
            stack: std::array::from_fn(|_| AtomicU64::new(0)),
            parked: AtomicBool::new(false),
            task_id: AtomicU64::new(0),
            spawned_at: AtomicPtr::new(ptr::null_mut()),
            dead: AtomicBool::new(false),
            instance,
            poll_hooks,
            current_thread,
            worker_index,
            thread_uid,
            os_tid: os_tid().unwrap_or(thread_uid as i64),
            thread_name: std::thread::current()
                .name()
                .unwrap_or_default()
                .to_string(),
            stack_target: crate::stack::ThreadTarget::current(),
            cpu_clock: crate::diagnose::CpuClock::current(),
        }
    }

    // ---- owner side (hot path) -------------------------------------------------------

    /// A poll starts: one clock read and one store.
    #[inline]
    pub(crate) fn poll_start(&self) {
        let previous = self.word.load(Ordering::Relaxed) & TS_MASK;
        let mut now = crate::clock::raw();
        if now <= previous {
            now = previous.saturating_add(1) & TS_MASK;
        }
        self.word.store(now | BUSY, Ordering::Release);
    }

    /// A poll ends: one load and one store, plus a clock read when the watchdog flagged it.
    #[inline]
    pub(crate) fn poll_end(&self) {
        let current = self.word.load(Ordering::Relaxed);
        if current & BUSY == 0 {
            return;
        }
        if current & FLAGGED != 0 {
            self.publish_flagged_end(current);
        }
        self.word.store(current & TS_MASK, Ordering::Release);
    }

    /// A flagged poll ends: publish the end time and the CPU time, and open the victim
    /// window (rare: stalls only).
    #[cold]
    fn publish_flagged_end(&self, flagged: u64) {
        self.window
            .store(((flagged & TS_MASK) << 2) | WINDOW_OPEN, Ordering::Relaxed);
        self.end.store(crate::clock::raw(), Ordering::Relaxed);
        let cpu = self
            .cpu_clock
            .and_then(|clock| clock.cpu_time())
            .map_or(0, |cpu| u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX));
        self.end_cpu.store(cpu, Ordering::Relaxed);
    }

    /// A span was entered on this thread. Returns the poll it begins when that poll starts in
    /// an open victim window (the caller marks the span's request as a victim, see
    /// `victims`), else `None`.
    #[inline]
    pub(crate) fn enter(&self, id: u64) -> Option<WindowPoll> {
        let depth = self.depth.load(Ordering::Relaxed);
        let mut in_window = None;
        if depth == self.base.load(Ordering::Relaxed) {
            // A current-thread runtime's thread is only a worker inside `block_on`.
            if !self.poll_hooks
                && (!self.current_thread || tokio::runtime::worker_index().is_some())
            {
                self.poll_start();
            }
            let window = self.window.load(Ordering::Relaxed);
            if window_open(window) {
                in_window = Some(WindowPoll {
                    start: self.word.load(Ordering::Relaxed) & TS_MASK,
                    stall: window >> 2,
                });
            }
        }
        if let Some(entry) = self.stack.get(depth) {
            entry.store(id, Ordering::Relaxed);
        }
        self.depth.store(depth.saturating_add(1), Ordering::Release);
        in_window
    }

    /// A span was exited on this thread.
    #[inline]
    pub(crate) fn exit(&self, id: u64) {
        let depth = self.depth.load(Ordering::Relaxed);
        if depth == 0 {
            // Entered before this thread had a slot.
            return;
        }
        let top = depth - 1;
        if let Some(entry) = self.stack.get(top) {
            if entry.load(Ordering::Relaxed) != id {
                self.remove_out_of_order(top, id);
            }
        }
        self.depth.store(top, Ordering::Release);
        if top == self.base.load(Ordering::Relaxed) && !self.poll_hooks {
            self.poll_end();
        }
    }

    /// `tracing` allows exiting a span that is not the innermost one; keep the recorded
    /// stack in order by moving the inner entries down over the exited one.
    #[cold]
    fn remove_out_of_order(&self, top: usize, id: u64) {
        let Some(position) = (0..top)
            .rev()
            .find(|&i| self.stack[i].load(Ordering::Relaxed) == id)
        else {
            return;
        };
        for i in position..top {
            let inner = self.stack[i + 1].load(Ordering::Relaxed);
            self.stack[i].store(inner, Ordering::Relaxed);
        }
    }

    /// The worker is about to park: whatever ran is over.
    #[inline]
    pub(crate) fn park(&self) {
        self.poll_end();
        let window = self.window.load(Ordering::Relaxed);
        if window_open(window) {
            self.window_park(window);
        }
        self.parked.store(true, Ordering::Release);
    }

    /// The worker woke up; polls start from the current span depth.
    /// The unpark hook then checks whether the watchdog dozes (`doze.rs`).
    #[inline]
    pub(crate) fn unpark(&self) {
        self.base
            .store(self.depth.load(Ordering::Relaxed), Ordering::Relaxed);
        let window = self.window.load(Ordering::Relaxed);
        if window & WINDOW_STATE == WINDOW_PARKED {
            self.window_unpark(window);
        }
        self.parked.store(false, Ordering::Release);
    }

    /// A park in an open victim window. The tasks queued behind the stall run before the
    /// first park after it. When nobody turned tokio's driver during the stall (always on a
    /// current-thread runtime), the timers that expired and the I/O that became ready then
    /// reach it at that park (or earlier, between polls), and their tasks run right after
    /// it: that park returns at once (`window_unpark`), and the window closes at the second
    /// park. When another worker turned the driver during the stall, it ran what it woke;
    /// the stalled worker's first park then finds nothing ready and sleeps, which closes the
    /// window.
    #[cold]
    fn window_park(&self, window: u64) {
        match window & WINDOW_STATE {
            WINDOW_OPEN => {
                self.window_park_delay
                    .store(self.run_delay_ns(), Ordering::Relaxed);
                self.window_park_at
                    .store(crate::clock::raw(), Ordering::Relaxed);
                self.move_window(window, WINDOW_PARKED);
            }
            _ => self.move_window(window, WINDOW_CLOSED),
        }
    }

    /// The first unpark in an open victim window: a park that slept ends the window, since
    /// what woke the worker came after the stall.
    #[cold]
    fn window_unpark(&self, window: u64) {
        let parked_at = self.window_park_at.load(Ordering::Relaxed);
        let wall = crate::clock::delta(parked_at, crate::clock::raw());
        let waited_for_cpu = self
            .run_delay_ns()
            .saturating_sub(self.window_park_delay.load(Ordering::Relaxed));
        let slept = wall.saturating_sub(Duration::from_nanos(waited_for_cpu));
        if slept >= IMMEDIATE_UNPARK {
            self.move_window(window, WINDOW_CLOSED);
        }
    }

    /// The owner's total run-queue delay in ns (0 when unknown).
    fn run_delay_ns(&self) -> u64 {
        crate::diagnose::run_delay(self.stack_target.tid()).map_or(0, |delay| {
            u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX)
        })
    }

    /// Moves the window from `window` to the state `to`, unless the watchdog closed it
    /// meanwhile.
    fn move_window(&self, window: u64, to: u64) {
        let _ = self.window.compare_exchange(
            window,
            (window & !WINDOW_STATE) | to,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }

    /// A task poll starts (tokio's poll hook): remember the task, then start the poll.
    #[cfg_attr(not(tokio_unstable), allow(dead_code))]
    #[inline]
    pub(crate) fn task_poll_start(&self, task_id: u64, spawned_at: &'static Location<'static>) {
        self.task_id.store(task_id, Ordering::Relaxed);
        self.spawned_at
            .store(ptr::from_ref(spawned_at).cast_mut(), Ordering::Relaxed);
        self.base
            .store(self.depth.load(Ordering::Relaxed), Ordering::Relaxed);
        self.poll_start();
    }

    // ---- watchdog side ---------------------------------------------------------------

    /// A consistent view of the activity word with the depth and park state.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            word: self.word.load(Ordering::Acquire),
            depth: self.depth.load(Ordering::Acquire),
            parked: self.parked.load(Ordering::Acquire),
        }
    }

    /// The raw activity word.
    pub(crate) fn word(&self) -> u64 {
        self.word.load(Ordering::Acquire)
    }

    /// Declares the poll identified by `busy_word` a stall. Fails when that poll is over.
    pub(crate) fn flag(&self, busy_word: u64) -> bool {
        self.word
            .compare_exchange(
                busy_word,
                busy_word | FLAGGED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The end the owner published for a flagged poll that started at `start`, if it did.
    pub(crate) fn published_end(&self, start: u64) -> Option<PollEnd> {
        let end = self.end.load(Ordering::Acquire);
        if end <= start {
            return None;
        }
        let cpu = self.end_cpu.load(Ordering::Relaxed);
        Some(PollEnd {
            at: end,
            cpu: (cpu != 0).then(|| Duration::from_nanos(cpu)),
        })
    }

    /// Whether the victim window of the flagged poll `flag_word` is closed (or was never
    /// opened: the owner missed the flag).
    pub(crate) fn window_closed(&self, flag_word: u64) -> bool {
        let window = self.window.load(Ordering::Acquire);
        window >> 2 != flag_word & TS_MASK || !window_open(window)
    }

    /// Closes the victim window of the flagged poll `flag_word` (the watchdog's bound, for a
    /// worker that does not park), unless another stall's window is open.
    pub(crate) fn close_window(&self, flag_word: u64) {
        let _ = self
            .window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |window| {
                (window >> 2 == flag_word & TS_MASK && window_open(window))
                    .then_some((window & !WINDOW_STATE) | WINDOW_CLOSED)
            });
    }

    /// The owner's CPU time now, if it can be read.
    pub(crate) fn cpu_time(&self) -> Option<Duration> {
        if self.is_dead() {
            return None;
        }
        self.cpu_clock.and_then(|clock| clock.cpu_time())
    }

    /// The state of the poll the watchdog flagged (`flag`): `None` while it runs, else its
    /// end: the one the owner published, or, when the owner missed the flag (it landed
    /// between the owner's load and store in `poll_end`), the flag's own time.
    pub(crate) fn flagged_end(&self, flag: &Flag) -> Option<PollEnd> {
        if self.word() == flag.word {
            return None;
        }
        Some(self.published_end(flag.word & TS_MASK).unwrap_or(PollEnd {
            at: flag.at,
            cpu: None,
        }))
    }

    /// The span ids entered on the thread, outermost first (at most `STACK_DEPTH`).
    pub(crate) fn entered_spans(&self, depth: usize) -> impl Iterator<Item = u64> + '_ {
        self.stack
            .iter()
            .take(depth.min(STACK_DEPTH))
            .map(|id| id.load(Ordering::Relaxed))
            .filter(|&id| id != 0)
    }

    /// The task being polled, when tokio's poll hooks report it.
    pub(crate) fn task(&self) -> Option<(u64, &'static Location<'static>)> {
        let id = self.task_id.load(Ordering::Relaxed);
        let location = self.spawned_at.load(Ordering::Relaxed);
        if id == 0 || location.is_null() {
            return None;
        }
        // SAFETY: the pointer was made from a `&'static Location<'static>` in
        // `task_poll_start` and is never written with anything else.
        Some((id, unsafe { &*location }))
    }

    /// The owner thread has exited.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
}

/// The slots registered by one looplag instance's runtime hooks.
#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) instance: u64,
    pub(crate) poll_hooks: std::sync::atomic::AtomicBool,
    slots: Mutex<Vec<Arc<Slot>>>,
}

impl Registry {
    pub(crate) fn new(instance: u64) -> Self {
        Registry {
            instance,
            poll_hooks: std::sync::atomic::AtomicBool::new(false),
            slots: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` with the calling thread's slot for this instance, registering the thread
    /// first if needed. Registration (once per thread) allocates and takes a lock; every
    /// later call is a thread-local read and a compare.
    #[inline]
    pub(crate) fn with_slot(&self, f: impl Fn(&Slot)) {
        let handled = with_current(|slot| {
            if slot.instance == self.instance {
                f(slot);
                true
            } else {
                false
            }
        });
        if handled != Some(true) {
            self.register();
            with_current(|slot| {
                if slot.instance == self.instance {
                    f(slot);
                }
            });
        }
    }

    /// Registers the calling thread as the driver of this instance's current-thread runtime,
    /// unless it already has a slot here. `LoopLag::start` calls it: the thread that starts
    /// the watchdog usually calls `block_on` next, and a runtime whose first task blocks never
    /// parks before it, so the park hook would register the thread too late. Polls only
    /// count while the thread is inside `block_on` (see `Slot::enter`), so registering a
    /// thread that never drives the runtime is harmless.
    pub(crate) fn register_current_thread_driver(&self) {
        let registered = with_current(|slot| slot.instance == self.instance).unwrap_or(false);
        if !registered {
            self.register_with(Some(true));
        }
    }

    #[cold]
    fn register(&self) {
        self.register_with(None);
    }

    fn register_with(&self, current_thread: Option<bool>) {
        let slot = Arc::new(Slot::new(
            self.instance,
            self.poll_hooks.load(Ordering::Relaxed),
            current_thread,
        ));
        let installed = OWNER
            .try_with(|owner| {
                SLOT.set(ptr::null());
                let Ok(mut owner) = owner.slot.try_borrow_mut() else {
                    return false;
                };
                if let Some(previous) = owner.replace(Arc::clone(&slot)) {
                    previous.dead.store(true, Ordering::Release);
                }
                SLOT.set(Arc::as_ptr(&slot));
                true
            })
            .unwrap_or(false);
        if !installed {
            // The thread is exiting; it will not run tasks any more.
            return;
        }
        match self.slots.lock() {
            Ok(mut slots) => slots.push(slot),
            Err(poisoned) => poisoned.into_inner().push(slot),
        }
    }

    /// The live slots, with dead ones pruned.
    pub(crate) fn live(&self) -> Vec<Arc<Slot>> {
        let mut slots = match self.slots.lock() {
            Ok(slots) => slots,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots.retain(|slot| !slot.is_dead());
        slots.clone()
    }
}

#[cfg(all(test, looplag_loom))]
mod loom_tests;

#[cfg(target_os = "linux")]
fn os_tid() -> Option<i64> {
    // SAFETY: `gettid` takes no arguments, cannot fail and has no side effects.
    Some(unsafe { libc::syscall(libc::SYS_gettid) })
}

#[cfg(not(target_os = "linux"))]
fn os_tid() -> Option<i64> {
    None
}

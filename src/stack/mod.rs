//! Capture the stack of another thread while it is stuck (Linux x86_64).
//!
//! The watchdog thread calls [`capture`] with the [`ThreadTarget`] of a stalled worker. The
//! capture goes in four steps, and only the second one runs on the stalled thread:
//!
//! 1. **Arm.** The watchdog writes the target's thread id and stack bounds into a process-wide
//!    slot allocated once by [`install`], and marks it armed with a new generation number.
//! 2. **Record.** It sends the stack signal ([`DEFAULT_STACK_SIGNAL`] unless configured) to that
//!    one thread with `tgkill`. The signal handler checks that it runs on the armed target and
//!    for the armed generation, then copies the interrupted registers (from the `ucontext_t` the
//!    kernel hands it) and the live part of the stack (from the red zone just below the
//!    interrupted stack pointer up to the stack's top, at most 512 KiB) into preallocated
//!    memory, and returns. It allocates nothing, takes no lock and calls no libc function but
//!    `syscall`.
//! 3. **Unwind.** Back on the watchdog, the copy is unwound with the `.eh_frame` call-frame
//!    information (CFI) of the loaded objects, read in place through `.eh_frame_hdr`'s search
//!    table with `gimli`. Every read of a saved register is bounded to the copied bytes, so a
//!    corrupt stack ends the walk instead of faulting, and every return address must lie in the
//!    code of a loaded object. Code without CFI is walked with frame pointers, under the same
//!    bounds.
//! 4. **Symbolize.** [`symbolize`] turns the addresses into demangled function names with file
//!    and line (`backtrace::resolve`), still on the watchdog.
//!
//! # Why CFI and not frame pointers
//!
//! `.eh_frame` is always there: Rust emits unwind tables on this target even with
//! `panic = "abort"`, and glibc has CFI for its system-call wrappers (`clock_nanosleep`,
//! `syscall` behind `futex`, `read`), where a blocked thread is usually interrupted and where a
//! frame-pointer walk loses the wrapper's caller, or follows garbage when the wrapper uses `rbp`
//! as a general register. Frame pointers would also need every crate of the application built
//! with `-C force-frame-pointers=yes`: a `.cargo/config.toml` in looplag applies to looplag's own
//! builds only, never to the applications that depend on it. With CFI, no build setting is
//! needed, in debug or release.
//!
//! Unwinding a copy instead of unwinding inside the handler keeps the handler trivially
//! async-signal-safe (one bounded copy) and makes the stack a consistent snapshot, taken in the
//! few microseconds the thread spends in the handler.
//!
//! # Cost
//!
//! Nothing runs while no stall happens: no hook, no timer, no signal (one exception: on a
//! stable build, a current-thread runtime whose thread stays outside `block_on` while the
//! runtime lives gets an [`in_runtime`] query every stall threshold, see `watchdog.rs`). [`install`] sets the
//! handler once and allocates the 512 KiB copy buffer, which the kernel backs with memory only
//! once written. A capture interrupts the target for a few microseconds and takes well under a
//! millisecond on the watchdog (measured: 3000 captures in about 1.2 s in a debug build,
//! unwinding included); the first [`symbolize`] loads debug info and is much slower.
//!
//! # Side effects on the stalled thread
//!
//! The handler is installed with `SA_RESTART`, so most blocking calls (`read`, `futex`...)
//! resume by themselves. `nanosleep`, `clock_nanosleep`, `poll`, `epoll_wait` and `select`
//! return `EINTR` after a handler whatever the flags (see `signal(7)`); `std::thread::sleep`
//! and tokio's I/O driver retry on `EINTR`, and correct code must already handle it.
//!
//! # Limitations
//!
//! - Linux x86_64 only; elsewhere [`install`] and [`capture`] return
//!   [`StackError::Unsupported`].
//! - A thread that blocks the stack signal, or is stopped, cannot be captured
//!   ([`StackError::Timeout`]).
//! - A function whose last act is the blocking call may be compiled into a tail call in
//!   release builds; it then leaves no frame, and the stack shows its caller instead.
//! - Frames beyond 128, or beyond the first 512 KiB of stack, are cut (the outermost ones).
//! - Code with neither CFI nor frame pointers (some JIT or hand-written assembly) ends the walk.
//! - Names need a symbol table: a binary built with `strip = "symbols"` shows `<unknown>`. With
//!   `debug = "line-tables-only"`, names lack their module path; `debug = "limited"` or more
//!   gives full paths and lines.
//! - The unwinder reads `.eh_frame` in place: a library unloaded with `dlclose` while the
//!   stalled thread still has frames in it could fault; that is already a use-after-free in
//!   the program.

// On platforms without support, the module is a stub and most of it goes unused.
#![cfg_attr(
    not(all(target_os = "linux", target_arch = "x86_64")),
    allow(dead_code)
)]

use std::fmt;

use crate::report::StackFrame;
use std::time::Duration;

/// The signal sent to a stalled thread to record its stack, unless configured otherwise: 42.
///
/// 42 is `SIGRTMIN + 8` with glibc (whose `SIGRTMIN` is 34: it keeps 32 and 33 for thread
/// cancellation and `setxid`) and `SIGRTMIN + 7` with musl (which keeps 32 to 34). It was picked
/// because:
///
/// - it is a real-time signal: no kernel event raises it and no library handles it by default;
/// - the programs and tools that do use real-time signals take the ends of the range:
///   `SIGRTMIN` and the few above it (POSIX timers and AIO notifications in most examples,
///   the old LinuxThreads library) and `SIGRTMAX` (Valgrind keeps it for itself). 42 sits in the
///   middle of 34..=64;
/// - the classic user signals are taken: `SIGUSR1`/`SIGUSR2` by many daemons and runtimes (the
///   JVM suspends threads with `SIGUSR2`), `SIGPROF` by sampling profilers (pprof-rs,
///   gperftools), `SIGURG` by the Go runtime.
///
/// [`install`] still checks at run time that the signal lies in `SIGRTMIN..=SIGRTMAX` and that
/// no other handler is installed for it.
pub(crate) const DEFAULT_STACK_SIGNAL: i32 = 42;

/// Most frames a [`RawStack`] holds; deeper frames are cut (see [`RawStack::is_truncated`]).
pub(crate) const MAX_FRAMES: usize = 128;

/// Why a stack could not be set up or captured.
#[derive(Debug)]
pub(crate) enum StackError {
    /// Stack capture is not implemented on this platform: only Linux x86_64 is.
    #[cfg_attr(all(target_os = "linux", target_arch = "x86_64"), allow(dead_code))]
    Unsupported,
    /// The signal already has a handler that looplag did not install; looplag leaves it alone.
    SignalInUse {
        /// The signal number asked for.
        signal: i32,
    },
    /// The signal cannot carry stack requests (only `SIGUSR1`, `SIGUSR2` and
    /// `SIGRTMIN..=SIGRTMAX` are accepted).
    InvalidSignal {
        /// The signal number asked for.
        signal: i32,
    },
    /// [`capture`] was called before a successful [`install`].
    NotInstalled,
    /// The target thread did not record its stack before the timeout: it may block the stack
    /// signal, or be stopped.
    Timeout,
    /// The target thread has exited.
    ThreadGone,
    /// A system call failed.
    Os(std::io::Error),
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StackError::Unsupported => f.write_str(
                "stack capture is not supported on this platform (supported: Linux x86_64)",
            ),
            StackError::SignalInUse { signal } => write!(
                f,
                "stack signal {signal} already has a handler that looplag did not install, and \
                 looplag does not replace it; configure another stack signal ({})",
                imp::accepted_signals()
            ),
            StackError::InvalidSignal { signal } => write!(
                f,
                "invalid stack signal {signal}: accepted are {}",
                imp::accepted_signals()
            ),
            StackError::NotInstalled => {
                f.write_str("no stack signal handler is installed: call install before capture")
            }
            StackError::Timeout => f.write_str(
                "the target thread did not record its stack before the timeout (it may block \
                 the stack signal or be stopped)",
            ),
            StackError::ThreadGone => f.write_str("the target thread has exited"),
            StackError::Os(error) => write!(f, "stack capture system call failed: {error}"),
        }
    }
}

impl std::error::Error for StackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StackError::Os(error) => Some(error),
            _ => None,
        }
    }
}

/// Installs the stack signal's handler for `signal`, process-wide.
///
/// Call it once, before the first [`capture`] (the watchdog does it at start). Calling it again
/// with the same signal does nothing and succeeds. Calling it with another accepted signal also
/// installs the handler there, and later captures send that signal; the handler stays on every
/// signal it was installed for (it ignores deliveries nobody asked for).
///
/// Installing also allocates, once per process, the buffer the handler copies stacks into
/// (512 KiB of zero-filled memory that the kernel only backs with pages once written).
///
/// # Errors
///
/// - [`StackError::InvalidSignal`] unless `signal` is `SIGUSR1`, `SIGUSR2` or in
///   `SIGRTMIN..=SIGRTMAX`;
/// - [`StackError::SignalInUse`] when a handler other than looplag's is installed for it
///   (`SIG_DFL` and `SIG_IGN` are replaced);
/// - [`StackError::Os`] when `sigaction` fails;
/// - [`StackError::Unsupported`] on platforms other than Linux x86_64.
pub(crate) fn install(signal: i32) -> Result<(), StackError> {
    imp::install(signal)
}

/// A thread whose stack the watchdog may capture.
///
/// Created on the thread itself by [`ThreadTarget::current`], then handed to the watchdog. It
/// holds the thread's ids, its stack bounds and a flag that the thread clears when it exits, so
/// that [`capture`] reports [`StackError::ThreadGone`] instead of signalling a recycled id.
#[derive(Clone, Debug)]
pub(crate) struct ThreadTarget {
    inner: imp::Target,
}

impl ThreadTarget {
    /// Describes the calling thread.
    ///
    /// Cheap but not free (it asks the C library for the stack bounds, which for the main thread
    /// reads `/proc/self/maps`): call it once per thread, when the thread starts.
    pub(crate) fn current() -> ThreadTarget {
        ThreadTarget {
            inner: imp::Target::current(),
        }
    }

    /// The Linux thread id (`gettid`) of the thread, or 0 where stacks are unsupported.
    pub(crate) fn tid(&self) -> i32 {
        self.inner.tid()
    }
}

/// Captures the stack of `target` from another thread, waiting at most `timeout` for it.
///
/// Captures are serialised process-wide: a second caller first waits for the first one to end
/// (the timeout counts from then). The target is interrupted for a few microseconds (see the
/// module docs for the effect on blocking calls). The first address is the interrupted
/// instruction, the others are return addresses.
///
/// # Errors
///
/// - [`StackError::NotInstalled`] before a successful [`install`];
/// - [`StackError::SignalInUse`] when another library replaced looplag's handler since;
/// - [`StackError::ThreadGone`] when the target has exited;
/// - [`StackError::Timeout`] when the target did not record its stack in time; a signal that
///   arrives later is ignored;
/// - [`StackError::Os`] when signalling fails;
/// - [`StackError::Unsupported`] on platforms other than Linux x86_64.
pub(crate) fn capture(target: &ThreadTarget, timeout: Duration) -> Result<RawStack, StackError> {
    imp::capture(&target.inner, timeout)
}

/// Whether `target` is inside a tokio runtime's scheduler right now: interrupts it like
/// [`capture`], but its handler only reads `tokio::runtime::worker_index()` there and copies
/// no stack.
///
/// This is how the watchdog tells, on a stable build, a current-thread runtime stuck in a
/// poll (its thread is inside `block_on`) from one that nobody drives (`block_on` returned and
/// the thread does something else): tokio publishes nothing that tells the two apart.
///
/// # Errors
///
/// As [`capture`].
pub(crate) fn in_runtime(target: &ThreadTarget, timeout: Duration) -> Result<bool, StackError> {
    imp::in_runtime(&target.inner, timeout)
}

/// The unsymbolized stack of a thread: up to [`MAX_FRAMES`] code addresses, innermost first.
///
/// It lives inline (no heap), so it can be moved around freely before symbolization.
#[derive(Clone)]
pub(crate) struct RawStack {
    addrs: [usize; MAX_FRAMES],
    len: usize,
    truncated: bool,
    /// Bit `i` set: frame `i`'s address is the next instruction to run (the interrupted
    /// instruction, or the instruction a signal interrupted), not a return address.
    exact: u128,
    /// Bit `i` set: frame `i` is a signal trampoline (`sigreturn`), not code of the program.
    trampoline: u128,
}

const _: () = assert!(
    MAX_FRAMES <= u128::BITS as usize,
    "frame flags are u128 bitsets"
);

impl RawStack {
    /// An empty stack.
    pub(crate) const fn new() -> RawStack {
        RawStack {
            addrs: [0; MAX_FRAMES],
            len: 0,
            truncated: false,
            exact: 0,
            trampoline: 0,
        }
    }

    /// The bit of frame `index` in the flag sets.
    fn bit(index: usize) -> u128 {
        u32::try_from(index)
            .ok()
            .and_then(|index| 1u128.checked_shl(index))
            .unwrap_or(0)
    }

    fn is_exact(&self, index: usize) -> bool {
        self.exact & RawStack::bit(index) != 0
    }

    fn is_trampoline(&self, index: usize) -> bool {
        self.trampoline & RawStack::bit(index) != 0
    }

    /// Appends `addr`; returns `false` (and drops it) when the stack is full.
    fn push(&mut self, addr: usize) -> bool {
        match self.addrs.get_mut(self.len) {
            Some(slot) => {
                *slot = addr;
                self.len = self.len.saturating_add(1);
                true
            }
            None => false,
        }
    }

    /// The addresses, innermost first: the interrupted instruction, then return addresses.
    pub(crate) fn addrs(&self) -> &[usize] {
        self.addrs.get(..self.len).unwrap_or(&[])
    }

    /// Whether outer frames were cut: more than [`MAX_FRAMES`] frames, or a stack deeper than
    /// the copy the handler makes.
    pub(crate) fn is_truncated(&self) -> bool {
        self.truncated
    }
}

impl Default for RawStack {
    fn default() -> Self {
        RawStack::new()
    }
}

impl fmt::Debug for RawStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Hex(usize);
        impl fmt::Debug for Hex {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
        let addrs: Vec<Hex> = self.addrs().iter().map(|&addr| Hex(addr)).collect();
        f.debug_struct("RawStack")
            .field("addrs", &addrs)
            .field("truncated", &self.truncated)
            .field("exact", &format_args!("{:#b}", self.exact))
            .field("trampoline", &format_args!("{:#b}", self.trampoline))
            .finish()
    }
}

/// The name [`symbolize`] gives a frame whose function it cannot name.
pub(crate) const UNKNOWN_FUNCTION: &str = "<unknown>";

/// Symbolizes `raw`, innermost first, dropping the frames of the signal machinery.
///
/// Functions inlined at an address come out as frames of their own, innermost first, all with
/// that address. Frames of the stack signal's handler and of the `sigreturn` trampoline
/// (`__restore_rt`, known from its CFI even where libc has no symbol for it) are dropped.
/// Captures start at the interrupted instruction, so those frames only appear when the thread
/// was already inside a signal handler (its own, which stays in the stack).
///
/// Runs on the watchdog thread, never in a signal handler: it takes `backtrace`'s global lock,
/// reads debug info from disk and allocates. The first call loads the debug info of each
/// object, which takes time and memory in large debug builds.
pub(crate) fn symbolize(raw: &RawStack) -> Vec<StackFrame> {
    let mut frames = Vec::with_capacity(raw.addrs().len());
    for (index, &addr) in raw.addrs().iter().enumerate() {
        if !raw.is_trampoline(index) {
            imp::resolve(addr, raw.is_exact(index), &mut frames);
        }
    }
    frames.retain(|frame| !is_signal_machinery(&frame.function));
    frames
}

/// Loads the symbolizer's debug info now, off the watchdog thread, so that the first stall's
/// stack is not delayed by it (the first symbolization of a large debug build takes long).
pub(crate) fn warm_up() {
    let mut frames = Vec::new();
    imp::resolve(warm_up as *const () as usize, true, &mut frames);
}

/// Whether `function` belongs to the signal delivery path rather than to the stalled code.
fn is_signal_machinery(function: &str) -> bool {
    function.contains(imp::HANDLER_NAME) || function == "__restore_rt"
}

/// Formats frames one per line, numbered like a Rust backtrace, for `code.stacktrace`.
///
/// A line reads `   3: crate::module::function at src/file.rs:42`; the location is the file
/// and line when known, else the address, and nothing for a frame without either (the marker
/// for cut frames). Lines are separated by `\n`, with none at the end.
pub(crate) fn format_stacktrace(frames: &[StackFrame]) -> String {
    use fmt::Write as _;
    let mut out = String::new();
    for (index, frame) in frames.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        // Writing to a String cannot fail.
        let _ = write!(out, "{index:>4}: {}", frame.function);
        let _ = match (&frame.file, frame.line) {
            (Some(file), Some(line)) => write!(out, " at {file}:{line}"),
            (Some(file), None) => write!(out, " at {file}"),
            (None, _) if frame.address != 0 => write!(out, " at {:#x}", frame.address),
            (None, _) => Ok(()),
        };
    }
    out
}

// The platform implementation, as `imp`: the same items on every platform.
pub(crate) mod capture;
pub(crate) mod culprit;
pub(crate) mod symbolizer;

/// Whether stall stacks can be captured, decided at `build()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StackSupport {
    /// The handler is installed on a supported platform.
    Enabled,
    /// Turned off by the settings.
    Disabled,
    /// Not implemented for this platform.
    Unsupported,
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod linux;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
use linux as imp;

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod unsupported;
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
use unsupported as imp;

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests;

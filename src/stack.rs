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
//! Nothing runs while no stall happens: no hook, no timer, no signal. [`install`] sets the
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

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The demangled function name without its hash, or `<unknown>`.
    pub(crate) function: String,
    /// The source file, when debug info has it.
    pub(crate) file: Option<String>,
    /// The source line, when debug info has it.
    pub(crate) line: Option<u32>,
    /// The code address (the same for a function and the frames inlined into it).
    pub(crate) addr: usize,
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
pub(crate) fn symbolize(raw: &RawStack) -> Vec<Frame> {
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
/// and line when known, else the address. Lines are separated by `\n`, with none at the end.
pub(crate) fn format_stacktrace(frames: &[Frame]) -> String {
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
            (None, _) => write!(out, " at {:#x}", frame.addr),
        };
    }
    out
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    //! The Linux x86_64 implementation: signal handler, capture protocol, CFI unwinder.

    use super::{Frame, RawStack, StackError, UNKNOWN_FUNCTION};
    use std::cell::Cell;
    use std::ffi::{c_int, c_void};
    use std::sync::atomic::Ordering::{Relaxed, SeqCst};
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    /// Most bytes of stack the handler copies, from the interrupted stack pointer upwards.
    ///
    /// Frames beyond it (the outermost ones: thread start, runtime loop) are cut; the innermost
    /// frames, where the culprit is, are always in the copy.
    pub(super) const STACK_COPY_BYTES: usize = 512 * 1024;

    /// Bytes below the stack pointer that the System V x86_64 ABI reserves for the running
    /// function (the red zone): signal delivery never writes there.
    const RED_ZONE: usize = 128;
    /// The smallest page size on x86_64: the aligned block of this size around the stack pointer
    /// is mapped.
    const MIN_PAGE_SIZE: usize = 4096;

    /// Part of the symbol name of [`looplag_stack_signal_handler`], to drop it from stacks.
    pub(super) const HANDLER_NAME: &str = "looplag_stack_signal_handler";

    /// Low bits of [`Slot::state`]: the phase. The other bits hold the generation.
    const PHASE_MASK: u64 = 0b11;
    /// No capture is waiting: the handler ignores signals.
    const IDLE: u64 = 0;
    /// A capture is waiting for the target thread's handler.
    const ARMED: u64 = 1;
    /// The target's handler is copying its registers and stack.
    const WRITING: u64 = 2;
    /// The copy is complete; the watchdog owns it until it arms the next generation.
    const DONE: u64 = 3;
    /// Amount added to the state for each new capture (generations live above the phase bits).
    const GENERATION_STEP: u64 = PHASE_MASK + 1;

    /// Registers kept, in DWARF numbering: rax, rdx, rcx, rbx, rsi, rdi, rbp, rsp, r8..r15, rip.
    const NREGS: usize = 17;
    const DW_RBP: usize = 6;
    const DW_RSP: usize = 7;
    /// The return-address column, which holds the program counter of each frame.
    const DW_RA: usize = 16;
    /// Registers a callee must preserve in the System V x86_64 ABI (rbx, rbp, r12..r15): the only
    /// ones besides rsp and rip that can be known in a caller's frame.
    const CALLEE_SAVED: [usize; 6] = [3, 6, 12, 13, 14, 15];
    /// For each DWARF register, its index in `mcontext_t::gregs`.
    const GREG_FOR_DWARF: [c_int; NREGS] = [
        libc::REG_RAX,
        libc::REG_RDX,
        libc::REG_RCX,
        libc::REG_RBX,
        libc::REG_RSI,
        libc::REG_RDI,
        libc::REG_RBP,
        libc::REG_RSP,
        libc::REG_R8,
        libc::REG_R9,
        libc::REG_R10,
        libc::REG_R11,
        libc::REG_R12,
        libc::REG_R13,
        libc::REG_R14,
        libc::REG_R15,
        libc::REG_RIP,
    ];

    /// The one place the watchdog and the signal handler share.
    ///
    /// `state` is `generation | phase`. The watchdog writes the target fields while the phase is
    /// `IDLE` or `DONE` (it alone moves the state out of those), then stores `ARMED`. The handler
    /// moves `ARMED` to `WRITING` with a compare-exchange on the exact generation it read, so a
    /// late signal from an abandoned generation can never claim a newer one, writes the copy,
    /// then stores `DONE`. All state accesses are `SeqCst`; the registers and the buffer are
    /// published by the `DONE` store and read after the watchdog loads it.
    pub(super) struct Slot {
        state: AtomicU64,
        target_tid: AtomicI32,
        stack_lo: AtomicUsize,
        stack_hi: AtomicUsize,
        regs: [AtomicU64; NREGS],
        copy_start: AtomicUsize,
        copy_len: AtomicUsize,
        /// Start of a leaked allocation of `buf_len` bytes, never freed.
        buf: AtomicPtr<u8>,
        buf_len: usize,
        /// Deliveries the handler ignored (no capture armed, another thread, stale generation).
        ignored: AtomicU64,
    }

    impl Slot {
        /// A new idle slot with a zeroed buffer of `buf_len` bytes, leaked: slots live forever
        /// because a late signal may still read them.
        pub(super) fn leak(buf_len: usize) -> &'static Slot {
            let buf: &'static mut [u8] = Box::leak(vec![0u8; buf_len].into_boxed_slice());
            Box::leak(Box::new(Slot {
                state: AtomicU64::new(IDLE),
                target_tid: AtomicI32::new(0),
                stack_lo: AtomicUsize::new(0),
                stack_hi: AtomicUsize::new(0),
                regs: Default::default(),
                copy_start: AtomicUsize::new(0),
                copy_len: AtomicUsize::new(0),
                buf: AtomicPtr::new(buf.as_mut_ptr()),
                buf_len,
                ignored: AtomicU64::new(0),
            }))
        }
    }

    /// The process-wide slot: null until the first [`install`], then never changed.
    static SLOT: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
    /// The signal [`capture`] sends; 0 until the first successful [`install`].
    static INSTALLED_SIGNAL: AtomicI32 = AtomicI32::new(0);
    /// Serialises [`install`].
    static INSTALL_LOCK: Mutex<()> = Mutex::new(());
    /// Serialises [`capture`]; holds the last generation used.
    static CAPTURE_LOCK: Mutex<u64> = Mutex::new(0);

    /// The stack signal's handler: if this thread is the one an armed capture waits for, records
    /// its interrupted registers and the live part of its stack into the [`Slot`].
    ///
    /// It performs these operations, in this order:
    ///
    /// 1. an atomic load of the `SLOT` pointer, then atomic loads of the slot's `state`,
    ///    `target_tid` and stack bounds: lock-free atomics are plain `mov` instructions on
    ///    x86_64;
    /// 2. `gettid`, through `libc::syscall`: a raw system call; glibc's `syscall` is an assembly
    ///    stub that touches only registers (and `errno` on failure, which `gettid` cannot have);
    /// 3. a compare-exchange of `state` from `ARMED` to `WRITING` for the generation read in 1, and
    ///    an atomic increment of `ignored` on every early return: `lock cmpxchg` and `lock xadd`;
    /// 4. reads of the interrupted registers from the `ucontext_t` the kernel placed on the
    ///    signal stack for this very delivery: plain memory reads;
    /// 5. one `rep movsb` (no libc call) that copies this thread's stack, from the 128-byte red
    ///    zone below the interrupted stack pointer (not below that pointer's page) up to the top
    ///    of the stack, at most the buffer's length, into the preallocated buffer: that range is
    ///    mapped (the stack above its pointer always is, and so is the pointer's own page), and
    ///    nothing writes it while the thread is in this handler (the kernel builds the signal
    ///    frame below the red zone, or on the alternate stack); the buffer is written only by
    ///    the handler that holds `WRITING`;
    /// 6. relaxed atomic stores of the registers and the copy's bounds, and a final `SeqCst`
    ///    store of `DONE`: plain `mov`s and one `xchg`.
    ///
    /// Those operations are all async-signal-safe: the handler allocates nothing, takes no lock,
    /// calls no libc function besides `syscall`, leaves `errno` unchanged, and cannot panic (no
    /// slice indexing or arithmetic that could overflow; a panic could not unwind out of an
    /// `extern "C"` function anyway, it would abort).
    extern "C" fn looplag_stack_signal_handler(
        _signal: c_int,
        _info: *mut libc::siginfo_t,
        context: *mut c_void,
    ) {
        let slot = SLOT.load(SeqCst);
        if slot.is_null() {
            return;
        }
        // SAFETY: `SLOT` is null or a pointer from `Slot::leak`, which is never freed.
        let slot = unsafe { &*slot };
        // SAFETY: `SYS_gettid` takes no argument, cannot fail and only reads the kernel's task.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        let tid = i32::try_from(tid).unwrap_or(-1);
        // SAFETY: the handler is installed with `SA_SIGINFO`, so `context` is the `ucontext_t`
        // of this delivery (or null, which `record` checks), valid until the handler returns.
        unsafe { record(slot, tid, context.cast::<libc::ucontext_t>()) };
    }

    /// The body of the handler, separate so that tests can drive it with a fake context.
    ///
    /// Returns whether it recorded (the thread was the armed target).
    ///
    /// # Safety
    ///
    /// `context` is null or points to a valid `ucontext_t`. Whenever its `rsp` lies within the
    /// armed stack bounds, the bytes from `rsp - 128` (but not below `rsp`'s 4 KiB page, nor
    /// below the armed `stack_lo`) up to the armed `stack_hi` must be readable and not written
    /// concurrently: the interrupted thread's own stack, when called from the handler.
    pub(super) unsafe fn record(slot: &Slot, tid: i32, context: *const libc::ucontext_t) -> bool {
        let state = slot.state.load(SeqCst);
        if state & PHASE_MASK != ARMED || slot.target_tid.load(SeqCst) != tid || context.is_null() {
            slot.ignored.fetch_add(1, Relaxed);
            return false;
        }
        let stack_lo = slot.stack_lo.load(SeqCst);
        let stack_hi = slot.stack_hi.load(SeqCst);
        let generation = state & !PHASE_MASK;
        if slot
            .state
            .compare_exchange(state, generation | WRITING, SeqCst, SeqCst)
            .is_err()
        {
            slot.ignored.fetch_add(1, Relaxed);
            return false;
        }
        // SAFETY: the caller guarantees `context` is valid; it is not null (checked above).
        let gregs = unsafe { &(*context).uc_mcontext.gregs };
        let greg = |index: c_int| -> u64 {
            let value = usize::try_from(index)
                .ok()
                .and_then(|i| gregs.get(i))
                .copied()
                .unwrap_or(0);
            // Reinterpret the signed `greg_t` as the raw 64-bit register.
            value as u64
        };
        for (register, &index) in slot.regs.iter().zip(GREG_FOR_DWARF.iter()) {
            register.store(greg(index), Relaxed);
        }
        let sp = usize::try_from(greg(libc::REG_RSP)).unwrap_or(0);
        let (start, len) = if stack_lo <= sp && sp < stack_hi {
            // Also copy the red zone below the stack pointer, within the page of the stack
            // pointer: a function interrupted in its epilogue has popped its saved registers
            // but its CFI still locates them there (the values are intact: the kernel builds the
            // signal frame below the red zone, or on the alternate stack).
            let floor = (sp & !(MIN_PAGE_SIZE - 1)).max(stack_lo);
            let start = sp.saturating_sub(RED_ZONE).max(floor);
            (start, stack_hi.saturating_sub(start).min(slot.buf_len))
        } else {
            // Not on its known stack (for example inside a handler on the alternate signal
            // stack): record the registers only.
            (sp, 0)
        };
        let buf = slot.buf.load(Relaxed);
        if len > 0 && !buf.is_null() {
            // SAFETY: `start..start + len` lies in the target's stack, from at most the red zone
            // below its stack pointer (in the same page, hence mapped) up to at most the top:
            // readable per this function's contract. `buf` holds `buf_len >= len` bytes that
            // only the holder of `WRITING` writes; the two ranges cannot overlap (one is a heap
            // buffer).
            unsafe { copy_bytes(buf, start as *const u8, len) };
        }
        slot.copy_start.store(start, Relaxed);
        slot.copy_len.store(len, Relaxed);
        slot.state.store(generation | DONE, SeqCst);
        true
    }

    /// Copies `len` bytes from `src` to `dst` with one `rep movsb`.
    ///
    /// An instruction rather than `ptr::copy_nonoverlapping`, so that no libc `memcpy` runs in
    /// the handler and so that the bytes it produces are plain initialised bytes to the compiler
    /// (they come from other functions' frames, outside Rust's view).
    ///
    /// # Safety
    ///
    /// `src..src + len` is readable, `dst..dst + len` is writable, and they do not overlap.
    #[inline(always)]
    unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: the ranges are valid per this function's contract. `rep movsb` copies exactly
        // `rcx` bytes from `rsi` to `rdi`, forwards because the direction flag is clear (the
        // System V ABI requires it at every call, and the kernel clears it on signal entry), and
        // changes no flag and no other register than the three declared.
        unsafe {
            std::arch::asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rsi") src => _,
                inout("rdi") dst => _,
                options(nostack, preserves_flags),
            );
        }
    }

    /// The address of the handler, as `sigaction` stores it.
    pub(super) fn handler_address() -> libc::sighandler_t {
        looplag_stack_signal_handler as *const () as libc::sighandler_t
    }

    /// Whether `signal` may carry stack requests.
    fn is_accepted(signal: i32) -> bool {
        signal == libc::SIGUSR1
            || signal == libc::SIGUSR2
            || (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal)
    }

    /// The accepted signals, for error messages.
    pub(super) fn accepted_signals() -> String {
        format!(
            "SIGUSR1 ({}), SIGUSR2 ({}) or SIGRTMIN..=SIGRTMAX ({}..={})",
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGRTMIN(),
            libc::SIGRTMAX()
        )
    }

    /// The handler currently installed for `signal`.
    fn current_handler(signal: i32) -> Result<libc::sighandler_t, StackError> {
        // SAFETY: `sigaction` is plain data; all zeroes is a valid value (SIG_DFL, empty mask).
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null `act` only queries; `old` is valid for writes.
        if unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) } != 0 {
            return Err(StackError::Os(std::io::Error::last_os_error()));
        }
        Ok(old.sa_sigaction)
    }

    pub(super) fn install(signal: i32) -> Result<(), StackError> {
        if !is_accepted(signal) {
            return Err(StackError::InvalidSignal { signal });
        }
        let _guard = INSTALL_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        if SLOT.load(SeqCst).is_null() {
            let slot: *const Slot = Slot::leak(STACK_COPY_BYTES);
            SLOT.store(slot.cast_mut(), SeqCst);
        }
        let current = current_handler(signal)?;
        if current == handler_address() {
            INSTALLED_SIGNAL.store(signal, SeqCst);
            return Ok(());
        }
        if current != libc::SIG_DFL && current != libc::SIG_IGN {
            return Err(StackError::SignalInUse { signal });
        }
        // SAFETY: all zeroes is a valid `sigaction`; the fields that matter are set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = handler_address();
        // SA_SIGINFO: the handler needs the ucontext. SA_RESTART: interrupted system calls that
        // can be restarted are. SA_ONSTACK: run on the alternate signal stack, where the thread
        // has one (std gives its threads one), so that a target close to overflowing its stack
        // is not pushed over.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
        // SAFETY: `sa_mask` is a valid, writable `sigset_t`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is fully initialised and its handler is async-signal-safe (see
        // `looplag_stack_signal_handler`); a null `oldact` is allowed.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(StackError::Os(std::io::Error::last_os_error()));
        }
        INSTALLED_SIGNAL.store(signal, SeqCst);
        Ok(())
    }

    /// Cleared by a thread-local destructor when the thread that created it exits.
    struct AliveFlag(Arc<AtomicBool>);

    impl Drop for AliveFlag {
        fn drop(&mut self) {
            self.0.store(false, SeqCst);
        }
    }

    thread_local! {
        static ALIVE: AliveFlag = AliveFlag(Arc::new(AtomicBool::new(true)));
    }

    #[derive(Clone, Debug)]
    pub(super) struct Target {
        tid: i32,
        stack_lo: usize,
        stack_hi: usize,
        alive: Arc<AtomicBool>,
    }

    impl Target {
        pub(super) fn current() -> Target {
            // SAFETY: `SYS_gettid` takes no argument and cannot fail.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            let (stack_lo, stack_hi) = current_stack_bounds();
            let alive = ALIVE
                .try_with(|flag| Arc::clone(&flag.0))
                // The thread is already running its thread-local destructors: it is exiting.
                .unwrap_or_else(|_| Arc::new(AtomicBool::new(false)));
            Target {
                tid: i32::try_from(tid).unwrap_or(0),
                stack_lo,
                stack_hi,
                alive,
            }
        }

        pub(super) fn tid(&self) -> i32 {
            self.tid
        }
    }

    /// The calling thread's stack as `(lowest address, one past the highest)`, or `(0, 0)` when
    /// unknown (then captures hold the interrupted instruction only).
    fn current_stack_bounds() -> (usize, usize) {
        // SAFETY: `pthread_attr_t` is plain data and `pthread_getattr_np` initialises it.
        let mut attr: libc::pthread_attr_t = unsafe { std::mem::zeroed() };
        // SAFETY: `pthread_self` has no precondition and cannot fail.
        let this_thread = unsafe { libc::pthread_self() };
        // SAFETY: `this_thread` is the calling thread, alive; `attr` is writable.
        if unsafe { libc::pthread_getattr_np(this_thread, &mut attr) } != 0 {
            return (0, 0);
        }
        let mut addr: *mut c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        // SAFETY: `attr` was initialised above; the out-pointers are valid.
        let rc = unsafe { libc::pthread_attr_getstack(&attr, &mut addr, &mut size) };
        // SAFETY: `attr` was initialised by `pthread_getattr_np` and is destroyed once.
        unsafe { libc::pthread_attr_destroy(&mut attr) };
        let lo = addr as usize;
        let hi = lo.saturating_add(size);
        let here = &rc as *const c_int as usize;
        if rc != 0 || !(lo..hi).contains(&here) {
            return (0, 0);
        }
        (lo, hi)
    }

    /// Lets time pass while waiting for the handler: spins briefly, then sleeps 50 µs per turn.
    fn backoff(turn: &mut u32) {
        if *turn < 64 {
            *turn = turn.saturating_add(1);
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn expired(deadline: Option<Instant>) -> bool {
        deadline.is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Waits until no handler is writing into `slot` (one from an abandoned capture may be).
    fn wait_while_writing(slot: &Slot, deadline: Option<Instant>) -> Result<(), StackError> {
        let mut turn = 0;
        while slot.state.load(SeqCst) & PHASE_MASK == WRITING {
            if expired(deadline) {
                return Err(StackError::Timeout);
            }
            backoff(&mut turn);
        }
        Ok(())
    }

    pub(super) fn capture(target: &Target, timeout: Duration) -> Result<RawStack, StackError> {
        let signal = INSTALLED_SIGNAL.load(SeqCst);
        let slot = SLOT.load(SeqCst);
        if signal == 0 || slot.is_null() {
            return Err(StackError::NotInstalled);
        }
        // SAFETY: `SLOT` is null or a pointer from `Slot::leak`, which is never freed.
        let slot: &Slot = unsafe { &*slot };
        let mut last_generation = CAPTURE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        if current_handler(signal)? != handler_address() {
            return Err(StackError::SignalInUse { signal });
        }
        if !target.alive.load(SeqCst) || target.tid <= 0 {
            return Err(StackError::ThreadGone);
        }
        let deadline = Instant::now().checked_add(timeout);
        wait_while_writing(slot, deadline)?;

        let generation = last_generation.wrapping_add(GENERATION_STEP);
        *last_generation = generation;
        slot.target_tid.store(target.tid, SeqCst);
        slot.stack_lo.store(target.stack_lo, SeqCst);
        slot.stack_hi.store(target.stack_hi, SeqCst);
        slot.state.store(generation | ARMED, SeqCst);

        // SAFETY: `getpid` has no precondition and cannot fail.
        let pid = unsafe { libc::getpid() };
        // SAFETY: `tgkill` takes the process id, a thread id and a signal number. A thread id
        // that no longer exists gives ESRCH; unlike `pthread_kill`, no freed memory is read.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                pid,
                libc::c_long::from(target.tid),
                libc::c_long::from(signal),
            )
        };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            // Nothing was sent, so no handler can be running: disarm.
            let _ =
                slot.state
                    .compare_exchange(generation | ARMED, generation | IDLE, SeqCst, SeqCst);
            return Err(if error.raw_os_error() == Some(libc::ESRCH) {
                StackError::ThreadGone
            } else {
                StackError::Os(error)
            });
        }

        let mut turn = 0;
        loop {
            if slot.state.load(SeqCst) == generation | DONE {
                break;
            }
            if expired(deadline) {
                match slot.state.compare_exchange(
                    generation | ARMED,
                    generation | IDLE,
                    SeqCst,
                    SeqCst,
                ) {
                    // Disarmed: the signal, if it ever arrives, finds IDLE and is ignored.
                    Ok(_) => return Err(StackError::Timeout),
                    Err(state) if state == generation | DONE => break,
                    // WRITING: the handler is copying right now; give it a short grace period.
                    Err(_) => {
                        let grace = Instant::now().checked_add(Duration::from_millis(100));
                        wait_while_writing(slot, grace)?;
                        if slot.state.load(SeqCst) == generation | DONE {
                            break;
                        }
                        return Err(StackError::Timeout);
                    }
                }
            }
            backoff(&mut turn);
        }

        let mut regs: Regs = [None; NREGS];
        for (value, register) in regs.iter_mut().zip(slot.regs.iter()) {
            *value = Some(register.load(Relaxed));
        }
        let len = slot.copy_len.load(Relaxed).min(slot.buf_len);
        let buf = slot.buf.load(Relaxed);
        let bytes: &[u8] = if buf.is_null() {
            &[]
        } else {
            // SAFETY: `buf` holds `buf_len >= len` bytes, written by the handler before it stored
            // DONE for this generation (we loaded DONE with SeqCst, so the writes are visible).
            // No handler writes again until we arm the next generation, which needs
            // `CAPTURE_LOCK`, held until the unwinding below is over.
            unsafe { std::slice::from_raw_parts(buf, len) }
        };
        let stack = StackCopy {
            start: slot.copy_start.load(Relaxed),
            bytes,
            capped: len == slot.buf_len,
            read_past_end: Cell::new(false),
        };
        let modules = modules();
        Ok(unwind(regs, &stack, &modules))
    }

    #[cfg(test)]
    pub(super) fn ignored_count() -> u64 {
        let slot = SLOT.load(SeqCst);
        if slot.is_null() {
            return 0;
        }
        // SAFETY: `SLOT` is null or a pointer from `Slot::leak`, which is never freed.
        unsafe { &*slot }.ignored.load(SeqCst)
    }

    #[cfg(test)]
    impl Slot {
        /// Arms `self` for `tid` as `capture` would (test helper).
        pub(super) fn arm(&self, generation: u64, tid: i32, stack: (usize, usize)) {
            self.target_tid.store(tid, SeqCst);
            self.stack_lo.store(stack.0, SeqCst);
            self.stack_hi.store(stack.1, SeqCst);
            self.state
                .store(generation.wrapping_mul(GENERATION_STEP) | ARMED, SeqCst);
        }

        pub(super) fn phase(&self) -> u64 {
            self.state.load(SeqCst) & PHASE_MASK
        }

        pub(super) fn is_done(&self) -> bool {
            self.phase() == DONE
        }

        pub(super) fn ignored(&self) -> u64 {
            self.ignored.load(SeqCst)
        }

        pub(super) fn recorded(&self) -> (u64, u64, usize, Vec<u8>) {
            let len = self.copy_len.load(SeqCst);
            let buf = self.buf.load(SeqCst);
            // SAFETY: test-only; the buffer holds `buf_len >= len` bytes and no handler runs.
            let bytes = unsafe { std::slice::from_raw_parts(buf, len) }.to_vec();
            (
                self.regs[DW_RA].load(SeqCst),
                self.regs[DW_RSP].load(SeqCst),
                self.copy_start.load(SeqCst),
                bytes,
            )
        }
    }

    // ---------------------------------------------------------------------------------------
    // Unwinding, on the watchdog thread.

    /// Register values of one frame, in DWARF numbering; `None` when unknown.
    type Regs = [Option<u64>; NREGS];

    /// The bytes the handler copied: the target's stack from `start` upwards.
    struct StackCopy<'a> {
        start: usize,
        bytes: &'a [u8],
        /// The copy stopped at the buffer's size, not at the top of the stack.
        capped: bool,
        /// A read asked for bytes past the end of the copy.
        read_past_end: Cell<bool>,
    }

    impl StackCopy<'_> {
        /// The 8 bytes the target had at `addr`, if they are in the copy.
        fn read_u64(&self, addr: u64) -> Option<u64> {
            let offset = usize::try_from(addr).ok()?.checked_sub(self.start)?;
            let end = offset.checked_add(8)?;
            let Some(bytes) = self.bytes.get(offset..end) else {
                if offset >= self.bytes.len() {
                    self.read_past_end.set(true);
                }
                return None;
            };
            Some(u64::from_ne_bytes(bytes.try_into().ok()?))
        }
    }

    /// A `PT_LOAD` segment of a loaded object, at its run-time address.
    #[derive(Debug)]
    struct Segment {
        start: usize,
        end: usize,
        flags: u32,
    }

    impl Segment {
        fn contains(&self, addr: usize) -> bool {
            (self.start..self.end).contains(&addr)
        }
    }

    /// A loaded object (executable, shared library, vDSO), as `dl_iterate_phdr` reports it.
    #[derive(Debug)]
    pub(super) struct Module {
        segments: Vec<Segment>,
        /// Run-time address and size of `.eh_frame_hdr` (`PT_GNU_EH_FRAME`).
        eh_frame_hdr: Option<(usize, usize)>,
    }

    impl Module {
        fn is_code(&self, addr: usize) -> bool {
            self.segments
                .iter()
                .any(|s| s.flags & libc::PF_X != 0 && s.contains(addr))
        }

        /// The readable segment containing `addr`, if any.
        fn readable_segment(&self, addr: usize) -> Option<&Segment> {
            self.segments
                .iter()
                .find(|s| s.flags & libc::PF_R != 0 && s.contains(addr))
        }
    }

    /// The loaded objects, now.
    ///
    /// The unwinder then reads their `.eh_frame` in place. An object unloaded (`dlclose`)
    /// between this call and the end of the unwinding would make those reads fault; that needs
    /// the stalled thread's stack to hold frames of a library being unloaded concurrently,
    /// which is already a use-after-free in the program.
    pub(super) fn modules() -> Vec<Module> {
        let mut out: Vec<Module> = Vec::new();
        // SAFETY: the callback receives `&mut out` as `data` and only uses it during the call.
        unsafe {
            libc::dl_iterate_phdr(
                Some(collect_module),
                (&mut out as *mut Vec<Module>).cast::<c_void>(),
            )
        };
        out
    }

    /// `dl_iterate_phdr` callback: appends one [`Module`] to the `Vec<Module>` behind `data`.
    unsafe extern "C" fn collect_module(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        if info.is_null() || data.is_null() {
            return 0;
        }
        // SAFETY: `data` is the `&mut Vec<Module>` given by `modules`, borrowed for the
        // iteration and used by nothing else meanwhile.
        let out = unsafe { &mut *data.cast::<Vec<Module>>() };
        // SAFETY: the loader passes a `dl_phdr_info` valid for the duration of the callback.
        let info = unsafe { &*info };
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: the loader guarantees `dlpi_phdr` points to `dlpi_phnum` program headers.
        let headers =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        let bias = info.dlpi_addr as usize;
        let mut module = Module {
            segments: Vec::new(),
            eh_frame_hdr: None,
        };
        for header in headers {
            let (Ok(vaddr), Ok(size)) = (
                usize::try_from(header.p_vaddr),
                usize::try_from(header.p_memsz),
            ) else {
                continue;
            };
            let Some(start) = bias.checked_add(vaddr) else {
                continue;
            };
            let Some(end) = start.checked_add(size) else {
                continue;
            };
            match header.p_type {
                libc::PT_LOAD => module.segments.push(Segment {
                    start,
                    end,
                    flags: header.p_flags,
                }),
                libc::PT_GNU_EH_FRAME => module.eh_frame_hdr = Some((start, size)),
                _ => {}
            }
        }
        out.push(module);
        0
    }

    fn module_of(modules: &[Module], addr: usize) -> Option<&Module> {
        modules.iter().find(|m| m.is_code(addr))
    }

    /// The outcome of one unwinding step.
    // `Next` is large (17 optional registers) but short-lived, moved a few times per frame on
    // the watchdog thread; boxing it would allocate for every frame.
    #[allow(clippy::large_enum_variant)]
    enum Step {
        /// The caller's registers; `exact_pc` when the caller was interrupted by a signal
        /// rather than making a call (this frame is the signal trampoline).
        Next { regs: Regs, exact_pc: bool },
        /// No caller: outermost frame, or a rule this unwinder does not follow.
        End,
        /// No CFI covers the address: try frame pointers.
        NoInfo,
    }

    /// Walks the copied stack from the interrupted registers `regs`.
    ///
    /// Every address after the first must be code of a loaded object and every frame must sit
    /// higher on the stack than the one it returns to, otherwise the walk ends: it never reports
    /// an address it could not vouch for.
    fn unwind(mut regs: Regs, stack: &StackCopy<'_>, modules: &[Module]) -> RawStack {
        let mut raw = RawStack::new();
        let mut ctx = gimli::UnwindContext::<usize>::new();
        // The first frame was interrupted: its pc is the next instruction to run, not a return
        // address. So is a frame interrupted by a signal whose handler is on the stack.
        let mut exact_pc = true;
        let mut first = true;
        while let Some(pc) = regs[DW_RA] {
            let Ok(pc_addr) = usize::try_from(pc) else {
                break;
            };
            if pc == 0 || (!first && module_of(modules, pc_addr).is_none()) {
                break;
            }
            if !raw.push(pc_addr) {
                raw.truncated = true;
                break;
            }
            let index = raw.len.saturating_sub(1);
            if exact_pc {
                raw.exact |= RawStack::bit(index);
            }
            // A return address points after the call; look up the call itself.
            let lookup = if exact_pc { pc } else { pc.saturating_sub(1) };
            let step = match cfi_step(&mut ctx, modules, &regs, lookup, stack) {
                Step::NoInfo => frame_pointer_step(&regs, stack),
                step => step,
            };
            let Step::Next {
                regs: next,
                exact_pc: next_exact,
            } = step
            else {
                break;
            };
            match (next[DW_RSP], regs[DW_RSP]) {
                (Some(new_sp), Some(sp)) if new_sp > sp => {}
                _ => break,
            }
            if next_exact {
                raw.trampoline |= RawStack::bit(index);
            }
            regs = next;
            exact_pc = next_exact;
            first = false;
        }
        if stack.capped && stack.read_past_end.get() {
            raw.truncated = true;
        }
        raw
    }

    fn register(regs: &Regs, register: gimli::Register) -> Option<u64> {
        regs.get(usize::from(register.0)).copied().flatten()
    }

    /// One step with the CFI of the object containing `lookup`.
    fn cfi_step(
        ctx: &mut gimli::UnwindContext<usize>,
        modules: &[Module],
        regs: &Regs,
        lookup: u64,
        stack: &StackCopy<'_>,
    ) -> Step {
        use gimli::{
            BaseAddresses, CfaRule, EhFrame, EhFrameHdr, NativeEndian, Pointer, UnwindSection,
        };

        let Some(module) = usize::try_from(lookup)
            .ok()
            .and_then(|addr| module_of(modules, addr))
        else {
            return Step::NoInfo;
        };
        let Some((hdr_addr, hdr_len)) = module.eh_frame_hdr else {
            return Step::NoInfo;
        };
        match module.readable_segment(hdr_addr) {
            Some(segment) if hdr_addr.saturating_add(hdr_len) <= segment.end => {}
            _ => return Step::NoInfo,
        }
        // SAFETY: `.eh_frame_hdr` lies inside a readable `PT_LOAD` segment of an object that is
        // loaded (checked above), so it is mapped and read-only for as long as the object stays
        // loaded (see `modules` about `dlclose`).
        let hdr = unsafe { std::slice::from_raw_parts(hdr_addr as *const u8, hdr_len) };
        let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr as u64);
        let Ok(parsed) = EhFrameHdr::new(hdr, NativeEndian).parse(&bases, 8) else {
            return Step::NoInfo;
        };
        let Pointer::Direct(eh_frame_addr) = parsed.eh_frame_ptr() else {
            return Step::NoInfo;
        };
        let Ok(eh_frame_addr) = usize::try_from(eh_frame_addr) else {
            return Step::NoInfo;
        };
        let Some(segment) = module.readable_segment(eh_frame_addr) else {
            return Step::NoInfo;
        };
        // `.eh_frame_hdr` does not give `.eh_frame`'s size: take the rest of its segment. The
        // search table points at the entries, so nothing past the section is parsed.
        let eh_frame_len = segment.end.saturating_sub(eh_frame_addr);
        // SAFETY: as above, this range is inside a readable segment of a loaded object.
        let eh_frame_bytes =
            unsafe { std::slice::from_raw_parts(eh_frame_addr as *const u8, eh_frame_len) };
        let mut eh_frame = EhFrame::new(eh_frame_bytes, NativeEndian);
        eh_frame.set_address_size(8);
        let bases = bases.set_eh_frame(eh_frame_addr as u64);
        let Some(table) = parsed.table() else {
            return Step::NoInfo;
        };
        let Ok(fde) = table.fde_for_address(&eh_frame, &bases, lookup, EhFrame::cie_from_offset)
        else {
            return Step::NoInfo;
        };
        let return_address = fde.cie().return_address_register();
        let encoding = fde.cie().encoding();
        let Ok(row) = fde.unwind_info_for_address(&eh_frame, &bases, ctx, lookup) else {
            return Step::NoInfo;
        };
        // DWARF expressions appear in PLT stubs and in the signal trampoline (`__restore_rt`,
        // whose rules read the interrupted registers from the `ucontext_t` on the stack).
        let evaluate = |expression: &gimli::UnwindExpression<usize>, initial: Option<u64>| {
            evaluate(&eh_frame, expression, encoding, initial, regs, stack)
        };
        let cfa = match row.cfa() {
            CfaRule::RegisterAndOffset {
                register: base,
                offset,
            } => register(regs, *base).and_then(|value| value.checked_add_signed(*offset)),
            CfaRule::Expression(expression) => evaluate(expression, None),
        };
        let Some(cfa) = cfa else {
            return Step::End;
        };
        let mut next: Regs = [None; NREGS];
        next[DW_RSP] = Some(cfa);
        for index in CALLEE_SAVED {
            let Ok(number) = u16::try_from(index) else {
                continue;
            };
            let rule = row.register(gimli::Register(number));
            // A callee-saved register without a rule keeps its value (what GCC assumes).
            if let Some(value) = next.get_mut(index) {
                *value = recover(&rule, regs, index, cfa, stack, true, &evaluate);
            }
        }
        // No rule for the return address means the outermost frame (`_start`, `clone3`).
        next[DW_RA] = recover(
            &row.register(return_address),
            regs,
            usize::from(return_address.0),
            cfa,
            stack,
            false,
            &evaluate,
        );
        Step::Next {
            regs: next,
            exact_pc: fde.is_signal_trampoline(),
        }
    }

    /// Evaluates a DWARF expression of the CFI against the frame's registers and the stack
    /// copy; `None` when it needs anything else (or does not terminate in 64 steps).
    fn evaluate<R: gimli::Reader<Offset = usize>>(
        section: &gimli::EhFrame<R>,
        expression: &gimli::UnwindExpression<usize>,
        encoding: gimli::Encoding,
        initial: Option<u64>,
        regs: &Regs,
        stack: &StackCopy<'_>,
    ) -> Option<u64> {
        use gimli::{EvaluationResult, Value};
        let mut evaluation = expression.get(section).ok()?.evaluation(encoding);
        if let Some(initial) = initial {
            evaluation.set_initial_value(initial);
        }
        let mut result = evaluation.evaluate().ok()?;
        for _ in 0..64 {
            result = match result {
                EvaluationResult::Complete => {
                    return evaluation.value_result()?.to_u64(u64::MAX).ok();
                }
                EvaluationResult::RequiresRegister { register: r, .. } => evaluation
                    .resume_with_register(Value::Generic(register(regs, r)?))
                    .ok()?,
                EvaluationResult::RequiresMemory {
                    address, size: 8, ..
                } => evaluation
                    .resume_with_memory(Value::Generic(stack.read_u64(address)?))
                    .ok()?,
                _ => return None,
            };
        }
        None
    }

    /// Evaluates a CFI expression, given the initial stack value (the CFA, for register rules).
    type Evaluate<'a> = dyn Fn(&gimli::UnwindExpression<usize>, Option<u64>) -> Option<u64> + 'a;

    /// Applies one register rule: the caller's value of register `index`.
    fn recover(
        rule: &gimli::RegisterRule<usize>,
        regs: &Regs,
        index: usize,
        cfa: u64,
        stack: &StackCopy<'_>,
        same_if_undefined: bool,
        evaluate: &Evaluate<'_>,
    ) -> Option<u64> {
        use gimli::RegisterRule;
        match rule {
            RegisterRule::Undefined if same_if_undefined => regs.get(index).copied().flatten(),
            RegisterRule::SameValue => regs.get(index).copied().flatten(),
            RegisterRule::Offset(offset) => stack.read_u64(cfa.checked_add_signed(*offset)?),
            RegisterRule::ValOffset(offset) => cfa.checked_add_signed(*offset),
            RegisterRule::Register(other) => register(regs, *other),
            RegisterRule::Constant(value) => Some(*value),
            RegisterRule::Expression(expression) => {
                stack.read_u64(evaluate(expression, Some(cfa))?)
            }
            RegisterRule::ValExpression(expression) => evaluate(expression, Some(cfa)),
            _ => None,
        }
    }

    /// One step through the frame-pointer chain, for code without CFI: the caller's `rbp` is
    /// saved at `rbp` and the return address just above it.
    fn frame_pointer_step(regs: &Regs, stack: &StackCopy<'_>) -> Step {
        let (Some(bp), Some(sp)) = (regs[DW_RBP], regs[DW_RSP]) else {
            return Step::End;
        };
        if bp < sp {
            return Step::End;
        }
        let (Some(saved_bp), Some(return_address), Some(cfa)) = (
            stack.read_u64(bp),
            bp.checked_add(8).and_then(|addr| stack.read_u64(addr)),
            bp.checked_add(16),
        ) else {
            return Step::End;
        };
        let mut next: Regs = [None; NREGS];
        next[DW_RBP] = Some(saved_bp);
        next[DW_RSP] = Some(cfa);
        next[DW_RA] = Some(return_address);
        Step::Next {
            regs: next,
            exact_pc: false,
        }
    }

    // ---------------------------------------------------------------------------------------
    // Symbolization, on the watchdog thread.

    /// Appends the frames (inlined ones first) at `addr`; `exact` marks an interrupted
    /// instruction, which is looked up as is rather than as a return address.
    pub(super) fn resolve(addr: usize, exact: bool, frames: &mut Vec<Frame>) {
        // `backtrace::resolve` subtracts one to land inside the call instruction; an exact
        // address is no return address, so compensate.
        let lookup = if exact { addr.saturating_add(1) } else { addr };
        let before = frames.len();
        backtrace::resolve(lookup as *mut c_void, |symbol| {
            frames.push(Frame {
                function: symbol
                    .name()
                    .map(|name| format!("{name:#}"))
                    .unwrap_or_else(|| UNKNOWN_FUNCTION.to_owned()),
                file: symbol.filename().map(|path| path.display().to_string()),
                line: symbol.lineno(),
                addr,
            });
        });
        let named = frames
            .get(before..)
            .is_some_and(|new| new.iter().any(|frame| frame.function != UNKNOWN_FUNCTION));
        if named {
            return;
        }
        // No file on disk to read symbols from (the vDSO) or no symbol table: ask the dynamic
        // loader for the nearest exported symbol.
        let function = dynamic_symbol(if exact { addr } else { addr.saturating_sub(1) })
            .unwrap_or_else(|| UNKNOWN_FUNCTION.to_owned());
        frames.truncate(before);
        frames.push(Frame {
            function,
            file: None,
            line: None,
            addr,
        });
    }

    /// The name of the dynamic symbol containing `addr`, from `dladdr`.
    fn dynamic_symbol(addr: usize) -> Option<String> {
        // SAFETY: `Dl_info` is plain data; all zeroes (null pointers) is valid.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: `dladdr` only reads the loader's tables and writes `info`.
        if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0
            || info.dli_sname.is_null()
        {
            return None;
        }
        // SAFETY: a non-null `dli_sname` is a NUL-terminated string owned by the loader, valid
        // while the object stays loaded; it is copied at once.
        let name = unsafe { std::ffi::CStr::from_ptr(info.dli_sname) };
        Some(name.to_string_lossy().into_owned())
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod imp {
    //! Platforms without stack capture: every operation reports [`StackError::Unsupported`].

    use super::{Frame, RawStack, StackError, UNKNOWN_FUNCTION};
    use std::time::Duration;

    pub(super) const HANDLER_NAME: &str = "looplag_stack_signal_handler";

    #[derive(Clone, Debug)]
    pub(super) struct Target;

    impl Target {
        pub(super) fn current() -> Target {
            Target
        }

        pub(super) fn tid(&self) -> i32 {
            0
        }
    }

    pub(super) fn accepted_signals() -> String {
        "none: stack capture is not supported on this platform".to_owned()
    }

    pub(super) fn install(_signal: i32) -> Result<(), StackError> {
        Err(StackError::Unsupported)
    }

    pub(super) fn capture(_target: &Target, _timeout: Duration) -> Result<RawStack, StackError> {
        Err(StackError::Unsupported)
    }

    pub(super) fn resolve(addr: usize, _exact: bool, frames: &mut Vec<Frame>) {
        frames.push(Frame {
            function: UNKNOWN_FUNCTION.to_owned(),
            file: None,
            line: None,
            addr,
        });
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn format_stacktrace_prints_one_numbered_frame_per_line() {
        let frames = [
            Frame {
                function: "clock_nanosleep".to_owned(),
                file: None,
                line: None,
                addr: 0x7f00_0000_1000,
            },
            Frame {
                function: "app::handler".to_owned(),
                file: Some("src/main.rs".to_owned()),
                line: Some(42),
                addr: 0x5500_0000_2000,
            },
            Frame {
                function: "app::other".to_owned(),
                file: Some("src/other.rs".to_owned()),
                line: None,
                addr: 0x5500_0000_3000,
            },
        ];
        assert_eq!(
            format_stacktrace(&frames),
            "   0: clock_nanosleep at 0x7f0000001000\n   \
             1: app::handler at src/main.rs:42\n   \
             2: app::other at src/other.rs"
        );
        assert_eq!(format_stacktrace(&[]), "");
    }

    #[test]
    fn raw_stack_holds_at_most_max_frames() {
        let mut raw = RawStack::new();
        for addr in 0..MAX_FRAMES {
            assert!(raw.push(addr + 1));
        }
        assert!(!raw.push(usize::MAX));
        assert_eq!(raw.addrs().len(), MAX_FRAMES);
        assert_eq!(raw.addrs()[MAX_FRAMES - 1], MAX_FRAMES);
        assert!(format!("{raw:?}").contains("0x80"));
    }

    #[test]
    fn errors_name_the_thing_and_the_value() {
        let in_use = StackError::SignalInUse { signal: 46 }.to_string();
        assert!(
            in_use.contains("46") && in_use.contains("handler"),
            "{in_use}"
        );
        let invalid = StackError::InvalidSignal { signal: 9 }.to_string();
        assert!(
            invalid.contains('9') && invalid.contains("accepted"),
            "{invalid}"
        );
        assert!(StackError::Timeout.to_string().contains("timeout"));
        assert!(StackError::ThreadGone.to_string().contains("exited"));
        assert!(StackError::NotInstalled.to_string().contains("install"));
        assert!(StackError::Unsupported
            .to_string()
            .contains("not supported"));
        let os = StackError::Os(std::io::Error::from_raw_os_error(1));
        assert!(std::error::Error::source(&os).is_some());
    }

    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    #[test]
    fn other_platforms_report_unsupported() {
        assert!(matches!(
            install(DEFAULT_STACK_SIGNAL),
            Err(StackError::Unsupported)
        ));
        let target = ThreadTarget::current();
        assert!(matches!(
            capture(&target, Duration::from_millis(10)),
            Err(StackError::Unsupported)
        ));
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    mod linux {
        use super::super::imp;
        use super::*;
        use std::hint::black_box;
        use std::io::Write as _;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc, Mutex};
        use std::thread;
        use std::time::Instant;

        const TIMEOUT: Duration = Duration::from_secs(2);

        fn installed() {
            install(DEFAULT_STACK_SIGNAL).expect("install the default stack signal");
        }

        /// Index of the first frame whose function contains `needle`.
        fn position(frames: &[Frame], needle: &str) -> Option<usize> {
            frames.iter().position(|f| f.function.contains(needle))
        }

        /// The scheduler state letter of thread `tid` (`R`, `S`, `D`...).
        fn state_of(tid: i32) -> Option<char> {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
            stat.rsplit_once(')')?.1.trim_start().chars().next()
        }

        /// Waits (at most 5 s) until thread `tid` sleeps in the kernel.
        fn wait_until_sleeping(tid: i32) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while state_of(tid) != Some('S') {
                assert!(Instant::now() < deadline, "thread {tid} never blocked");
                thread::sleep(Duration::from_millis(2));
            }
        }

        /// Executable mappings of this process, from `/proc/self/maps` (independent of the
        /// unwinder's own view of the loaded objects).
        fn executable_ranges() -> Vec<(usize, usize)> {
            let maps = std::fs::read_to_string("/proc/self/maps").expect("read maps");
            maps.lines()
                .filter_map(|line| {
                    let mut fields = line.split_whitespace();
                    let range = fields.next()?;
                    let perms = fields.next()?;
                    if !perms.contains('x') {
                        return None;
                    }
                    let (lo, hi) = range.split_once('-')?;
                    Some((
                        usize::from_str_radix(lo, 16).ok()?,
                        usize::from_str_radix(hi, 16).ok()?,
                    ))
                })
                .collect()
        }

        fn in_ranges(ranges: &[(usize, usize)], addr: usize) -> bool {
            ranges.iter().any(|&(lo, hi)| (lo..hi).contains(&addr))
        }

        fn capture_symbolized(target: &ThreadTarget) -> (Vec<Frame>, String) {
            let raw = capture(target, TIMEOUT).expect("capture");
            let frames = symbolize(&raw);
            let text = format_stacktrace(&frames);
            (frames, text)
        }

        /// Asserts that `culprit` is named, and above (closer to the top than) `caller`.
        fn assert_culprit_above_caller(frames: &[Frame], text: &str, culprit: &str, caller: &str) {
            eprintln!("--- stack of {culprit}:\n{text}");
            let culprit_at = position(frames, culprit)
                .unwrap_or_else(|| panic!("{culprit} missing from the stack:\n{text}"));
            let caller_at = position(frames, caller)
                .unwrap_or_else(|| panic!("{caller} missing from the stack:\n{text}"));
            assert!(
                culprit_at < caller_at,
                "{culprit} (frame {culprit_at}) should be above {caller} (frame {caller_at}):\n{text}"
            );
        }

        // --- the culprits. Each does something after its call so that release builds cannot
        // turn the call into a tail call, which would remove the caller's frame from the stack.

        #[inline(never)]
        fn looplag_culprit_sleep() {
            thread::sleep(Duration::from_millis(300));
            black_box(());
        }

        #[inline(never)]
        fn caller_frame(ready: mpsc::Sender<ThreadTarget>) {
            let _ = ready.send(ThreadTarget::current());
            looplag_culprit_sleep();
            black_box(());
        }

        #[inline(never)]
        fn looplag_culprit_spin(stop: &AtomicBool) -> u64 {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut turns = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                turns = black_box(turns.wrapping_add(1));
            }
            turns
        }

        #[inline(never)]
        fn caller_frame_spin(ready: mpsc::Sender<ThreadTarget>, stop: &AtomicBool) -> u64 {
            let _ = ready.send(ThreadTarget::current());
            let turns = looplag_culprit_spin(stop);
            black_box(turns)
        }

        #[inline(never)]
        fn looplag_culprit_lock(lock: &Mutex<u64>) -> u64 {
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            black_box(*guard)
        }

        #[inline(never)]
        fn caller_frame_lock(ready: mpsc::Sender<ThreadTarget>, lock: &Mutex<u64>) -> u64 {
            let _ = ready.send(ThreadTarget::current());
            let value = looplag_culprit_lock(lock);
            black_box(value)
        }

        #[test]
        fn names_a_culprit_blocked_in_sleep_above_its_caller() {
            installed();
            let (ready, targets) = mpsc::channel();
            let started = Instant::now();
            let worker = thread::spawn(move || {
                caller_frame(ready);
                started.elapsed()
            });
            let target = targets.recv_timeout(TIMEOUT).expect("target");
            wait_until_sleeping(target.tid());
            let (frames, text) = capture_symbolized(&target);
            assert_culprit_above_caller(&frames, &text, "looplag_culprit_sleep", "caller_frame");
            // The frame carries a location when debug info has one.
            let culprit = &frames[position(&frames, "looplag_culprit_sleep").unwrap()];
            if cfg!(debug_assertions) {
                assert!(culprit
                    .file
                    .as_deref()
                    .is_some_and(|f| f.ends_with("stack.rs")));
                assert!(culprit.line.is_some());
            }
            // The interrupted sleep still lasts its full 300 ms (std retries after EINTR).
            let slept = worker.join().expect("worker");
            assert!(slept >= Duration::from_millis(300), "slept {slept:?}");
        }

        #[test]
        fn names_a_culprit_spinning_on_cpu_in_every_capture() {
            installed();
            let stop = Arc::new(AtomicBool::new(false));
            let (ready, targets) = mpsc::channel();
            let worker = {
                let stop = Arc::clone(&stop);
                thread::spawn(move || caller_frame_spin(ready, &stop))
            };
            let target = targets.recv_timeout(TIMEOUT).expect("target");
            thread::sleep(Duration::from_millis(20));
            for _ in 0..10 {
                let (frames, text) = capture_symbolized(&target);
                assert_culprit_above_caller(
                    &frames,
                    &text,
                    "looplag_culprit_spin",
                    "caller_frame_spin",
                );
                thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::Relaxed);
            assert!(worker.join().expect("worker") > 0);
        }

        #[test]
        fn names_a_culprit_blocked_on_a_held_mutex() {
            installed();
            let lock = Arc::new(Mutex::new(7));
            let guard = lock.lock().expect("lock");
            let (ready, targets) = mpsc::channel();
            let worker = {
                let lock = Arc::clone(&lock);
                thread::spawn(move || caller_frame_lock(ready, &lock))
            };
            let target = targets.recv_timeout(TIMEOUT).expect("target");
            wait_until_sleeping(target.tid());
            let (frames, text) = capture_symbolized(&target);
            drop(guard);
            assert_culprit_above_caller(
                &frames,
                &text,
                "looplag_culprit_lock",
                "caller_frame_lock",
            );
            assert_eq!(worker.join().expect("worker"), 7);
        }

        /// Allocates, formats and makes system calls until `stop`; returns (iterations,
        /// checksum) so the caller can check that no register was corrupted.
        #[inline(never)]
        fn looplag_culprit_churn(stop: &AtomicBool) -> (u64, u64) {
            let mut devnull = std::fs::File::create("/dev/null").expect("/dev/null");
            let (mut iterations, mut checksum) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let mut numbers: Vec<u64> = Vec::with_capacity(4);
                for i in 0..256 {
                    numbers.push(i);
                }
                let text = format!("{:?}", &numbers[..8]);
                let _ = devnull.write_all(text.as_bytes());
                let _ = std::fs::metadata("/proc/self");
                let boxed: Box<[u8]> = vec![1u8; 3000].into_boxed_slice();
                checksum = checksum
                    .wrapping_add(numbers.iter().sum::<u64>())
                    .wrapping_add(text.len() as u64)
                    .wrapping_add(boxed.iter().map(|&b| u64::from(b)).sum::<u64>());
                iterations += 1;
            }
            black_box((iterations, checksum))
        }

        #[test]
        fn survives_thousands_of_captures_of_an_allocating_thread() {
            const CAPTURES: usize = 3000;
            installed();
            let stop = Arc::new(AtomicBool::new(false));
            let (ready, targets) = mpsc::channel();
            let worker = {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let _ = ready.send(ThreadTarget::current());
                    looplag_culprit_churn(&stop)
                })
            };
            let target = targets.recv_timeout(TIMEOUT).expect("target");
            thread::sleep(Duration::from_millis(20));
            let executable = executable_ranges();
            // Function names of each address seen, so that every capture can be checked
            // without symbolizing it whole.
            let mut names: std::collections::HashMap<(usize, bool), String> = Default::default();
            let started = Instant::now();
            let mut depths = Vec::with_capacity(CAPTURES);
            for i in 0..CAPTURES {
                let raw =
                    capture(&target, TIMEOUT).unwrap_or_else(|e| panic!("capture {i} failed: {e}"));
                assert!(!raw.addrs().is_empty(), "capture {i} is empty");
                for &addr in raw.addrs() {
                    assert!(
                        in_ranges(&executable, addr),
                        "capture {i}: {addr:#x} is not in an executable mapping: {raw:?}"
                    );
                }
                depths.push(raw.addrs().len());
                let callers: Vec<String> = raw
                    .addrs()
                    .iter()
                    .enumerate()
                    .map(|(index, &addr)| {
                        names
                            .entry((addr, index == 0))
                            .or_insert_with(|| {
                                let mut frames = Vec::new();
                                imp::resolve(addr, index == 0, &mut frames);
                                frames.into_iter().map(|f| f.function + "\n").collect()
                            })
                            .clone()
                    })
                    .collect();
                let complete = callers.last().is_some_and(|last| last.contains("clone3"));
                let culprit = callers.iter().any(|n| n.contains("looplag_culprit_churn"));
                assert!(
                    complete && culprit,
                    "capture {i} stops early or misses the culprit:\n{}",
                    format_stacktrace(&symbolize(&raw))
                );
                if i % 100 == 0 {
                    let frames = symbolize(&raw);
                    let text = format_stacktrace(&frames);
                    for frame in &frames {
                        assert!(
                            frame.function != UNKNOWN_FUNCTION
                                || in_ranges(&executable, frame.addr),
                            "capture {i}: bad frame {frame:?}\n{text}"
                        );
                    }
                    assert!(
                        position(&frames, "looplag_culprit_churn").is_some(),
                        "capture {i}: culprit missing:\n{text}"
                    );
                }
            }
            let elapsed = started.elapsed();
            stop.store(true, Ordering::Relaxed);
            let (iterations, checksum) = worker.join().expect("worker");
            let per_iteration =
                (0..256u64).sum::<u64>() + "[0, 1, 2, 3, 4, 5, 6, 7]".len() as u64 + 3000;
            assert_eq!(
                checksum,
                iterations.wrapping_mul(per_iteration),
                "registers corrupted"
            );
            assert!(
                elapsed < Duration::from_secs(60),
                "{CAPTURES} captures took {elapsed:?}"
            );
            depths.sort_unstable();
            eprintln!(
                "{CAPTURES} captures in {elapsed:?}; depth min {} median {} max {}; {iterations} worker iterations",
                depths[0],
                depths[CAPTURES / 2],
                depths[CAPTURES - 1]
            );
        }

        fn set_blocked(signal: i32, blocked: bool) {
            // SAFETY: `set` is a valid sigset_t, initialised by sigemptyset before use.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                let how = if blocked {
                    libc::SIG_BLOCK
                } else {
                    libc::SIG_UNBLOCK
                };
                assert_eq!(libc::pthread_sigmask(how, &set, std::ptr::null_mut()), 0);
            }
        }

        #[inline(never)]
        fn caller_frame_after_late_signal(
            unblock: mpsc::Receiver<()>,
            unblocked: mpsc::Sender<()>,
        ) {
            let _ = unblock.recv();
            // Delivers the signal that is pending since the capture that timed out.
            set_blocked(DEFAULT_STACK_SIGNAL, false);
            let _ = unblocked.send(());
            looplag_culprit_sleep();
            black_box(());
        }

        #[test]
        fn late_signal_after_a_timeout_is_ignored() {
            installed();
            let (ready, targets) = mpsc::channel();
            let (unblock_tx, unblock_rx) = mpsc::channel();
            let (unblocked_tx, unblocked_rx) = mpsc::channel();
            let worker = thread::spawn(move || {
                set_blocked(DEFAULT_STACK_SIGNAL, true);
                let _ = ready.send(ThreadTarget::current());
                caller_frame_after_late_signal(unblock_rx, unblocked_tx);
            });
            let target = targets.recv_timeout(TIMEOUT).expect("target");
            let result = capture(&target, Duration::from_millis(100));
            assert!(matches!(result, Err(StackError::Timeout)), "{result:?}");
            let ignored_before = imp::ignored_count();
            unblock_tx.send(()).expect("unblock");
            unblocked_rx.recv_timeout(TIMEOUT).expect("unblocked");
            assert!(
                imp::ignored_count() > ignored_before,
                "the late signal was not ignored"
            );
            // The slot is usable again and holds the new stack, not the stale request's.
            wait_until_sleeping(target.tid());
            let (frames, text) = capture_symbolized(&target);
            assert_culprit_above_caller(
                &frames,
                &text,
                "looplag_culprit_sleep",
                "caller_frame_after_late_signal",
            );
            worker.join().expect("worker");
        }

        #[test]
        fn stray_signals_are_ignored() {
            installed();
            let stop = Arc::new(AtomicBool::new(false));
            let (ready, targets) = mpsc::channel();
            let worker = {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let _ = ready.send(ThreadTarget::current());
                    let mut naps = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(1));
                        naps += 1;
                    }
                    naps
                })
            };
            let target = targets.recv_timeout(TIMEOUT).expect("target");
            let before = imp::ignored_count();
            for _ in 0..100 {
                // SAFETY: tgkill with this process, a live thread of it and a handled signal.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        libc::c_long::from(target.tid()),
                        libc::c_long::from(DEFAULT_STACK_SIGNAL),
                    )
                };
                assert_eq!(rc, 0);
            }
            let deadline = Instant::now() + TIMEOUT;
            while imp::ignored_count() < before + 100 {
                assert!(Instant::now() < deadline, "stray signals not all seen");
                thread::sleep(Duration::from_millis(1));
            }
            // The thread is unharmed and can still be captured.
            assert!(!capture(&target, TIMEOUT)
                .expect("capture")
                .addrs()
                .is_empty());
            stop.store(true, Ordering::Relaxed);
            assert!(worker.join().expect("worker") > 0);
        }

        #[test]
        fn handler_records_only_for_the_armed_thread_and_generation() {
            let slot = imp::Slot::leak(4096);
            let stack: Vec<u64> = (0..128u64).map(|i| 0x1111_0000 + i).collect();
            let lo = stack.as_ptr() as usize;
            let hi = lo + stack.len() * 8;
            let sp = lo + 512;
            // SAFETY: all zeroes is a valid ucontext_t for reading registers.
            let mut context: libc::ucontext_t = unsafe { std::mem::zeroed() };
            context.uc_mcontext.gregs[libc::REG_RSP as usize] = sp as i64;
            context.uc_mcontext.gregs[libc::REG_RIP as usize] = 0x1234;

            let record = |tid: i32, context: *const libc::ucontext_t| {
                // SAFETY: every context of this test is null or valid, and its rsp is either
                // outside the armed bounds or at `sp`, inside `stack`, which stays readable and
                // unwritten from 128 bytes below `sp` up to `hi`.
                unsafe { imp::record(slot, tid, context) }
            };

            assert!(!record(7, &context), "not armed");
            assert_eq!((slot.ignored(), slot.phase()), (1, 0));

            slot.arm(1, 7, (lo, hi));
            assert!(!record(8, &context), "another thread");
            assert_eq!((slot.ignored(), slot.phase()), (2, 1));
            assert!(!record(7, std::ptr::null()), "no context");

            assert!(record(7, &context));
            assert!(slot.is_done());
            let (rip, rsp, start, bytes) = slot.recorded();
            assert_eq!((rip, rsp), (0x1234, sp as u64));
            // The copy starts at the red zone (128 bytes below the stack pointer), unless that
            // would leave the stack pointer's page.
            assert_eq!(start, (sp - 128).max(sp & !4095));
            let expected: Vec<u8> = stack[(start - lo) / 8..]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            assert_eq!(bytes, expected);

            assert!(!record(7, &context), "late duplicate");
            assert!(slot.is_done());

            // A stack pointer outside the known stack records the registers only.
            slot.arm(2, 7, (lo, hi));
            context.uc_mcontext.gregs[libc::REG_RSP as usize] = (hi + 64) as i64;
            assert!(record(7, &context));
            assert!(slot.recorded().3.is_empty());
        }

        extern "C" fn foreign_handler(_signal: libc::c_int) {}

        #[test]
        fn install_refuses_to_replace_a_foreign_handler() {
            let signal = libc::SIGRTMIN() + 12;
            // SAFETY: installs a handler that does nothing for a signal no test sends.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = foreign_handler as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
            }
            let result = install(signal);
            // SAFETY: restores the default disposition.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
            match result {
                Err(error @ StackError::SignalInUse { signal: s }) if s == signal => {
                    assert!(error.to_string().contains(&signal.to_string()), "{error}");
                }
                other => panic!("expected SignalInUse, got {other:?}"),
            }
        }

        #[test]
        fn install_accepts_only_user_and_real_time_signals_and_is_idempotent() {
            for signal in [0, -1, libc::SIGKILL, libc::SIGSEGV, libc::SIGPROF, 32, 65] {
                match install(signal) {
                    Err(StackError::InvalidSignal { signal: s }) => assert_eq!(s, signal),
                    other => panic!("signal {signal}: expected InvalidSignal, got {other:?}"),
                }
            }
            let message = StackError::InvalidSignal { signal: 9 }.to_string();
            assert!(
                message.contains("SIGRTMIN..=SIGRTMAX (34..=64)"),
                "{message}"
            );
            installed();
            installed();
        }

        #[test]
        fn capturing_an_exited_thread_reports_thread_gone() {
            installed();
            let target = thread::spawn(ThreadTarget::current).join().expect("thread");
            let result = capture(&target, TIMEOUT);
            assert!(matches!(result, Err(StackError::ThreadGone)), "{result:?}");
        }

        #[test]
        fn symbolize_drops_the_signal_handler_frame() {
            let mut raw = RawStack::new();
            assert!(raw.push(imp::handler_address()));
            // A return address just after the start of the culprit.
            assert!(raw.push(looplag_culprit_sleep as *const () as usize + 1));
            let frames = symbolize(&raw);
            let text = format_stacktrace(&frames);
            assert!(position(&frames, imp::HANDLER_NAME).is_none(), "{text}");
            assert!(
                position(&frames, "looplag_culprit_sleep").is_some(),
                "{text}"
            );
        }

        #[inline(never)]
        fn looplag_culprit_in_handler() {
            let nap = libc::timespec {
                tv_sec: 0,
                tv_nsec: 300_000_000,
            };
            // SAFETY: `nap` is valid; nanosleep is async-signal-safe.
            unsafe { libc::nanosleep(&nap, std::ptr::null_mut()) };
            black_box(());
        }

        extern "C" fn sleeping_handler(_signal: libc::c_int) {
            looplag_culprit_in_handler();
            black_box(());
        }

        #[inline(never)]
        fn looplag_interrupted_spin(ready: mpsc::Sender<ThreadTarget>, stop: &AtomicBool) {
            let _ = ready.send(ThreadTarget::current());
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
            black_box(());
        }

        /// A thread stuck in its own signal handler: the stack goes through the signal
        /// trampoline back to the interrupted code, and the trampoline is dropped.
        #[test]
        fn unwinds_through_another_signal_handler() {
            installed();
            let signal = libc::SIGRTMIN() + 14;
            // SAFETY: installs a handler that only sleeps, for a signal only this test sends;
            // no SA_ONSTACK, so the signal frame is on the thread's stack.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = sleeping_handler as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (ready, targets) = mpsc::channel();
            let worker = {
                let stop = Arc::clone(&stop);
                thread::spawn(move || looplag_interrupted_spin(ready, &stop))
            };
            let target = targets.recv_timeout(TIMEOUT).expect("target");
            thread::sleep(Duration::from_millis(20));
            // SAFETY: tgkill with this process, a live thread of it and a handled signal.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::c_long::from(target.tid()),
                    libc::c_long::from(signal),
                )
            };
            assert_eq!(rc, 0);
            wait_until_sleeping(target.tid());
            let (frames, text) = capture_symbolized(&target);
            stop.store(true, Ordering::Relaxed);
            worker.join().expect("worker");
            // SAFETY: restores the default disposition once the handler has returned.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
            assert_culprit_above_caller(
                &frames,
                &text,
                "looplag_culprit_in_handler",
                "looplag_interrupted_spin",
            );
            assert!(position(&frames, "sleeping_handler").is_some(), "{text}");
            assert!(position(&frames, "__restore_rt").is_none(), "{text}");
            assert!(position(&frames, UNKNOWN_FUNCTION).is_none(), "{text}");
        }

        #[test]
        fn a_thread_can_capture_itself() {
            installed();
            let raw = capture(&ThreadTarget::current(), TIMEOUT).expect("capture");
            let frames = symbolize(&raw);
            let text = format_stacktrace(&frames);
            assert!(
                position(&frames, "a_thread_can_capture_itself").is_some(),
                "{text}"
            );
        }
    }
}

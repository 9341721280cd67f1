//! Arming a capture, the signal handler that records the stack, and installing it.

use super::unwind::{modules, unwind, Regs, StackCopy};
use super::NREGS;
#[cfg(test)]
use super::{DW_RA, DW_RSP};
use crate::stack::{RawStack, StackError};
use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Most bytes of stack the handler copies, from the interrupted stack pointer upwards.
///
/// Frames beyond it (the outermost ones: thread start, runtime loop) are cut; the innermost
/// frames, where the culprit is, are always in the copy.
pub(in crate::stack) const STACK_COPY_BYTES: usize = 512 * 1024;

/// Bytes below the stack pointer that the System V x86_64 ABI reserves for the running
/// function (the red zone): signal delivery never writes there.
const RED_ZONE: usize = 128;
/// The smallest page size on x86_64: the aligned block of this size around the stack pointer
/// is mapped.
const MIN_PAGE_SIZE: usize = 4096;

/// Part of the symbol name of [`looplag_stack_signal_handler`], to drop it from stacks.
pub(in crate::stack) const HANDLER_NAME: &str = "looplag_stack_signal_handler";

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
pub(in crate::stack) struct Slot {
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
    /// Whether the armed request wants the stack copied (a query only wants `in_runtime`).
    copy_stack: AtomicBool,
    /// What the handler found: [`IN_RUNTIME`] or [`OUTSIDE_RUNTIME`].
    in_runtime: AtomicU8,
}

/// The interrupted thread was inside a tokio runtime's scheduler (`worker_index()` was set).
const IN_RUNTIME: u8 = 1;
/// The interrupted thread was not running a tokio scheduler.
const OUTSIDE_RUNTIME: u8 = 2;

impl Slot {
    /// A new idle slot with a zeroed buffer of `buf_len` bytes, leaked: slots live forever
    /// because a late signal may still read them.
    pub(in crate::stack) fn leak(buf_len: usize) -> &'static Slot {
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
            copy_stack: AtomicBool::new(true),
            in_runtime: AtomicU8::new(0),
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
/// 6. for a query ([`in_runtime`]) only, `tokio::runtime::worker_index()`: two reads of
///    tokio's own thread-local context (a `Cell` holding the runtime-entered state and a
///    `Cell` holding the scheduler pointer), then a read of the scheduler's enum tag. tokio's
///    `CONTEXT` is a `const`-initialised thread-local whose destructor registration (the one
///    step of a thread-local's first access that may allocate) happened long before, on the
///    thread itself: [`Target::current`] reads `worker_index()` once for that reason. On a
///    thread that is tearing its thread-locals down the read fails and yields "outside";
/// 7. relaxed atomic stores of the registers and the copy's bounds, and a final `SeqCst`
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
pub(in crate::stack) unsafe fn record(
    slot: &Slot,
    tid: i32,
    context: *const libc::ucontext_t,
) -> bool {
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
    let (start, len) = if !slot.copy_stack.load(Relaxed) {
        // A query: the registers and the runtime state only.
        let in_runtime = if tokio::runtime::worker_index().is_some() {
            IN_RUNTIME
        } else {
            OUTSIDE_RUNTIME
        };
        slot.in_runtime.store(in_runtime, Relaxed);
        (sp, 0)
    } else if stack_lo <= sp && sp < stack_hi {
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
pub(in crate::stack) fn handler_address() -> libc::sighandler_t {
    looplag_stack_signal_handler as *const () as libc::sighandler_t
}

/// Whether `signal` may carry stack requests.
fn is_accepted(signal: i32) -> bool {
    signal == libc::SIGUSR1
        || signal == libc::SIGUSR2
        || (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal)
}

/// The accepted signals, for error messages.
pub(in crate::stack) fn accepted_signals() -> String {
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

pub(in crate::stack) fn install(signal: i32) -> Result<(), StackError> {
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
pub(in crate::stack) struct Target {
    tid: i32,
    stack_lo: usize,
    stack_hi: usize,
    alive: Arc<AtomicBool>,
}

impl Target {
    pub(in crate::stack) fn current() -> Target {
        // The first read of tokio's thread-local context on a thread registers its destructor,
        // which may allocate: do it here, so that the handler's read (`in_runtime`) never is
        // the first.
        let _ = tokio::runtime::worker_index();
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

    pub(in crate::stack) fn tid(&self) -> i32 {
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

/// Signals `target` with a request armed (`copy`: also copy its stack) and waits until its
/// handler has recorded. Returns with [`CAPTURE_LOCK`] held, so nothing overwrites the
/// record while the caller reads it.
fn request(
    target: &Target,
    timeout: Duration,
    copy: bool,
) -> Result<(MutexGuard<'static, u64>, &'static Slot), StackError> {
    let signal = INSTALLED_SIGNAL.load(SeqCst);
    let slot = SLOT.load(SeqCst);
    if signal == 0 || slot.is_null() {
        return Err(StackError::NotInstalled);
    }
    // SAFETY: `SLOT` is null or a pointer from `Slot::leak`, which is never freed.
    let slot: &'static Slot = unsafe { &*slot };
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
    slot.copy_stack.store(copy, SeqCst);
    slot.in_runtime.store(0, SeqCst);
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
        let _ = slot
            .state
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
            match slot
                .state
                .compare_exchange(generation | ARMED, generation | IDLE, SeqCst, SeqCst)
            {
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
    Ok((last_generation, slot))
}

pub(in crate::stack) fn capture(
    target: &Target,
    timeout: Duration,
) -> Result<RawStack, StackError> {
    let (_lock, slot) = request(target, timeout, true)?;
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

pub(in crate::stack) fn in_runtime(target: &Target, timeout: Duration) -> Result<bool, StackError> {
    let (_lock, slot) = request(target, timeout, false)?;
    Ok(slot.in_runtime.load(Relaxed) == IN_RUNTIME)
}

#[cfg(test)]
pub(in crate::stack) fn ignored_count() -> u64 {
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
    pub(in crate::stack) fn arm(&self, generation: u64, tid: i32, stack: (usize, usize)) {
        self.target_tid.store(tid, SeqCst);
        self.stack_lo.store(stack.0, SeqCst);
        self.stack_hi.store(stack.1, SeqCst);
        self.state
            .store(generation.wrapping_mul(GENERATION_STEP) | ARMED, SeqCst);
    }

    pub(in crate::stack) fn phase(&self) -> u64 {
        self.state.load(SeqCst) & PHASE_MASK
    }

    pub(in crate::stack) fn is_done(&self) -> bool {
        self.phase() == DONE
    }

    pub(in crate::stack) fn ignored(&self) -> u64 {
        self.ignored.load(SeqCst)
    }

    pub(in crate::stack) fn recorded(&self) -> (u64, u64, usize, Vec<u8>) {
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

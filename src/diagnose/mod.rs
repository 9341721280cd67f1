//! Was a stalled thread running on a CPU or blocked, and in which system call (Linux).
//!
//! The watchdog reads the stalled thread's [`CpuClock`] when the stall is detected and when it
//! ends. The CPU time the thread burnt over the wall time of the stall tells a busy loop
//! ([`StallKind::Cpu`]) from a thread that waited in the kernel ([`StallKind::Blocked`]); see
//! [`classify`]. While the stall lasts, [`blocked_syscall`] names the system call the thread
//! waits in (`futex` for a `std::sync::Mutex`, `clock_nanosleep` for `std::thread::sleep`,
//! `read`/`recvfrom`/`connect` for synchronous I/O) and [`thread_state`] gives the scheduler's
//! view (`R` running, `S` sleeping, `D` uninterruptible disk wait).
//!
//! Everything here runs on the watchdog thread: it reads `/proc` and makes system calls, and
//! must not be called from a signal handler or a hot path.
//!
//! On other platforms everything compiles and reports nothing: [`CpuClock::current`],
//! [`blocked_syscall`] and [`thread_state`] return `None` and [`current_tid`] returns 0.

// On platforms without support, the module is a stub and most of it goes unused.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

use std::time::Duration;

/// CPU time over wall time, in percent, from which a stall counts as [`StallKind::Cpu`]: 80.
pub(crate) const CPU_BOUND_PERCENT: u32 = 80;

/// CPU time over wall time, in percent, up to which a stall counts as [`StallKind::Blocked`]: 20.
pub(crate) const BLOCKED_PERCENT: u32 = 20;

/// What a stalled thread was doing, from its CPU time over the stall's wall time.
///
/// The value of the `tokio.eventloop.stall.kind` attribute (bounded: three values).
///
/// # Examples
///
/// ```
/// use looplag::StallKind;
///
/// assert_eq!(StallKind::Blocked.as_str(), "blocked");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StallKind {
    /// On a CPU, or runnable and waiting for one, at least 80% of the time: a busy loop, a
    /// big parse, a compression, a regex.
    Cpu,
    /// On a CPU at most 20% of the time: a sleep, a lock, synchronous I/O.
    Blocked,
    /// In between: both computing and waiting.
    Mixed,
}

impl StallKind {
    /// The attribute value: `"cpu"`, `"blocked"` or `"mixed"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            StallKind::Cpu => "cpu",
            StallKind::Blocked => "blocked",
            StallKind::Mixed => "mixed",
        }
    }
}

/// Classifies a stall from the CPU time the thread used during it and its wall time.
///
/// - `cpu >= 80% of wall` (80%): [`StallKind::Cpu`];
/// - `cpu <= 20% of wall` (20%): [`StallKind::Blocked`];
/// - otherwise, and for a zero `wall` (no evidence either way): [`StallKind::Mixed`].
///
/// A CPU-bound thread that waits for a CPU (more busy threads than cores) shows less CPU time
/// than wall time and would come out as `Mixed`: where [`run_delay`] is available, pass the CPU
/// time plus the run-queue delay over the stall as `cpu` (a blocked thread has next to no
/// run-queue delay, so this does not blur `Blocked`).
pub(crate) fn classify(cpu: Duration, wall: Duration) -> StallKind {
    let (cpu, wall) = (cpu.as_nanos(), wall.as_nanos());
    if wall == 0 {
        return StallKind::Mixed;
    }
    let cpu_percent = cpu.saturating_mul(100);
    if cpu_percent >= wall.saturating_mul(u128::from(CPU_BOUND_PERCENT)) {
        StallKind::Cpu
    } else if cpu_percent <= wall.saturating_mul(u128::from(BLOCKED_PERCENT)) {
        StallKind::Blocked
    } else {
        StallKind::Mixed
    }
}

/// One line of advice for a stall of this kind, for logs and span attributes.
pub(crate) fn advice(kind: StallKind) -> &'static str {
    match kind {
        StallKind::Cpu => {
            "the thread was computing: move CPU-heavy work to tokio::task::spawn_blocking or a \
             rayon pool"
        }
        StallKind::Blocked => {
            "the thread waited in a blocking call: use an async API (tokio::fs, tokio::sync, an \
             async client) or move the call to tokio::task::spawn_blocking"
        }
        StallKind::Mixed => {
            "the thread both computed and waited: use async APIs or spawn_blocking for the \
             blocking calls, and spawn_blocking or rayon for the heavy computation"
        }
    }
}

/// The CPU-time clock of one thread, readable from any thread.
///
/// Created on the thread itself with [`CpuClock::current`] (typically when a runtime worker
/// starts), then read by the watchdog with [`CpuClock::cpu_time`].
///
/// # Lifetime
///
/// `pthread_getcpuclockid` is only ever called on the calling thread, which is alive: passing
/// the `pthread_t` of a thread that has exited is undefined behaviour, and creating the clock
/// on the thread itself rules that out. The clock then names the thread by its kernel id, so
/// reading it after the thread has exited is safe and returns `None`. Drop the clock when the
/// thread exits anyway: once the kernel recycles the id for a new thread of this process, the
/// clock would read that thread's time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuClock {
    #[cfg(target_os = "linux")]
    clock: libc::clockid_t,
}

impl CpuClock {
    /// The calling thread's CPU-time clock, or `None` where unsupported.
    pub(crate) fn current() -> Option<CpuClock> {
        imp::current_clock()
    }

    /// The CPU time the thread has used since it started, or `None` if it has exited (or on
    /// platforms without per-thread CPU clocks).
    ///
    /// One system call (`clock_gettime`), about a microsecond.
    pub(crate) fn cpu_time(&self) -> Option<Duration> {
        imp::cpu_time(self)
    }
}

/// The system call that thread `tid` of this process is blocked in, or `None` when it is not in
/// one (running, or stopped outside a system call), when the number is not in the table of
/// common blocking calls, or when `/proc/self/task/<tid>/syscall` cannot be read.
///
/// The table covers x86_64 and aarch64: file and socket I/O (`read`, `write`, `pread64`,
/// `recvfrom`, `sendto`, `connect`, `accept4`...), waiting (`futex`, `clock_nanosleep`, `poll`,
/// `ppoll`, `epoll_wait`, `epoll_pwait`, `select`, `pselect6`, `wait4`...), disk (`fsync`,
/// `openat`, `statx`...) and memory (`mmap`, `munmap`, `madvise`...).
pub(crate) fn blocked_syscall(tid: i32) -> Option<&'static str> {
    imp::blocked_syscall(tid)
}

/// The scheduler state of thread `tid` of this process, from `/proc/self/task/<tid>/stat`:
/// `'R'` running or runnable, `'S'` sleeping, `'D'` uninterruptible (usually disk) wait, `'T'`
/// stopped, `'Z'` zombie... `None` when it cannot be read (the thread has exited).
pub(crate) fn thread_state(tid: i32) -> Option<char> {
    imp::thread_state(tid)
}

/// The time thread `tid` of this process has spent runnable but waiting for a CPU since it
/// started, from the second field of `/proc/self/task/<tid>/schedstat` (kernels built with
/// `CONFIG_SCHED_INFO`, which common distributions enable); `None` when unavailable.
///
/// Read it at the start and at the end of a stall, like [`CpuClock::cpu_time`]: CPU time plus
/// run-queue delay is the time the thread wanted a CPU (see [`classify`]).
pub(crate) fn run_delay(tid: i32) -> Option<Duration> {
    imp::run_delay(tid)
}

/// The calling thread's [`run_delay`], read with one `pread` of a file it keeps open: for a
/// thread that reads its own run-queue wait often (the polls of a `#[looplag::test]` body).
/// Read it on the thread that made it.
#[derive(Debug)]
pub(crate) struct OwnRunDelay {
    schedstat: Option<std::fs::File>,
}

impl OwnRunDelay {
    /// Opens the calling thread's `schedstat` (Linux); elsewhere every read is `None`.
    pub(crate) fn open() -> OwnRunDelay {
        OwnRunDelay {
            schedstat: imp::open_own_schedstat(),
        }
    }

    /// The time the thread has waited for a CPU since it started, or `None`.
    pub(crate) fn read(&self) -> Option<Duration> {
        self.schedstat.as_ref().and_then(imp::read_run_delay)
    }
}

/// The Linux thread id of the calling thread (`gettid`), or 0 on other platforms.
pub(crate) fn current_tid() -> i32 {
    imp::current_tid()
}

mod proc;
mod window;

use proc::imp;
pub(crate) use window::Diagnosis;

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn classify_uses_the_documented_thresholds() {
        let wall = MS(1000);
        assert_eq!(classify(MS(1000), wall), StallKind::Cpu);
        assert_eq!(
            classify(MS(1100), wall),
            StallKind::Cpu,
            "clock skew: cpu > wall"
        );
        assert_eq!(classify(MS(800), wall), StallKind::Cpu);
        assert_eq!(classify(MS(799), wall), StallKind::Mixed);
        assert_eq!(classify(MS(500), wall), StallKind::Mixed);
        assert_eq!(classify(MS(201), wall), StallKind::Mixed);
        assert_eq!(classify(MS(200), wall), StallKind::Blocked);
        assert_eq!(classify(Duration::ZERO, wall), StallKind::Blocked);
        assert_eq!(classify(MS(5), Duration::ZERO), StallKind::Mixed);
        assert_eq!(classify(Duration::MAX, Duration::MAX), StallKind::Cpu);
    }

    #[test]
    fn kinds_have_stable_names_and_one_line_advice() {
        assert_eq!(StallKind::Cpu.as_str(), "cpu");
        assert_eq!(StallKind::Blocked.as_str(), "blocked");
        assert_eq!(StallKind::Mixed.as_str(), "mixed");
        for kind in [StallKind::Cpu, StallKind::Blocked, StallKind::Mixed] {
            let line = advice(kind);
            assert!(
                !line.contains('\n') && line.contains("spawn_blocking"),
                "{line}"
            );
        }
        assert!(advice(StallKind::Cpu).contains("rayon"));
        assert!(advice(StallKind::Blocked).contains("async"));
    }

    #[cfg(not(target_os = "linux"))]
    #[test]
    fn other_platforms_report_nothing() {
        assert!(CpuClock::current().is_none());
        assert_eq!(current_tid(), 0);
        assert_eq!(blocked_syscall(1), None);
        assert_eq!(thread_state(1), None);
        assert_eq!(run_delay(1), None);
    }

    #[cfg(target_os = "linux")]
    mod linux {
        use super::super::imp::{
            parse_schedstat_delay, parse_stat_state, parse_syscall_file, syscall_name, SYSCALLS,
        };
        use super::*;
        use std::hint::black_box;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc, Mutex};
        use std::thread;
        use std::time::Instant;

        /// Tolerance on CPU time against wall time for a busy thread: 20%.
        const CPU_TOLERANCE_PERCENT: u128 = 20;
        /// Measurement window.
        const WINDOW: Duration = Duration::from_millis(300);
        /// Attempts for timing-sensitive checks: this machine's cores are shared with other
        /// builds, and a busy thread that gets no CPU is not what is being tested.
        const ATTEMPTS: usize = 3;

        /// A thread that reports its clock and tid, then runs `body` until told to stop.
        struct Subject {
            clock: CpuClock,
            tid: i32,
            stop: Arc<AtomicBool>,
            handle: thread::JoinHandle<()>,
        }

        fn spawn_subject(body: impl FnOnce(&AtomicBool) + Send + 'static) -> Subject {
            let stop = Arc::new(AtomicBool::new(false));
            let (ready, started) = mpsc::channel();
            let handle = {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let clock = CpuClock::current().expect("cpu clock");
                    let _ = ready.send((clock, current_tid()));
                    body(&stop);
                })
            };
            let (clock, tid) = started
                .recv_timeout(Duration::from_secs(5))
                .expect("subject");
            Subject {
                clock,
                tid,
                stop,
                handle,
            }
        }

        impl Subject {
            /// CPU time used, run-queue delay and wall time elapsed over one [`WINDOW`].
            fn measure(&self) -> (Duration, Duration, Duration) {
                let sample = || {
                    (
                        self.clock.cpu_time().expect("cpu"),
                        run_delay(self.tid).expect("run delay"),
                        Instant::now(),
                    )
                };
                let (cpu0, delay0, wall0) = sample();
                thread::sleep(WINDOW);
                let (cpu1, delay1, wall1) = sample();
                (cpu1 - cpu0, delay1 - delay0, wall1 - wall0)
            }

            /// Waits (at most 5 s) until the thread blocks in a known system call.
            fn wait_for_syscall(&self) -> &'static str {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    if let Some(name) = blocked_syscall(self.tid) {
                        return name;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "thread never blocked in a syscall"
                    );
                    thread::sleep(Duration::from_millis(2));
                }
            }

            fn finish(self) {
                self.stop.store(true, Ordering::Relaxed);
                self.handle.join().expect("subject thread");
            }
        }

        fn within_tolerance(measured: Duration, wall: Duration) -> bool {
            let gap = measured.as_nanos().abs_diff(wall.as_nanos());
            gap * 100 <= wall.as_nanos() * CPU_TOLERANCE_PERCENT
        }

        /// A busy thread uses CPU time within 20% of wall time, and is classified `Cpu`.
        ///
        /// The machine's two cores are shared with other tests and builds, so the thread may
        /// wait for a CPU. That wait is the run-queue delay: CPU time plus run-queue delay is
        /// checked in every window, and CPU time alone in a window where the thread waited less
        /// than 5% of the time (up to [`ATTEMPTS`] windows are tried).
        #[test]
        fn busy_thread_uses_cpu_time_close_to_wall_time() {
            let subject = spawn_subject(|stop| {
                let mut turns = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    turns = black_box(turns.wrapping_add(1));
                }
            });
            thread::sleep(Duration::from_millis(20));
            let mut windows = Vec::new();
            for _ in 0..ATTEMPTS {
                let (cpu, delay, wall) = subject.measure();
                windows.push((cpu, delay, wall));
                assert!(within_tolerance(cpu + delay, wall), "{windows:?}");
                assert_eq!(classify(cpu + delay, wall), StallKind::Cpu, "{windows:?}");
                // Running or runnable, and not in a system call.
                assert_eq!(thread_state(subject.tid), Some('R'));
                assert_eq!(blocked_syscall(subject.tid), None);
                if delay.as_nanos() * 100 < wall.as_nanos() * 5 {
                    assert!(within_tolerance(cpu, wall), "{windows:?}");
                    assert_eq!(classify(cpu, wall), StallKind::Cpu, "{windows:?}");
                    subject.finish();
                    return;
                }
            }
            subject.finish();
            eprintln!(
                "busy thread never had a CPU to itself; checked CPU + run-queue delay only: \
                 {windows:?}"
            );
        }

        /// Asserts that the subject is blocked in one of `syscalls` and classified `Blocked`.
        fn assert_blocked_in(subject: &Subject, syscalls: &[&str]) {
            let syscall = subject.wait_for_syscall();
            assert!(
                syscalls.contains(&syscall),
                "blocked in {syscall}, not {syscalls:?}"
            );
            assert_eq!(thread_state(subject.tid), Some('S'));
            let (cpu, delay, wall) = subject.measure();
            assert_eq!(
                classify(cpu, wall),
                StallKind::Blocked,
                "{cpu:?} of {wall:?}"
            );
            assert_eq!(classify(cpu + delay, wall), StallKind::Blocked, "{delay:?}");
            // Still in the same call after the window.
            assert_eq!(blocked_syscall(subject.tid), Some(syscall));
        }

        #[test]
        fn sleeping_thread_is_blocked_in_clock_nanosleep() {
            let subject = spawn_subject(|_| thread::sleep(Duration::from_millis(1500)));
            assert_blocked_in(&subject, &["clock_nanosleep", "nanosleep"]);
            subject.finish();
        }

        #[test]
        fn thread_waiting_for_a_held_mutex_is_blocked_in_futex() {
            let lock = Arc::new(Mutex::new(0u32));
            let guard = lock.lock().expect("lock");
            let subject = {
                let lock = Arc::clone(&lock);
                spawn_subject(move |_| {
                    let value = *lock.lock().unwrap_or_else(|e| e.into_inner());
                    black_box(value);
                })
            };
            assert_blocked_in(&subject, &["futex"]);
            drop(guard);
            subject.finish();
        }

        #[test]
        fn thread_reading_an_empty_pipe_is_blocked_in_read() {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors `pipe` writes.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let [read_end, write_end] = fds;
            let subject = spawn_subject(move |_| {
                let mut byte = 0u8;
                // SAFETY: `byte` is valid for one byte of writes; `read_end` is open until
                // the main thread closes it after joining.
                let n = unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) };
                assert_eq!(n, 1);
            });
            assert_blocked_in(&subject, &["read"]);
            // SAFETY: writes one byte from a valid buffer to the pipe's write end.
            let written = unsafe { libc::write(write_end, b"x".as_ptr().cast(), 1) };
            assert_eq!(written, 1);
            subject.finish();
            for fd in [read_end, write_end] {
                // SAFETY: both descriptors are open, and each is closed once.
                unsafe { libc::close(fd) };
            }
        }

        #[test]
        fn cpu_clock_of_an_exited_thread_reads_none() {
            let clock = thread::spawn(|| CpuClock::current().expect("clock"))
                .join()
                .expect("thread");
            assert_eq!(clock.cpu_time(), None);
            let own = CpuClock::current().expect("own clock");
            assert!(own.cpu_time().is_some());
        }

        #[test]
        fn current_tid_is_the_kernel_thread_id() {
            let link = std::fs::read_link("/proc/thread-self").expect("thread-self");
            let tid: i32 = link
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.parse().ok())
                .expect("tid in /proc/thread-self");
            assert_eq!(current_tid(), tid);
            // SAFETY: getpid cannot fail.
            let pid = unsafe { libc::getpid() };
            assert_eq!(
                thread::spawn(current_tid).join().ok().map(|t| t != pid),
                Some(true)
            );
            assert_eq!(thread_state(current_tid()), Some('R'));
            assert_eq!(thread_state(i32::MAX), None);
            assert_eq!(blocked_syscall(i32::MAX), None);
            assert_eq!(run_delay(i32::MAX), None);
            assert!(run_delay(current_tid()).is_some());
        }

        #[test]
        fn parses_proc_files() {
            assert_eq!(parse_syscall_file("running\n"), None);
            assert_eq!(parse_syscall_file("-1 0x7ffd 0x7f00\n"), None);
            assert_eq!(parse_syscall_file(""), None);
            assert_eq!(parse_syscall_file("99999 0x0 0x0\n"), None);
            let futex = format!(
                "{} 0x1 0x2 0x3 0x4 0x5 0x6 0x7ffd 0x7f00\n",
                libc::SYS_futex
            );
            assert_eq!(parse_syscall_file(&futex), Some("futex"));
            assert_eq!(parse_stat_state("42 (a (weird) name) S 1 2 3"), Some('S'));
            assert_eq!(parse_stat_state("42 (tokio-runtime-w) R 1"), Some('R'));
            assert_eq!(parse_stat_state("garbage"), None);
            let schedstat = "268359711 259686873 62\n";
            assert_eq!(
                parse_schedstat_delay(schedstat),
                Some(Duration::from_nanos(259686873))
            );
            assert_eq!(parse_schedstat_delay("1\n"), None);
        }

        #[test]
        fn syscall_table_is_sorted_and_matches_libc() {
            assert!(
                SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0),
                "sorted, unique"
            );
            #[cfg(target_arch = "x86_64")]
            let expected: &[(libc::c_long, &str)] = &[
                (libc::SYS_read, "read"),
                (libc::SYS_write, "write"),
                (libc::SYS_open, "open"),
                (libc::SYS_poll, "poll"),
                (libc::SYS_select, "select"),
                (libc::SYS_nanosleep, "nanosleep"),
                (libc::SYS_connect, "connect"),
                (libc::SYS_accept, "accept"),
                (libc::SYS_sendto, "sendto"),
                (libc::SYS_recvfrom, "recvfrom"),
                (libc::SYS_wait4, "wait4"),
                (libc::SYS_fsync, "fsync"),
                (libc::SYS_futex, "futex"),
                (libc::SYS_clock_nanosleep, "clock_nanosleep"),
                (libc::SYS_epoll_wait, "epoll_wait"),
                (libc::SYS_openat, "openat"),
                (libc::SYS_pselect6, "pselect6"),
                (libc::SYS_ppoll, "ppoll"),
                (libc::SYS_epoll_pwait, "epoll_pwait"),
                (libc::SYS_accept4, "accept4"),
                (libc::SYS_statx, "statx"),
                (libc::SYS_io_uring_enter, "io_uring_enter"),
                (libc::SYS_epoll_pwait2, "epoll_pwait2"),
                (libc::SYS_futex_waitv, "futex_waitv"),
            ];
            #[cfg(target_arch = "aarch64")]
            let expected: &[(libc::c_long, &str)] = &[
                (libc::SYS_read, "read"),
                (libc::SYS_write, "write"),
                (libc::SYS_nanosleep, "nanosleep"),
                (libc::SYS_connect, "connect"),
                (libc::SYS_accept, "accept"),
                (libc::SYS_sendto, "sendto"),
                (libc::SYS_recvfrom, "recvfrom"),
                (libc::SYS_wait4, "wait4"),
                (libc::SYS_fsync, "fsync"),
                (libc::SYS_futex, "futex"),
                (libc::SYS_clock_nanosleep, "clock_nanosleep"),
                (libc::SYS_openat, "openat"),
                (libc::SYS_pselect6, "pselect6"),
                (libc::SYS_ppoll, "ppoll"),
                (libc::SYS_epoll_pwait, "epoll_pwait"),
                (libc::SYS_accept4, "accept4"),
            ];
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            let expected: &[(libc::c_long, &str)] = &[];
            for &(number, name) in expected {
                // `c_long` is `i64` on the 64-bit targets above, `i32` elsewhere.
                #[allow(clippy::useless_conversion)]
                let number = i64::from(number);
                assert_eq!(syscall_name(number), Some(name), "{name}");
            }
            assert_eq!(syscall_name(-1), None);
            assert_eq!(syscall_name(100_000), None);
        }
    }
}

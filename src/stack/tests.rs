use super::*;

#[test]
fn format_stacktrace_prints_one_numbered_frame_per_line() {
    let frames = [
        StackFrame {
            function: "clock_nanosleep".to_owned(),
            file: None,
            line: None,
            address: 0x7f00_0000_1000,
        },
        StackFrame {
            function: "app::handler".to_owned(),
            file: Some("src/main.rs".to_owned()),
            line: Some(42),
            address: 0x5500_0000_2000,
        },
        StackFrame {
            function: "app::other".to_owned(),
            file: Some("src/other.rs".to_owned()),
            line: None,
            address: 0x5500_0000_3000,
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
    fn position(frames: &[StackFrame], needle: &str) -> Option<usize> {
        frames.iter().position(|f| f.function.contains(needle))
    }

    /// The scheduler state letter of thread `tid` (`R`, `S`, `D`...).
    fn state_of(tid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    /// Sends `signal` to thread `tid` of this process.
    fn send_signal(tid: i32, signal: i32) {
        // SAFETY: tgkill with this process, a live thread of it and a handled signal.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::c_long::from(tid),
                libc::c_long::from(signal),
            )
        };
        assert_eq!(rc, 0, "tgkill({tid}, {signal})");
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

    fn capture_symbolized(target: &ThreadTarget) -> (Vec<StackFrame>, String) {
        let raw = capture(target, TIMEOUT).expect("capture");
        let frames = symbolize(&raw);
        let text = format_stacktrace(&frames);
        (frames, text)
    }

    /// Asserts that `culprit` is named, and above (closer to the top than) `caller`.
    fn assert_culprit_above_caller(frames: &[StackFrame], text: &str, culprit: &str, caller: &str) {
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
                .is_some_and(|f| f.ends_with("stack/tests.rs")));
            assert!(culprit.line.is_some());
        }
        // The interrupted sleep still lasts its full 300 ms (std retries after EINTR).
        let slept = worker.join().expect("worker");
        assert!(slept >= Duration::from_millis(300), "slept {slept:?}");
    }

    /// The query tells a thread blocked inside a current-thread runtime's `block_on` (in a
    /// task, then in the `block_on` future itself) from the same thread blocked after
    /// `block_on` returned, and copies no stack.
    #[test]
    fn in_runtime_tells_a_thread_inside_block_on_from_one_outside() {
        installed();
        let (ready, targets) = mpsc::channel();
        let (step, steps) = mpsc::channel::<&str>();
        let worker = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let _ = ready.send(ThreadTarget::current());
            let in_task = step.clone();
            runtime.block_on(async {
                tokio::spawn(async move {
                    let _ = in_task.send("in a task");
                    thread::sleep(Duration::from_millis(300));
                })
                .await
                .expect("task");
                let _ = step.send("in block_on's future");
                thread::sleep(Duration::from_millis(300));
            });
            let _ = step.send("after block_on");
            thread::sleep(Duration::from_millis(300));
        });
        let target = targets.recv_timeout(TIMEOUT).expect("target");
        for (expected, inside) in [
            ("in a task", true),
            ("in block_on's future", true),
            ("after block_on", false),
        ] {
            assert_eq!(steps.recv_timeout(TIMEOUT).expect("step"), expected);
            wait_until_sleeping(target.tid());
            assert_eq!(
                in_runtime(&target, TIMEOUT).expect("query"),
                inside,
                "{expected}"
            );
        }
        worker.join().expect("worker");
        assert!(matches!(
            in_runtime(&target, TIMEOUT),
            Err(StackError::ThreadGone)
        ));
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
        assert_culprit_above_caller(&frames, &text, "looplag_culprit_lock", "caller_frame_lock");
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
                        frame.function != UNKNOWN_FUNCTION || in_ranges(&executable, frame.address),
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
    fn caller_frame_after_late_signal(unblock: mpsc::Receiver<()>, unblocked: mpsc::Sender<()>) {
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
            send_signal(target.tid(), DEFAULT_STACK_SIGNAL);
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
        send_signal(target.tid(), signal);
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

    #[inline(never)]
    fn looplag_symtab_probe() -> u64 {
        black_box(7)
    }

    #[test]
    fn the_symbol_table_names_a_function_in_full() {
        let addr = looplag_symtab_probe as *const () as usize;
        let started = Instant::now();
        let name = imp::full_name(addr, "looplag_symtab_probe");
        let cold = started.elapsed();
        assert_eq!(
            name.as_deref(),
            Some("looplag::stack::tests::linux::looplag_symtab_probe")
        );
        let started = Instant::now();
        let again = imp::full_name(addr, "looplag_symtab_probe");
        let warm = started.elapsed();
        assert_eq!(again, name);
        // A short name that is not the symbol's: the debug info's name is kept.
        assert_eq!(imp::full_name(addr, "something_else"), None);
        println!("symbol table: first lookup (reads .symtab) {cold:?}, then {warm:?}");
        black_box(looplag_symtab_probe());
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

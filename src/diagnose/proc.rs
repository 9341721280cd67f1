//! The platform side of the diagnosis: `/proc/self/task` readers, per-thread CPU clocks and
//! the table of blocking system calls on Linux; stubs that report nothing elsewhere.

use super::CpuClock;

#[cfg(target_os = "linux")]
pub(super) mod imp {
    //! The Linux implementation, from `/proc/self/task` and per-thread CPU clocks.

    use super::CpuClock;
    use std::time::Duration;

    pub(in crate::diagnose) fn current_clock() -> Option<CpuClock> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `pthread_self` has no precondition and cannot fail.
        let this_thread = unsafe { libc::pthread_self() };
        // SAFETY: `this_thread` is the calling thread, alive during the call (see the lifetime
        // rule on `CpuClock`); `clock` is valid for writes.
        let rc = unsafe { libc::pthread_getcpuclockid(this_thread, &mut clock) };
        (rc == 0).then_some(CpuClock { clock })
    }

    pub(in crate::diagnose) fn cpu_time(clock: &CpuClock) -> Option<Duration> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is valid for writes. Any clock id is accepted: the kernel returns EINVAL
        // for a thread that no longer exists.
        if unsafe { libc::clock_gettime(clock.clock, &mut now) } != 0 {
            return None;
        }
        Some(Duration::new(
            u64::try_from(now.tv_sec).ok()?,
            u32::try_from(now.tv_nsec).ok()?,
        ))
    }

    pub(in crate::diagnose) fn current_tid() -> i32 {
        // SAFETY: `SYS_gettid` takes no argument and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        i32::try_from(tid).unwrap_or(0)
    }

    pub(in crate::diagnose) fn blocked_syscall(tid: i32) -> Option<&'static str> {
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
        parse_syscall_file(&text)
    }

    pub(in crate::diagnose) fn thread_state(tid: i32) -> Option<char> {
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        parse_stat_state(&text)
    }

    pub(in crate::diagnose) fn run_delay(tid: i32) -> Option<Duration> {
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        parse_schedstat_delay(&text)
    }

    /// The calling thread's `schedstat`, kept open: each read is one `pread`.
    pub(in crate::diagnose) fn open_own_schedstat() -> Option<std::fs::File> {
        std::fs::File::open("/proc/thread-self/schedstat").ok()
    }

    pub(in crate::diagnose) fn read_run_delay(file: &std::fs::File) -> Option<Duration> {
        use std::os::unix::fs::FileExt;
        let mut buffer = [0u8; 96];
        let read = file.read_at(&mut buffer, 0).ok()?;
        parse_schedstat_delay(std::str::from_utf8(buffer.get(..read)?).ok()?)
    }

    /// Reads `/proc/<pid>/task/<tid>/schedstat`: `<on-cpu ns> <run-queue ns> <timeslices>`.
    pub(in crate::diagnose) fn parse_schedstat_delay(text: &str) -> Option<Duration> {
        let nanos: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
        Some(Duration::from_nanos(nanos))
    }

    /// Reads `/proc/<pid>/task/<tid>/syscall`: `running`, `-1 <sp> <pc>` (blocked outside a
    /// system call) or `<number> <args...> <sp> <pc>`.
    pub(in crate::diagnose) fn parse_syscall_file(text: &str) -> Option<&'static str> {
        let number: i64 = text.split_whitespace().next()?.parse().ok()?;
        if number < 0 {
            return None;
        }
        syscall_name(number)
    }

    /// Reads the state letter of `/proc/<pid>/task/<tid>/stat`: `<tid> (<comm>) <state> ...`.
    /// The command name may hold spaces and parentheses, so the state follows the last `)`.
    pub(in crate::diagnose) fn parse_stat_state(text: &str) -> Option<char> {
        text.rsplit_once(')')?.1.trim_start().chars().next()
    }

    /// The name of system call `number` on this architecture, if it is in [`SYSCALLS`].
    pub(in crate::diagnose) fn syscall_name(number: i64) -> Option<&'static str> {
        let index = SYSCALLS.binary_search_by_key(&number, |&(n, _)| n).ok()?;
        SYSCALLS.get(index).map(|&(_, name)| name)
    }

    /// Common blocking system calls, sorted by number: x86_64 numbers, from the kernel's
    /// `asm/unistd_64.h`.
    #[cfg(target_arch = "x86_64")]
    pub(in crate::diagnose) const SYSCALLS: &[(i64, &str)] = &[
        (0, "read"),
        (1, "write"),
        (2, "open"),
        (3, "close"),
        (4, "stat"),
        (5, "fstat"),
        (6, "lstat"),
        (7, "poll"),
        (8, "lseek"),
        (9, "mmap"),
        (10, "mprotect"),
        (11, "munmap"),
        (12, "brk"),
        (16, "ioctl"),
        (17, "pread64"),
        (18, "pwrite64"),
        (19, "readv"),
        (20, "writev"),
        (21, "access"),
        (23, "select"),
        (24, "sched_yield"),
        (25, "mremap"),
        (26, "msync"),
        (28, "madvise"),
        (34, "pause"),
        (35, "nanosleep"),
        (40, "sendfile"),
        (42, "connect"),
        (43, "accept"),
        (44, "sendto"),
        (45, "recvfrom"),
        (46, "sendmsg"),
        (47, "recvmsg"),
        (48, "shutdown"),
        (56, "clone"),
        (57, "fork"),
        (58, "vfork"),
        (59, "execve"),
        (61, "wait4"),
        (65, "semop"),
        (69, "msgsnd"),
        (70, "msgrcv"),
        (72, "fcntl"),
        (73, "flock"),
        (74, "fsync"),
        (75, "fdatasync"),
        (76, "truncate"),
        (77, "ftruncate"),
        (82, "rename"),
        (83, "mkdir"),
        (84, "rmdir"),
        (85, "creat"),
        (86, "link"),
        (87, "unlink"),
        (88, "symlink"),
        (89, "readlink"),
        (90, "chmod"),
        (91, "fchmod"),
        (92, "chown"),
        (93, "fchown"),
        (128, "rt_sigtimedwait"),
        (130, "rt_sigsuspend"),
        (149, "mlock"),
        (162, "sync"),
        (165, "mount"),
        (166, "umount2"),
        (202, "futex"),
        (208, "io_getevents"),
        (217, "getdents64"),
        (220, "semtimedop"),
        (230, "clock_nanosleep"),
        (232, "epoll_wait"),
        (242, "mq_timedsend"),
        (243, "mq_timedreceive"),
        (247, "waitid"),
        (257, "openat"),
        (258, "mkdirat"),
        (260, "fchownat"),
        (262, "newfstatat"),
        (263, "unlinkat"),
        (264, "renameat"),
        (265, "linkat"),
        (266, "symlinkat"),
        (267, "readlinkat"),
        (268, "fchmodat"),
        (269, "faccessat"),
        (270, "pselect6"),
        (271, "ppoll"),
        (275, "splice"),
        (276, "tee"),
        (277, "sync_file_range"),
        (278, "vmsplice"),
        (280, "utimensat"),
        (281, "epoll_pwait"),
        (285, "fallocate"),
        (288, "accept4"),
        (295, "preadv"),
        (296, "pwritev"),
        (299, "recvmmsg"),
        (306, "syncfs"),
        (307, "sendmmsg"),
        (316, "renameat2"),
        (318, "getrandom"),
        (322, "execveat"),
        (326, "copy_file_range"),
        (327, "preadv2"),
        (328, "pwritev2"),
        (332, "statx"),
        (333, "io_pgetevents"),
        (426, "io_uring_enter"),
        (435, "clone3"),
        (436, "close_range"),
        (437, "openat2"),
        (439, "faccessat2"),
        (441, "epoll_pwait2"),
        (449, "futex_waitv"),
    ];

    /// Common blocking system calls, sorted by number: aarch64 numbers, from the kernel's
    /// `asm-generic/unistd.h` (64-bit). aarch64 has no `open`, `poll`, `select`, `epoll_wait`
    /// and the like: libc uses `openat`, `ppoll`, `pselect6`, `epoll_pwait`.
    #[cfg(target_arch = "aarch64")]
    pub(in crate::diagnose) const SYSCALLS: &[(i64, &str)] = &[
        (4, "io_getevents"),
        (22, "epoll_pwait"),
        (25, "fcntl"),
        (29, "ioctl"),
        (32, "flock"),
        (34, "mkdirat"),
        (35, "unlinkat"),
        (36, "symlinkat"),
        (37, "linkat"),
        (38, "renameat"),
        (39, "umount2"),
        (40, "mount"),
        (45, "truncate"),
        (46, "ftruncate"),
        (47, "fallocate"),
        (48, "faccessat"),
        (52, "fchmod"),
        (53, "fchmodat"),
        (54, "fchownat"),
        (55, "fchown"),
        (56, "openat"),
        (57, "close"),
        (61, "getdents64"),
        (62, "lseek"),
        (63, "read"),
        (64, "write"),
        (65, "readv"),
        (66, "writev"),
        (67, "pread64"),
        (68, "pwrite64"),
        (69, "preadv"),
        (70, "pwritev"),
        (71, "sendfile"),
        (72, "pselect6"),
        (73, "ppoll"),
        (75, "vmsplice"),
        (76, "splice"),
        (77, "tee"),
        (78, "readlinkat"),
        (79, "newfstatat"),
        (80, "fstat"),
        (81, "sync"),
        (82, "fsync"),
        (83, "fdatasync"),
        (84, "sync_file_range"),
        (88, "utimensat"),
        (95, "waitid"),
        (98, "futex"),
        (101, "nanosleep"),
        (115, "clock_nanosleep"),
        (124, "sched_yield"),
        (133, "rt_sigsuspend"),
        (137, "rt_sigtimedwait"),
        (182, "mq_timedsend"),
        (183, "mq_timedreceive"),
        (188, "msgrcv"),
        (189, "msgsnd"),
        (192, "semtimedop"),
        (193, "semop"),
        (202, "accept"),
        (203, "connect"),
        (206, "sendto"),
        (207, "recvfrom"),
        (210, "shutdown"),
        (211, "sendmsg"),
        (212, "recvmsg"),
        (214, "brk"),
        (215, "munmap"),
        (216, "mremap"),
        (220, "clone"),
        (221, "execve"),
        (222, "mmap"),
        (226, "mprotect"),
        (227, "msync"),
        (228, "mlock"),
        (233, "madvise"),
        (242, "accept4"),
        (243, "recvmmsg"),
        (260, "wait4"),
        (267, "syncfs"),
        (269, "sendmmsg"),
        (276, "renameat2"),
        (278, "getrandom"),
        (281, "execveat"),
        (285, "copy_file_range"),
        (286, "preadv2"),
        (287, "pwritev2"),
        (291, "statx"),
        (292, "io_pgetevents"),
        (426, "io_uring_enter"),
        (435, "clone3"),
        (436, "close_range"),
        (437, "openat2"),
        (439, "faccessat2"),
        (441, "epoll_pwait2"),
        (449, "futex_waitv"),
    ];

    /// Other architectures: no table yet, so no names.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub(in crate::diagnose) const SYSCALLS: &[(i64, &str)] = &[];
}

#[cfg(not(target_os = "linux"))]
pub(super) mod imp {
    //! Other platforms: nothing to report.

    use super::CpuClock;
    use std::time::Duration;

    pub(in crate::diagnose) fn current_clock() -> Option<CpuClock> {
        None
    }

    pub(in crate::diagnose) fn cpu_time(_clock: &CpuClock) -> Option<Duration> {
        None
    }

    pub(in crate::diagnose) fn current_tid() -> i32 {
        0
    }

    pub(in crate::diagnose) fn blocked_syscall(_tid: i32) -> Option<&'static str> {
        None
    }

    pub(in crate::diagnose) fn thread_state(_tid: i32) -> Option<char> {
        None
    }

    pub(in crate::diagnose) fn open_own_schedstat() -> Option<std::fs::File> {
        None
    }

    pub(in crate::diagnose) fn read_run_delay(_file: &std::fs::File) -> Option<Duration> {
        None
    }

    pub(in crate::diagnose) fn run_delay(_tid: i32) -> Option<Duration> {
        None
    }
}

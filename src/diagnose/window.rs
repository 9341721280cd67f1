//! One stall's diagnosis over its life: what is read when it is detected, and the kind and
//! CPU time worked out when it ends.

use std::time::Duration;

use super::{blocked_syscall, classify, run_delay, thread_state, StallKind};
use crate::clock;

/// What the watchdog learned about the blocked thread's activity.
#[derive(Debug, Clone, Default)]
pub(crate) struct Diagnosis {
    /// The thread's CPU time and the raw clock when the watchdog first saw this poll busy
    /// (from a tick before detection): the start of the observed window.
    window: Option<(Duration, u64)>,
    /// Time the thread had spent waiting for a CPU (run queue) and the raw clock, at
    /// detection.
    run_delay: Option<(Duration, u64)>,
    pub(crate) kind: Option<StallKind>,
    pub(crate) cpu_time: Option<Duration>,
    pub(crate) syscall: Option<&'static str>,
    /// How long the thread waited for a CPU (run queue) during the stall: the share of the
    /// time from detection to the end spent waiting, applied to the whole stall (Linux;
    /// known once the stall ended).
    pub(crate) run_queue_wait: Option<Duration>,
}

impl Diagnosis {
    /// Reads thread `tid` just found stalled at raw time `now`: its system call, its run
    /// queue delay, and, when the watchdog saw the same poll busy at an earlier tick
    /// (`window`: CPU time and raw time then), the CPU share since then. `cpu_now` is the
    /// thread's CPU time now.
    pub(crate) fn at_detection(
        tid: i32,
        window: Option<(Duration, u64)>,
        cpu_now: Option<Duration>,
        now: u64,
    ) -> Self {
        // Everything about the thread's state first: the stack signal, sent after this,
        // interrupts its system call and briefly runs it.
        let syscall = match thread_state(tid) {
            Some('R') | None => None,
            Some(_) => blocked_syscall(tid),
        };
        let run_delay = run_delay(tid).map(|delay| (delay, clock::raw()));
        let (kind, cpu_time) = match (window, cpu_now) {
            (Some((cpu0, at)), Some(cpu)) if clock::delta(at, now) > Duration::ZERO => {
                let wall = clock::delta(at, now);
                let used = cpu.saturating_sub(cpu0).min(wall);
                (Some(classify(used, wall)), Some(used))
            }
            _ => (None, None),
        };
        Diagnosis {
            window,
            run_delay,
            kind,
            cpu_time,
            syscall,
            run_queue_wait: None,
        }
    }

    /// The stall of `duration` ended at raw time `end`: its kind and CPU time from the share
    /// of the observed window the thread spent on a CPU (`end_cpu`: its CPU time at the end)
    /// or waiting for one, applied to the whole stall (neither changes without a window);
    /// and the run-queue wait during the stall.
    pub(crate) fn at_end(
        &mut self,
        tid: Option<i32>,
        duration: Duration,
        end: u64,
        end_cpu: Option<Duration>,
    ) {
        // Time spent runnable but waiting for a CPU counts as CPU-bound: on a busy machine
        // a spinning thread is not always on a core. Only the wait before the stall's end
        // counts: the thread may have queued for a CPU again between the end and now (up to
        // `now - end`), running the next polls, which is not this stall's; counting it made
        // a sleeping thread look `mixed` on a loaded machine.
        let waiting_share = self.run_delay.and_then(|(delay0, at0)| {
            let now = clock::raw();
            let delay = run_delay(tid?)?
                .saturating_sub(delay0)
                .saturating_sub(clock::delta(end, now));
            let span = clock::delta(at0, end);
            (span > Duration::ZERO).then(|| (delay.as_secs_f64() / span.as_secs_f64()).min(1.0))
        });
        self.run_queue_wait = waiting_share.map(|share| duration.mul_f64(share));
        let Some((cpu0, at)) = self.window else {
            return;
        };
        let wall = clock::delta(at, end);
        let Some(cpu_end) = end_cpu.filter(|_| wall > Duration::ZERO) else {
            return;
        };
        let used = cpu_end.saturating_sub(cpu0).min(wall);
        let share = (used.as_secs_f64() / wall.as_secs_f64()).clamp(0.0, 1.0);
        let busy_share = (share + waiting_share.unwrap_or(0.0)).clamp(0.0, 1.0);
        self.cpu_time = Some(duration.mul_f64(share));
        self.kind = Some(classify(duration.mul_f64(busy_share), duration));
    }
}

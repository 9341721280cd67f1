//! Tests that fail when their code blocks the runtime: what `#[looplag::test]` runs its
//! function on ([`__private::Test`]), and the function form for a runtime the test builds
//! itself ([`assert_no_stalls`]).
//!
//! Each test gets its own instance, runtime and watchdog, never the process's global one:
//! under `cargo test` many tests run at once in one process, and one test's stalls are only
//! ever reported to that test.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::env::parse_duration;
use crate::config::Builder;
use crate::diagnose;
use crate::instance::{LoopLag, Watchdog};
use crate::report::{StallReport, StallState};

/// The stall threshold of `#[looplag::test]` and [`assert_no_stalls`] when neither the
/// attribute's `stall_threshold` nor `LOOPLAG_TEST_STALL_THRESHOLD` sets one: 50 ms.
///
/// Measured on a 2-core machine running two CPU hogs (`yes > /dev/null`, twice) with
/// `scripts/clean_tests_under_load.sh`: 200 clean tests passed in every run, while with a
/// 10 ms threshold the same tests saw false stalls of 20 to 44 ms (estimated polls, outside
/// any span; the time waiting for a CPU, [`StallReport::run_queue_wait`], already taken
/// off); and a 100 ms `std::thread::sleep` outside any span was reported as 60 to 95 ms, so
/// it still fails every time (README, "Testing for blocking code").
pub const DEFAULT_TEST_STALL_THRESHOLD: Duration = Duration::from_millis(50);

/// The variable that sets the threshold for a whole test suite, e.g. `200ms`.
pub const TEST_STALL_THRESHOLD_VARIABLE: &str = "LOOPLAG_TEST_STALL_THRESHOLD";

/// The stall reports of one test's runtime, and the threshold they are judged by.
#[derive(Debug)]
struct Judge {
    threshold: Duration,
    /// Whether the threshold came from the attribute, the variable or the default, for the
    /// advice line.
    source: &'static str,
    ended: Arc<Mutex<Vec<StallReport>>>,
    /// Polls of the watched future that took the threshold or longer, as measured around
    /// each poll (see [`Watched`]); those the watchdog also reported are left out.
    long_polls: Arc<Mutex<Vec<LongPoll>>>,
}

/// A poll of the future `block_on` runs that took at least the threshold, measured by the
/// poll's caller: the watchdog finds such a poll while it blocks, unless the machine is so
/// busy that the watchdog thread gets no CPU during it.
#[derive(Clone, Debug)]
struct LongPoll {
    started_at: SystemTime,
    duration: Duration,
    /// Time the thread spent runnable but waiting for a CPU during the poll (Linux).
    run_queue_wait: Option<Duration>,
    tid: i64,
    thread_name: String,
}

impl LongPoll {
    /// Whether `report` is a stall of this poll: same thread, overlapping in time (with a
    /// sample interval's slack either side).
    fn reported_by(&self, report: &StallReport) -> bool {
        let slack = Duration::from_millis(20);
        let end = self.started_at + self.duration + slack;
        let report_end = report.started_at + report.duration + slack;
        report.thread_id == Some(self.tid)
            && report.started_at < end
            && self.started_at < report_end
    }

    fn own_time(&self) -> Duration {
        self.duration
            .saturating_sub(self.run_queue_wait.unwrap_or_default())
    }
}

impl Judge {
    fn new(explicit: Option<Duration>) -> Judge {
        let (threshold, source) = match explicit {
            Some(threshold) => (threshold, "set by the test"),
            None => match std::env::var(TEST_STALL_THRESHOLD_VARIABLE) {
                Ok(text) => match parse_duration(text.trim()) {
                    Some(threshold) => (threshold, "set by LOOPLAG_TEST_STALL_THRESHOLD"),
                    None => panic!(
                        "looplag: {TEST_STALL_THRESHOLD_VARIABLE}={text:?} is not a duration; \
                         write a whole number and a unit, us, ms or s, e.g. 200ms"
                    ),
                },
                Err(_) => (DEFAULT_TEST_STALL_THRESHOLD, "the default"),
            },
        };
        Judge {
            threshold,
            source,
            ended: Arc::default(),
            long_polls: Arc::default(),
        }
    }

    /// The instance for a runtime named `name`, reporting its ended stalls here.
    fn looplag(&self, name: &str) -> LoopLag {
        let ended = Arc::clone(&self.ended);
        let name: String = name.chars().take(128).collect();
        let built = Builder::default()
            .runtime_name(if name.is_empty() { "test".into() } else { name })
            .stall_threshold(self.threshold)
            // looplag's own frames (the test's `block_on`) are never the culprit, also when
            // looplag is a path dependency whose files look like the application's.
            .library_prefixes(["looplag"])
            .on_stall(move |report| {
                if report.state == StallState::Ended {
                    if let Ok(mut ended) = ended.lock() {
                        ended.push(report.clone());
                    }
                }
            })
            .build();
        match built {
            Ok(looplag) => looplag,
            Err(err) => panic!("looplag: the test's settings: {err}"),
        }
    }

    /// Panics with every stall that counts; notes on stderr those a busy machine caused.
    /// `location` names the code a long poll the watchdog did not see is blamed on.
    #[track_caller]
    fn verdict(&self, location: &Blame) {
        let ended = match self.ended.lock() {
            Ok(mut ended) => std::mem::take(&mut *ended),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        let long_polls = match self.long_polls.lock() {
            Ok(mut polls) => std::mem::take(&mut *polls),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        let unseen: Vec<LongPoll> = long_polls
            .into_iter()
            .filter(|poll| !ended.iter().any(|report| poll.reported_by(report)))
            .filter(|poll| poll.own_time() >= self.threshold)
            .collect();
        let mut failures = Vec::new();
        for report in ended {
            let waited = report.run_queue_wait.unwrap_or_default();
            if report.thread_id.is_none() {
                // Estimated from tokio's metrics alone, on no known thread: nothing says
                // whether the worker ran the test's code or waited for a CPU (a loaded
                // machine made a clean multi-thread test look blocked for 150 ms this way).
                eprintln!(
                    "looplag: not counted: a {:.1} ms stall on an unidentified worker thread \
                     (no stack, no way to tell a blocking poll from a busy machine)",
                    ms(report.duration)
                );
            } else if report.duration.saturating_sub(waited) >= self.threshold {
                failures.push(report);
            } else {
                eprintln!(
                    "looplag: not counted: a {:.1} ms stall, {:.1} ms of it waiting for a CPU \
                     (a busy machine, not the test's code)",
                    ms(report.duration),
                    ms(waited)
                );
            }
        }
        if failures.is_empty() && unseen.is_empty() {
            return;
        }
        panic!("{}", self.message(&failures, &unseen, location));
    }

    fn message(&self, failures: &[StallReport], unseen: &[LongPoll], location: &Blame) -> String {
        let mut message = format!(
            "looplag: this test blocked its tokio runtime {} time(s) for longer than {:.0} ms:",
            failures.len() + unseen.len(),
            ms(self.threshold)
        );
        for poll in unseen {
            message.push_str(&format!(
                "\n\nblocked in {location}: one poll of it took {:.1} ms on thread `{}` (tid {}), \
                 found when the poll returned (the watchdog got no CPU while it blocked, so \
                 there is no stack: look for a blocking call in this function)",
                ms(poll.duration),
                poll.thread_name,
                poll.tid
            ));
            if let Some(waited) = poll.run_queue_wait.filter(|w| !w.is_zero()) {
                message.push_str(&format!(
                    "\n    ({:.1} ms of it waiting for a CPU, not counted)",
                    ms(waited)
                ));
            }
        }
        for report in failures {
            message.push_str(&format!("\n\n{report}"));
            if let Some(waited) = report.run_queue_wait.filter(|w| !w.is_zero()) {
                message.push_str(&format!(
                    "\n    ({:.1} ms of it waiting for a CPU, not counted)",
                    ms(waited)
                ));
            }
            if !report.exact {
                message.push_str(
                    "\n    (estimated: the poll ran outside any span, so its start and end are \
                     known to within a sample interval, 10 ms)",
                );
            }
            if report.culprit.frame().is_none() {
                message.push_str(&format!("\n    {}", no_culprit_note(report)));
            }
        }
        message.push_str(&format!(
            "\n\nThe threshold is {:.0} ms ({}); change it with \
             #[looplag::test(stall_threshold = \"200ms\")] or, for the whole suite, \
             LOOPLAG_TEST_STALL_THRESHOLD=200ms.",
            ms(self.threshold),
            self.source
        ));
        message
    }
}

/// Why a failure names no application frame.
fn no_culprit_note(report: &StallReport) -> &'static str {
    use crate::report::StackCapture;
    match report.stack {
        StackCapture::Unsupported => {
            "(no stack: looplag takes stacks on Linux x86_64 only; here a test fails without \
             naming the function, and a current-thread test sees only polls inside a span)"
        }
        StackCapture::Symbolizing => {
            "(the stack was still being symbolized when the test ended; the frames are lost)"
        }
        StackCapture::UnknownThread => "(no stack: the blocked thread is not known)",
        _ => "(no application frame in the stack)",
    }
}

/// The code a long poll the watchdog did not see is blamed on: without a stack, the test's
/// own function (or the future given to `block_on`) is all that is known.
#[derive(Debug)]
enum Blame {
    /// A `#[looplag::test]` function: its path and where the attribute is.
    Function {
        path: String,
        file: &'static str,
        line: u32,
    },
    /// The future an `assert_no_stalls` closure ran, in the test named `test`.
    Future {
        test: String,
        file: &'static str,
        line: u32,
    },
}

impl std::fmt::Display for Blame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blame::Function { path, file, line } => write!(f, "`{path}` at {file}:{line}"),
            Blame::Future { test, file, line } => write!(
                f,
                "the future given to `block_on` in test `{test}` (assert_no_stalls at \
                 {file}:{line})"
            ),
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// A test's runtime: [`block_on`](TestRuntime::block_on) watches every poll of the future it
/// runs, and everything else is the [`Runtime`](tokio::runtime::Runtime) it derefs to.
///
/// What [`assert_no_stalls`] gives its closure. Blocking in the future given to `block_on`
/// is found exactly on any flavor (its polls are marked as a span's are); blocking in a
/// spawned task as [What is exact and what is
/// estimated](https://docs.rs/looplag/latest/looplag/#what-is-exact-and-what-is-estimated)
/// says. A `block_on` called through [`handle`](tokio::runtime::Runtime::handle) is not
/// watched this way.
///
/// # Examples
///
/// ```
/// let mut builder = tokio::runtime::Builder::new_multi_thread();
/// builder.worker_threads(2).enable_all();
/// looplag::testing::assert_no_stalls(builder, |runtime| {
///     let answer = runtime.block_on(async { tokio::spawn(async { 42 }).await });
///     assert_eq!(answer.expect("the task"), 42);
///     // The runtime's own API is there too.
///     assert_eq!(runtime.metrics().num_workers(), 2);
/// });
/// ```
pub struct TestRuntime {
    runtime: tokio::runtime::Runtime,
    looplag: LoopLag,
    threshold: Duration,
    long_polls: Arc<Mutex<Vec<LongPoll>>>,
}

impl std::fmt::Debug for TestRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRuntime")
            .field("runtime", &self.runtime)
            .field("looplag", &self.looplag)
            .finish()
    }
}

impl TestRuntime {
    /// Runs `future` to completion on the runtime, as
    /// [`Runtime::block_on`](tokio::runtime::Runtime::block_on) does, with each of its polls
    /// watched: one that blocks for longer than the threshold fails the test.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(Watched {
            runtime: self,
            future: Box::pin(future),
            thread: None,
        })
    }

    /// The runtime itself.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }
}

impl std::ops::Deref for TestRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }
}

/// A future whose polls the test's instance sees (see `LoopLag::watched_poll`), each also
/// timed here: a poll the watchdog had no CPU to see while it blocked still fails the test
/// (a [`LongPoll`]). Boxed once per test, so the wrapper needs no pin projection.
///
/// Per poll that adds two clock reads and, on Linux, one `pread` of the thread's
/// `/proc/thread-self/schedstat`: tests only.
struct Watched<'a, F> {
    runtime: &'a TestRuntime,
    future: std::pin::Pin<Box<F>>,
    /// The polling thread's id and run-queue wait (`block_on` polls on its caller's
    /// thread), opened at the first poll.
    thread: Option<(i32, diagnose::OwnRunDelay)>,
}

impl<F: Future> Future for Watched<'_, F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = &mut *self;
        let (tid, run_delay) = this
            .thread
            .get_or_insert_with(|| (diagnose::current_tid(), diagnose::OwnRunDelay::open()));
        let tid = *tid;
        let waited_before = run_delay.read();
        let started_at = SystemTime::now();
        let started = Instant::now();
        let future = &mut this.future;
        let output = this
            .runtime
            .looplag
            .watched_poll(|| future.as_mut().poll(cx));
        let duration = started.elapsed();
        if duration >= this.runtime.threshold {
            let waited_after = this.thread.as_ref().and_then(|(_, delay)| delay.read());
            let run_queue_wait = waited_before
                .zip(waited_after)
                .map(|(before, after)| after.saturating_sub(before));
            let poll = LongPoll {
                started_at,
                duration,
                run_queue_wait,
                tid: i64::from(tid),
                thread_name: std::thread::current()
                    .name()
                    .unwrap_or_default()
                    .to_string(),
            };
            match this.runtime.long_polls.lock() {
                Ok(mut polls) => polls.push(poll),
                Err(poisoned) => poisoned.into_inner().push(poll),
            }
        }
        output
    }
}

/// Builds `builder`'s runtime hooked by `looplag` and starts the watchdog, or panics saying
/// which failed.
fn start(
    judge: &Judge,
    looplag: LoopLag,
    mut builder: tokio::runtime::Builder,
) -> (TestRuntime, Watchdog) {
    hook(&looplag, &mut builder);
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => panic!("looplag: the test's tokio runtime could not start: {err}"),
    };
    let watchdog = match looplag.start(runtime.handle()) {
        Ok(watchdog) => watchdog,
        Err(err) => panic!("looplag: the test's watchdog could not start: {err}"),
    };
    let runtime = TestRuntime {
        runtime,
        looplag,
        threshold: judge.threshold,
        long_polls: Arc::clone(&judge.long_polls),
    };
    (runtime, watchdog)
}

/// Runs `run` with `builder`'s runtime watched by looplag, and panics when a poll on it
/// blocked a worker for longer than the threshold: the function form of `#[looplag::test]`,
/// for a test that builds its own runtime.
///
/// `run` gets the runtime, built from `builder` with looplag's hooks, as a [`TestRuntime`]:
/// its [`block_on`](TestRuntime::block_on) watches the future's polls. The threshold is
/// `LOOPLAG_TEST_STALL_THRESHOLD`, or [`DEFAULT_TEST_STALL_THRESHOLD`]; time the blocked
/// thread spent waiting for a CPU is not counted. The panic message is the stall report, as
/// `#[looplag::test]`'s.
///
/// # Examples
///
/// ```
/// let mut builder = tokio::runtime::Builder::new_current_thread();
/// builder.enable_all();
/// looplag::testing::assert_no_stalls(builder, |runtime| {
///     runtime.block_on(async {
///         tokio::task::yield_now().await;
///     })
/// });
/// ```
#[track_caller]
pub fn assert_no_stalls<T>(
    builder: tokio::runtime::Builder,
    run: impl FnOnce(&TestRuntime) -> T,
) -> T {
    let judge = Judge::new(None);
    let name = std::thread::current()
        .name()
        .map(|name| name.rsplit("::").next().unwrap_or(name).to_string())
        .unwrap_or_default();
    let (runtime, watchdog) = start(&judge, judge.looplag(&name), builder);
    let output = run(&runtime);
    drop(watchdog);
    let caller = std::panic::Location::caller();
    judge.verdict(&Blame::Future {
        test: name,
        file: caller.file(),
        line: caller.line(),
    });
    output
}

/// What `#[looplag::test]` expands to. Not a public API: its shape may change in any
/// release.
#[doc(hidden)]
pub(crate) mod __private {
    use super::*;

    /// How the runtime of one test is configured by hand (`start_paused`).
    type Configure = Box<dyn FnOnce(&mut tokio::runtime::Builder)>;

    /// The runtime, instance and verdict of one `#[looplag::test]` function.
    pub struct Test {
        module: &'static str,
        name: &'static str,
        current_thread: bool,
        worker_threads: Option<usize>,
        threshold: Option<Duration>,
        configure: Option<Configure>,
    }

    impl std::fmt::Debug for Test {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Test")
                .field("module", &self.module)
                .field("name", &self.name)
                .field("current_thread", &self.current_thread)
                .field("worker_threads", &self.worker_threads)
                .field("threshold", &self.threshold)
                .finish_non_exhaustive()
        }
    }

    impl Test {
        /// The test function `name` of module `module` (`module_path!()`), on a
        /// current-thread runtime.
        pub fn new(module: &'static str, name: &'static str) -> Self {
            Test {
                module,
                name,
                current_thread: true,
                worker_threads: None,
                threshold: None,
                configure: None,
            }
        }

        /// `flavor = "multi_thread"`.
        pub fn multi_thread(self) -> Self {
            Test {
                current_thread: false,
                ..self
            }
        }

        /// `worker_threads = n`.
        pub fn worker_threads(self, count: usize) -> Self {
            Test {
                worker_threads: Some(count),
                ..self
            }
        }

        /// `stall_threshold = ".."` (wins over `LOOPLAG_TEST_STALL_THRESHOLD`).
        pub fn stall_threshold(self, threshold: Duration) -> Self {
            Test {
                threshold: Some(threshold),
                ..self
            }
        }

        /// A call on the runtime builder made in the test's crate (`start_paused`).
        pub fn configure(
            self,
            configure: impl FnOnce(&mut tokio::runtime::Builder) + 'static,
        ) -> Self {
            Test {
                configure: Some(Box::new(configure)),
                ..self
            }
        }

        /// Builds the test's own instance and runtime, runs `body` to completion, stops the
        /// watchdog (stalls still going end there) and panics when a stall counts.
        #[track_caller]
        pub fn run<T, F>(self, body: F) -> T
        where
            F: Future<Output = T>,
        {
            let judge = Judge::new(self.threshold);
            let looplag = judge.looplag(self.name);
            let mut builder = if self.current_thread {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                if let Some(count) = self.worker_threads {
                    builder.worker_threads(count);
                }
                builder
            };
            builder.enable_all();
            if let Some(configure) = self.configure {
                configure(&mut builder);
            }
            let (runtime, watchdog) = start(&judge, looplag, builder);
            let output = runtime.block_on(body);
            drop(watchdog);
            let caller = std::panic::Location::caller();
            judge.verdict(&Blame::Function {
                path: format!("{}::{}", self.module, self.name),
                file: caller.file(),
                line: caller.line(),
            });
            output
        }
    }
}

/// looplag's park and unpark hooks only, never tokio's task poll hooks: under
/// `--cfg tokio_unstable` those would make the polls of the future `block_on` runs itself
/// (the test's body) invisible, and a test blocks in its body more often than anywhere else.
/// Without them, polls are found as on stable builds (spans, and tokio's worker metrics).
fn hook(looplag: &LoopLag, builder: &mut tokio::runtime::Builder) {
    builder
        .on_thread_park(looplag.park_hook())
        .on_thread_unpark(looplag.unpark_hook());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Culprit, StackCapture, StackFrame};

    fn ended(duration_ms: u64, waited_ms: Option<u64>) -> StallReport {
        StallReport {
            runtime_name: "t".into(),
            state: StallState::Ended,
            duration: Duration::from_millis(duration_ms),
            started_at: std::time::SystemTime::now(),
            exact: false,
            report_number: 2,
            thread_id: Some(1),
            thread_name: Some("t".into()),
            worker_index: Some(0),
            span_name: None,
            trace_id: None,
            span_id: None,
            task_id: None,
            spawn_location: None,
            kind: None,
            cpu_time: None,
            syscall: None,
            run_queue_wait: waited_ms.map(Duration::from_millis),
            stack: StackCapture::Captured(Vec::new()),
            culprit: Culprit::Found(StackFrame {
                function: "app::handler".into(),
                file: Some("src/handler.rs".into()),
                line: Some(7),
                address: 1,
            }),
            victims: 0,
            victims_dropped: 0,
        }
    }

    fn verdict(reports: Vec<StallReport>) -> Option<String> {
        verdict_with(reports, Vec::new())
    }

    fn verdict_with(reports: Vec<StallReport>, long_polls: Vec<LongPoll>) -> Option<String> {
        let judge = Judge::new(Some(Duration::from_millis(50)));
        judge.ended.lock().expect("lock").extend(reports);
        judge.long_polls.lock().expect("lock").extend(long_polls);
        let blame = Blame::Function {
            path: "app::tests::handles_a_request".into(),
            file: "tests/app.rs",
            line: 12,
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| judge.verdict(&blame)))
            .err()
            .map(|panic| panic.downcast_ref::<String>().cloned().unwrap_or_default())
    }

    /// A poll of the test's body timed by its caller, on the thread of [`ended`]'s reports.
    fn long_poll(started_at: SystemTime, duration_ms: u64, waited_ms: Option<u64>) -> LongPoll {
        LongPoll {
            started_at,
            duration: Duration::from_millis(duration_ms),
            run_queue_wait: waited_ms.map(Duration::from_millis),
            tid: 1,
            thread_name: "handles_a_request".into(),
        }
    }

    #[test]
    fn a_long_poll_the_watchdog_did_not_see_fails_the_test_naming_the_function() {
        let message = verdict_with(Vec::new(), vec![long_poll(SystemTime::now(), 100, Some(3))])
            .expect("the test fails");
        assert!(
            message.contains("1 time(s)")
                && message.contains(
                    "blocked in `app::tests::handles_a_request` at tests/app.rs:12: one poll \
                     of it took 100.0 ms on thread `handles_a_request` (tid 1)"
                )
                && message.contains("3.0 ms of it waiting for a CPU"),
            "{message}"
        );
    }

    #[test]
    fn a_long_poll_the_watchdog_reported_counts_once() {
        let report = ended(100, None);
        let poll = long_poll(report.started_at, 101, None);
        let message = verdict_with(vec![report], vec![poll]).expect("the test fails");
        assert!(message.contains("1 time(s)"), "{message}");
        assert!(!message.contains("one poll of it"), "{message}");
        // Reported, but not counted (a busy machine): the long poll is not counted either.
        let busy = ended(100, Some(80));
        let poll = long_poll(busy.started_at, 101, None);
        assert_eq!(verdict_with(vec![busy], vec![poll]), None);
        // On another thread, or at another time, it is another stall.
        let report = ended(100, None);
        let mut elsewhere = long_poll(report.started_at, 100, None);
        elsewhere.tid = 2;
        let later = long_poll(report.started_at + Duration::from_secs(1), 100, None);
        let message = verdict_with(vec![report], vec![elsewhere, later]).expect("the test fails");
        assert!(message.contains("3 time(s)"), "{message}");
    }

    #[test]
    fn a_long_poll_that_mostly_waited_for_a_cpu_does_not_count() {
        assert_eq!(
            verdict_with(
                Vec::new(),
                vec![long_poll(SystemTime::now(), 100, Some(60))]
            ),
            None
        );
    }

    #[test]
    fn a_stall_fails_the_test_with_its_report_and_the_threshold_line() {
        let message = verdict(vec![ended(100, Some(10))]).expect("the test fails");
        assert!(
            message.contains("blocked in `app::handler` at src/handler.rs:7"),
            "{message}"
        );
        assert!(message.contains("100.0 ms"), "{message}");
        assert!(
            message.contains("10.0 ms of it waiting for a CPU"),
            "{message}"
        );
        assert!(message.contains("(estimated"), "{message}");
        assert!(
            message.contains("The threshold is 50 ms (set by the test)")
                && message.contains("LOOPLAG_TEST_STALL_THRESHOLD"),
            "{message}"
        );
    }

    #[test]
    fn time_waiting_for_a_cpu_does_not_count() {
        // 100 ms, 60 of them in the run queue: 40 ms of the test's own, under 50.
        assert_eq!(verdict(vec![ended(100, Some(60))]), None);
        // Unknown wait: the whole duration counts.
        assert!(verdict(vec![ended(60, None)]).is_some());
        // No known thread: nothing tells a blocking poll from a busy machine.
        let mut unidentified = ended(150, None);
        unidentified.thread_id = None;
        assert_eq!(verdict(vec![unidentified]), None);
        // Exactly the threshold of its own counts.
        assert!(verdict(vec![ended(100, Some(50))]).is_some());
    }

    #[test]
    fn every_counted_stall_is_in_the_message() {
        let message =
            verdict(vec![ended(80, None), ended(100, Some(90)), ended(70, None)]).expect("fails");
        assert!(message.contains("2 time(s)"), "{message}");
        assert!(
            message.contains("80.0 ms") && message.contains("70.0 ms"),
            "{message}"
        );
        assert!(!message.contains("100.0 ms"), "{message}");
    }
}

//! Victim precision and recall over a run of stalls (issue 14), against the requests' own
//! clocks: `cargo run --release --example victim_precision [current|multi]`.
//!
//! 200 idle requests (a 1 h timer) and 20 active ones (5 ms timer loops) on a hooked
//! runtime; 20 stalls of 50 to 240 ms in a `culprit` span, 300 ms apart, each waking three
//! more requests right before it blocks (their wait: from the wake to their poll). Each active
//! request records every timer wait: when its timer was due and when it ran again. A request
//! was held up by a stall when one of its timers fell due before the stall's end and it ran
//! only after that end, more than 3 ms late (tokio's timers fire on the next millisecond
//! tick; the culprit's own clock readings give the stall's start and end). The 20 requests
//! run in phase, so one borderline timer tick counts 20 times. Precision: the marked (stall, request) pairs that
//! were held up; recall: the held-up pairs that were marked.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const IDLE: usize = 200;
const ACTIVE: i64 = 20;
const STALLS: u64 = 20;

type Waits = Arc<Mutex<HashMap<i64, Vec<(SystemTime, SystemTime)>>>>;

fn main() {
    let multi = std::env::args().any(|a| a == "multi");
    let spans = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reports);
    let looplag = looplag::LoopLag::builder()
        .tracer(provider.tracer("looplag"))
        .max_stall_logs_per_second(0)
        .on_stall(move |report| {
            if report.state == looplag::StallState::Ended {
                sink.lock().unwrap().push(report.clone());
            }
        })
        .build()
        .expect("looplag");
    tracing_subscriber::registry()
        .with(looplag.layer())
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("app")))
        .init();
    let mut builder = if multi {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2);
        builder
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all();
    looplag.hook_runtime(&mut builder);
    let runtime = builder.build().expect("runtime");
    let watchdog = looplag.start(runtime.handle()).expect("start");
    let waits: Waits = Arc::default();
    // Each culprit's own start and end, on the clock the requests use.
    let culprits: Arc<Mutex<Vec<(SystemTime, SystemTime)>>> = Arc::default();
    runtime.block_on(async {
        let idle: Vec<_> = (0..IDLE)
            .map(|i| {
                tokio::spawn(
                    async { tokio::time::sleep(Duration::from_secs(3600)).await }
                        .instrument(tracing::info_span!("idle", i)),
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let active: Vec<_> = (0..ACTIVE)
            .map(|i| {
                let (stop, waits) = (Arc::clone(&stop), Arc::clone(&waits));
                tokio::spawn(
                    async move {
                        while !stop.load(Ordering::Relaxed) {
                            let due = SystemTime::now() + Duration::from_millis(5);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            let ran = SystemTime::now();
                            waits.lock().unwrap().entry(i).or_default().push((due, ran));
                        }
                    }
                    .instrument(tracing::info_span!("active", i)),
                )
            })
            .collect();
        for n in 0..STALLS {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let stall = Duration::from_millis(50 + 10 * (n % 20));
            let culprits = Arc::clone(&culprits);
            // Three requests woken by the culprit right before it blocks: onto its worker's
            // queue (on a multi-thread runtime, the last one in its LIFO slot, which no other
            // worker steals).
            let (senders, receivers): (Vec<_>, Vec<_>) = (0..3)
                .map(|_| tokio::sync::oneshot::channel::<SystemTime>())
                .unzip();
            for (k, receiver) in (0..).zip(receivers) {
                let waits = Arc::clone(&waits);
                let i = 100 + 3 * n as i64 + k;
                tokio::spawn(
                    async move {
                        if let Ok(sent) = receiver.await {
                            let ran = SystemTime::now();
                            waits
                                .lock()
                                .unwrap()
                                .entry(i)
                                .or_default()
                                .push((sent, ran));
                        }
                    }
                    .instrument(tracing::info_span!("active", i)),
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            tokio::spawn(
                async move {
                    for sender in senders {
                        let _ = sender.send(SystemTime::now());
                    }
                    let start = SystemTime::now();
                    std::thread::sleep(stall);
                    culprits.lock().unwrap().push((start, SystemTime::now()));
                }
                .instrument(tracing::info_span!("culprit")),
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        for task in active {
            task.await.unwrap();
        }
        for task in idle {
            task.abort();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(watchdog);
    provider.force_flush().expect("flush");
    let finished = spans.get_finished_spans().expect("spans");
    let reports = reports.lock().unwrap().clone();
    // Stall span id -> the culprit's [start, end] (the one whose start is nearest the
    // report's).
    let culprits = culprits.lock().unwrap().clone();
    let gap = |a: SystemTime, b: SystemTime| {
        a.duration_since(b)
            .or_else(|_| b.duration_since(a))
            .unwrap_or_default()
    };
    let stalls: HashMap<String, (SystemTime, SystemTime)> = reports
        .iter()
        .filter_map(|r| {
            let culprit = culprits
                .iter()
                .min_by_key(|(start, _)| gap(*start, r.started_at))?;
            Some((r.span_id?.to_string(), *culprit))
        })
        .collect();
    let index = |span: &opentelemetry_sdk::trace::SpanData| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == "i")
            .map(|kv| kv.value.to_string())
            .unwrap_or_default()
    };
    let mut marked = HashSet::new();
    let mut idle_marked = 0usize;
    for span in &finished {
        for event in span
            .events
            .iter()
            .filter(|e| e.name == "tokio.eventloop.stall")
        {
            let stall = event
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == "tokio.eventloop.stall.span_id")
                .map(|kv| kv.value.to_string())
                .unwrap_or_default();
            match span.name.as_ref() {
                "active" => {
                    marked.insert((stall, index(span)));
                }
                "idle" => idle_marked += 1,
                _ => {}
            }
        }
    }
    // tokio's timers fire on the next millisecond tick: a request that ran up to this late
    // was on time (its timer was due just before the stall's end).
    let on_time = Duration::from_millis(3);
    let mut held = HashSet::new();
    for (i, waits) in waits.lock().unwrap().iter() {
        for (stall, (start, end)) in &stalls {
            if waits.iter().any(|&(due, ran)| {
                due < *end
                    && ran >= *end
                    && ran >= *start
                    && ran.duration_since(due).unwrap_or_default() > on_time
            }) {
                held.insert((stall.clone(), i.to_string()));
            }
        }
    }
    let mut per_stall: Vec<_> = reports
        .iter()
        .filter_map(|r| {
            let id = r.span_id?.to_string();
            let h = held.iter().filter(|(s, _)| *s == id).count();
            let m = marked.iter().filter(|(s, _)| *s == id).count();
            Some((
                r.started_at,
                r.duration,
                r.worker_index,
                h,
                m,
                r.victims_dropped,
            ))
        })
        .collect();
    per_stall.sort_by_key(|row| row.0);
    for (_, duration, worker, h, m, dropped) in per_stall {
        println!(
            "stall {duration:?} on worker {worker:?}: {h} held up, {m} marked, {dropped} counted \
             as dropped"
        );
    }
    let true_positives = marked.intersection(&held).count();
    // The pinged requests that were never woken (no wait recorded) cannot be judged.
    // No marks: precision is undefined (printed as NaN).
    let precision = true_positives as f64 / (marked.len() + idle_marked) as f64;
    let recall = true_positives as f64 / held.len().max(1) as f64;
    println!(
        "{} runtime: {} stalls ended, {} held-up (stall, request) pairs, {} marked ({} of idle \
         requests); precision {:.2} %, recall {:.2} %",
        if multi {
            "2-worker multi-thread"
        } else {
            "current-thread"
        },
        reports.len(),
        held.len(),
        marked.len() + idle_marked,
        idle_marked,
        precision * 100.0,
        recall * 100.0
    );
    let missed: Vec<_> = held.difference(&marked).collect();
    let wrong: Vec<_> = marked.difference(&held).collect();
    if !missed.is_empty() || !wrong.is_empty() {
        println!("missed {missed:?}\nmarked but not held up {wrong:?}");
    }
}

//! Find the code that blocks a tokio runtime, while it blocks, and report it over
//! OpenTelemetry.
//!
//! A tokio worker runs one task poll at a time. A poll that does not return for a long time
//! (`std::thread::sleep`, a synchronous client, a big parse, a held `std::sync::Mutex`)
//! stalls every task queued behind it. looplag turns those stalls into:
//!
//! 1. a **delay histogram**, `tokio.eventloop.delay`: how late the runtime gets to new work;
//! 2. a **stall span**, `tokio.eventloop.stall`: a child of the request span that blocked,
//!    spanning the blocked interval;
//! 3. a **stall event** on every request span that waited during the stall, linked to the
//!    stall span;
//!
//! plus the `tokio.eventloop.stalls` counter, the `tokio.eventloop.stall.duration`
//! histogram, a WARN log line and an optional callback, all while the stall is happening.
//!
//! # Setup
//!
//! ```
//! use std::time::Duration;
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//!
//! let looplag = looplag::LoopLag::builder()
//!     .runtime_name("main")
//!     .stall_threshold(Duration::from_millis(50))
//!     .build()?;
//!
//! tracing_subscriber::registry()
//!     .with(looplag.layer()) // before tracing-opentelemetry's layer, see LoopLagLayer
//!     // .with(tracing_opentelemetry::layer().with_tracer(tracer))
//!     .init();
//!
//! let mut builder = tokio::runtime::Builder::new_multi_thread();
//! builder.enable_all();
//! looplag.hook_runtime(&mut builder);
//! let runtime = builder.build().expect("runtime");
//! let _watchdog = looplag.start(runtime.handle())?;
//!
//! runtime.block_on(async {
//!     // the application
//! });
//! # Ok::<(), looplag::Error>(())
//! ```
//!
//! # Cost
//!
//! Span enter/exit and the runtime's park/unpark hooks only write the calling thread's
//! slot with atomic stores: no lock, no allocation, and one clock read per poll start. The
//! watchdog is a plain OS thread that wakes once per sample interval while the runtime
//! works; while every worker is parked it dozes for 20 intervals, and the first worker to
//! unpark wakes it.
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

// Modules, lowest first: a module uses only those listed above it (ARCHITECTURE.md).
mod clock;
mod config;
mod diagnose;
mod entry;
mod error;
mod hot;
mod instance;
mod layer;
mod report;
mod stack;
mod telemetry;
pub mod testing;
mod victims;
mod watchdog;

pub use config::{
    Builder, DEFAULT_MAX_CULPRIT_FUNCTIONS, DEFAULT_MAX_STACKS_PER_MINUTE,
    DEFAULT_MAX_STALL_LOGS_PER_SECOND, DEFAULT_MAX_VICTIMS, DEFAULT_RUNTIME_NAME,
    DEFAULT_SAMPLE_INTERVAL, DEFAULT_SPAN_LEVEL, DEFAULT_STACK_SIGNAL, DEFAULT_STALL_THRESHOLD,
};
pub use diagnose::StallKind;
pub use entry::{layer, shutdown};
pub use error::Error;
pub use instance::{LoopLag, Watchdog};
pub use layer::LoopLagLayer;
#[cfg(feature = "macros")]
pub use looplag_macros::{main, test};

/// What `#[looplag::main]` and `#[looplag::test]` expand to. Not a public API: its shape may
/// change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::entry::__private::Main;
    pub use crate::testing::__private::Test;
}
pub use report::{Culprit, StackCapture, StackFrame, StallReport, StallState};

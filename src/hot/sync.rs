//! The atomics of the per-thread slots: std's, or loom's when the slot protocol is model
//! checked (`RUSTFLAGS="--cfg looplag_loom"`, see `slots/loom_tests.rs`).
//!
//! In every normal build these are plain re-exports of `std::sync::atomic`, so the hot path
//! compiles to exactly the same code as without this module.
//!
//! The cfg is `looplag_loom`, not the customary `loom`: `RUSTFLAGS` reach every crate of
//! the build, and tokio changes its own API under `cfg(loom)` (its runtime builder loses
//! `on_thread_park`), so `--cfg loom` would not even compile looplag.

#[cfg(all(test, looplag_loom))]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(not(all(test, looplag_loom)))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};

pub(crate) use std::sync::atomic::Ordering;

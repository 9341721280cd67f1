//! The Linux x86_64 implementation: signal handler, capture protocol, CFI unwinder.
//!
//! - [`signal`]: arming a capture, the signal handler that records, installing it;
//! - [`unwind`]: walking the copied stack with `.eh_frame` CFI or frame pointers;
//! - [`symbols`]: naming the addresses.

mod signal;
mod symbols;
mod unwind;

pub(super) use signal::{accepted_signals, capture, in_runtime, install, Target, HANDLER_NAME};
#[cfg(test)]
pub(super) use signal::{handler_address, ignored_count, record, Slot};
#[cfg(test)]
pub(super) use symbols::full_name;
pub(super) use symbols::resolve;

/// Registers kept, in DWARF numbering: rax, rdx, rcx, rbx, rsi, rdi, rbp, rsp, r8..r15, rip.
const NREGS: usize = 17;
const DW_RBP: usize = 6;
const DW_RSP: usize = 7;
/// The return-address column, which holds the program counter of each frame.
const DW_RA: usize = 16;

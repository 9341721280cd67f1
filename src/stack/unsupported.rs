//! Platforms without stack capture: every operation reports [`StackError::Unsupported`].

use super::{RawStack, StackError, UNKNOWN_FUNCTION};
use crate::report::StackFrame;
use std::time::Duration;

pub(super) const HANDLER_NAME: &str = "looplag_stack_signal_handler";

#[derive(Clone, Debug)]
pub(super) struct Target;

impl Target {
    pub(super) fn current() -> Target {
        Target
    }

    pub(super) fn tid(&self) -> i32 {
        0
    }
}

pub(super) fn accepted_signals() -> String {
    "none: stack capture is not supported on this platform".to_owned()
}

pub(super) fn install(_signal: i32) -> Result<(), StackError> {
    Err(StackError::Unsupported)
}

pub(super) fn capture(_target: &Target, _timeout: Duration) -> Result<RawStack, StackError> {
    Err(StackError::Unsupported)
}

pub(super) fn in_runtime(_target: &Target, _timeout: Duration) -> Result<bool, StackError> {
    Err(StackError::Unsupported)
}

pub(super) fn resolve(addr: usize, _exact: bool, frames: &mut Vec<StackFrame>) {
    frames.push(StackFrame {
        function: UNKNOWN_FUNCTION.to_owned(),
        file: None,
        line: None,
        address: addr,
    });
}

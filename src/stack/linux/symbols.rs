//! Symbolization, on the watchdog thread.

use crate::report::StackFrame;
use crate::stack::UNKNOWN_FUNCTION;
use std::ffi::c_void;

/// Appends the frames (inlined ones first) at `addr`; `exact` marks an interrupted
/// instruction, which is looked up as is rather than as a return address.
pub(in crate::stack) fn resolve(addr: usize, exact: bool, frames: &mut Vec<StackFrame>) {
    // `backtrace::resolve` subtracts one to land inside the call instruction; an exact
    // address is no return address, so compensate.
    let lookup = if exact { addr.saturating_add(1) } else { addr };
    let before = frames.len();
    backtrace::resolve(lookup as *mut c_void, |symbol| {
        frames.push(StackFrame {
            function: symbol
                .name()
                .map(|name| format!("{name:#}"))
                .unwrap_or_else(|| UNKNOWN_FUNCTION.to_owned()),
            file: symbol.filename().map(|path| path.display().to_string()),
            line: symbol.lineno(),
            address: addr,
        });
    });
    let named = frames
        .get(before..)
        .is_some_and(|new| new.iter().any(|frame| frame.function != UNKNOWN_FUNCTION));
    if named {
        return;
    }
    // No file on disk to read symbols from (the vDSO) or no symbol table: ask the dynamic
    // loader for the nearest exported symbol.
    let function = dynamic_symbol(if exact { addr } else { addr.saturating_sub(1) })
        .unwrap_or_else(|| UNKNOWN_FUNCTION.to_owned());
    frames.truncate(before);
    frames.push(StackFrame {
        function,
        file: None,
        line: None,
        address: addr,
    });
}

/// The name of the dynamic symbol containing `addr`, from `dladdr`.
fn dynamic_symbol(addr: usize) -> Option<String> {
    // SAFETY: `Dl_info` is plain data; all zeroes (null pointers) is valid.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `dladdr` only reads the loader's tables and writes `info`.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 || info.dli_sname.is_null() {
        return None;
    }
    // SAFETY: a non-null `dli_sname` is a NUL-terminated string owned by the loader, valid
    // while the object stays loaded; it is copied at once.
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_sname) };
    Some(name.to_string_lossy().into_owned())
}

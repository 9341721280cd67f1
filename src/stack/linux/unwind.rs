//! Unwinding, on the watchdog thread: the stack copy, the loaded objects, and one step per
//! frame with `.eh_frame` CFI or, without it, frame pointers.

use super::{DW_RA, DW_RBP, DW_RSP, NREGS};
use crate::stack::RawStack;
use std::cell::Cell;
use std::ffi::{c_int, c_void};

/// Registers a callee must preserve in the System V x86_64 ABI (rbx, rbp, r12..r15): the only
/// ones besides rsp and rip that can be known in a caller's frame.
const CALLEE_SAVED: [usize; 6] = [3, 6, 12, 13, 14, 15];

/// Register values of one frame, in DWARF numbering; `None` when unknown.
pub(super) type Regs = [Option<u64>; NREGS];

/// The bytes the handler copied: the target's stack from `start` upwards.
pub(super) struct StackCopy<'a> {
    pub(super) start: usize,
    pub(super) bytes: &'a [u8],
    /// The copy stopped at the buffer's size, not at the top of the stack.
    pub(super) capped: bool,
    /// A read asked for bytes past the end of the copy.
    pub(super) read_past_end: Cell<bool>,
}

impl StackCopy<'_> {
    /// The 8 bytes the target had at `addr`, if they are in the copy.
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let offset = usize::try_from(addr).ok()?.checked_sub(self.start)?;
        let end = offset.checked_add(8)?;
        let Some(bytes) = self.bytes.get(offset..end) else {
            if offset >= self.bytes.len() {
                self.read_past_end.set(true);
            }
            return None;
        };
        Some(u64::from_ne_bytes(bytes.try_into().ok()?))
    }
}

/// A `PT_LOAD` segment of a loaded object, at its run-time address.
#[derive(Debug)]
struct Segment {
    start: usize,
    end: usize,
    flags: u32,
}

impl Segment {
    fn contains(&self, addr: usize) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

/// A loaded object (executable, shared library, vDSO), as `dl_iterate_phdr` reports it.
#[derive(Debug)]
pub(in crate::stack) struct Module {
    segments: Vec<Segment>,
    /// Run-time address and size of `.eh_frame_hdr` (`PT_GNU_EH_FRAME`).
    eh_frame_hdr: Option<(usize, usize)>,
}

impl Module {
    fn is_code(&self, addr: usize) -> bool {
        self.segments
            .iter()
            .any(|s| s.flags & libc::PF_X != 0 && s.contains(addr))
    }

    /// The readable segment containing `addr`, if any.
    fn readable_segment(&self, addr: usize) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| s.flags & libc::PF_R != 0 && s.contains(addr))
    }
}

/// The loaded objects, now.
///
/// The unwinder then reads their `.eh_frame` in place. An object unloaded (`dlclose`)
/// between this call and the end of the unwinding would make those reads fault; that needs
/// the stalled thread's stack to hold frames of a library being unloaded concurrently,
/// which is already a use-after-free in the program.
pub(in crate::stack) fn modules() -> Vec<Module> {
    let mut out: Vec<Module> = Vec::new();
    // SAFETY: the callback receives `&mut out` as `data` and only uses it during the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(collect_module),
            (&mut out as *mut Vec<Module>).cast::<c_void>(),
        )
    };
    out
}

/// `dl_iterate_phdr` callback: appends one [`Module`] to the `Vec<Module>` behind `data`.
unsafe extern "C" fn collect_module(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> c_int {
    if info.is_null() || data.is_null() {
        return 0;
    }
    // SAFETY: `data` is the `&mut Vec<Module>` given by `modules`, borrowed for the
    // iteration and used by nothing else meanwhile.
    let out = unsafe { &mut *data.cast::<Vec<Module>>() };
    // SAFETY: the loader passes a `dl_phdr_info` valid for the duration of the callback.
    let info = unsafe { &*info };
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: the loader guarantees `dlpi_phdr` points to `dlpi_phnum` program headers.
    let headers =
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    let bias = info.dlpi_addr as usize;
    let mut module = Module {
        segments: Vec::new(),
        eh_frame_hdr: None,
    };
    for header in headers {
        let (Ok(vaddr), Ok(size)) = (
            usize::try_from(header.p_vaddr),
            usize::try_from(header.p_memsz),
        ) else {
            continue;
        };
        let Some(start) = bias.checked_add(vaddr) else {
            continue;
        };
        let Some(end) = start.checked_add(size) else {
            continue;
        };
        match header.p_type {
            libc::PT_LOAD => module.segments.push(Segment {
                start,
                end,
                flags: header.p_flags,
            }),
            libc::PT_GNU_EH_FRAME => module.eh_frame_hdr = Some((start, size)),
            _ => {}
        }
    }
    out.push(module);
    0
}

fn module_of(modules: &[Module], addr: usize) -> Option<&Module> {
    modules.iter().find(|m| m.is_code(addr))
}

/// The outcome of one unwinding step.
// `Next` is large (17 optional registers) but short-lived, moved a few times per frame on
// the watchdog thread; boxing it would allocate for every frame.
#[allow(clippy::large_enum_variant)]
enum Step {
    /// The caller's registers; `exact_pc` when the caller was interrupted by a signal
    /// rather than making a call (this frame is the signal trampoline).
    Next { regs: Regs, exact_pc: bool },
    /// No caller: outermost frame, or a rule this unwinder does not follow.
    End,
    /// No CFI covers the address: try frame pointers.
    NoInfo,
}

/// Walks the copied stack from the interrupted registers `regs`.
///
/// Every address after the first must be code of a loaded object and every frame must sit
/// higher on the stack than the one it returns to, otherwise the walk ends: it never reports
/// an address it could not vouch for.
pub(super) fn unwind(mut regs: Regs, stack: &StackCopy<'_>, modules: &[Module]) -> RawStack {
    let mut raw = RawStack::new();
    let mut ctx = gimli::UnwindContext::<usize>::new();
    // The first frame was interrupted: its pc is the next instruction to run, not a return
    // address. So is a frame interrupted by a signal whose handler is on the stack.
    let mut exact_pc = true;
    let mut first = true;
    while let Some(pc) = regs[DW_RA] {
        let Ok(pc_addr) = usize::try_from(pc) else {
            break;
        };
        if pc == 0 || (!first && module_of(modules, pc_addr).is_none()) {
            break;
        }
        if !raw.push(pc_addr) {
            raw.truncated = true;
            break;
        }
        let index = raw.len.saturating_sub(1);
        if exact_pc {
            raw.exact |= RawStack::bit(index);
        }
        // A return address points after the call; look up the call itself.
        let lookup = if exact_pc { pc } else { pc.saturating_sub(1) };
        let step = match cfi_step(&mut ctx, modules, &regs, lookup, stack) {
            Step::NoInfo => frame_pointer_step(&regs, stack),
            step => step,
        };
        let Step::Next {
            regs: next,
            exact_pc: next_exact,
        } = step
        else {
            break;
        };
        match (next[DW_RSP], regs[DW_RSP]) {
            (Some(new_sp), Some(sp)) if new_sp > sp => {}
            _ => break,
        }
        if next_exact {
            raw.trampoline |= RawStack::bit(index);
        }
        regs = next;
        exact_pc = next_exact;
        first = false;
    }
    if stack.capped && stack.read_past_end.get() {
        raw.truncated = true;
    }
    raw
}

fn register(regs: &Regs, register: gimli::Register) -> Option<u64> {
    regs.get(usize::from(register.0)).copied().flatten()
}

/// One step with the CFI of the object containing `lookup`.
fn cfi_step(
    ctx: &mut gimli::UnwindContext<usize>,
    modules: &[Module],
    regs: &Regs,
    lookup: u64,
    stack: &StackCopy<'_>,
) -> Step {
    use gimli::{
        BaseAddresses, CfaRule, EhFrame, EhFrameHdr, NativeEndian, Pointer, UnwindSection,
    };

    let Some(module) = usize::try_from(lookup)
        .ok()
        .and_then(|addr| module_of(modules, addr))
    else {
        return Step::NoInfo;
    };
    let Some((hdr_addr, hdr_len)) = module.eh_frame_hdr else {
        return Step::NoInfo;
    };
    match module.readable_segment(hdr_addr) {
        Some(segment) if hdr_addr.saturating_add(hdr_len) <= segment.end => {}
        _ => return Step::NoInfo,
    }
    // SAFETY: `.eh_frame_hdr` lies inside a readable `PT_LOAD` segment of an object that is
    // loaded (checked above), so it is mapped and read-only for as long as the object stays
    // loaded (see `modules` about `dlclose`).
    let hdr = unsafe { std::slice::from_raw_parts(hdr_addr as *const u8, hdr_len) };
    let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr as u64);
    let Ok(parsed) = EhFrameHdr::new(hdr, NativeEndian).parse(&bases, 8) else {
        return Step::NoInfo;
    };
    let Pointer::Direct(eh_frame_addr) = parsed.eh_frame_ptr() else {
        return Step::NoInfo;
    };
    let Ok(eh_frame_addr) = usize::try_from(eh_frame_addr) else {
        return Step::NoInfo;
    };
    let Some(segment) = module.readable_segment(eh_frame_addr) else {
        return Step::NoInfo;
    };
    // `.eh_frame_hdr` does not give `.eh_frame`'s size: take the rest of its segment. The
    // search table points at the entries, so nothing past the section is parsed.
    let eh_frame_len = segment.end.saturating_sub(eh_frame_addr);
    // SAFETY: as above, this range is inside a readable segment of a loaded object.
    let eh_frame_bytes =
        unsafe { std::slice::from_raw_parts(eh_frame_addr as *const u8, eh_frame_len) };
    let mut eh_frame = EhFrame::new(eh_frame_bytes, NativeEndian);
    eh_frame.set_address_size(8);
    let bases = bases.set_eh_frame(eh_frame_addr as u64);
    let Some(table) = parsed.table() else {
        return Step::NoInfo;
    };
    let Ok(fde) = table.fde_for_address(&eh_frame, &bases, lookup, EhFrame::cie_from_offset) else {
        return Step::NoInfo;
    };
    let return_address = fde.cie().return_address_register();
    let encoding = fde.cie().encoding();
    let Ok(row) = fde.unwind_info_for_address(&eh_frame, &bases, ctx, lookup) else {
        return Step::NoInfo;
    };
    // DWARF expressions appear in PLT stubs and in the signal trampoline (`__restore_rt`,
    // whose rules read the interrupted registers from the `ucontext_t` on the stack).
    let evaluate = |expression: &gimli::UnwindExpression<usize>, initial: Option<u64>| {
        evaluate(&eh_frame, expression, encoding, initial, regs, stack)
    };
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset {
            register: base,
            offset,
        } => register(regs, *base).and_then(|value| value.checked_add_signed(*offset)),
        CfaRule::Expression(expression) => evaluate(expression, None),
    };
    let Some(cfa) = cfa else {
        return Step::End;
    };
    let mut next: Regs = [None; NREGS];
    next[DW_RSP] = Some(cfa);
    for index in CALLEE_SAVED {
        let Ok(number) = u16::try_from(index) else {
            continue;
        };
        let rule = row.register(gimli::Register(number));
        // A callee-saved register without a rule keeps its value (what GCC assumes).
        if let Some(value) = next.get_mut(index) {
            *value = recover(&rule, regs, index, cfa, stack, true, &evaluate);
        }
    }
    // No rule for the return address means the outermost frame (`_start`, `clone3`).
    next[DW_RA] = recover(
        &row.register(return_address),
        regs,
        usize::from(return_address.0),
        cfa,
        stack,
        false,
        &evaluate,
    );
    Step::Next {
        regs: next,
        exact_pc: fde.is_signal_trampoline(),
    }
}

/// Evaluates a DWARF expression of the CFI against the frame's registers and the stack
/// copy; `None` when it needs anything else (or does not terminate in 64 steps).
fn evaluate<R: gimli::Reader<Offset = usize>>(
    section: &gimli::EhFrame<R>,
    expression: &gimli::UnwindExpression<usize>,
    encoding: gimli::Encoding,
    initial: Option<u64>,
    regs: &Regs,
    stack: &StackCopy<'_>,
) -> Option<u64> {
    use gimli::{EvaluationResult, Value};
    let mut evaluation = expression.get(section).ok()?.evaluation(encoding);
    if let Some(initial) = initial {
        evaluation.set_initial_value(initial);
    }
    let mut result = evaluation.evaluate().ok()?;
    for _ in 0..64 {
        result = match result {
            EvaluationResult::Complete => {
                return evaluation.value_result()?.to_u64(u64::MAX).ok();
            }
            EvaluationResult::RequiresRegister { register: r, .. } => evaluation
                .resume_with_register(Value::Generic(register(regs, r)?))
                .ok()?,
            EvaluationResult::RequiresMemory {
                address, size: 8, ..
            } => evaluation
                .resume_with_memory(Value::Generic(stack.read_u64(address)?))
                .ok()?,
            _ => return None,
        };
    }
    None
}

/// Evaluates a CFI expression, given the initial stack value (the CFA, for register rules).
type Evaluate<'a> = dyn Fn(&gimli::UnwindExpression<usize>, Option<u64>) -> Option<u64> + 'a;

/// Applies one register rule: the caller's value of register `index`.
fn recover(
    rule: &gimli::RegisterRule<usize>,
    regs: &Regs,
    index: usize,
    cfa: u64,
    stack: &StackCopy<'_>,
    same_if_undefined: bool,
    evaluate: &Evaluate<'_>,
) -> Option<u64> {
    use gimli::RegisterRule;
    match rule {
        RegisterRule::Undefined if same_if_undefined => regs.get(index).copied().flatten(),
        RegisterRule::SameValue => regs.get(index).copied().flatten(),
        RegisterRule::Offset(offset) => stack.read_u64(cfa.checked_add_signed(*offset)?),
        RegisterRule::ValOffset(offset) => cfa.checked_add_signed(*offset),
        RegisterRule::Register(other) => register(regs, *other),
        RegisterRule::Constant(value) => Some(*value),
        RegisterRule::Expression(expression) => stack.read_u64(evaluate(expression, Some(cfa))?),
        RegisterRule::ValExpression(expression) => evaluate(expression, Some(cfa)),
        _ => None,
    }
}

/// One step through the frame-pointer chain, for code without CFI: the caller's `rbp` is
/// saved at `rbp` and the return address just above it.
fn frame_pointer_step(regs: &Regs, stack: &StackCopy<'_>) -> Step {
    let (Some(bp), Some(sp)) = (regs[DW_RBP], regs[DW_RSP]) else {
        return Step::End;
    };
    if bp < sp {
        return Step::End;
    }
    let (Some(saved_bp), Some(return_address), Some(cfa)) = (
        stack.read_u64(bp),
        bp.checked_add(8).and_then(|addr| stack.read_u64(addr)),
        bp.checked_add(16),
    ) else {
        return Step::End;
    };
    let mut next: Regs = [None; NREGS];
    next[DW_RBP] = Some(saved_bp);
    next[DW_RSP] = Some(cfa);
    next[DW_RA] = Some(return_address);
    Step::Next {
        regs: next,
        exact_pc: false,
    }
}

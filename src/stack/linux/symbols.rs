//! Symbolization, on the symbolizer thread.
//!
//! Names come from `backtrace`: the debug info's (DWARF) names, file and line for each frame,
//! inlined ones included, or the symbol table's name where there is no debug info. With
//! `debug = "line-tables-only"` (this crate's release profile, and a common one), DWARF
//! names carry no module path (`legacy_lookup` for `app::db::legacy_lookup`); the
//! non-inlined function at an address then takes its fully qualified name from the symbol
//! table of its object, read once per object (see [`full_name`]). Inlined frames keep the
//! short name: the symbol table knows only the function they were inlined into.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, PoisonError};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

use crate::report::StackFrame;
use crate::stack::UNKNOWN_FUNCTION;

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
        // The last frame at an address is the function the others were inlined into: the
        // one the symbol table names.
        if let Some(outer) = frames.last_mut().filter(|frame| is_short(&frame.function)) {
            let at = if exact { addr } else { addr.saturating_sub(1) };
            if let Some(name) = full_name(at, &outer.function) {
                outer.function = name;
            }
        }
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

/// Whether `function` is a name without its module path, as line-tables-only debug info
/// gives (`legacy_lookup`, `poll<F>`), rather than a path (`app::db::legacy_lookup`) or a
/// C function (which has no path to add, but is looked up all the same: cheap, and right).
fn is_short(function: &str) -> bool {
    !function.contains("::") && function != UNKNOWN_FUNCTION
}

/// The symbol table of one loaded object: function symbols by address.
struct SymbolTable {
    /// Lowest address of the object's loadable segments, before relocation.
    base_svma: u64,
    /// `(start, end, mangled name)`, sorted by start.
    functions: Vec<(u64, u64, String)>,
}

/// Symbol tables read so far, by object path (`None`: unreadable, not tried again).
static TABLES: Mutex<Vec<(String, Option<Arc<SymbolTable>>)>> = Mutex::new(Vec::new());

/// The demangled symbol-table name (no hash) of the function containing `addr`, if the
/// debug info's `short` name is its last segment, generic arguments aside (a mismatch means
/// the debug info and the symbol table disagree about the address, and the debug info's
/// name is kept).
///
/// Reads the object's `.symtab` once (a few milliseconds to tens of milliseconds for a
/// large binary, on the symbolizer thread), then answers with a binary search.
pub(in crate::stack) fn full_name(addr: usize, short: &str) -> Option<String> {
    let (path, base) = object_of(addr)?;
    let table = {
        let mut tables = TABLES.lock().unwrap_or_else(PoisonError::into_inner);
        match tables.iter().find(|(known, _)| *known == path) {
            Some((_, table)) => table.clone(),
            None => {
                let table = read_table(&path).map(Arc::new);
                tables.push((path, table.clone()));
                table
            }
        }
    }?;
    let svma = u64::try_from(addr.checked_sub(base)?)
        .ok()?
        .checked_add(table.base_svma)?;
    let index = table
        .functions
        .partition_point(|(start, _, _)| *start <= svma)
        .checked_sub(1)?;
    let (_, end, mangled) = table.functions.get(index)?;
    if svma >= *end {
        return None;
    }
    let name = format!("{:#}", backtrace::SymbolName::new(mangled.as_bytes()));
    // `poll<F>` in DWARF is `poll` in the path; compare without generic arguments.
    let bare = |name: &str| name.split('<').next().unwrap_or_default().to_owned();
    let last = name.rsplit("::").next().unwrap_or_default();
    // An async body or a closure: `{async_fn#0}` or `{closure#0}` in DWARF, `{{closure}}`
    // in the symbol.
    let closure = short.starts_with('{') && last.starts_with("{{");
    (closure || bare(last) == bare(short)).then_some(name)
}

/// The file and load address of the object containing `addr`, from `dladdr`; the running
/// executable is read through `/proc/self/exe` (the loader names it by `argv[0]`, which may
/// be relative or stale).
fn object_of(addr: usize) -> Option<(String, usize)> {
    // SAFETY: `Dl_info` is plain data; all zeroes (null pointers) is valid.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `dladdr` only reads the loader's tables and writes `info`.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 || info.dli_fbase.is_null() {
        return None;
    }
    let base = info.dli_fbase as usize;
    // SAFETY: `getauxval` reads the process's auxiliary vector.
    let phdr = unsafe { libc::getauxval(libc::AT_PHDR) } as usize;
    let name = if info.dli_fname.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null `dli_fname` is a NUL-terminated string owned by the loader,
        // valid while the object stays loaded; it is copied at once.
        let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
        name.to_string_lossy().into_owned()
    };
    // The executable's program headers follow its ELF header closely: the object whose
    // load address is just below them is the executable.
    let is_executable = phdr >= base && phdr - base < 4096;
    if is_executable || !name.starts_with('/') {
        Some(("/proc/self/exe".to_owned(), base))
    } else {
        Some((name, base))
    }
}

/// Reads the function symbols of the ELF file at `path`.
fn read_table(path: &str) -> Option<SymbolTable> {
    let file = std::fs::File::open(path).ok()?;
    let cache = object::read::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let base_svma = elf
        .segments()
        .map(|segment| segment.address())
        .min()
        .unwrap_or(0);
    // Round down to the page, as the loader maps it.
    let base_svma = base_svma & !0xfff;
    let mut functions: Vec<(u64, u64, String)> = elf
        .symbols()
        .filter(|symbol| symbol.kind() == object::SymbolKind::Text && symbol.size() > 0)
        .filter_map(|symbol| {
            let name = symbol.name().ok()?;
            let end = symbol.address().checked_add(symbol.size())?;
            Some((symbol.address(), end, name.to_owned()))
        })
        .collect();
    functions.sort_unstable_by_key(|(start, _, _)| *start);
    Some(SymbolTable {
        base_svma,
        functions,
    })
}

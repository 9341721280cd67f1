//! The culprit frame: the first frame of a stall's stack that belongs to the application
//! rather than to the standard library, tokio, or the crates between (futures, hyper, axum,
//! tower, tonic, …).
//!
//! Pure functions over symbolized frames, run on the symbolizer thread right after the
//! frames are named (measured: a few microseconds per stack, see BENCHMARKS.md).
//!
//! # How a frame is classified
//!
//! In this order, the first rule that applies decides:
//!
//! 1. A function under one of the user's [`library_prefixes`](crate::Builder::library_prefixes)
//!    is library code (a prefix with a `/` matches the frame's source file instead).
//! 2. With a source file (line tables): a file that is no Rust source (glibc's
//!    `./time/../sysdeps/unix/sysv/linux/clock_nanosleep.c`, assembly), or one under the cargo
//!    registry or a git checkout of cargo (`…/registry/src/…`, `…/git/checkouts/…`) or in the
//!    Rust sources (`/rustc/<hash>/…`, `…/lib/rustlib/src/rust/…`, `library/std/src/…`) is
//!    library code; any other `.rs` file is the application's (the workspace, path
//!    dependencies). Except a library file with no line under a Rust path: the line table
//!    placed the function's code at a callee's file, and rule 4 decides.
//! 3. Without a file, a function without a Rust path (`clock_nanosleep`, `syscall`,
//!    `<unknown>`, `main`) is foreign code (glibc, the vDSO, the C entry point): library.
//! 4. Without a file, a Rust path is judged by its crate, the first segment of the path
//!    (`<tokio::… as core::…>::poll` is `tokio`'s): a crate in [`LIBRARY_CRATES`] is library
//!    code, any other crate the application's.
//!
//! When no frame qualifies, the stack has no culprit ([`Culprit::NotFound`]): looplag never
//! guesses.

use crate::report::{Culprit, StackFrame};

/// Crates whose code is never the culprit, when a frame has no file to tell by: the Rust
/// standard library, tokio and the crates that sit between tokio and an application's code
/// (executors, HTTP and RPC stacks, middleware, tracing, OpenTelemetry), and looplag.
pub(crate) const LIBRARY_CRATES: &[&str] = &[
    // The standard library.
    "std",
    "core",
    "alloc",
    "panic_unwind",
    "panic_abort",
    "std_detect",
    "test",
    "backtrace",
    "backtrace_rs",
    "rustc_demangle",
    "addr2line",
    "gimli",
    // tokio and its companions.
    "tokio",
    "tokio_util",
    "tokio_stream",
    "tokio_macros",
    "mio",
    "futures",
    "futures_util",
    "futures_core",
    "futures_executor",
    "futures_channel",
    "futures_io",
    "async_stream",
    "pin_project",
    "pin_project_lite",
    "parking_lot",
    "parking_lot_core",
    "lock_api",
    "crossbeam",
    "crossbeam_channel",
    "crossbeam_utils",
    "crossbeam_epoch",
    "crossbeam_deque",
    "rayon",
    "rayon_core",
    // HTTP, RPC and middleware.
    "hyper",
    "hyper_util",
    "h2",
    "h3",
    "http",
    "http_body",
    "http_body_util",
    "httparse",
    "bytes",
    "axum",
    "axum_core",
    "axum_extra",
    "tower",
    "tower_http",
    "tower_layer",
    "tower_service",
    "tonic",
    "prost",
    "actix_web",
    "actix_rt",
    "actix_http",
    "actix_server",
    "warp",
    "reqwest",
    "rustls",
    "tokio_rustls",
    "native_tls",
    // Telemetry.
    "tracing",
    "tracing_core",
    "tracing_subscriber",
    "tracing_futures",
    "tracing_opentelemetry",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "looplag",
];

/// The culprit of a captured stack: the first application frame, innermost first.
///
/// Its function name loses any `::{{closure}}` suffix (an `async fn` body is a closure
/// inside the function: `app::handler::{{closure}}` is `app::handler`'s code); the file and
/// line stay those of the frame.
pub(crate) fn find(frames: &[StackFrame], library_prefixes: &[String]) -> Culprit {
    match frames
        .iter()
        .find(|frame| is_application(frame, library_prefixes))
    {
        Some(frame) => Culprit::Found(StackFrame {
            function: without_closures(&frame.function).to_owned(),
            ..frame.clone()
        }),
        None => Culprit::NotFound,
    }
}

/// Whether `frame` is the application's own code (see the module docs for the rules).
pub(crate) fn is_application(frame: &StackFrame, library_prefixes: &[String]) -> bool {
    let path = type_path(&frame.function);
    let marked = |prefix: &String| {
        if prefix.contains('/') {
            // A source path: for frames named without their module path (inlined frames
            // with line-tables-only debug info).
            frame
                .file
                .as_deref()
                .is_some_and(|file| file.contains(prefix.as_str()))
        } else {
            has_prefix(path, prefix) || has_prefix(&frame.function, prefix)
        }
    };
    if library_prefixes.iter().any(marked) {
        return false;
    }
    if let Some(file) = &frame.file {
        let library_file = is_library_file(file);
        // A library file without a line under a Rust path: the line table placed code of
        // the named function at a callee's file with no line (seen: a debug build's spin
        // loop, `demo::app::cpu::{{closure}}` at core's `uint_macros.rs`). The file says
        // nothing about the function there; its crate decides (rule 4).
        let located_elsewhere = library_file && frame.line.is_none() && path.contains("::");
        if !located_elsewhere {
            return !library_file;
        }
    }
    match crate_of(path) {
        Some(krate) => !LIBRARY_CRATES.contains(&krate),
        None => false,
    }
}

/// Whether `file` is no Rust source (C, assembly: foreign code), or is in the cargo registry,
/// a cargo git checkout or the Rust sources.
pub(crate) fn is_library_file(file: &str) -> bool {
    if !file.ends_with(".rs") {
        return true;
    }
    // `\` for paths recorded on Windows hosts (rare: allocate only then).
    let file: std::borrow::Cow<'_, str> = if file.contains('\\') {
        file.replace('\\', "/").into()
    } else {
        file.into()
    };
    const MARKERS: &[&str] = &[
        "/.cargo/registry/",
        "/.cargo/git/",
        // CARGO_HOME elsewhere (`/usr/local/cargo/registry/src/…`).
        "/registry/src/",
        "/git/checkouts/",
        // The standard library: remapped in rustup's builds, or from rust-src.
        "/rustc/",
        "/lib/rustlib/src/rust/",
    ];
    if file.starts_with("rustc/") || MARKERS.iter().any(|marker| file.contains(marker)) {
        return true;
    }
    // A relative `library/std/…` (remapped differently) or an absolute one from a toolchain
    // built from source.
    const STD_DIRS: &[&str] = &[
        "library/std/",
        "library/core/",
        "library/alloc/",
        "library/panic_unwind/",
        "library/panic_abort/",
        "library/stdarch/",
        "library/backtrace/",
        "library/portable-simd/",
        "library/test/",
    ];
    STD_DIRS.iter().any(|dir| {
        file.match_indices(dir)
            .any(|(at, _)| at == 0 || file[..at].ends_with('/'))
    })
}

/// The path a function's name starts with: the name itself, or for an impl block
/// (`<tokio::task::Foo as core::future::Future>::poll`) the implementing type's path.
fn type_path(function: &str) -> &str {
    function.trim_start_matches('<').trim_start_matches('&')
}

/// The crate of a Rust path (`tokio` in `tokio::runtime::park`), or `None` when `path` is no
/// Rust path (a C function, `<unknown>`).
fn crate_of(path: &str) -> Option<&str> {
    let (krate, _) = path.split_once("::")?;
    let is_identifier = !krate.is_empty()
        && krate.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !krate.starts_with(|c: char| c.is_ascii_digit());
    is_identifier.then_some(krate)
}

/// Whether `path` starts with `prefix` on a path boundary: `app::db` covers `app::db`,
/// `app::db::query` and `app::db<T>`, not `app::dbx`.
fn has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => {
            prefix.ends_with("::")
                || !rest.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        }
        None => false,
    }
}

/// `function` without its trailing `::{{closure}}` segments.
pub(crate) fn without_closures(function: &str) -> &str {
    let mut name = function;
    while let Some(outer) = name.strip_suffix("::{{closure}}") {
        name = outer;
    }
    name
}

/// Bounds the distinct culprit function names one instance puts on its metrics.
#[derive(Debug)]
pub(crate) struct MetricNames {
    max: usize,
    seen: std::collections::HashSet<String>,
}

/// What the stall metrics say about one stall's culprit (the names of [`Other`] and
/// [`Unknown`] are in `telemetry.rs`).
///
/// [`Other`]: MetricValue::Other
/// [`Unknown`]: MetricValue::Unknown
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MetricValue {
    /// The culprit's function.
    Function(String),
    /// A culprit past the bound of distinct names.
    Other,
    /// No culprit: no stack, or no application frame in it.
    Unknown,
}

impl MetricNames {
    /// At most `max` distinct names.
    pub(crate) fn new(max: usize) -> Self {
        MetricNames {
            max,
            seen: std::collections::HashSet::new(),
        }
    }

    /// The value of `code.function.name` on the stall metrics for `culprit`: its function,
    /// while fewer than `max` distinct ones were seen (or it is one of them); `Other` past
    /// that; `Unknown` without a culprit.
    pub(crate) fn value(&mut self, culprit: &Culprit) -> MetricValue {
        let Culprit::Found(frame) = culprit else {
            return MetricValue::Unknown;
        };
        if self.seen.contains(&frame.function) {
            return MetricValue::Function(frame.function.clone());
        }
        if self.seen.len() < self.max {
            self.seen.insert(frame.function.clone());
            return MetricValue::Function(frame.function.clone());
        }
        MetricValue::Other
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn frame(function: &str, file: Option<&str>, line: Option<u32>) -> StackFrame {
        StackFrame {
            function: function.to_owned(),
            file: file.map(str::to_owned),
            line,
            address: 0x5555_0000_1000,
        }
    }

    const REGISTRY: &str = "/home/u/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f";
    const RUSTC: &str = "/rustc/17067e9ac6d7e98f18d4a2a3ff2bd8fcd6ffe1e0/library";

    /// A stall in `app::db::legacy_lookup`, called from an axum handler, with line tables.
    fn axum_stack() -> Vec<StackFrame> {
        vec![
            frame("clock_nanosleep", None, None),
            frame(
                "std::sys::pal::unix::thread::Thread::sleep",
                Some(&format!("{RUSTC}/std/src/sys/pal/unix/thread.rs")),
                Some(373),
            ),
            frame(
                "std::thread::sleep",
                Some(&format!("{RUSTC}/std/src/thread/mod.rs")),
                Some(897),
            ),
            frame("app::db::legacy_lookup", Some("/src/app/src/db.rs"), Some(42)),
            frame(
                "app::handlers::users::{{closure}}",
                Some("/src/app/src/handlers.rs"),
                Some(17),
            ),
            frame(
                "<axum::handler::future::IntoServiceFuture<F> as core::future::future::Future>::poll",
                Some(&format!("{REGISTRY}/axum-0.8.4/src/handler/future.rs")),
                Some(12),
            ),
            frame(
                "tokio::runtime::task::harness::poll_future",
                Some(&format!("{REGISTRY}/tokio-1.47.1/src/runtime/task/harness.rs")),
                Some(473),
            ),
        ]
    }

    fn found(culprit: Culprit) -> StackFrame {
        match culprit {
            Culprit::Found(frame) => frame,
            other => panic!("expected a culprit, got {other:?}"),
        }
    }

    #[test]
    fn the_first_application_frame_is_the_culprit() {
        let culprit = found(find(&axum_stack(), &[]));
        assert_eq!(culprit.function, "app::db::legacy_lookup");
        assert_eq!(culprit.file.as_deref(), Some("/src/app/src/db.rs"));
        assert_eq!(culprit.line, Some(42));
    }

    #[test]
    fn a_library_prefix_names_the_caller_without_its_closure_suffix() {
        let prefixes = vec!["app::db".to_owned()];
        let culprit = found(find(&axum_stack(), &prefixes));
        assert_eq!(culprit.function, "app::handlers::users");
        assert_eq!(culprit.line, Some(17));
        // On a path boundary only.
        let culprit = found(find(&axum_stack(), &["app::d".to_owned()]));
        assert_eq!(culprit.function, "app::db::legacy_lookup");
        let culprit = found(find(&axum_stack(), &["app::db::".to_owned()]));
        assert_eq!(culprit.function, "app::handlers::users");
        // A source path, for frames named without their module path.
        let culprit = found(find(&axum_stack(), &["app/src/db.rs".to_owned()]));
        assert_eq!(culprit.function, "app::handlers::users");
    }

    #[test]
    fn a_stack_of_library_code_only_has_no_culprit() {
        let stack = axum_stack();
        let library: Vec<StackFrame> = stack
            .into_iter()
            .filter(|f| !f.function.starts_with("app::"))
            .collect();
        assert_eq!(find(&library, &[]), Culprit::NotFound);
        assert_eq!(find(&[], &[]), Culprit::NotFound);
        assert_eq!(
            find(&axum_stack(), &["app".to_owned()]),
            Culprit::NotFound,
            "the whole crate marked as library"
        );
    }

    #[test]
    fn a_mutex_wait_names_the_function_that_locked() {
        let stack = vec![
            frame("syscall", None, None),
            frame(
                "std::sys::pal::unix::futex::futex_wait",
                Some(&format!("{RUSTC}/std/src/sys/pal/unix/futex.rs")),
                Some(72),
            ),
            frame(
                "std::sys::sync::mutex::futex::Mutex::lock_contended",
                Some(&format!("{RUSTC}/std/src/sys/sync/mutex/futex.rs")),
                Some(66),
            ),
            frame(
                "std::sync::poison::mutex::Mutex<T>::lock",
                Some(&format!("{RUSTC}/std/src/sync/poison/mutex.rs")),
                Some(434),
            ),
            frame("app::cache::refresh", Some("src/cache.rs"), Some(9)),
        ];
        assert_eq!(found(find(&stack, &[])).function, "app::cache::refresh");
    }

    #[test]
    fn inlined_std_code_in_an_application_frame_names_the_application() {
        // A spin loop interrupted inside an inlined `u64::wrapping_add`: two frames at one
        // address, the inlined one first, with core's file (short name: line tables only).
        let stack = vec![
            frame(
                "wrapping_add",
                Some(&format!("{RUSTC}/core/src/num/uint_macros.rs")),
                Some(2164),
            ),
            frame("spin", Some("/src/app/src/cpu.rs"), Some(5)),
        ];
        assert_eq!(found(find(&stack, &[])).function, "spin");
    }

    #[test]
    fn a_library_file_without_a_line_does_not_hide_an_application_function() {
        // A debug build's spin loop interrupted in code the line table gives to core's
        // `uint_macros.rs` without a line, under the application's function (seen in the
        // demo); frames of library crates with such a file stay library code.
        let stack = vec![
            frame(
                "std::sys::pal::unix::time::Timespec::now",
                Some(&format!("{RUSTC}/std/src/sys/pal/unix/time.rs")),
                None,
            ),
            frame(
                "demo::app::cpu::{{closure}}",
                Some(&format!("{RUSTC}/core/src/num/uint_macros.rs")),
                None,
            ),
            frame(
                "demo::app::remember_route::{{closure}}",
                Some("/src/demo/app.rs"),
                Some(124),
            ),
        ];
        assert_eq!(found(find(&stack, &[])).function, "demo::app::cpu");
        // With a line, the file decides as before: an inlined library function.
        let inlined = vec![
            frame(
                "core::num::<impl u64>::wrapping_add",
                Some(&format!("{RUSTC}/core/src/num/uint_macros.rs")),
                Some(2164),
            ),
            frame(
                "demo::app::cpu::{{closure}}",
                Some("/src/demo/app.rs"),
                Some(150),
            ),
        ];
        let culprit = found(find(&inlined, &[]));
        assert_eq!(culprit.line, Some(150));
    }

    #[test]
    fn without_line_tables_the_crate_name_decides() {
        let stack = vec![
            frame("clock_nanosleep", None, None),
            frame("std::thread::sleep", None, None),
            frame("<unknown>", None, None),
            frame("core::ptr::drop_in_place<app::Conn>", None, None),
            frame(
                "<tokio::task::Unconstrained<T> as core::future::future::Future>::poll",
                None,
                None,
            ),
            frame("<app::Conn as core::ops::drop::Drop>::drop", None, None),
            frame("app::main::{{closure}}::{{closure}}", None, None),
        ];
        let culprit = found(find(&stack, &[]));
        assert_eq!(
            culprit.function,
            "<app::Conn as core::ops::drop::Drop>::drop"
        );
        assert_eq!(culprit.file, None);
        let only_library = &stack[..5];
        assert_eq!(find(only_library, &[]), Culprit::NotFound);
        let culprit = found(find(&stack, &["app::Conn".to_owned()]));
        assert_eq!(culprit.function, "app::main");
    }

    #[test]
    fn files_are_told_apart_by_where_they_live() {
        for library in [
            "/home/u/.cargo/registry/src/index.crates.io-6f17d22bba15001f/tokio-1.0.0/src/lib.rs",
            "/usr/local/cargo/registry/src/index.crates.io-6f17d22bba15001f/hyper-1.0.0/src/a.rs",
            "/home/u/.cargo/git/checkouts/tower-abc/1234567/src/lib.rs",
            "/rustc/17067e9ac6d7e98f18d4a2a3ff2bd8fcd6ffe1e0/library/std/src/thread/mod.rs",
            "/home/u/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/lib/rustlib/src/rust/library/core/src/num/mod.rs",
            "library/alloc/src/vec/mod.rs",
            "C:\\Users\\u\\.cargo\\registry\\src\\index\\tokio-1.0.0\\src\\lib.rs",
            "./time/../sysdeps/unix/sysv/linux/clock_nanosleep.c",
            "./misc/../sysdeps/unix/sysv/linux/x86_64/syscall.S",
            "/src/app/native/lz4.c",
        ] {
            assert!(is_library_file(library), "{library}");
        }
        for application in [
            "/src/app/src/main.rs",
            "src/main.rs",
            "/home/u/work/app/crates/db/src/lib.rs",
            "/home/u/work/library/src/lib.rs",
            "/work/wt-culprit/tests/stacks.rs",
        ] {
            assert!(!is_library_file(application), "{application}");
        }
    }

    #[test]
    fn crates_come_from_the_path_or_the_impl_block() {
        assert_eq!(crate_of(type_path("tokio::runtime::park")), Some("tokio"));
        assert_eq!(
            crate_of(type_path("<hyper::proto::h1::Conn<I> as x::Y>::poll")),
            Some("hyper")
        );
        assert_eq!(
            crate_of(type_path("<&app::T as core::fmt::Debug>::fmt")),
            Some("app")
        );
        assert_eq!(crate_of(type_path("clock_nanosleep")), None);
        assert_eq!(crate_of(type_path("<unknown>")), None);
        assert_eq!(
            crate_of(type_path("_ZN3app4main17h0123456789abcdefE")),
            None
        );
    }

    #[test]
    fn closure_suffixes_are_dropped() {
        assert_eq!(
            without_closures("app::f::{{closure}}::{{closure}}"),
            "app::f"
        );
        assert_eq!(
            without_closures("app::f::{{closure}}::g"),
            "app::f::{{closure}}::g"
        );
        assert_eq!(without_closures("app::f"), "app::f");
    }

    #[test]
    fn metric_names_are_bounded_with_other_past_the_bound() {
        let mut names = MetricNames::new(2);
        let culprit = |name: &str| Culprit::Found(frame(name, None, None));
        let function = |name: &str| MetricValue::Function(name.to_owned());
        assert_eq!(names.value(&culprit("a::x")), function("a::x"));
        assert_eq!(names.value(&culprit("a::y")), function("a::y"));
        assert_eq!(names.value(&culprit("a::z")), MetricValue::Other);
        assert_eq!(
            names.value(&culprit("a::x")),
            function("a::x"),
            "a known name keeps its value"
        );
        assert_eq!(names.value(&Culprit::NotFound), MetricValue::Unknown);
        assert_eq!(names.value(&Culprit::NoStack), MetricValue::Unknown);
        let mut none = MetricNames::new(0);
        assert_eq!(none.value(&culprit("a::x")), MetricValue::Other);
    }

    #[test]
    fn finding_the_culprit_takes_microseconds() {
        // A deep stack: 120 library frames above the application's.
        let mut stack = Vec::new();
        for _ in 0..40 {
            stack.extend(
                axum_stack()
                    .into_iter()
                    .filter(|f| !f.function.starts_with("app")),
            );
        }
        stack.extend(axum_stack());
        let prefixes = vec!["app::vendor".to_owned(), "my_sdk".to_owned()];
        let rounds = 2000;
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(find(std::hint::black_box(&stack), &prefixes));
        }
        let each = started.elapsed() / rounds;
        println!(
            "culprit of a {}-frame stack: {each:?} per stall",
            stack.len()
        );
        // Generous: a debug build on a loaded machine; the point is "not milliseconds".
        assert!(each < std::time::Duration::from_millis(5), "{each:?}");
    }
}

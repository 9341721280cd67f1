//! The `#[looplag::main]` attribute. Use it through the `looplag` crate (its `macros`
//! feature, on by default), never directly: the code it generates names `::looplag`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, ItemFn, Lit, Meta, Token};

/// The arguments `#[looplag::main]` accepts, for error messages.
const ACCEPTED: &str =
    "flavor, worker_threads, runtime_name, stall_threshold, sample_interval, crate";

/// The arguments `#[looplag::test]` accepts, for error messages.
const ACCEPTED_TEST: &str = "flavor, worker_threads, start_paused, stall_threshold, crate";

/// Which attribute is being expanded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Main,
    Test,
}

impl Kind {
    fn accepted(self) -> &'static str {
        match self {
            Kind::Main => ACCEPTED,
            Kind::Test => ACCEPTED_TEST,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Main => "#[looplag::main]",
            Kind::Test => "#[looplag::test]",
        }
    }
}

/// Runs an `async fn` on a tokio runtime watched by looplag: a drop-in for `#[tokio::main]`.
///
/// See the `looplag` crate's documentation of `main` for the arguments and what the
/// generated code does.
#[proc_macro_attribute]
pub fn main(args: TokenStream, item: TokenStream) -> TokenStream {
    let item: TokenStream2 = item.into();
    match expand(args.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        Err(err) => with_error(item, err).into(),
    }
}

/// Runs an `async fn` test on its own tokio runtime watched by looplag, and fails it when a
/// poll blocked the runtime: a drop-in for `#[tokio::test]`.
///
/// ```ignore
/// #[looplag::test]                       // current-thread, as #[tokio::test]
/// async fn handles_a_request() { /* … */ }
///
/// #[looplag::test(flavor = "multi_thread", worker_threads = 2, stall_threshold = "200ms")]
/// async fn under_load() { /* … */ }
/// ```
///
/// Arguments: `flavor` (`"current_thread"`, the default, or `"multi_thread"`),
/// `worker_threads` (multi-thread only), `start_paused = true` (needs tokio's `test-util`
/// feature in the test's crate, as with tokio), `stall_threshold` (`"50ms"`; wins over the
/// `LOOPLAG_TEST_STALL_THRESHOLD` variable, which sets it for a whole suite; by default
/// `looplag::testing::DEFAULT_TEST_STALL_THRESHOLD`, 50 ms) and `crate`.
///
/// Each test gets its own looplag instance, runtime and watchdog (tests running at once in
/// one process never see each other's stalls). When the body has returned, the watchdog
/// stops, and the test panics if a poll blocked a worker for longer than the threshold, not
/// counting the time the blocked thread waited for a CPU (nor a stall on no known thread,
/// which cannot be told from a busy machine); the message is the stall report
/// (duration, kind, the application frame that blocked and the top of the stack, the span)
/// and a line saying how to change the threshold. With no tracing subscriber, on stable
/// Rust, polls outside any span are found by estimation: on a current-thread runtime that
/// needs looplag's stack signal (Linux x86_64); elsewhere, only polls inside a span, or every
/// poll under `--cfg tokio_unstable`, are seen. `looplag::testing::assert_no_stalls` is the
/// same for a runtime the test builds itself.
#[proc_macro_attribute]
pub fn test(args: TokenStream, item: TokenStream) -> TokenStream {
    let item: TokenStream2 = item.into();
    match expand_test(args.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        Err(err) => with_error(item, err).into(),
    }
}

/// The error, and the function with its body replaced, so that the error is the only one
/// the user sees (no "`main` function not found" after it).
fn with_error(item: TokenStream2, err: syn::Error) -> TokenStream2 {
    let error = err.to_compile_error();
    match syn::parse2::<ItemFn>(item) {
        Ok(mut function) => {
            function.sig.asyncness = None;
            *function.block = syn::parse_quote!({ loop {} });
            quote!(#error #function)
        }
        Err(_) => error,
    }
}

#[derive(Default)]
struct Args {
    /// `Some(true)` for `flavor = "current_thread"`, `Some(false)` for `"multi_thread"`.
    current_thread: Option<bool>,
    start_paused: bool,
    worker_threads: Option<(usize, Span)>,
    runtime_name: Option<String>,
    stall_threshold: Option<u64>,
    sample_interval: Option<u64>,
    krate: Option<syn::Path>,
}

fn string(expr: &Expr, name: &str) -> syn::Result<String> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) => Ok(text.value()),
        other => Err(syn::Error::new(
            other.span(),
            format!(
                "`{name}` takes a string literal, e.g. {name} = \"{}\"",
                example(name)
            ),
        )),
    }
}

fn example(name: &str) -> &'static str {
    match name {
        "flavor" => "current_thread",
        "runtime_name" => "api",
        "stall_threshold" => "50ms",
        "sample_interval" => "10ms",
        "crate" => "::looplag",
        _ => "",
    }
}

/// `<digits><unit>` with unit `us`, `ms` or `s`, as the `LOOPLAG_*` variables take it; in
/// microseconds.
fn duration_us(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return None;
    }
    let number: u64 = digits.parse().ok()?;
    match unit {
        "us" => Some(number),
        "ms" => number.checked_mul(1_000),
        "s" => number.checked_mul(1_000_000),
        _ => None,
    }
}

fn parse_args(args: TokenStream2, kind: Kind) -> syn::Result<Args> {
    let accepted = kind.accepted();
    let mut parsed = Args::default();
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
    for meta in metas {
        let Meta::NameValue(pair) = &meta else {
            return Err(syn::Error::new(
                meta.span(),
                format!("expected `name = value`; accepted names: {accepted}"),
            ));
        };
        let name = pair
            .path
            .get_ident()
            .map(|ident| ident.to_string())
            .unwrap_or_default();
        match name.as_str() {
            "flavor" => match string(&pair.value, "flavor")?.as_str() {
                "current_thread" => parsed.current_thread = Some(true),
                "multi_thread" => parsed.current_thread = Some(false),
                other => {
                    return Err(syn::Error::new(
                        pair.value.span(),
                        format!(
                            "unknown flavor `{other}`; accepted: \"current_thread\" or \
                             \"multi_thread\""
                        ),
                    ))
                }
            },
            "worker_threads" => {
                let count = match &pair.value {
                    Expr::Lit(ExprLit {
                        lit: Lit::Int(int), ..
                    }) => int.base10_parse::<usize>().ok().filter(|n| *n > 0),
                    _ => None,
                };
                let Some(count) = count else {
                    return Err(syn::Error::new(
                        pair.value.span(),
                        "`worker_threads` takes a whole number above 0, e.g. worker_threads = 4",
                    ));
                };
                parsed.worker_threads = Some((count, pair.value.span()));
            }
            "start_paused" if kind == Kind::Test => {
                let Expr::Lit(ExprLit {
                    lit: Lit::Bool(value),
                    ..
                }) = &pair.value
                else {
                    return Err(syn::Error::new(
                        pair.value.span(),
                        "`start_paused` takes `true` or `false`",
                    ));
                };
                parsed.start_paused = value.value;
            }
            "runtime_name" if kind == Kind::Main => {
                let value = string(&pair.value, "runtime_name")?;
                if value.is_empty()
                    || value.chars().count() > 128
                    || value.chars().any(char::is_control)
                {
                    return Err(syn::Error::new(
                        pair.value.span(),
                        "`runtime_name` takes 1 to 128 characters, no control characters",
                    ));
                }
                parsed.runtime_name = Some(value);
            }
            "stall_threshold" | "sample_interval"
                if kind == Kind::Main || name == "stall_threshold" =>
            {
                let text = string(&pair.value, &name)?;
                let Some(us) = duration_us(&text) else {
                    return Err(syn::Error::new(
                        pair.value.span(),
                        format!(
                            "`{name}` takes a duration: a whole number and a unit, us, ms or \
                             s, with no space (e.g. \"{}\"), not {text:?}",
                            example(&name)
                        ),
                    ));
                };
                if name == "stall_threshold" {
                    parsed.stall_threshold = Some(us);
                } else {
                    parsed.sample_interval = Some(us);
                }
            }
            "crate" => {
                let text = string(&pair.value, "crate")?;
                parsed.krate = Some(syn::parse_str(&text).map_err(|_| {
                    syn::Error::new(
                        pair.value.span(),
                        "`crate` takes a path, e.g. \"::looplag\"",
                    )
                })?);
            }
            _ => {
                return Err(syn::Error::new(
                    pair.path.span(),
                    format!("unknown argument `{name}`; accepted: {accepted}"),
                ))
            }
        }
    }
    match (kind, parsed.current_thread, parsed.worker_threads) {
        (_, Some(true), Some((_, span))) => return Err(syn::Error::new(
            span,
            "`worker_threads` does not go with flavor = \"current_thread\" (one thread runs it)",
        )),
        (Kind::Test, None, Some((_, span))) => {
            return Err(syn::Error::new(
                span,
                "`worker_threads` needs flavor = \"multi_thread\": a test runs on a \
                 current-thread runtime by default, as with #[tokio::test]",
            ))
        }
        _ => {}
    }
    Ok(parsed)
}

fn expand(args: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let args = parse_args(args, Kind::Main)?;
    let mut function = async_fn(item, Kind::Main)?;
    let krate = krate(&args);
    let mut settings = shared_settings(&args);
    if args.current_thread == Some(true) {
        settings.push(quote!(.current_thread()));
    }
    if let Some(name) = &args.runtime_name {
        settings.push(quote!(.runtime_name(#name)));
    }
    if let Some(us) = args.sample_interval {
        settings.push(quote!(.sample_interval(::std::time::Duration::from_micros(#us))));
    }
    run_body(
        &mut function,
        quote!(#krate::__private::Main::new()),
        &settings,
    )?;
    Ok(quote!(#function))
}

/// `crate = ".."`, or `::looplag`.
fn krate(args: &Args) -> TokenStream2 {
    args.krate
        .as_ref()
        .map(|path| quote!(#path))
        .unwrap_or_else(|| quote!(::looplag))
}

/// The builder calls both attributes make alike: `worker_threads`, `stall_threshold`.
fn shared_settings(args: &Args) -> Vec<TokenStream2> {
    let mut settings = Vec::new();
    if let Some((count, _)) = args.worker_threads {
        settings.push(quote!(.worker_threads(#count)));
    }
    if let Some(us) = args.stall_threshold {
        settings.push(quote!(.stall_threshold(::std::time::Duration::from_micros(#us))));
    }
    settings
}

/// Replaces the function's body with `runner`, its `settings`, then `.run(async move body)`.
fn run_body(
    function: &mut ItemFn,
    runner: TokenStream2,
    settings: &[TokenStream2],
) -> syn::Result<()> {
    let body = &function.block;
    let span = body.span();
    let output = match &function.sig.output {
        syn::ReturnType::Default => quote!(()),
        syn::ReturnType::Type(_, ty) => quote!(#ty),
    };
    let block = quote_spanned! {span=>
        {
            let body = async move #body;
            #runner
                #(#settings)*
                .run::<#output, _>(body)
        }
    };
    function.block = syn::parse2(block)?;
    Ok(())
}

/// The function, its `async` taken away; an error when it had none.
fn async_fn(item: TokenStream2, kind: Kind) -> syn::Result<ItemFn> {
    let mut function: ItemFn = syn::parse2(item)?;
    if function.sig.asyncness.take().is_none() {
        return Err(syn::Error::new(
            function.sig.fn_token.span(),
            format!(
                "{} goes on an `async fn`; the `async` keyword is missing",
                kind.name()
            ),
        ));
    }
    Ok(function)
}

fn expand_test(args: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let args = parse_args(args, Kind::Test)?;
    let mut function = async_fn(item, Kind::Test)?;
    if let Some(input) = function.sig.inputs.first() {
        return Err(syn::Error::new(
            input.span(),
            "#[looplag::test] functions take no arguments",
        ));
    }
    let krate = krate(&args);
    let mut settings = shared_settings(&args);
    if args.current_thread == Some(false) {
        settings.push(quote!(.multi_thread()));
    }
    if args.start_paused {
        // tokio's `start_paused` needs its `test-util` feature, in the test's crate: the
        // call is made there, as `#[tokio::test(start_paused = true)]` makes it.
        settings.push(
            quote!(.configure(|builder: &mut ::tokio::runtime::Builder| {
                builder.start_paused(true);
            })),
        );
    }
    let name = function.sig.ident.to_string();
    run_body(
        &mut function,
        quote!(#krate::__private::Test::new(::core::module_path!(), #name)),
        &settings,
    )?;
    Ok(quote!(#[::core::prelude::v1::test] #function))
}

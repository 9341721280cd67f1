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
    current_thread: bool,
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

fn parse_args(args: TokenStream2) -> syn::Result<Args> {
    let mut parsed = Args::default();
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
    for meta in metas {
        let Meta::NameValue(pair) = &meta else {
            return Err(syn::Error::new(
                meta.span(),
                format!("expected `name = value`; accepted names: {ACCEPTED}"),
            ));
        };
        let name = pair
            .path
            .get_ident()
            .map(|ident| ident.to_string())
            .unwrap_or_default();
        match name.as_str() {
            "flavor" => match string(&pair.value, "flavor")?.as_str() {
                "current_thread" => parsed.current_thread = true,
                "multi_thread" => parsed.current_thread = false,
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
            "runtime_name" => {
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
            "stall_threshold" | "sample_interval" => {
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
                    format!("unknown argument `{name}`; accepted: {ACCEPTED}"),
                ))
            }
        }
    }
    if let (true, Some((_, span))) = (parsed.current_thread, parsed.worker_threads) {
        return Err(syn::Error::new(
            span,
            "`worker_threads` does not go with flavor = \"current_thread\" (one thread runs it)",
        ));
    }
    Ok(parsed)
}

fn expand(args: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let args = parse_args(args)?;
    let mut function: ItemFn = syn::parse2(item)?;
    if function.sig.asyncness.take().is_none() {
        return Err(syn::Error::new(
            function.sig.fn_token.span(),
            "#[looplag::main] goes on an `async fn`; the `async` keyword is missing",
        ));
    }
    let krate = args
        .krate
        .map(|path| quote!(#path))
        .unwrap_or_else(|| quote!(::looplag));
    let mut settings = Vec::new();
    if args.current_thread {
        settings.push(quote!(.current_thread()));
    }
    if let Some((count, _)) = args.worker_threads {
        settings.push(quote!(.worker_threads(#count)));
    }
    if let Some(name) = args.runtime_name {
        settings.push(quote!(.runtime_name(#name)));
    }
    if let Some(us) = args.stall_threshold {
        settings.push(quote!(.stall_threshold(::std::time::Duration::from_micros(#us))));
    }
    if let Some(us) = args.sample_interval {
        settings.push(quote!(.sample_interval(::std::time::Duration::from_micros(#us))));
    }
    let body = &function.block;
    let span = body.span();
    let output = match &function.sig.output {
        syn::ReturnType::Default => quote!(()),
        syn::ReturnType::Type(_, ty) => quote!(#ty),
    };
    let block = quote_spanned! {span=>
        {
            let body = async move #body;
            #krate::__private::Main::new()
                #(#settings)*
                .run::<#output, _>(body)
        }
    };
    function.block = syn::parse2(block)?;
    Ok(quote!(#function))
}

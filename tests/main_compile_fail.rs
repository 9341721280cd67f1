//! `#[looplag::main]` refuses wrong arguments at compile time, each with a message that says
//! what is accepted (the expected messages are the `.stderr` files in `tests/ui/`;
//! `TRYBUILD=overwrite cargo test --test main_compile_fail` rewrites them).

#[test]
fn wrong_arguments_are_compile_errors_with_a_clear_message() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}

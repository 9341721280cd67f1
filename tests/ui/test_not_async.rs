#[looplag::test]
fn not_async() {}

fn main() {}

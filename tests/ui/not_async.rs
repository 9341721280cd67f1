#[looplag::main]
fn main() {}

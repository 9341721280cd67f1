#[looplag::test(runtime_name = "api")]
async fn takes_no_runtime_name() {}

fn main() {}

#[looplag::main(stall_threshold = "50 ms")]
async fn main() {}

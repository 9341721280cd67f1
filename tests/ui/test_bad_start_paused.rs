#[looplag::test(start_paused = "yes")]
async fn bad_start_paused() {}

fn main() {}

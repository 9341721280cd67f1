//! What runs on the application's threads: the per-thread slots written at span enter/exit
//! and park/unpark, the clock they read, the close gate a closing span passes, and the
//! watchdog's doze flag. Nothing here takes a lock or allocates on the hot path, and nothing
//! here knows about the watchdog's types (ARCHITECTURE.md, "Thread model").

pub(crate) mod close_gate;
pub(crate) mod doze;
pub(crate) mod slots;
pub(crate) mod sync;

//! AFL target: the stats parser (see fuzz/src/checks.rs).
#[path = "../src/checks.rs"]
#[allow(dead_code)] // each target uses one of the checks
mod checks;

fn main() {
    afl::fuzz!(|data: &[u8]| checks::stats(data));
}

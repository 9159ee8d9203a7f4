//! AFL target: the stats parser (see fuzz/src/checks.rs).
#[path = "../src/checks.rs"]
mod checks;

fn main() {
    afl::fuzz!(|data: &[u8]| checks::stats(data));
}

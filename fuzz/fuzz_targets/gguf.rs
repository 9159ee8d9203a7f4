//! AFL target: the gguf parser (see fuzz/src/checks.rs).
#[path = "../src/checks.rs"]
mod checks;

fn main() {
    afl::fuzz!(|data: &[u8]| checks::gguf(data));
}

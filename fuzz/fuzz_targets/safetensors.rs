//! AFL target: the safetensors parser (see fuzz/src/checks.rs).
#[path = "../src/checks.rs"]
mod checks;

fn main() {
    afl::fuzz!(|data: &[u8]| checks::safetensors(data));
}

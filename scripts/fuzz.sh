#!/usr/bin/env bash
# Coverage-guided fuzzing of the GGUF, safetensors-header and stats-file
# parsers with AFL++ (the `afl` crate: stable Rust, LLVM sanitizer-coverage
# instrumentation). Each target runs for a fixed time from its committed
# corpus (fuzz/corpus/<target>); new inputs AFL finds interesting are
# minimised into the corpus (commit the small ones), crashes are copied to
# fuzz/out/crashes-<target>/ and make the script fail.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default 60, all three)
#
# Needs cargo-afl (`cargo install cargo-afl`, which builds AFL++ from the
# crate on first use with `cargo afl config --build`). Not run by CI: CI
# replays the corpus (tests/fuzz_corpus.rs).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf safetensors stats)

command -v cargo-afl >/dev/null || { echo "cargo-afl not found: cargo install cargo-afl" >&2; exit 1; }
cargo afl config --build >/dev/null 2>&1 || true
cargo afl build --release
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1
status=0
for t in "${targets[@]}"; do
  out=out/$t
  rm -rf "$out"
  mkdir -p out
  echo "fuzzing $t for ${secs}s" >&2
  cargo afl fuzz -V "$secs" -i "corpus/$t" -o "$out" "target/release/$t" >"out/$t.log" 2>&1 || true
  stats=$out/default/fuzzer_stats
  [ -f "$stats" ] || { echo "$t: AFL did not run, see fuzz/out/$t.log" >&2; status=1; continue; }
  grep -E '^(execs_done|corpus_count|saved_crashes|bitmap_cvg)' "$stats" | sed "s/^/$t: /" >&2
  # Interesting inputs, minimised, back into the corpus (small ones only).
  cargo afl cmin -i "$out/default/queue" -o "out/cmin-$t" -- "target/release/$t" >/dev/null 2>&1 || true
  for f in out/cmin-$t/*; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 16384 ] || continue
    cp "$f" "corpus/$t/afl-$(sha256sum "$f" | cut -c1-16)"
  done
  crashes=$(find "$out/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
  if [ "$crashes" -gt 0 ]; then
    mkdir -p "out/crashes-$t"
    cp "$out"/default/crashes/id:* "out/crashes-$t/"
    echo "$t: $crashes crashing inputs in fuzz/out/crashes-$t" >&2
    status=1
  fi
done
exit $status

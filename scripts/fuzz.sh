#!/usr/bin/env bash
# Coverage-guided fuzzing of the GGUF, safetensors-header and stats-file
# parsers with AFL++ (the `afl` crate: stable Rust, LLVM sanitizer-coverage
# instrumentation). Each target runs for a fixed time from its committed
# corpus (fuzz/corpus/<target>); the inputs AFL found that reach new
# coverage are added to the corpus (commit them), crashes are copied to
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
  # Inputs that reach edges the corpus does not, smallest first, back into
  # the corpus (each at most 16 KiB, 100 KiB a target and run): a greedy
  # minimisation over afl-showmap's edges (afl-cmin finds no tuples with
  # the small map these targets have).
  rm -rf "out/maps-$t" "out/maps-corpus-$t"
  cargo afl showmap -q -i "$out/default/queue" -o "out/maps-$t" -- "target/release/$t" >/dev/null 2>&1 || true
  cargo afl showmap -q -i "corpus/$t" -o "out/maps-corpus-$t" -- "target/release/$t" >/dev/null 2>&1 || true
  python3 - "$out/default/queue" "out/maps-$t" "out/maps-corpus-$t" "corpus/$t" <<'PY'
import hashlib, os, shutil, sys
queue, maps, corpus_maps, corpus = sys.argv[1:]
def tuples(d, name):
    try:
        with open(os.path.join(d, name)) as f:
            # Edges only (not their hit-count buckets): a few inputs each.
            return {l.split(":")[0] for l in f if l.strip()}
    except OSError:
        return set()
seen = set()
for n in os.listdir(corpus_maps):
    seen |= tuples(corpus_maps, n)
added, budget = 0, 100 * 1024  # bytes added per target per run
for n in sorted(os.listdir(queue), key=lambda n: os.path.getsize(os.path.join(queue, n))):
    p = os.path.join(queue, n)
    if not os.path.isfile(p) or os.path.getsize(p) > 16384:
        continue
    new = tuples(maps, n) - seen
    if new and os.path.getsize(p) <= budget:
        budget -= os.path.getsize(p)
        seen |= new
        data = open(p, "rb").read()
        shutil.copy(p, os.path.join(corpus, "afl-" + hashlib.sha256(data).hexdigest()[:16]))
        added += 1
print(f"{os.path.basename(corpus)}: {added} inputs with new coverage added to the corpus", file=sys.stderr)
PY
  crashes=$(find "$out/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
  if [ "$crashes" -gt 0 ]; then
    mkdir -p "out/crashes-$t"
    cp "$out"/default/crashes/id:* "out/crashes-$t/"
    echo "$t: $crashes crashing inputs in fuzz/out/crashes-$t" >&2
    status=1
  fi
done
exit $status

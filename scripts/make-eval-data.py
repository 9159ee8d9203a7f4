#!/usr/bin/env python3
"""Builds the evaluation sets under assets/eval/ from packages on the Python
package index (no dataset hub is reachable here; see docs DATA.md):

  gsm_symbolic.jsonl       GSM-symbolic word problems (NOT GSM8K: generated
                           offline from GSM8K test templates by
                           reasoning-gym==0.1.25, `create_dataset('gsm_symbolic',
                           size=N, seed=S)`); rows {question, answer, answer_value,
                           label, seed, index}, answer = worked solution ending
                           "#### N" (what `rku-engine eval gen` reads)
  gsm_symbolic_calibration.jsonl
                           GSM-symbolic calibration prompts, the same generator
                           and row format (label "GSM-symbolic-calibration"), for
                           `rku-engine traces` (self-generated calibration,
                           METHODS.md section 11); never an evaluation question
  bigbench_<task>.jsonl    multiple choice from bigbench==1.0.0's
                           benchmark_tasks/<task>/task.json (source archive only);
                           rows {query, choices, gold} (what `eval mc` reads)
  SHA256SUMS               sha256 of every file above

The query of a BIG-bench example follows its task.json: task_prefix +
example_input_prefix (default "\\nQ: ") + input [+ "\\n  choice: c" per choice
when append_choices_to_input, default true] + example_output_prefix (default
"\\nA: ") with trailing white space removed, leading newlines removed; the
choices are the target_scores keys in file order, gold the first with the
highest score. Examples without target_scores are skipped.

Seeds. reasoning-gym draws row i of `create_dataset(..., size=N, seed=S)`
from `random.Random(S + i)` (and the templates from `random.Random(S)`), so
a dataset uses the generator seeds S .. S+N-1. The evaluation problems use
--seed (default 42: seeds 42..541); the calibration prompts use
--calib-seed (default 1000000: seeds 1000000..1000499). The two ranges
must not overlap (checked), and a calibration row whose question text
equals an evaluation question anyway (the same template with the same
numbers) is dropped and counted; its `index` is the generator's row.

Idempotent: when every output exists and matches SHA256SUMS nothing is done.
Otherwise the files are rebuilt; a rebuild that differs from an existing
SHA256SUMS is an error (upstream or generator drift) unless --force. The
downloaded archive and the outputs for the default arguments are checked
against sums pinned below.

Usage: scripts/make-eval-data.py [--size 500] [--seed 42]
       [--calib-size 500] [--calib-seed 1000000]
       [--tasks winowhy,strategyqa,physical_intuition] [--out assets/eval] [--force]
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RG_VERSION = "0.1.25"
BB_ARCHIVE = "bigbench-1.0.0.tar.gz"
BB_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
DEFAULTS = {"size": 500, "seed": 42, "calib_size": 500, "calib_seed": 1_000_000,
            "tasks": "winowhy,strategyqa,physical_intuition"}
# Output sums for the default arguments (checked when those are used).
PINNED = {
    "gsm_symbolic.jsonl": "4c2ebbb81264e6a0f7865063c2b549ca3822e3efa839025f80d254447f4f1239",
    "gsm_symbolic_calibration.jsonl": "2ada1438c47f07d3f3e07abb886cee43c2d2110273beb66aee8ec34ef3a62091",
    "bigbench_winowhy.jsonl": "8c2bf15cf99e7f8bd0a90879e249369570eec89c33f27d1da84d8b45e8d25190",
    "bigbench_strategyqa.jsonl": "ecbfa73b169a3af18fd21a9df01a149c09aa228201533a6abb89268e44c04bf7",
    "bigbench_physical_intuition.jsonl": "d9be70c9b6d878b458c9f59ac1f7732bfb54654630808e19d3c08eeca03f1ed7",
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_jsonl(path, rows):
    tmp = path.with_suffix(".jsonl.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def reasoning_gym(cache):
    """Imports reasoning_gym, installing the pinned version into `cache` first."""
    target = cache / f"reasoning-gym-{RG_VERSION}"
    if not (target / "reasoning_gym").is_dir():
        print(f"installing reasoning-gym=={RG_VERSION} into {target}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target),
                        f"reasoning-gym=={RG_VERSION}"], check=True)
    sys.path.insert(0, str(target))
    import reasoning_gym
    return reasoning_gym


def gsm_symbolic(cache, size, seed, label="GSM-symbolic"):
    rg = reasoning_gym(cache)
    rows = []
    for i, x in enumerate(rg.create_dataset("gsm_symbolic", size=size, seed=seed)):
        value = x["metadata"]["answer_value"]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if str(value) != x["answer"].strip():
            raise SystemExit(f"gsm_symbolic row {i}: answer {x['answer']!r} != answer_value {value!r}")
        cot = x["metadata"].get("answer_cot", "").strip()
        tail = cot.rsplit("####", 1)[-1].strip().replace(",", "") if "####" in cot else None
        answer = cot if tail == str(value) else f"{cot}\n#### {value}".strip()
        rows.append({"question": x["question"], "answer": answer, "answer_value": value,
                     "label": label, "seed": seed, "index": i})
    return rows


def gsm_calibration(cache, size, seed, eval_rows, eval_seed, eval_size):
    """Calibration prompts from generator seeds disjoint from the evaluation
    problems' (see the module doc), without any evaluation question."""
    if seed < eval_seed + eval_size and eval_seed < seed + size:
        raise SystemExit(f"calibration seeds {seed}..{seed + size - 1} overlap the evaluation "
                         f"seeds {eval_seed}..{eval_seed + eval_size - 1}: choose another --calib-seed")
    asked = set(r["question"] for r in eval_rows)
    rows = gsm_symbolic(cache, size, seed, label="GSM-symbolic-calibration")
    kept = [r for r in rows if r["question"] not in asked]
    if len(kept) < len(rows):
        print(f"calibration: dropped {len(rows) - len(kept)} prompts equal to evaluation questions",
              file=sys.stderr)
    return kept


def bigbench_archive(cache):
    path = cache / BB_ARCHIVE
    if not path.exists() or sha256(path) != BB_SHA256:
        print("downloading bigbench==1.0.0 (source archive, 358 MB)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", "bigbench==1.0.0", "-d", str(cache)], check=True)
    got = sha256(path)
    if got != BB_SHA256:
        raise SystemExit(f"{path}: sha256 {got}, expected {BB_SHA256}")
    return path


def bigbench_tasks(archive, tasks):
    found = {}
    with tarfile.open(archive, "r:gz") as t:
        for m in t:
            p = m.name.split("/")
            if len(p) == 5 and p[2] == "benchmark_tasks" and p[3] in tasks and p[4] == "task.json":
                found[p[3]] = json.load(t.extractfile(m))
    missing = set(tasks) - set(found)
    if missing:
        raise SystemExit(f"{archive}: no task.json for {sorted(missing)}")
    return found


def mc_rows(task):
    pre = task.get("task_prefix", "")
    inp = task.get("example_input_prefix", "\nQ: ")
    out = task.get("example_output_prefix", "\nA: ")
    rows = []
    for ex in task["examples"]:
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        best = max(scores.values())
        text = ex["input"]
        if task.get("append_choices_to_input", True):
            text += "".join(f"\n  choice: {c}" for c in choices)
        query = (pre + inp + text + out).rstrip().lstrip("\n")
        rows.append({"query": query, "choices": choices,
                     "gold": next(i for i, c in enumerate(choices) if scores[c] == best)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=DEFAULTS["size"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                    help="generator seed of the evaluation problems")
    ap.add_argument("--calib-size", type=int, default=DEFAULTS["calib_size"])
    ap.add_argument("--calib-seed", type=int, default=DEFAULTS["calib_seed"],
                    help="generator seed of the calibration prompts (disjoint from --seed's range)")
    ap.add_argument("--tasks", default=DEFAULTS["tasks"])
    ap.add_argument("--out", type=Path, default=ROOT / "assets/eval")
    ap.add_argument("--cache", type=Path, default=ROOT / "assets/wheels")
    ap.add_argument("--force", action="store_true", help="accept outputs that differ from SHA256SUMS")
    a = ap.parse_args()
    tasks = [t for t in a.tasks.split(",") if t]
    names = (["gsm_symbolic.jsonl", "gsm_symbolic_calibration.jsonl"]
             + [f"bigbench_{t}.jsonl" for t in tasks])
    sums_path = a.out / "SHA256SUMS"
    recorded = {}
    if sums_path.exists():
        for line in sums_path.read_text().splitlines():
            s, n = line.split(maxsplit=1)
            recorded[n] = s
    if all((a.out / n).exists() and recorded.get(n) == sha256(a.out / n) for n in names):
        print(f"{a.out}: up to date ({len(names)} files match SHA256SUMS)", file=sys.stderr)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    a.cache.mkdir(parents=True, exist_ok=True)
    problems = gsm_symbolic(a.cache, a.size, a.seed)
    write_jsonl(a.out / "gsm_symbolic.jsonl", problems)
    write_jsonl(a.out / "gsm_symbolic_calibration.jsonl",
                gsm_calibration(a.cache, a.calib_size, a.calib_seed, problems, a.seed, a.size))
    for name, task in bigbench_tasks(bigbench_archive(a.cache), tasks).items():
        write_jsonl(a.out / f"bigbench_{name}.jsonl", mc_rows(task))
    sums = {n: sha256(a.out / n) for n in names}
    defaults = ((a.size, a.seed, a.calib_size, a.calib_seed, a.tasks)
                == tuple(DEFAULTS[k] for k in ("size", "seed", "calib_size", "calib_seed", "tasks")))
    expected = {**(PINNED if defaults else {}), **recorded}
    drift = [n for n in names if n in expected and expected[n] != sums[n]]
    if drift and not a.force:
        raise SystemExit(f"rebuilt files differ from their recorded sha256: {drift} (--force to accept)")
    recorded.update(sums)
    sums_path.write_text("".join(f"{s}  {n}\n" for n, s in sorted(recorded.items())))
    for n in names:
        rows = sum(1 for _ in open(a.out / n, encoding="utf-8"))
        print(f"{a.out / n}: {rows} rows, sha256 {sums[n][:16]}…", file=sys.stderr)


if __name__ == "__main__":
    main()

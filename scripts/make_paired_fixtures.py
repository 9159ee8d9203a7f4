#!/usr/bin/env python3
"""Fixtures of `eval paired` (src/eval/paired.rs, docs/METHODS.md section 8),
computed here independently of the Rust code, in Python's integers:

  tests/fixtures/paired/candidate.jsonl, baseline.jsonl
      per-problem records as `eval gen --out` writes them (index, prompt,
      generation, extracted, gold, correct, finish, new_tokens) for 40
      made-up problems, written in different orders;
  tests/fixtures/paired/expected.json
      the 2x2 table, McNemar's exact p (math.comb), and the percentile
      bootstrap intervals of the accuracy difference and ratio for
      RESAMPLES resamples under SEED, drawing problem
      floor(h * n / 2^64), h = sm(sm(sm(seed) ^ r) ^ d), sm = splitmix64,
      the quantiles linearly interpolated at q * (m - 1).

Usage: python3 scripts/make_paired_fixtures.py
"""
import json
import math
import pathlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/paired"
MASK = (1 << 64) - 1
SEED = 12345
RESAMPLES = 2000


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def quantile(sorted_values, q):
    h = q * (len(sorted_values) - 1)
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def main():
    n = 40
    # Made-up outcomes: the baseline solves every third problem and one
    # more; the candidate keeps some of those, loses others, gains two.
    base = [i % 3 == 0 or i == 7 for i in range(n)]
    cand = [(b and i % 4 != 0) or i in (5, 22) for i, b in enumerate(base)]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, outcomes, order in (
        ("candidate", cand, range(n)),
        ("baseline", base, reversed(range(n))),
    ):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for i in order:
                rec = {"index": i + 100, "prompt": f"Question: problem {i}?\nAnswer:",
                       "generation": "The answer is 1.", "extracted": "1",
                       "gold": "1" if outcomes[i] else "2", "correct": outcomes[i],
                       "finish": "eos", "new_tokens": 5}
                f.write(json.dumps(rec) + "\n")
    pairs = list(zip(cand, base))
    cell = lambda a, b: sum(1 for p in pairs if p == (a, b))
    b_only_cand, c_only_base = cell(True, False), cell(False, True)
    d = b_only_cand + c_only_base
    p = min(1.0, 2 * sum(math.comb(d, i) for i in range(min(b_only_cand, c_only_base) + 1)) / 2**d)
    diffs, ratios = [], []
    for r in range(RESAMPLES):
        ra = rb = 0
        for k in range(n):
            h = splitmix64(splitmix64(splitmix64(SEED) ^ r) ^ k)
            a, b = pairs[(h * n) >> 64]
            ra += a
            rb += b
        diffs.append((ra - rb) / n)
        if rb:
            ratios.append(ra / rb)
    diffs.sort()
    ratios.sort()
    ka, kb = sum(cand), sum(base)
    expected = {
        "n": n, "seed": SEED, "resamples": RESAMPLES,
        "candidate_correct": ka, "baseline_correct": kb,
        "both": cell(True, True), "only_candidate": b_only_cand,
        "only_baseline": c_only_base, "neither": cell(False, False),
        "mcnemar_p": p, "difference": (ka - kb) / n,
        "difference_ci95": [quantile(diffs, 0.025), quantile(diffs, 0.975)],
        "ratio": ka / kb,
        "ratio_ci95": [quantile(ratios, 0.025), quantile(ratios, 0.975)],
        "ratio_undefined_resamples": RESAMPLES - len(ratios),
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(json.dumps(expected))


if __name__ == "__main__":
    main()

//! Two models' accuracy on the same problems, compared problem by problem
//! (METHODS.md section 8, `eval paired`): from the per-problem records of
//! two `eval gen --out` runs, the 2×2 table of who solved what, McNemar's
//! exact test, and paired bootstrap intervals of the accuracy ratio and
//! difference (a pruned model against the dense one: "keeps ≥ 50% of the
//! dense accuracy" is a statement about the ratio).
use crate::eval::gen::wilson95;
use crate::model::decode::splitmix64;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What `eval paired` reads of one per-problem record: the problem's row
/// in the data file, the prompt the model saw, and whether it was right.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub prompt: String,
    pub correct: bool,
}

/// Reads a per-problem jsonl of `eval gen --out` (src/eval/gen.rs's
/// `GenRecord`): one object per non-blank line with `index` (an integer
/// ≥ 0), `prompt` (a string) and `correct` (a boolean); where `gold` is
/// given, `correct` must be (`extracted` == `gold`); other fields are
/// ignored. Errs on a malformed line, a `correct` that contradicts its
/// answers, a repeated index, or no records.
pub fn read_outcomes(path: &Path) -> Result<BTreeMap<u64, Outcome>> {
    let text = crate::io::read_regular_text(path, "a per-problem record file")?;
    let mut out = BTreeMap::new();
    for (no, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: &str| Error::format(path, format!("line {}: {msg}", no + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let index = v["index"]
            .as_u64()
            .ok_or_else(|| bad("no `index` (an integer ≥ 0)"))?;
        let prompt = v["prompt"]
            .as_str()
            .ok_or_else(|| bad("no `prompt` (a string)"))?
            .to_string();
        let correct = v["correct"]
            .as_bool()
            .ok_or_else(|| bad("no `correct` (true or false)"))?;
        // `eval gen` sets correct = (extracted == gold); a record that says
        // otherwise was edited or made by something else.
        if let Some(gold) = v.get("gold").filter(|g| !g.is_null()) {
            let gold = gold.as_str().ok_or_else(|| bad("`gold` is not a string"))?;
            let extracted = match &v["extracted"] {
                serde_json::Value::Null => None,
                e => Some(
                    e.as_str()
                        .ok_or_else(|| bad("`extracted` is not a string or null"))?,
                ),
            };
            if correct != (extracted == Some(gold)) {
                return Err(bad(&format!(
                    "`correct` is {correct} for the extracted answer {extracted:?} and gold {gold:?}"
                )));
            }
        }
        if out.insert(index, Outcome { prompt, correct }).is_some() {
            return Err(bad(&format!("problem {index} appears twice")));
        }
    }
    if out.is_empty() {
        return Err(Error::format(path, "no per-problem records"));
    }
    Ok(out)
}

/// One side's accuracy k/n with its 95% Wilson interval.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Side {
    pub correct: usize,
    pub accuracy: f64,
    pub ci95: (f64, f64),
}

/// The paired comparison of a candidate (e.g. a pruned model) with a
/// baseline (the dense model) on the same n problems.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Paired {
    pub n: usize,
    pub candidate: Side,
    pub baseline: Side,
    /// The 2×2 table: problems both solved, only the candidate, only the
    /// baseline, neither.
    pub both: usize,
    pub only_candidate: usize,
    pub only_baseline: usize,
    pub neither: usize,
    /// McNemar's exact two-sided p-value on the discordant problems.
    pub mcnemar_p: f64,
    /// candidate accuracy − baseline accuracy, and its bootstrap interval.
    pub difference: f64,
    pub difference_ci95: (f64, f64),
    /// candidate accuracy / baseline accuracy and its bootstrap interval;
    /// null when the baseline solved nothing.
    pub ratio: Option<f64>,
    pub ratio_ci95: Option<(f64, f64)>,
    /// Resamples in which the baseline solved nothing (no ratio; the
    /// ratio's interval is over the others).
    pub ratio_undefined_resamples: usize,
    pub resamples: usize,
    pub seed: u64,
}

/// Pairs two record sets problem by problem: they must hold the same
/// problems (indices) with the same prompts, else the comparison would not
/// be paired. Returns (candidate correct, baseline correct) per problem.
pub fn pair(
    candidate: &BTreeMap<u64, Outcome>,
    baseline: &BTreeMap<u64, Outcome>,
    names: (&Path, &Path),
) -> Result<Vec<(bool, bool)>> {
    let missing = |from: &BTreeMap<u64, Outcome>, to: &BTreeMap<u64, Outcome>| {
        from.keys().find(|i| !to.contains_key(i)).copied()
    };
    let (a, b) = (names.0.display(), names.1.display());
    if let Some(i) = missing(candidate, baseline) {
        return Err(Error::Invalid(format!(
            "problem {i} is in {a} but not in {b}: not the same problems ({} and {} records)",
            candidate.len(),
            baseline.len()
        )));
    }
    if let Some(i) = missing(baseline, candidate) {
        return Err(Error::Invalid(format!(
            "problem {i} is in {b} but not in {a}: not the same problems ({} and {} records)",
            baseline.len(),
            candidate.len()
        )));
    }
    candidate
        .iter()
        .map(|(i, c)| {
            let base = &baseline[i];
            if c.prompt != base.prompt {
                return Err(Error::Invalid(format!(
                    "problem {i} has different prompts in {a} and {b}: not the same evaluation (data, shots or --chat differ)"
                )));
            }
            Ok((c.correct, base.correct))
        })
        .collect()
}

/// McNemar's exact test: under the null each of the d = b + c discordant
/// problems favours either side with probability ½, so
/// p = min(1, 2·Σ_{i ≤ min(b, c)} C(d, i)/2^d). The binomial terms are
/// built in log space, ln C(d, i+1) = ln C(d, i) + ln((d − i)/(i + 1)),
/// so large d does not underflow 2^−d before the sum.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let d = b + c;
    let ln_half = -(d as f64) * std::f64::consts::LN_2;
    let mut ln_term = ln_half; // ln(C(d, 0)/2^d)
    let mut tail = 0.0;
    for i in 0..=b.min(c) {
        tail += ln_term.exp();
        ln_term += ((d - i) as f64 / (i + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

/// Index of draw `draw` of resample `resample` among n problems:
/// h = sm(sm(sm(seed) ^ resample) ^ draw), sm = splitmix64, and
/// ⌊h·n/2^64⌋ (uniform to within n/2^64).
fn draw_index(seed: u64, resample: u64, draw: u64, n: usize) -> usize {
    let h = splitmix64(splitmix64(splitmix64(seed) ^ resample) ^ draw);
    ((h as u128 * n as u128) >> 64) as usize
}

/// The q-quantile of sorted values with linear interpolation between
/// order statistics (position q·(m − 1); numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = q * (sorted.len() - 1) as f64;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The paired comparison of per-problem outcomes (candidate, baseline).
/// The intervals are percentile bootstraps: `resamples` times, draw n
/// problems with replacement ([`draw_index`]) and recompute the
/// difference and the ratio of the two accuracies over the drawn
/// problems; the interval is the 2.5% and 97.5% quantiles ([`quantile`]).
/// Resampling problems keeps each problem's pair of outcomes together,
/// which is what makes the interval narrower than the two accuracies'
/// separate intervals suggest when the models succeed on the same problems.
pub fn compare(outcomes: &[(bool, bool)], resamples: usize, seed: u64) -> Result<Paired> {
    let n = outcomes.len();
    if n == 0 || resamples == 0 {
        return Err(Error::Invalid(
            "a paired comparison needs at least one problem and one resample".into(),
        ));
    }
    let cell = |a: bool, b: bool| outcomes.iter().filter(|&&o| o == (a, b)).count();
    let (both, only_candidate) = (cell(true, true), cell(true, false));
    let (only_baseline, neither) = (cell(false, true), cell(false, false));
    let side = |k: usize| Side {
        correct: k,
        accuracy: k as f64 / n as f64,
        ci95: wilson95(k, n),
    };
    let (ka, kb) = (both + only_candidate, both + only_baseline);
    let mut diffs = Vec::with_capacity(resamples);
    let mut ratios = Vec::with_capacity(resamples);
    for r in 0..resamples {
        let (mut ra, mut rb) = (0usize, 0usize);
        for d in 0..n {
            let (a, b) = outcomes[draw_index(seed, r as u64, d as u64, n)];
            ra += a as usize;
            rb += b as usize;
        }
        diffs.push((ra as f64 - rb as f64) / n as f64);
        if rb > 0 {
            ratios.push(ra as f64 / rb as f64);
        }
    }
    diffs.sort_by(f64::total_cmp);
    ratios.sort_by(f64::total_cmp);
    let interval = |v: &[f64]| (quantile(v, 0.025), quantile(v, 0.975));
    Ok(Paired {
        n,
        candidate: side(ka),
        baseline: side(kb),
        both,
        only_candidate,
        only_baseline,
        neither,
        mcnemar_p: mcnemar_exact(only_candidate, only_baseline),
        difference: (ka as f64 - kb as f64) / n as f64,
        difference_ci95: interval(&diffs),
        ratio: (kb > 0).then(|| ka as f64 / kb as f64),
        ratio_ci95: (kb > 0 && !ratios.is_empty()).then(|| interval(&ratios)),
        ratio_undefined_resamples: resamples - ratios.len(),
        resamples,
        seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the binomial sums written out by hand: d = 7, min 1:
    /// 2·(1 + 7)/128; d = 5, min 0: 2/32; equal counts: 1 (capped).
    #[test]
    fn mcnemar_matches_the_binomial_sums() {
        assert!((mcnemar_exact(1, 6) - 16.0 / 128.0).abs() < 1e-15);
        assert!((mcnemar_exact(0, 5) - 2.0 / 32.0).abs() < 1e-15);
        assert_eq!(mcnemar_exact(4, 4), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // 2^-2000 underflows f64; its log-space sum does not blow up.
        let p = mcnemar_exact(0, 2000);
        assert!((0.0..1e-300).contains(&p), "{p}");
    }

    #[test]
    fn the_same_outcomes_give_ratio_one_with_no_width() {
        let o: Vec<_> = (0..50).map(|i| (i % 3 == 0, i % 3 == 0)).collect();
        let r = compare(&o, 500, 7).unwrap();
        assert_eq!((r.ratio, r.ratio_ci95), (Some(1.0), Some((1.0, 1.0))));
        assert_eq!(r.difference_ci95, (0.0, 0.0));
        assert_eq!(
            (r.only_candidate, r.only_baseline, r.mcnemar_p),
            (0, 0, 1.0)
        );
    }

    /// The bootstrap distribution of the difference has the paired
    /// difference's standard error, √((b + c)/n − ((b − c)/n)²)/√n, so the
    /// percentile interval spans about 2·1.96 of it (within 5%: the
    /// resampling's Monte Carlo error at 20,000 resamples is ~1%).
    #[test]
    fn the_difference_interval_has_the_paired_standard_error() {
        let mut o = vec![(true, true); 20];
        o.extend(vec![(true, false); 5]);
        o.extend(vec![(false, true); 15]);
        o.extend(vec![(false, false); 160]);
        let r = compare(&o, 20_000, 1).unwrap();
        let (n, b, c): (f64, f64, f64) = (200.0, 5.0, 15.0);
        let se = ((b + c) / n - ((b - c) / n).powi(2)).sqrt() / n.sqrt();
        let width = r.difference_ci95.1 - r.difference_ci95.0;
        assert!(
            (width / (2.0 * 1.96 * se) - 1.0).abs() < 0.05,
            "width {width} against 2·1.96·{se}"
        );
        assert!(r.difference_ci95.0 < r.difference && r.difference < r.difference_ci95.1);
        let (lo, hi) = r.ratio_ci95.unwrap();
        assert!(lo < r.ratio.unwrap() && r.ratio.unwrap() < hi);
        // Rerun: the same seed, the same intervals.
        assert_eq!(compare(&o, 20_000, 1).unwrap(), r);
    }

    #[test]
    fn a_baseline_that_solved_nothing_has_no_ratio() {
        let o = vec![(true, false), (false, false), (false, false)];
        let r = compare(&o, 100, 0).unwrap();
        assert_eq!((r.ratio, r.ratio_ci95), (None, None));
        assert_eq!(r.ratio_undefined_resamples, 100);
        assert!(compare(&[], 100, 0).is_err());
    }
}

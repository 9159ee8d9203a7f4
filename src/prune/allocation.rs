//! Which channels go (METHODS.md §6): from per-layer scores `[L][m_l]` and a
//! sparsity s ∈ (0, 1) to each layer's kept channel indices.
//!
//! round(x) is to the nearest integer, halves to even
//! (`f64::round_ties_even`). Order: channels are ranked by score ascending,
//! ties by (layer, channel) ascending; the lowest go first, so within a
//! layer the kept channels are always its top-ranked ones.
//!
//! - Floor f_l: every layer keeps at least `min_keep` channels, by default
//!   max(1, round(m_l/20)) (5 %, rounded half to even in exact integer
//!   arithmetic: m = 50 → 2, m = 70 → 4).
//! - `uniform`: layer l drops its round(s·m_l) lowest channels; error if
//!   that leaves fewer than f_l.
//! - `global`: drop D = round(s·Σm_l) channels: walk all (layer, channel)
//!   pairs in ascending order, skip a pair whose layer is at its floor,
//!   stop after D drops; error if D > Σ(m_l − f_l).
//! - `align` k > 1, applied after either: see [`align_counts`].
//!
//! Relative to a reference model ([`allocate_from`]; progressive pruning,
//! METHODS.md §11): the scores are of a model already pruned from one of
//! widths r_l (R = Σr_l) to widths m_l ≤ r_l (M = Σm_l), and the sparsity
//! is a fraction of the reference's channels. Floors are the reference's,
//! f_l = floor(r_l) (capped at m_l); `uniform` keeps
//! k_l = min(m_l, r_l − round(s·r_l)); `global` drops
//! max(0, round(s·R) − (R − M)) of the current channels, so that
//! R − round(s·R) remain, what the same sparsity keeps of the reference;
//! `align` rounds towards that same total. With r = m it is [`allocate`].
use crate::{Error, Result};
use std::cmp::Ordering;
use std::fmt;

/// How the pruned channels are spread over the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Allocation {
    /// The same fraction of every layer.
    Uniform,
    /// The lowest scores of the whole model, whatever their layer.
    Global,
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Allocation::Uniform => "uniform",
            Allocation::Global => "global",
        })
    }
}

/// Each layer's floor f_l: `min_keep`, or max(1, round(m_l/20)) halves to
/// even. Errors if `min_keep` is 0 or exceeds a layer's width.
pub fn floors(widths: &[usize], min_keep: Option<usize>) -> Result<Vec<usize>> {
    widths
        .iter()
        .enumerate()
        .map(|(l, &m)| match min_keep {
            Some(0) => Err(Error::Invalid(
                "--min-keep must be at least 1 (a layer cannot lose its whole FFN)".into(),
            )),
            Some(k) if k > m => Err(Error::Invalid(format!(
                "--min-keep {k} exceeds the width {m} of layer {l}"
            ))),
            Some(k) => Ok(k),
            None => {
                let (q, r) = (m / 20, m % 20);
                let rounded = match r.cmp(&10) {
                    Ordering::Less => q,
                    Ordering::Greater => q + 1,
                    Ordering::Equal => q + q % 2,
                };
                Ok(rounded.max(1))
            }
        })
        .collect()
}

/// The kept channel indices of every layer, ascending (original order).
///
/// `scores[l][c]` is the score of channel c of layer l (higher = keep);
/// `sparsity` the fraction of all FFN channels to remove, in (0, 1);
/// `min_keep` the floor (see [`floors`]); `align` ≥ 1 the multiple every
/// layer's kept count is rounded to. Errors on an empty or non-finite
/// score, a sparsity outside (0, 1), `align` 0, or floors that make the
/// target unreachable (the message says by how much).
pub fn allocate(
    scores: &[Vec<f64>],
    alloc: Allocation,
    sparsity: f64,
    min_keep: Option<usize>,
    align: usize,
) -> Result<Vec<Vec<usize>>> {
    let widths: Vec<usize> = scores.iter().map(Vec::len).collect();
    allocate_from(scores, &widths, alloc, sparsity, min_keep, align)
}

/// [`allocate`] on a model pruned from a reference of widths `reference`
/// (one per layer, each at least the layer's score count): `sparsity` and
/// the floors are of the reference (see the module's notes), the indices
/// returned of the scored model.
pub fn allocate_from(
    scores: &[Vec<f64>],
    reference: &[usize],
    alloc: Allocation,
    sparsity: f64,
    min_keep: Option<usize>,
    align: usize,
) -> Result<Vec<Vec<usize>>> {
    if !(sparsity > 0.0 && sparsity < 1.0) {
        return Err(Error::Invalid(format!(
            "sparsity must be strictly between 0 and 1, got {sparsity}"
        )));
    }
    if align == 0 {
        return Err(Error::Invalid("--align must be at least 1".into()));
    }
    if scores.is_empty() {
        return Err(Error::Invalid("no layers to prune".into()));
    }
    for (l, layer) in scores.iter().enumerate() {
        if layer.is_empty() {
            return Err(Error::Invalid(format!("layer {l} has no channels")));
        }
        if let Some(c) = layer.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "score of layer {l} channel {c} is {}",
                layer[c]
            )));
        }
    }
    let widths: Vec<usize> = scores.iter().map(Vec::len).collect();
    if reference.len() != widths.len() || reference.iter().zip(&widths).any(|(r, m)| r < m) {
        return Err(Error::Invalid(format!(
            "reference widths {reference:?} do not cover the scored widths {widths:?}"
        )));
    }
    let floor: Vec<usize> = floors(reference, min_keep)?
        .into_iter()
        .zip(&widths)
        .map(|(f, &m)| f.min(m))
        .collect();
    let total: usize = widths.iter().sum();
    let ref_total: usize = reference.iter().sum();

    // Each layer's channels, ascending by (score, channel): a drop order.
    let order: Vec<Vec<usize>> = scores
        .iter()
        .map(|layer| {
            let mut idx: Vec<usize> = (0..layer.len()).collect();
            idx.sort_by(|&a, &b| cmp_score(layer[a], layer[b]).then(a.cmp(&b)));
            idx
        })
        .collect();

    let (keep, target) = match alloc {
        Allocation::Uniform => {
            let mut keep = Vec::with_capacity(widths.len());
            for (l, (&r, &f)) in reference.iter().zip(&floor).enumerate() {
                let drop = round_count(sparsity * r as f64);
                let k = r - drop.min(r);
                if k < f {
                    return Err(Error::Invalid(format!(
                        "uniform sparsity {sparsity} leaves layer {l} {k} of {r} channels, \
                         below its floor of {f} (short by {}); lower --sparsity or --min-keep",
                        f - k
                    )));
                }
                keep.push(k.min(widths[l]));
            }
            let target = keep.iter().sum();
            (keep, target)
        }
        Allocation::Global => {
            // Of the reference's; those already gone count as dropped.
            let ref_drop = round_count(sparsity * ref_total as f64).min(ref_total);
            let drop_target = ref_drop.saturating_sub(ref_total - total);
            let droppable: usize = widths.iter().zip(&floor).map(|(m, f)| m - f).sum();
            if drop_target > droppable {
                return Err(Error::Invalid(format!(
                    "sparsity {sparsity} asks to drop {drop_target} of {total} channels \
                     but the per-layer floors allow at most {droppable} (short by {}); \
                     lower --sparsity or --min-keep",
                    drop_target - droppable
                )));
            }
            let mut pairs: Vec<(usize, usize)> = widths
                .iter()
                .enumerate()
                .flat_map(|(l, &m)| (0..m).map(move |c| (l, c)))
                .collect();
            pairs.sort_by(|&(la, ca), &(lb, cb)| {
                cmp_score(scores[la][ca], scores[lb][cb]).then((la, ca).cmp(&(lb, cb)))
            });
            let mut keep = widths.clone();
            let mut dropped = 0;
            for (l, _) in pairs {
                if dropped == drop_target {
                    break;
                }
                if keep[l] > floor[l] {
                    keep[l] -= 1;
                    dropped += 1;
                }
            }
            (keep, total - drop_target)
        }
    };

    let keep = if align > 1 {
        align_counts(scores, &order, &keep, &floor, target, align)?
    } else {
        keep
    };

    Ok(order
        .iter()
        .zip(&keep)
        .map(|(idx, &k)| {
            let mut kept = idx[idx.len() - k..].to_vec();
            kept.sort_unstable();
            kept
        })
        .collect())
}

/// Rounds each layer's kept count k_l to a multiple of `a`, keeping the
/// total as close as possible to `target`. Deterministic procedure:
///
/// 1. Bounds: F_l = a·⌈f_l/a⌉ (floor rounded up), M_l = a·⌊m_l/a⌋; error
///    if F_l > M_l (layer l cannot hold an aligned count).
/// 2. Candidates: down_l = clamp(a·⌊k_l/a⌋, F_l, M_l) and
///    up_l = clamp(a·⌈k_l/a⌉, F_l, M_l); they are equal or differ by a.
/// 3. Every layer starts at down_l (total T₀). Of the layers with
///    up_l > down_l, the number j that go up minimises
///    |T₀ + j·a − target|; on a tie the larger j (keep more channels).
/// 4. The j layers that go up are those whose extra block, the channels
///    ranked down_l+1 ..= up_l from the top of the layer, has the largest
///    score sum; ties by layer ascending.
fn align_counts(
    scores: &[Vec<f64>],
    order: &[Vec<usize>],
    keep: &[usize],
    floor: &[usize],
    target: usize,
    a: usize,
) -> Result<Vec<usize>> {
    let mut down = Vec::with_capacity(keep.len());
    let mut rising: Vec<(f64, usize)> = Vec::new();
    for (l, (&k, &f)) in keep.iter().zip(floor).enumerate() {
        let m = order[l].len();
        let (lo, hi) = (f.div_ceil(a) * a, m / a * a);
        if lo > hi {
            return Err(Error::Invalid(format!(
                "--align {a}: layer {l} of width {m} cannot keep a multiple of {a} \
                 that is at least its floor {f}"
            )));
        }
        let d = (k / a * a).clamp(lo, hi);
        let u = (k.div_ceil(a) * a).clamp(lo, hi);
        if u > d {
            // Descending rank r (0 = best) sits at ascending position m-1-r.
            let block: f64 = order[l][m - u..m - d].iter().map(|&c| scores[l][c]).sum();
            rising.push((block, l));
        }
        down.push(d);
    }
    let base: usize = down.iter().sum();
    let dist = |j: usize| (base + j * a).abs_diff(target);
    let j = (0..=rising.len())
        .min_by(|&x, &y| dist(x).cmp(&dist(y)).then(y.cmp(&x)))
        .unwrap_or(0);
    rising.sort_by(|&(sa, la), &(sb, lb)| cmp_score(sb, sa).then(la.cmp(&lb)));
    for &(_, l) in &rising[..j] {
        down[l] += a;
    }
    Ok(down)
}

/// round(x) for a non-negative count: nearest integer, halves to even.
fn round_count(x: f64) -> usize {
    x.round_ties_even() as usize
}

/// Orders two finite scores (−0 and +0 compare equal, so they tie).
fn cmp_score(a: f64, b: f64) -> Ordering {
    a.partial_cmp(&b).expect("scores are checked finite")
}

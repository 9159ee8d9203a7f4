//! Channel scores of every method (METHODS.md §5): higher = more useful,
//! the lowest-scored channels are pruned first.
//!
//! Per layer l, channel c, with n = `meta.tokens` and w_c = column c of
//! down_proj (W_d is [d, m_l]):
//!
//! | method         | score                                                     |
//! |----------------|-----------------------------------------------------------|
//! | `wanda-struct` | ‖w_c‖₁ · sqrt(s2_c)                                       |
//! | `flap`         | standardise_l(var_c · ‖w_c‖₂²), var_c = (s2_c − s1_c²/n)/(n−1) |
//! | `taylor`       | tk_c                                                      |
//! | `agf`          | k1_c                                                      |
//! | `rku`          | k1_c / Σ_{c'} k1_c'                                       |
//! | `rku-fisher`   | sqrt(s2_c/n)·sqrt(f2_c/n) / Σ_{c'} sqrt(f2_c'/n)          |
//!
//! standardise_l(x)_c = (x_c − mean_l)/std_l with the unbiased std
//! (divisor m_l − 1).
//!
//! Degenerate cases, handled explicitly rather than producing NaN:
//! - `rku` / `rku-fisher`: a layer whose denominator Σ is 0 (every k1, or
//!   every f2, is 0: no channel of the layer moves J) scores 0 everywhere,
//!   so under global allocation it is pruned down to its floor first.
//! - `flap`: var_c is clamped at 0 (rounding can make s2 − s1²/n slightly
//!   negative); a layer whose std_l is 0 (all scores equal, or m_l = 1)
//!   standardises to 0 everywhere.
//! - n must be at least 2 for `flap` (unbiased variance) and at least 1
//!   for every method.
use super::allocation::Allocation;
use super::stats::{Objective, Stats};
use crate::{Error, Result};
use std::fmt;

/// A channel-scoring method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Method {
    /// Relative kinetic utility: Σ|h·g| of the energy objective, divided by its layer's sum.
    Rku,
    /// Absolute kinetic utility: Σ|h·g| of the energy objective.
    Agf,
    /// ‖W_d column‖₁ · sqrt(Σh²), uniform allocation.
    WandaStruct,
    /// Activation variance × ‖W_d column‖₂², standardised per layer, with bias compensation.
    Flap,
    /// First-order Taylor: Σ_sequences |Σ_t h·g| of the cross-entropy, uniform allocation.
    Taylor,
    /// Fisher-trace ablation: sqrt(mean h²)·sqrt(mean g²), normalised per layer.
    RkuFisher,
}

/// Per-layer norms of the columns of down_proj: for W_d of shape [d, m_l],
/// `l1[c]` = ‖W_d[:, c]‖₁ and `l2sq[c]` = ‖W_d[:, c]‖₂², each of length m_l.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ColumnNorms {
    pub l1: Vec<f64>,
    pub l2sq: Vec<f64>,
}

impl Method {
    /// Every method, in the order of the CLI help.
    pub const ALL: [Method; 6] = [
        Method::Rku,
        Method::Agf,
        Method::WandaStruct,
        Method::Flap,
        Method::Taylor,
        Method::RkuFisher,
    ];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rku => "rku",
            Method::Agf => "agf",
            Method::WandaStruct => "wanda-struct",
            Method::Flap => "flap",
            Method::Taylor => "taylor",
            Method::RkuFisher => "rku-fisher",
        }
    }

    /// The allocation used unless `--allocation` says otherwise.
    pub fn default_allocation(self) -> Allocation {
        match self {
            Method::WandaStruct | Method::Taylor => Allocation::Uniform,
            Method::Rku | Method::Agf | Method::Flap | Method::RkuFisher => Allocation::Global,
        }
    }

    /// The objective whose backward pass the method's statistics come from;
    /// `None` for the forward-only methods (s1, s2 exist under any objective).
    pub fn needs(self) -> Option<Objective> {
        match self {
            Method::Rku | Method::Agf | Method::RkuFisher => Some(Objective::Energy),
            Method::Taylor => Some(Objective::Ce),
            Method::WandaStruct | Method::Flap => None,
        }
    }

    /// Whether the scores read the down_proj column norms.
    pub fn needs_column_norms(self) -> bool {
        matches!(self, Method::WandaStruct | Method::Flap)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The score of every channel of every layer, `[L][m_l]`, for `method`.
///
/// `down_norms[l]` must hold layer l's column norms when
/// [`Method::needs_column_norms`]; otherwise it is not read (pass `&[]`).
/// Errors if the stats lack the method's objective, n is too small, or the
/// norms do not match the layer widths. Every returned score is finite.
pub fn scores(method: Method, stats: &Stats, down_norms: &[ColumnNorms]) -> Result<Vec<Vec<f64>>> {
    stats.check_shapes()?;
    if let Some(obj) = method.needs() {
        if !stats.meta.objectives.has(obj) {
            return Err(Error::Invalid(format!(
                "{method} needs the {obj} objective; this stats file was scored with: {}",
                stats.meta.objectives
            )));
        }
    }
    let n = stats.meta.tokens as f64;
    let min_tokens = if method == Method::Flap { 2 } else { 1 };
    if stats.meta.tokens < min_tokens {
        return Err(Error::Invalid(format!(
            "{method} needs statistics over at least {min_tokens} tokens, these have {}",
            stats.meta.tokens
        )));
    }
    if method.needs_column_norms() {
        let widths = stats.widths();
        if down_norms.len() != widths.len() {
            return Err(Error::Invalid(format!(
                "{method} needs down_proj column norms for {} layers, got {}",
                widths.len(),
                down_norms.len()
            )));
        }
        for (l, (norms, &m)) in down_norms.iter().zip(&widths).enumerate() {
            if norms.l1.len() != m || norms.l2sq.len() != m {
                return Err(Error::Invalid(format!(
                    "layer {l}: down_proj column norms have lengths {} and {}, stats width is {m}",
                    norms.l1.len(),
                    norms.l2sq.len()
                )));
            }
        }
    }

    let out: Vec<Vec<f64>> = stats
        .layers
        .iter()
        .enumerate()
        .map(|(l, s)| match method {
            Method::WandaStruct => {
                let w = &down_norms[l];
                s.s2.iter()
                    .zip(&w.l1)
                    .map(|(s2, l1)| l1 * s2.sqrt())
                    .collect()
            }
            Method::Flap => {
                let w = &down_norms[l];
                let raw: Vec<f64> =
                    s.s1.iter()
                        .zip(&s.s2)
                        .zip(&w.l2sq)
                        .map(|((s1, s2), l2sq)| ((s2 - s1 * s1 / n) / (n - 1.0)).max(0.0) * l2sq)
                        .collect();
                standardise(&raw)
            }
            Method::Taylor => s.tk.clone(),
            Method::Agf => s.k1.clone(),
            Method::Rku => normalise(&s.k1),
            Method::RkuFisher => {
                let fisher: Vec<f64> = s.f2.iter().map(|f2| (f2 / n).sqrt()).collect();
                let total: f64 = fisher.iter().sum();
                s.s2.iter()
                    .zip(&fisher)
                    .map(|(s2, f)| {
                        if total > 0.0 {
                            (s2 / n).sqrt() * f / total
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
        })
        .collect();

    for (l, layer) in out.iter().enumerate() {
        if let Some(c) = layer.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "{method} score of layer {l} channel {c} is {} (overflow in the statistics or norms)",
                layer[c]
            )));
        }
    }
    Ok(out)
}

/// x_c / Σ x, or all zeros when Σ x = 0.
fn normalise(x: &[f64]) -> Vec<f64> {
    let total: f64 = x.iter().sum();
    x.iter()
        .map(|&v| if total > 0.0 { v / total } else { 0.0 })
        .collect()
}

/// (x − mean)/std with the unbiased std (divisor m − 1); all zeros when
/// std is 0 or m < 2.
fn standardise(x: &[f64]) -> Vec<f64> {
    let m = x.len() as f64;
    let mean = x.iter().sum::<f64>() / m;
    let var = if x.len() > 1 {
        x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (m - 1.0)
    } else {
        0.0
    };
    let std = var.sqrt();
    x.iter()
        .map(|v| if std > 0.0 { (v - mean) / std } else { 0.0 })
        .collect()
}

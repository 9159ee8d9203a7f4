//! Least-squares refit of the kept down_proj columns (METHODS.md section 9).
//!
//! Layers are refitted in order over the calibration windows. The pruned
//! residual stream x' (and, for the `residual` target, the dense stream x)
//! is held for every window and advanced one layer at a time, so the whole
//! refit costs O(L) layer evaluations: per layer, one pass computes the
//! layer's channels h on x' and accumulates the normal equations, a
//! Cholesky solve (f64, faer) gives the new columns, and x' advances
//! through the refitted layer from the h and x' + Attn already computed.
use crate::backend::{Backend, NormalEquations};
use crate::model::forward::{check_ids, layer_acts, layer_forward, Geometry, RopeTables};
use crate::model::weights::layer_tensor;
use crate::model::Model;
use crate::progress::Progress;
use crate::{Error, Result};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use serde::Serialize;
use std::time::{Duration, Instant};

/// What the refitted layer reproduces (METHODS.md section 9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefitTarget {
    /// The original FFN output W_d·h on the same (pruned-model) input.
    Layer,
    /// The dense model's residual after the layer minus the pruned model's
    /// post-attention residual (also corrects the error from below).
    Residual,
}

/// How to refit.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RefitSpec {
    pub target: RefitTarget,
    /// Also fit a down_proj bias (a constant column, undamped).
    pub bias: bool,
    /// λ = damp · mean(diag G) is added to G's channel diagonal.
    pub damp: f64,
}

impl RefitSpec {
    /// Refuses a damping that is not finite and positive.
    pub fn check(&self) -> Result<()> {
        if !(self.damp.is_finite() && self.damp > 0.0) {
            return Err(Error::Invalid(format!(
                "--refit-damp {} must be finite and > 0",
                self.damp
            )));
        }
        Ok(())
    }
}

/// One refitted layer.
#[derive(Clone, Debug, Serialize)]
pub struct RefitLayer {
    /// The kept columns of down_proj, `[d, |K|]` row-major.
    #[serde(skip)]
    pub w_down: Vec<f32>,
    /// The fitted down_proj bias `[d]` (with `RefitSpec::bias`).
    #[serde(skip)]
    pub bias: Option<Vec<f32>>,
    /// Σ_t ‖y − ŷ‖² over the calibration tokens with the removed channels
    /// simply dropped (ŷ = W_d[:,K] h_K).
    pub err_zeroed: f64,
    /// The same with the least-squares solution.
    pub err_refit: f64,
    /// False when the solution would have raised the error (possible only
    /// through the damping): the layer then keeps W_d[:,K], unchanged.
    pub refitted: bool,
}

/// The calibration windows a refit runs over.
#[derive(Clone, Debug)]
pub struct RefitWindows {
    /// `[N, seq_len]` token ids.
    pub ids: Vec<u32>,
    pub seq_len: usize,
    /// Windows per pass (memory vs speed; the result does not depend on it).
    pub batch: usize,
    /// The text they were cut from, and the sha256 of their ids.
    pub source: std::path::PathBuf,
    pub digest: String,
}

/// Where the refit's time went (host wall time).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RefitTiming {
    /// Layer evaluations over the windows: each layer's forward on x' (and
    /// on x for `residual`), the target, and advancing x'.
    pub passes_s: f64,
    /// Forming G and C (`Backend::normal_equations`, f64 products).
    pub products_s: f64,
    /// Cholesky solves and reconstruction errors.
    pub solves_s: f64,
}

/// Refits every layer of `model` pruned to `kept` (ascending channel
/// indices per layer) over `windows` (`[N, seq_len]` ids), `batch`
/// windows per pass. Returns one `RefitLayer` per layer.
pub fn refit<B: Backend>(
    be: &B,
    model: &Model<B>,
    kept: &[Vec<usize>],
    windows: &[u32],
    seq_len: usize,
    batch: usize,
    spec: RefitSpec,
) -> Result<(Vec<RefitLayer>, RefitTiming)> {
    spec.check()?;
    let c = &model.cfg;
    let d = c.hidden;
    if kept.len() != c.layers {
        return Err(Error::Invalid(format!(
            "refit: {} kept lists for {} layers",
            kept.len(),
            c.layers
        )));
    }
    if seq_len == 0 || windows.is_empty() || !windows.len().is_multiple_of(seq_len) {
        return Err(Error::Invalid(format!(
            "refit: {} calibration ids are not whole windows of {seq_len}",
            windows.len()
        )));
    }
    check_ids(windows, c.vocab)?;
    if let Some(l) =
        (0..c.layers).find(|&l| model.files.contains(&layer_tensor(l, "mlp.down_proj.bias")))
    {
        return Err(Error::Invalid(format!(
            "refit: {} has a down_proj bias (layer {l}), as an earlier FLAP export does; \
             refitting such a model is not supported: prune the dense model instead",
            model.dir.display()
        )));
    }
    let geos: Vec<Geometry> = windows
        .chunks(batch.max(1) * seq_len)
        .map(|ids| Geometry {
            seqs: ids.len() / seq_len,
            t: seq_len,
        })
        .collect();
    let chunks: Vec<&[u32]> = windows.chunks(batch.max(1) * seq_len).collect();
    let rope = RopeTables::new(be, model, seq_len)?;
    let embed = |ids: &[u32]| be.embedding(ids, &model.embed, d);
    // x'_l per batch (pruned, refitted below l) and x_l (dense, `residual` only).
    let mut pruned: Vec<B::Buf> = chunks.iter().map(|ids| embed(ids)).collect::<Result<_>>()?;
    let mut dense: Vec<B::Buf> = match spec.target {
        RefitTarget::Residual => chunks.iter().map(|ids| embed(ids)).collect::<Result<_>>()?,
        RefitTarget::Layer => Vec::new(),
    };
    let mut out = Vec::with_capacity(c.layers);
    let (mut passes, mut products, mut solves) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let progress = Progress::new(c.layers as u64, "refit");
    model.for_each_layer(be, 0..c.layers, |l, lw| {
        let (m, keep) = (lw.ffn, &kept[l]);
        let t0 = Instant::now();
        let mut eqs = NormalEquations::zeros(keep.len() + usize::from(spec.bias), d);
        // (x' + Attn, h) of every batch, for advancing x' after the solve.
        let mut held = Vec::with_capacity(geos.len());
        for (i, &geo) in geos.iter().enumerate() {
            let rows = geo.rows();
            let acts = layer_acts(be, model, lw, None, &rope, &pruned[i], geo)?;
            // The target y, as `y − y_sub`.
            let (y, y_sub) = match spec.target {
                // y = W_d h: the original layer's FFN output on x'.
                RefitTarget::Layer => (be.linear(&acts.h, &lw.w_down, None, rows, m, d)?, None),
                // y = x_{l+1} − (x' + Attn); x then advances to x_{l+1}.
                RefitTarget::Residual => (
                    layer_forward(be, model, lw, None, &rope, &dense[i], geo)?,
                    Some(&acts.mid),
                ),
            };
            let tp = Instant::now();
            let part = be.normal_equations(&acts.h, keep, spec.bias, &y, y_sub, rows, m, d)?;
            products += tp.elapsed();
            eqs.add(&part)?;
            if spec.target == RefitTarget::Residual {
                dense[i] = y;
            }
            held.push((acts.mid, acts.h));
        }
        passes += t0.elapsed();

        let t1 = Instant::now();
        let w_down = model
            .files
            .get(&layer_tensor(l, "mlp.down_proj.weight"), &[d, m])?
            .to_f32()?;
        let layer = solve_layer(l, &eqs, &w_down, m, keep, spec.damp)?;
        solves += t1.elapsed();

        // x'_{l+1} = (x' + Attn) + W'·h_K (+ b), with W' scattered into a
        // full-width [d, m] matrix that is zero at the removed channels.
        let t2 = Instant::now();
        let k = keep.len();
        let mut full = vec![0f32; d * m];
        for (dst, src) in full.chunks_exact_mut(m).zip(layer.w_down.chunks_exact(k)) {
            keep.iter().zip(src).for_each(|(&ch, &v)| dst[ch] = v);
        }
        let w_full = be.upload_weight(&full)?;
        let b = layer
            .bias
            .as_deref()
            .map(|b| be.upload_weight(b))
            .transpose()?;
        for (i, (mid, h)) in held.into_iter().enumerate() {
            let rows = geos[i].rows();
            let y = be.linear(&h, &w_full, b.as_ref(), rows, m, d)?;
            let mut next = mid;
            be.add_assign(&mut next, &y, rows * d)?;
            pruned[i] = next;
        }
        passes += t2.elapsed();
        out.push(layer);
        progress.inc(1);
        Ok(())
    })?;
    progress.finish();
    let timing = RefitTiming {
        passes_s: passes.saturating_sub(products).as_secs_f64(),
        products_s: products.as_secs_f64(),
        solves_s: solves.as_secs_f64(),
    };
    Ok((out, timing))
}

/// Solves layer `l`'s damped normal equations `(G + λI)·X = C` (λ on the
/// channel diagonal only, λ = damp·mean(diag G) over the channels) by
/// Cholesky, X `[k', d]` = the new down_proj columns transposed (plus the
/// bias row), and keeps X only if it does not raise the reconstruction
/// error ‖y − ŷ‖² = rr − 2⟨X, C⟩ + ⟨X, G·X⟩ over the zeroed solution
/// X₀ = W_d[:,K]ᵀ (bias row 0). `w_down` is the original `[d, m]`.
pub fn solve_layer(
    l: usize,
    eqs: &NormalEquations,
    w_down: &[f32],
    m: usize,
    keep: &[usize],
    damp: f64,
) -> Result<RefitLayer> {
    let (w, d, k) = (eqs.width, eqs.d, keep.len());
    if k == 0 || w < k || w > k + 1 || w_down.len() != d * m {
        return Err(Error::Invalid(format!(
            "refit: layer {l}: normal equations of width {w} for {k} kept channels"
        )));
    }
    let g = Mat::from_fn(w, w, |i, j| eqs.g[i * w + j]);
    let c = Mat::from_fn(w, d, |i, j| eqs.c[i * d + j]);
    let x0 = Mat::from_fn(w, d, |j, r| match keep.get(j) {
        Some(&ch) => w_down[r * m + ch] as f64,
        None => 0.0,
    });
    let lambda = damp * (0..k).map(|i| g[(i, i)]).sum::<f64>() / k as f64;
    let singular = || {
        Error::Invalid(format!(
            "refit: layer {l}: the kept channels' Gram matrix is singular even after \
             damping (λ = {lambda:e}); use more calibration tokens or a larger --refit-damp"
        ))
    };
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(singular());
    }
    let mut a = g.clone();
    for i in 0..k {
        a[(i, i)] += lambda;
    }
    let llt = a.llt(Side::Lower).map_err(|_| singular())?;
    let mut x = c.clone();
    llt.solve_in_place(x.as_mut());
    if x.col_iter().any(|col| col.iter().any(|v| !v.is_finite())) {
        return Err(singular());
    }
    let err = |x: &Mat<f64>| -> f64 {
        let gx = &g * x;
        let mut e = eqs.rr;
        for j in 0..d {
            for i in 0..w {
                e += x[(i, j)] * (gx[(i, j)] - 2.0 * c[(i, j)]);
            }
        }
        e
    };
    let (err_zeroed, err_refit) = (err(&x0), err(&x));
    let refitted = err_refit <= err_zeroed;
    let chosen = if refitted { &x } else { &x0 };
    let mut w_new = vec![0f32; d * k];
    for (r, row) in w_new.chunks_exact_mut(k).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = chosen[(j, r)] as f32;
        }
    }
    let bias: Option<Vec<f32>> = (w > k).then(|| (0..d).map(|r| chosen[(k, r)] as f32).collect());
    let values = w_new.iter().chain(bias.iter().flatten());
    if values.into_iter().any(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "refit: layer {l}: the solution overflows f32; use a larger --refit-damp"
        )));
    }
    Ok(RefitLayer {
        w_down: w_new,
        bias,
        err_zeroed,
        err_refit: if refitted { err_refit } else { err_zeroed },
        refitted,
    })
}

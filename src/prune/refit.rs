//! Least-squares refit of the kept down_proj columns (METHODS.md section 9).
//!
//! Layers are refitted in order over the calibration sequences: windows,
//! or traces of their own lengths whose prompt rows may be context only
//! (METHODS.md §11). The pruned residual stream x' (and, for the
//! `residual` target, the dense stream x) is held for every sequence and
//! advanced one layer at a time, so the whole
//! refit costs O(L) layer evaluations: per layer, one pass computes the
//! layer's channels h on x' and accumulates the normal equations, a
//! Cholesky solve (f64, faer) gives the new columns, and x' advances
//! through the refitted layer from the h and x' + Attn already computed.
use crate::backend::{Backend, NormalEquations};
use crate::io::traces::Sequence;
use crate::model::forward::{check_ids, layer_acts, layer_forward, Geometry, RopeTables};
use crate::model::layer_major::{HostBuf, LayerMajor, ResidualDtype};
use crate::model::weights::layer_tensor;
use crate::model::Model;
use crate::progress::Progress;
use crate::prune::stats::TraceSource;
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

/// The calibration a refit runs over (METHODS.md §9): windows of one
/// length, or traces of their own lengths whose prompt positions may be
/// context only (`Sequence::counted_from`).
#[derive(Clone, Debug)]
pub struct RefitWindows {
    /// The sequences; only those of equal length share a pass.
    pub seqs: Vec<Sequence>,
    /// Sequences per pass (memory vs speed; the result does not depend on it).
    pub batch: usize,
    /// The text or traces file they came from.
    pub source: std::path::PathBuf,
    /// sha256 of the window ids (windows) or `sequences_digest` (traces).
    pub digest: String,
    /// The traces file's digest, selection and token rule; `None` for windows.
    pub traces: Option<TraceSource>,
    /// Whether each window starts with BOS (METHODS.md §2); false for traces.
    pub bos: bool,
    /// Hold the residual streams on the host between layers (`--layer-major`;
    /// the result does not change with f32 residuals).
    pub layer_major: Option<LayerMajor>,
}

impl RefitWindows {
    /// `[N, seq_len]` windows cut from the text at `source`, every token
    /// counted; `bos`: whether each starts with BOS (the ids hold it).
    pub fn windows(
        ids: &[u32],
        seq_len: usize,
        batch: usize,
        source: std::path::PathBuf,
        digest: String,
        bos: bool,
    ) -> Self {
        Self {
            seqs: ids
                .chunks(seq_len.max(1))
                .map(|w| Sequence {
                    ids: w.to_vec(),
                    counted_from: 0,
                })
                .collect(),
            batch,
            source,
            digest,
            traces: None,
            bos,
            layer_major: None,
        }
    }

    /// The longest sequence.
    pub fn seq_len(&self) -> usize {
        self.seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0)
    }

    /// Tokens whose rows enter G and C.
    pub fn counted(&self) -> usize {
        self.seqs.iter().map(Sequence::counted).sum()
    }

    /// `pruning.json`'s `refit.calibration`: source, digest, samples,
    /// seq_len (the longest), tokens (counted), bos, and for traces
    /// `traces` (file digest, selection, token rule).
    pub fn record(&self) -> serde_json::Value {
        let mut r = serde_json::json!({
            "source": self.source.display().to_string(),
            "digest": self.digest,
            "samples": self.seqs.len(),
            "seq_len": self.seq_len(),
            "tokens": self.counted(),
            "bos": self.bos,
        });
        if let Some(t) = &self.traces {
            r["traces"] = serde_json::json!({
                "digest": t.digest,
                "selection": t.selection,
                "tokens": t.tokens,
            });
        }
        r
    }
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
    if seq_len == 0 || windows.is_empty() || !windows.len().is_multiple_of(seq_len) {
        return Err(Error::Invalid(format!(
            "refit: {} calibration ids are not whole windows of {seq_len}",
            windows.len()
        )));
    }
    let w = RefitWindows::windows(
        windows,
        seq_len,
        batch,
        Default::default(),
        String::new(),
        false,
    );
    refit_sequences(be, model, kept, &w.seqs, batch, spec, None)
}

/// One pass's share of the sequences: equal lengths only, no padding.
struct Pass {
    ids: Vec<u32>,
    geo: Geometry,
    /// Rows that enter G and C; `None`: all of them.
    counted: Option<Vec<bool>>,
    /// Rows that do not.
    skipped: usize,
}

/// Refits every layer of `model` pruned to `kept` over `seqs`, each of its
/// own length, the rows of a sequence counting from its `counted_from`
/// (METHODS.md §9, §11): the other rows pass through attention as context
/// but add nothing to G, C or ‖y‖². Sequences of equal length share a pass
/// (up to `batch`); the streams of every sequence advance one layer at a
/// time. A sequence with no counted row is left out. Windows (every row
/// counted, one length) run exactly as they always have.
///
/// With `layer_major`, the streams wait on the host between layers (one
/// pass's buffers on the device at a time), and the layer's activations
/// are recomputed to advance x' after the solve instead of being held:
/// two evaluations of each layer on x' instead of one, the same values.
pub fn refit_sequences<B: Backend>(
    be: &B,
    model: &Model<B>,
    kept: &[Vec<usize>],
    seqs: &[Sequence],
    batch: usize,
    spec: RefitSpec,
    layer_major: Option<LayerMajor>,
) -> Result<(Vec<RefitLayer>, RefitTiming)> {
    spec.check()?;
    let c = &model.cfg;
    let d = c.hidden;
    if c.sandwich_norms && spec.target == RefitTarget::Residual {
        // x_{l+1} − (x' + Attn) is norm(W_d h) there, not linear in W_d.
        return Err(Error::Unsupported(format!(
            "refit target `residual` on {} (the FFN output passes a norm before the residual)",
            c.arch.hf_name()
        )));
    }
    if kept.len() != c.layers {
        return Err(Error::Invalid(format!(
            "refit: {} kept lists for {} layers",
            kept.len(),
            c.layers
        )));
    }
    let used: Vec<&Sequence> = seqs.iter().filter(|s| s.counted() > 0).collect();
    if used.is_empty() {
        return Err(Error::Invalid(format!(
            "refit: no counted token in {} calibration sequences",
            seqs.len()
        )));
    }
    for s in &used {
        check_ids(&s.ids, c.vocab)?;
    }
    if let Some(l) =
        (0..c.layers).find(|&l| model.files.contains(&layer_tensor(l, "mlp.down_proj.bias")))
    {
        return Err(Error::Invalid(format!(
            "refit: {} has a down_proj bias (layer {l}), as an earlier FLAP export does; \
             refitting such a model is not supported: prune the dense model instead",
            model.dir.display()
        )));
    }
    // Equal lengths together (shortest first, file order within a length).
    let mut order: Vec<usize> = (0..used.len()).collect();
    order.sort_by_key(|&i| used[i].ids.len());
    let mut passes_of: Vec<Pass> = Vec::new();
    for same in order.chunk_by(|&a, &b| used[a].ids.len() == used[b].ids.len()) {
        for group in same.chunks(batch.max(1)) {
            let t = used[group[0]].ids.len();
            let mask: Vec<bool> = group
                .iter()
                .flat_map(|&i| {
                    let from = used[i].counted_from;
                    (0..t).map(move |p| p >= from)
                })
                .collect();
            let skipped = mask.iter().filter(|&&k| !k).count();
            passes_of.push(Pass {
                ids: group.iter().flat_map(|&i| used[i].ids.clone()).collect(),
                geo: Geometry {
                    seqs: group.len(),
                    t,
                },
                counted: (skipped > 0).then_some(mask),
                skipped,
            });
        }
    }
    let t_max = used.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    // Each output row of W' is a least-squares fit of k' unknowns to the
    // counted rows. With barely more rows than unknowns it fits the
    // calibration set and not the data: on Qwen2.5-Coder-0.5B at 20%
    // (up to 4,849 channels kept, 4,096 rows) the refit raised held-out
    // perplexity by 21%, and with 16,384 rows it lowered it by 5.5%;
    // on SmolLM2 at 40% (922 kept, 4,096 rows), by 22% (README, "Recovery
    // on Qwen at 20%" and the refit table).
    let rows: usize = used.iter().map(|s| s.counted()).sum();
    let widest = kept.iter().map(Vec::len).max().unwrap_or(0) + usize::from(spec.bias);
    if rows < 2 * widest {
        crate::progress::println(&format!(
            "note: the refit fits up to {widest} kept channels per layer to {rows} calibration \
             rows; with fewer than twice as many rows as channels it tends to fit the \
             calibration set rather than the data (more windows or traces help)"
        ));
    }
    let rope = RopeTables::new(be, model, t_max)?;
    let on_host = match layer_major {
        None => None,
        Some(lm) => Some(host_streams(be, lm, &passes_of, d, spec.target)?),
    };
    let hold = |x: B::Buf| Stream::hold(be, x, on_host);
    let embed = |p: &Pass| hold(model.embed_tokens(be, &p.ids)?);
    // x'_l per pass (pruned, refitted below l) and x_l (dense, `residual` only).
    let mut pruned: Vec<Stream<B>> = passes_of.iter().map(embed).collect::<Result<_>>()?;
    let mut dense: Vec<Stream<B>> = match spec.target {
        RefitTarget::Residual => passes_of.iter().map(embed).collect::<Result<_>>()?,
        RefitTarget::Layer => Vec::new(),
    };
    let mut out = Vec::with_capacity(c.layers);
    let (mut passes, mut products, mut solves) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let progress = Progress::new(c.layers as u64, "refit");
    model.for_each_layer(be, 0..c.layers, |l, lw| {
        let (m, keep) = (lw.ffn, &kept[l]);
        let t0 = Instant::now();
        let width = keep.len() + usize::from(spec.bias);
        let mut eqs = NormalEquations::zeros(width, d);
        // (x' + Attn, h) of every pass, for advancing x' after the solve.
        let mut held = Vec::with_capacity(passes_of.len());
        for (i, pass) in passes_of.iter().enumerate() {
            let (geo, rows) = (pass.geo, pass.geo.rows());
            let acts = pruned[i].with(be, |x| layer_acts(be, model, lw, None, &rope, x, geo))?;
            // h with the uncounted rows zeroed (they then add nothing to G,
            // C, nor, through y = W_d h, to ‖y‖²); h itself advances x'.
            let h_masked = match &pass.counted {
                None => None,
                Some(mask) => {
                    let mut h = copy(be, &acts.h, rows * m)?;
                    be.zero_rows(&mut h, m, mask)?;
                    Some(h)
                }
            };
            let h_eq = h_masked.as_ref().unwrap_or(&acts.h);
            let tp;
            let mut part = match spec.target {
                // y = W_d h: the original layer's FFN output on x'.
                RefitTarget::Layer => {
                    let y = be.linear(h_eq, &lw.w_down, None, rows, m, d)?;
                    tp = Instant::now();
                    be.normal_equations(h_eq, keep, spec.bias, &y, None, rows, m, d)?
                }
                // y = x_{l+1} − (x' + Attn); x then advances to x_{l+1}.
                RefitTarget::Residual => {
                    let y =
                        dense[i].with(be, |x| layer_forward(be, model, lw, None, &rope, x, geo))?;
                    let part = match &pass.counted {
                        None => {
                            tp = Instant::now();
                            be.normal_equations(
                                h_eq,
                                keep,
                                spec.bias,
                                &y,
                                Some(&acts.mid),
                                rows,
                                m,
                                d,
                            )?
                        }
                        Some(mask) => {
                            let (mut ym, mut mid) =
                                (copy(be, &y, rows * d)?, copy(be, &acts.mid, rows * d)?);
                            be.zero_rows(&mut ym, d, mask)?;
                            be.zero_rows(&mut mid, d, mask)?;
                            tp = Instant::now();
                            be.normal_equations(h_eq, keep, spec.bias, &ym, Some(&mid), rows, m, d)?
                        }
                    };
                    dense[i] = hold(y)?;
                    part
                }
            };
            // The bias column is 1 on every row, the uncounted ones too: its
            // diagonal entry counted them (an exact integer in f64).
            if spec.bias && pass.skipped > 0 {
                let k = keep.len();
                part.g[k * width + k] -= pass.skipped as f64;
            }
            products += tp.elapsed();
            eqs.add(&part)?;
            if on_host.is_none() {
                held.push((acts.mid, acts.h));
            }
        }
        passes += t0.elapsed();

        let t1 = Instant::now();
        let w_down = model
            .files
            .get(&layer_tensor(l, "mlp.down_proj.weight"), &[d, m])?
            .to_f32()?;
        let layer = solve_layer(l, &eqs, &w_down, m, keep, spec.damp)?;
        solves += t1.elapsed();

        // x'_{l+1} = (x' + Attn) + W'·h_K (+ b) (Gemma 3: normalised by the
        // post-FFN norm), with W' scattered into a
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
        let mut held = held.into_iter();
        for (i, pass) in passes_of.iter().enumerate() {
            let (geo, rows) = (pass.geo, pass.geo.rows());
            let (mid, h) = match held.next() {
                Some(kept) => kept,
                // Layer-major: the activations again, from the same x'.
                None => {
                    let a =
                        pruned[i].with(be, |x| layer_acts(be, model, lw, None, &rope, x, geo))?;
                    (a.mid, a.h)
                }
            };
            let mut y = be.linear(&h, &w_full, b.as_ref(), rows, m, d)?;
            if let Some(w) = &lw.post_ffn_norm {
                y = be.rmsnorm_fwd(&y, w, rows, d, c.rms_eps as f32)?.0; // Gemma 3
            }
            let mut next = mid;
            be.add_assign(&mut next, &y, rows * d)?;
            pruned[i] = hold(next)?;
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

/// A pass's residual stream between layers: on the device, or
/// (layer-major) a host copy.
enum Stream<B: Backend> {
    Device(B::Buf),
    Host(HostBuf),
}

impl<B: Backend> Stream<B> {
    /// `x` kept on the device, or downloaded as `on_host` says.
    fn hold(be: &B, x: B::Buf, on_host: Option<ResidualDtype>) -> Result<Self> {
        Ok(match on_host {
            None => Stream::Device(x),
            Some(dtype) => Stream::Host(HostBuf::store(be, &x, dtype)?),
        })
    }

    /// `f` of the stream's values on the device.
    fn with<R>(&self, be: &B, f: impl FnOnce(&B::Buf) -> Result<R>) -> Result<R> {
        match self {
            Stream::Device(x) => f(x),
            Stream::Host(h) => f(&h.load(be)?),
        }
    }
}

/// Checks that every pass's streams (x', and x for `residual`) fit in
/// `lm.host_memory` and says so; returns the host dtype.
fn host_streams<B: Backend>(
    be: &B,
    lm: LayerMajor,
    passes: &[Pass],
    d: usize,
    target: RefitTarget,
) -> Result<ResidualDtype> {
    let budget = lm
        .host_memory
        .resolve("--host-memory", || be.available_memory())?;
    let streams = 1 + u64::from(target == RefitTarget::Residual);
    let rows: u64 = passes.iter().map(|p| p.geo.rows() as u64).sum();
    let need = streams * rows * d as u64 * lm.residual.bytes();
    if need > budget {
        return Err(Error::Invalid(format!(
            "--host-memory {budget} B is too small for the refit's residual streams: \
             {need} B ({streams} stream(s) of {rows} rows; or fewer calibration windows)"
        )));
    }
    crate::progress::println(&format!(
        "refit: layer-major, residual streams on the host ({:.1} MiB, {})",
        need as f64 / (1 << 20) as f64,
        lm.residual.name()
    ));
    Ok(lm.residual)
}

/// A copy of the first `n` values of `x`.
fn copy<B: Backend>(be: &B, x: &B::Buf, n: usize) -> Result<B::Buf> {
    let mut y = be.zeros(n)?;
    be.add_assign(&mut y, x, n)?;
    Ok(y)
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

//! The backward pass: activation gradients only, never the base weights'
//! gradients (the LoRA adapters' are formed when the model has adapters).
//!
//! The forward pass keeps the residual stream x_0..x_L and, within the
//! activation-memory budget, the activations of the top layers
//! (`forward::Keep`); walking backward, every other layer is recomputed from
//! its stored input, its FFN channel gradient g = ∂J/∂h is formed and handed
//! to the statistics, and the gradient flows on to the layer's input. Of the
//! layers not kept, one layer's intermediates are alive at a time.
use super::forward::{
    attn_shape, ffn_down, layer_acts, next_token_targets, qk_norm_bwd, ForwardOut, Geometry,
    LayerActs, RopeTables,
};
use super::lora::{Adapter, Adapters, LayerLora, Proj};
use super::objective::{EnergyAt, Objective};
use super::weights::{LayerWeights, Model};
use crate::backend::{Backend, ChannelPartial};
use crate::{Error, Result};

/// Backward pass of `objective` over the batch whose forward (`fwd`, with
/// residuals kept) ran on `ids`; takes the activations `fwd` kept (a second
/// pass over the same `fwd` recomputes every layer). `scale` is the objective's normaliser over
/// the whole calibration set (1/n for energy, 1/(N·(T−1)) for ce), so that
/// per-batch statistics add up to the statistics of the full objective.
/// Calls `on_layer(l, partial)` for every layer, last layer first, and
/// returns this batch's contribution to J.
#[allow(clippy::too_many_arguments)]
pub fn backward_channel_stats<B: Backend>(
    be: &B,
    model: &Model<B>,
    fwd: &mut ForwardOut<B>,
    ids: &[u32],
    geo: Geometry,
    objective: Objective,
    energy_at: EnergyAt,
    scale: f32,
    on_layer: impl FnMut(usize, ChannelPartial) -> Result<()>,
) -> Result<f64> {
    backward_channel_stats_counted(
        be, model, fwd, ids, geo, objective, energy_at, scale, None, on_layer,
    )
}

/// [`backward_channel_stats`] counting only the rows `r` (of `geo.rows()`)
/// with `counted[r]` (METHODS.md §11, `--tokens generated`): the energy
/// objective sums ½‖z_r‖² over counted rows, cross-entropy predicts only
/// counted targets, and every per-token statistic (s1, s2, f2, k1 and each
/// sequence's h·g) sums counted rows only. `None` counts every row and is
/// exactly [`backward_channel_stats`] (same operations, same buffers); the
/// masked path works on copies of z (or x_L) and of g, and masks h in place
/// after its last other use.
#[allow(clippy::too_many_arguments)]
pub fn backward_channel_stats_counted<B: Backend>(
    be: &B,
    model: &Model<B>,
    fwd: &mut ForwardOut<B>,
    ids: &[u32],
    geo: Geometry,
    objective: Objective,
    energy_at: EnergyAt,
    scale: f32,
    counted: Option<&[bool]>,
    mut on_layer: impl FnMut(usize, ChannelPartial) -> Result<()>,
) -> Result<f64> {
    let c = &model.cfg;
    if fwd.residuals.len() != c.layers + 1 {
        return Err(Error::Invalid(
            "backward pass needs the forward pass's residual stream".into(),
        ));
    }
    let (j, dx) = objective_grad(
        be,
        model,
        (&fwd.z, &fwd.rstd_final, &fwd.residuals[c.layers]),
        ids,
        geo,
        (objective, energy_at, scale),
        counted,
    )?;
    backward_layers(be, model, None, fwd, geo, dx, counted, Some(&mut on_layer))?;
    Ok(j)
}

/// The objective J over one batch and its gradient ∂J/∂x_L `[rows, d]`,
/// from the forward pass's final norm output z, its rstd and the final
/// residual x_L (`(z, rstd_final, x_last)`); `(objective, energy_at,
/// scale)` and `counted` as in [`backward_channel_stats_counted`].
pub fn objective_grad<B: Backend>(
    be: &B,
    model: &Model<B>,
    (z, rstd_final, x_last): (&B::Buf, &B::Buf, &B::Buf),
    ids: &[u32],
    geo: Geometry,
    (objective, energy_at, scale): (Objective, EnergyAt, f32),
    counted: Option<&[bool]>,
) -> Result<(f64, B::Buf)> {
    let c = &model.cfg;
    let (rows, d) = (geo.rows(), c.hidden);
    if let Some(k) = counted {
        if k.len() != rows {
            return Err(Error::Invalid(format!(
                "row mask of {} rows for a batch of {rows}",
                k.len()
            )));
        }
    }
    // The energy of `x` [rows, d] over the counted rows.
    let energy = |x: &B::Buf| match counted {
        None => be.energy(x, rows, d, scale),
        Some(keep) => {
            let mut x = copy(be, x, rows * d)?;
            be.zero_rows(&mut x, d, keep)?;
            be.energy(&x, rows, d, scale)
        }
    };
    Ok(match (objective, energy_at) {
        (Objective::Energy, EnergyAt::PreNorm) => energy(x_last)?,
        (Objective::Energy, EnergyAt::FinalNorm) => {
            let (j, dz) = energy(z)?;
            (
                j,
                be.rmsnorm_bwd(&dz, x_last, &model.norm, rstd_final, rows, d)?,
            )
        }
        (Objective::Ce, _) => {
            let mut tg = next_token_targets(ids, geo);
            if let Some(keep) = counted {
                // Row r predicts the token at r + 1 (never across sequences:
                // a sequence's last row has no target).
                for (r, t) in tg.iter_mut().enumerate() {
                    if !keep.get(r + 1).copied().unwrap_or(false) {
                        *t = u32::MAX;
                    }
                }
            }
            let (sum, _, dz) =
                be.cross_entropy(z, model.lm_head(be)?, &tg, rows, d, c.vocab, scale, true)?;
            let dz = dz.expect("cross_entropy returns dz when asked");
            (
                sum * scale as f64,
                be.rmsnorm_bwd(&dz, x_last, &model.norm, rstd_final, rows, d)?,
            )
        }
    })
}

/// A copy of the first `n` values of `x`.
fn copy<B: Backend>(be: &B, x: &B::Buf, n: usize) -> Result<B::Buf> {
    let mut y = be.zeros(n)?;
    be.add_assign(&mut y, x, n)?;
    Ok(y)
}

/// The adapters' gradients of an objective whose gradient w.r.t. the final
/// norm's output z is `dz` `[rows, d]`, over the batch whose forward pass
/// (`fwd`, with residuals kept, through `forward_with` with the same
/// adapters; its kept activations are taken) ran: `lora = (adapters, s = α / r)`; each adapter's gradient
/// is added into `grads` (same shapes).
pub fn backward_adapters<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: (&Adapters<B>, f32),
    grads: &mut Adapters<B>,
    fwd: &mut ForwardOut<B>,
    geo: Geometry,
    dz: &B::Buf,
) -> Result<()> {
    let c = &model.cfg;
    if fwd.residuals.len() != c.layers + 1 {
        return Err(Error::Invalid(
            "backward pass needs the forward pass's residual stream".into(),
        ));
    }
    let (rows, d) = (geo.rows(), c.hidden);
    let x_last = &fwd.residuals[c.layers];
    let dx = be.rmsnorm_bwd(dz, x_last, &model.norm, &fwd.rstd_final, rows, d)?;
    backward_layers(
        be,
        model,
        Some((lora.0, lora.1, grads)),
        fwd,
        geo,
        dx,
        None,
        None,
    )
}

/// The walk down the layers from `dx = ∂J/∂x_L`: hands each layer's
/// channel statistics (over the rows `counted`, when given) to `on_layer`
/// when given, and adds the adapters' gradients into the third member of
/// `lora` when given.
#[allow(clippy::too_many_arguments)]
fn backward_layers<'f, B: Backend>(
    be: &B,
    model: &Model<B>,
    mut lora: Option<(&Adapters<B>, f32, &mut Adapters<B>)>,
    fwd: &mut ForwardOut<B>,
    geo: Geometry,
    mut dx: B::Buf,
    counted: Option<&[bool]>,
    mut on_layer: Option<&mut (dyn FnMut(usize, ChannelPartial) -> Result<()> + 'f)>,
) -> Result<()> {
    let rope = RopeTables::new(be, model, geo.t)?;
    let adapted = lora.is_some();
    let mut kept_acts = std::mem::take(&mut fwd.acts);
    let residuals = &fwd.residuals;
    model.for_each_layer(be, (0..model.cfg.layers).rev(), |l, lw| {
        // This layer's adapters, and where their gradients go.
        let lora_l = match lora.as_mut() {
            Some((ad, s, grads)) => Some((
                ad.layer(l, *s)?,
                grads
                    .layers
                    .get_mut(l)
                    .ok_or_else(|| Error::Invalid(format!("no adapter gradients for layer {l}")))?,
            )),
            None => None,
        };
        let acts = kept_acts.get_mut(l).and_then(Option::take);
        let on = on_layer.as_deref_mut();
        let x = &residuals[l];
        layer_backward(
            be,
            model,
            (l, lw),
            lora_l,
            &rope,
            x,
            acts,
            geo,
            &mut dx,
            counted,
            on,
            adapted,
        )
    })
}

/// One layer's backward pass: `dx` goes from ∂J/∂x_{l+1} to ∂J/∂x_l (left
/// as ∂J/∂x' at layer 0 without adapters, where nothing below needs it).
/// `x` is the layer's input, `acts` its activations when the forward pass
/// kept them (else they are recomputed from `x`); the layer's channel
/// statistics (over the rows `counted`) go to `on_layer` when given, and
/// its adapters' gradients into the second member of `lora_l` when given.
#[allow(clippy::too_many_arguments)]
pub fn layer_backward<'f, B: Backend>(
    be: &B,
    model: &Model<B>,
    (l, lw): (usize, &LayerWeights<B::Weight>),
    mut lora_l: Option<(LayerLora<'_, B>, &mut Vec<Adapter<B>>)>,
    rope: &RopeTables<B>,
    x: &B::Buf,
    acts: Option<LayerActs<B>>,
    geo: Geometry,
    dx: &mut B::Buf,
    counted: Option<&[bool]>,
    mut on_layer: Option<&mut (dyn FnMut(usize, ChannelPartial) -> Result<()> + 'f)>,
    adapted: bool,
) -> Result<()> {
    let c = &model.cfg;
    let (rows, d, m) = (geo.rows(), c.hidden, lw.ffn);
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let shape = attn_shape(c, geo);
    // The forward's activations of this layer when it kept them, else recomputed.
    let mut acts = match acts {
        Some(acts) => acts,
        None => layer_acts(
            be,
            model,
            lw,
            lora_l.as_ref().map(|(ll, _)| ll),
            rope,
            x,
            geo,
        )?,
    };
    // FFN: x_next = x' + y, y = W_d h  ⇒  g = dh = dy·W_d  [rows, m], dy = dx;
    // Gemma 3: x_next = x' + norm(y), dy through the norm (y kept or recomputed).
    let dy_norm = match &lw.post_ffn_norm {
        Some(w) => {
            let y = match acts.ffn_out.take() {
                Some(y) => y,
                None => ffn_down(be, lw, lora_l.as_ref().map(|(ll, _)| ll), &acts.h, rows, d)?,
            };
            let (_, rstd) = be.rmsnorm_fwd(&y, w, rows, d, c.rms_eps as f32)?;
            Some(be.rmsnorm_bwd(dx, &y, w, &rstd, rows, d)?)
        }
        None => None,
    };
    let dy = dy_norm.as_ref().unwrap_or(dx);
    // `∂(adapter of p)` from its input and output gradient, adding its
    // input gradient into `dx_in` (LayerLora::backward).
    let mut adapter_bwd =
        |p: Proj, inp: &B::Buf, dy: &B::Buf, dx_in: &mut B::Buf| match lora_l.as_mut() {
            Some((ll, g)) => ll.backward(be, p, &mut g[p as usize], inp, dy, dx_in, rows),
            None => Ok(()),
        };

    let mut dh = be.linear_bwd_input(dy, &lw.w_down, rows, m, d)?;
    adapter_bwd(Proj::Down, &acts.h, dy, &mut dh)?;
    drop(dy_norm);
    if let Some(f) = on_layer.as_mut() {
        let partial = match counted {
            None => be.channel_stats(&acts.h, &dh, geo.seqs, geo.t, m)?,
            Some(keep) => {
                // h has no other use left; g (dh) flows on unmasked.
                be.zero_rows(&mut acts.h, m, keep)?;
                let mut g = copy(be, &dh, rows * m)?;
                be.zero_rows(&mut g, m, keep)?;
                be.channel_stats(&acts.h, &g, geo.seqs, geo.t, m)?
            }
        };
        f(l, partial)?;
    }
    drop(acts.h); // [rows, m] buffers go as soon as they are used (src/plan.rs)
    if l == 0 && !adapted {
        return Ok(()); // nothing below layer 0 needs a gradient
    }
    let (da, db) = be.glu_bwd(c.act, &dh, &acts.a, &acts.b, rows * m)?;
    drop((dh, acts.a, acts.b));
    let mut du2 = be.linear_bwd_input(&da, &lw.w_gate, rows, d, m)?; // [rows, d]
    if acts.u2.is_some() {
        adapter_bwd(Proj::Gate, kept(&acts.u2)?, &da, &mut du2)?;
    }
    drop(da);
    let mut du2_up = be.linear_bwd_input(&db, &lw.w_up, rows, d, m)?;
    if acts.u2.is_some() {
        adapter_bwd(Proj::Up, kept(&acts.u2)?, &db, &mut du2_up)?;
    }
    be.add_assign(&mut du2, &du2_up, rows * d)?;
    drop((db, du2_up));
    let dnorm = be.rmsnorm_bwd(&du2, &acts.mid, &lw.ffn_norm, &acts.rstd_ffn, rows, d)?;
    drop(du2);
    be.add_assign(dx, &dnorm, rows * d)?; // dx is now ∂J/∂x'
    drop(dnorm);

    // Attention: x' = x + W_o Attn(rope(W_q u), rope(W_k u), W_v u), u = norm(x)
    // (Qwen3, Gemma 3: rope(qnorm(W_q u)), rope(knorm(W_k u)); Gemma 3:
    // x' = x + norm(W_o Attn(..)))
    let d_o_norm = match (&lw.post_attn_norm, &acts.post_attn) {
        (Some(w), Some((o, rstd))) => Some(be.rmsnorm_bwd(dx, o, w, rstd, rows, d)?),
        _ => None,
    };
    let d_o = d_o_norm.as_ref().unwrap_or(dx);
    let mut datt = be.linear_bwd_input(d_o, &lw.wo, rows, qd, d)?; // [rows, q]
    adapter_bwd(Proj::O, &acts.att, d_o, &mut datt)?;
    drop(d_o_norm);
    let (mut dq, mut dk, dv) = be.attention_bwd(
        &datt,
        &acts.q,
        &acts.k,
        &acts.v,
        &acts.att,
        &acts.lse,
        shape,
        c.window(l),
    )?;
    let (cos, sin) = rope.layer(c, l);
    be.rope(
        &mut dq, cos, sin, geo.seqs, geo.t, c.heads, c.head_dim, true,
    )?;
    be.rope(
        &mut dk, cos, sin, geo.seqs, geo.t, c.kv_heads, c.head_dim, true,
    )?;
    // Qwen3, Gemma 3: through the per-head q/k norms to the projections' outputs.
    qk_norm_bwd(be, c, lw, acts.qk.as_ref(), &mut dq, &mut dk, rows)?;
    // du = dq·W_q + dk·W_k + dv·W_v  [rows, d], one term alive at a time
    let mut du = be.linear_bwd_input(&dq, &lw.wq, rows, d, qd)?;
    for (p, dy, w, out) in [(Proj::K, &dk, &lw.wk, kvd), (Proj::V, &dv, &lw.wv, kvd)] {
        let mut term = be.linear_bwd_input(dy, w, rows, d, out)?;
        if acts.u.is_some() {
            adapter_bwd(p, kept(&acts.u)?, dy, &mut term)?;
        }
        be.add_assign(&mut du, &term, rows * d)?;
    }
    if acts.u.is_some() {
        adapter_bwd(Proj::Q, kept(&acts.u)?, &dq, &mut du)?;
    }
    if l == 0 {
        return Ok(()); // the embedding is frozen
    }
    let dnorm = be.rmsnorm_bwd(&du, x, &lw.attn_norm, &acts.rstd_attn, rows, d)?;
    be.add_assign(dx, &dnorm, rows * d) // dx is now ∂J/∂x_l
}

/// An adapted projection's input, which `layer_acts` keeps when the layer has adapters.
fn kept<T>(u: &Option<T>) -> Result<&T> {
    u.as_ref()
        .ok_or_else(|| Error::Invalid("adapter inputs were not kept".into()))
}

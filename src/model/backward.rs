//! The backward pass: activation gradients only, never weight gradients.
//!
//! The forward pass keeps the residual stream x_0..x_L; walking backward,
//! each layer is recomputed from its stored input, its FFN channel gradient
//! g = ∂J/∂h is formed and handed to the statistics, and the gradient flows
//! on to the layer's input. Only one layer's intermediates are alive at a time.
use super::forward::{layer_acts, next_token_targets, ForwardOut, Geometry, RopeTables};
use super::objective::{EnergyAt, Objective};
use super::weights::Model;
use crate::backend::{AttnShape, Backend, ChannelPartial};
use crate::{Error, Result};

/// Backward pass of `objective` over the batch whose forward (`fwd`, with
/// residuals kept) ran on `ids`. `scale` is the objective's normaliser over
/// the whole calibration set (1/n for energy, 1/(N·(T−1)) for ce), so that
/// per-batch statistics add up to the statistics of the full objective.
/// Calls `on_layer(l, partial)` for every layer, last layer first, and
/// returns this batch's contribution to J.
#[allow(clippy::too_many_arguments)]
pub fn backward_channel_stats<B: Backend>(
    be: &B,
    model: &Model<B>,
    fwd: &ForwardOut<B>,
    ids: &[u32],
    geo: Geometry,
    objective: Objective,
    energy_at: EnergyAt,
    scale: f32,
    mut on_layer: impl FnMut(usize, ChannelPartial) -> Result<()>,
) -> Result<f64> {
    let c = &model.cfg;
    let (rows, d) = (geo.rows(), c.hidden);
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    if fwd.residuals.len() != c.layers + 1 {
        return Err(Error::Invalid(
            "backward pass needs the forward pass's residual stream".into(),
        ));
    }
    let x_last = &fwd.residuals[c.layers];
    let (j, mut dx) = match (objective, energy_at) {
        (Objective::Energy, EnergyAt::PreNorm) => be.energy(x_last, rows, d, scale)?,
        (Objective::Energy, EnergyAt::FinalNorm) => {
            let (j, dz) = be.energy(&fwd.z, rows, d, scale)?;
            (
                j,
                be.rmsnorm_bwd(&dz, x_last, &model.norm, &fwd.rstd_final, rows, d)?,
            )
        }
        (Objective::Ce, _) => {
            let tg = next_token_targets(ids, geo);
            let (sum, _, dz) =
                be.cross_entropy(&fwd.z, model.lm_head(), &tg, rows, d, c.vocab, scale, true)?;
            let dz = dz.expect("cross_entropy returns dz when asked");
            (
                sum * scale as f64,
                be.rmsnorm_bwd(&dz, x_last, &model.norm, &fwd.rstd_final, rows, d)?,
            )
        }
    };
    let rope = RopeTables::new(be, model, geo.t)?;
    let shape = AttnShape {
        seqs: geo.seqs,
        t: geo.t,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
    };
    model.for_each_layer(be, (0..c.layers).rev(), |l, lw| {
        let m = lw.ffn;
        let x = &fwd.residuals[l];
        let acts = layer_acts(be, model, lw, &rope, x, geo)?;

        // FFN: x_next = x' + W_d h  ⇒  g = dh = dx·W_d  [rows, m]
        let dh = be.linear_bwd_input(&dx, &lw.w_down, rows, m, d)?;
        on_layer(l, be.channel_stats(&acts.h, &dh, geo.seqs, geo.t, m)?)?;
        drop(acts.h); // [rows, m] buffers go as soon as they are used (src/plan.rs)
        if l == 0 {
            return Ok(()); // nothing below layer 0 needs a gradient
        }
        let (da, db) = be.swiglu_bwd(&dh, &acts.a, &acts.b, rows * m)?;
        drop((dh, acts.a, acts.b));
        let mut du2 = be.linear_bwd_input(&da, &lw.w_gate, rows, d, m)?; // [rows, d]
        drop(da);
        be.add_assign(
            &mut du2,
            &be.linear_bwd_input(&db, &lw.w_up, rows, d, m)?,
            rows * d,
        )?;
        drop(db);
        let dnorm = be.rmsnorm_bwd(&du2, &acts.mid, &lw.ffn_norm, &acts.rstd_ffn, rows, d)?;
        drop(du2);
        be.add_assign(&mut dx, &dnorm, rows * d)?; // dx is now ∂J/∂x'
        drop(dnorm);

        // Attention: x' = x + W_o Attn(rope(W_q u), rope(W_k u), W_v u), u = norm(x)
        let datt = be.linear_bwd_input(&dx, &lw.wo, rows, qd, d)?; // [rows, q]
        let (mut dq, mut dk, dv) = be.attention_bwd(
            &datt, &acts.q, &acts.k, &acts.v, &acts.att, &acts.lse, shape,
        )?;
        be.rope(
            &mut dq, &rope.cos, &rope.sin, geo.seqs, geo.t, c.heads, c.head_dim, true,
        )?;
        be.rope(
            &mut dk, &rope.cos, &rope.sin, geo.seqs, geo.t, c.kv_heads, c.head_dim, true,
        )?;
        let mut du = be.linear_bwd_input(&dq, &lw.wq, rows, d, qd)?; // [rows, d]
        be.add_assign(
            &mut du,
            &be.linear_bwd_input(&dk, &lw.wk, rows, d, kvd)?,
            rows * d,
        )?;
        be.add_assign(
            &mut du,
            &be.linear_bwd_input(&dv, &lw.wv, rows, d, kvd)?,
            rows * d,
        )?;
        let dnorm = be.rmsnorm_bwd(&du, x, &lw.attn_norm, &acts.rstd_attn, rows, d)?;
        be.add_assign(&mut dx, &dnorm, rows * d) // dx is now ∂J/∂x_l
    })?;
    Ok(j)
}

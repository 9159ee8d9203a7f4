//! One LoRA-distillation training step (METHODS.md section 10): the loss
//! and the adapters' gradients over a batch, gradient clipping and the
//! AdamW update; and the adapters' seeded initialisation.
use crate::backend::{AdamwStep, Backend};
use crate::io::traces::Sequence;
use crate::model::backward::backward_adapters;
use crate::model::forward::{forward, forward_with, next_token_targets, Geometry, Keep};
use crate::model::keep::kept_layers;
use crate::model::lora::Adapters;
use crate::model::{Model, ModelConfig};
use crate::{Error, Result};

/// The training loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RecoverLoss {
    /// KL(p_teacher ‖ p_student) of the next-token distributions.
    Kd,
    /// Next-token cross-entropy (no teacher).
    Ce,
}

impl RecoverLoss {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kd => "kd",
            Self::Ce => "ce",
        }
    }
}

/// AdamW's fixed settings (METHODS.md section 10).
pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;
pub const WEIGHT_DECAY: f64 = 0.0;
/// Gradient clipping at this global norm by default.
pub const MAX_GRAD_NORM: f64 = 1.0;

/// The learning rate of 1-based step `t`: linear warm-up to `lr` over the
/// first `warmup` steps (`lr·t/warmup`), then constant.
pub fn lr_at(lr: f64, warmup: u64, t: u64) -> f64 {
    if t >= warmup {
        lr
    } else {
        lr * t as f64 / warmup as f64
    }
}

/// Fresh adapters of rank `r`: A ~ N(0, 1/inp) drawn from `seed` (layer,
/// then projection order, row-major), B = 0, so the adapted model starts
/// as the pruned one.
pub fn init_adapters<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    rank: usize,
    seed: u64,
) -> Result<Adapters<B>> {
    let mut rng = Normal::new(seed);
    Adapters::build(be, cfg, rank, |_, _, inp, out| {
        let std = (1.0 / inp as f64).sqrt();
        let a = (0..rank * inp).map(|_| (rng.next() * std) as f32).collect();
        Ok((a, vec![0.0; out * rank]))
    })
}

/// Standard normal draws: splitmix64 uniforms through Box–Muller.
struct Normal {
    state: u64,
    spare: Option<f64>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64 // in (0, 1)
    }
    fn next(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        self.spare = Some(r * th.sin());
        r * th.cos()
    }
}

/// The student's loss over one batch `ids` (`[seqs, t]`) and, added into
/// `grads`, its gradient w.r.t. the adapters `lora = (adapters, s)`. The
/// loss is the mean over predicted positions (those with a next token in
/// the window, N·(T−1)): KL(p_teacher ‖ p_student) for `Kd` (the teacher
/// runs in the same pass, on the same backend), next-token NLL for `Ce`.
/// The student's forward pass keeps its top layers' activations within
/// `acts_budget` bytes (`model::keep`; the result does not depend on it).
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grads<B: Backend>(
    be: &B,
    student: &Model<B>,
    teacher: Option<&Model<B>>,
    lora: (&Adapters<B>, f32),
    grads: &mut Adapters<B>,
    ids: &[u32],
    geo: Geometry,
    loss: RecoverLoss,
    acts_budget: u64,
) -> Result<f64> {
    let count = geo.seqs * geo.t.saturating_sub(1);
    if count == 0 {
        return Err(Error::Invalid(
            "a training batch needs windows of at least 2 tokens".into(),
        ));
    }
    let scale = 1.0 / count as f32;
    let (sum, _) = loss_sum_and_grads(
        be,
        student,
        teacher,
        lora,
        grads,
        ids,
        geo,
        None,
        loss,
        scale,
        acts_budget,
    )?;
    Ok(sum / count as f64)
}

/// The loss and adapter gradients of one training step over `seqs`, each
/// of its own length (METHODS.md §10): the mean over the counted
/// predictions of the whole step (a prediction counts when its target
/// position is at or past the sequence's `counted_from`), so the step
/// equals the same sequences done one at a time, their gradients added
/// and normalised by the total count. Sequences of equal length share a
/// pass (in their order); none is padded. Returns the mean loss.
/// `acts_budget` as in [`loss_and_grads`].
#[allow(clippy::too_many_arguments)]
pub fn step_loss_and_grads<B: Backend>(
    be: &B,
    student: &Model<B>,
    teacher: Option<&Model<B>>,
    lora: (&Adapters<B>, f32),
    grads: &mut Adapters<B>,
    seqs: &[&Sequence],
    loss: RecoverLoss,
    acts_budget: u64,
) -> Result<f64> {
    let count: usize = seqs.iter().map(|s| s.predicted()).sum();
    if count == 0 {
        return Err(Error::Invalid(format!(
            "a training step of {} sequences predicts no counted token",
            seqs.len()
        )));
    }
    let scale = 1.0 / count as f32;
    let mut order: Vec<usize> = (0..seqs.len())
        .filter(|&i| seqs[i].predicted() > 0)
        .collect();
    order.sort_by_key(|&i| seqs[i].ids.len());
    let mut sum = 0.0;
    for same in order.chunk_by(|&a, &b| seqs[a].ids.len() == seqs[b].ids.len()) {
        let t = seqs[same[0]].ids.len();
        let geo = Geometry {
            seqs: same.len(),
            t,
        };
        let ids: Vec<u32> = same.iter().flat_map(|&i| seqs[i].ids.clone()).collect();
        let from: Vec<usize> = same.iter().map(|&i| seqs[i].counted_from).collect();
        let (part, _) = loss_sum_and_grads(
            be,
            student,
            teacher,
            lora,
            grads,
            &ids,
            geo,
            Some(&from),
            loss,
            scale,
            acts_budget,
        )?;
        sum += part;
    }
    Ok(sum / count as f64)
}

/// Σ of the loss over the counted predictions of one batch `ids`
/// (`[seqs, t]`), and their count; `scale`·∂Σ/∂adapters is added into
/// `grads`. Position p of sequence i predicts p + 1 and counts when
/// p + 1 < t and p + 1 ≥ `counted_from[i]` (all when `None`).
/// `acts_budget` as in [`loss_and_grads`].
#[allow(clippy::too_many_arguments)]
pub fn loss_sum_and_grads<B: Backend>(
    be: &B,
    student: &Model<B>,
    teacher: Option<&Model<B>>,
    lora: (&Adapters<B>, f32),
    grads: &mut Adapters<B>,
    ids: &[u32],
    geo: Geometry,
    counted_from: Option<&[usize]>,
    loss: RecoverLoss,
    scale: f32,
    acts_budget: u64,
) -> Result<(f64, usize)> {
    let c = &student.cfg;
    let (rows, d) = (geo.rows(), c.hidden);
    let mut targets = next_token_targets(ids, geo);
    if let Some(from) = counted_from {
        if from.len() != geo.seqs {
            return Err(Error::Invalid(format!(
                "{} counted-from positions for {} sequences",
                from.len(),
                geo.seqs
            )));
        }
        for (seq, &f) in targets.chunks_mut(geo.t).zip(from) {
            // Position p predicts p + 1: the prompt's targets are context.
            seq.iter_mut()
                .take(f.saturating_sub(1))
                .for_each(|t| *t = u32::MAX);
        }
    }
    let counted: Vec<bool> = targets.iter().map(|&t| t != u32::MAX).collect();
    let count = counted.iter().filter(|&&k| k).count();
    if count == 0 {
        return Ok((0.0, 0));
    }
    let z_teacher = match (loss, teacher) {
        (RecoverLoss::Kd, Some(t)) => Some(forward(be, t, ids, geo, Keep::OUTPUT)?.z),
        (RecoverLoss::Kd, None) => {
            return Err(Error::Invalid("the kd loss needs a teacher".into()))
        }
        (RecoverLoss::Ce, _) => None,
    };
    let (acts_layers, _) = kept_layers(c, geo, true, acts_budget);
    let mut fwd = forward_with(be, student, Some(lora), ids, geo, Keep::acts(acts_layers))?;
    let (sum, dz) = match (z_teacher, teacher) {
        (Some(zt), Some(t)) => {
            let (sum, _, dz) = be.kl_div(
                &fwd.z,
                student.lm_head(be)?,
                &zt,
                t.lm_head(be)?,
                &counted,
                rows,
                d,
                c.vocab,
                scale,
                true,
            )?;
            (sum, dz)
        }
        _ => {
            let (sum, _, dz) = be.cross_entropy(
                &fwd.z,
                student.lm_head(be)?,
                &targets,
                rows,
                d,
                c.vocab,
                scale,
                true,
            )?;
            (sum, dz)
        }
    };
    let dz = dz.ok_or_else(|| Error::Invalid("the loss returned no gradient".into()))?;
    backward_adapters(be, student, lora, grads, &mut fwd, geo, &dz)?;
    Ok((sum, count))
}

/// The clipping factor of `clip_grad_norm_` for a global norm `norm`:
/// min(1, max_norm / (norm + 1e-6)); 1 without clipping (`max_norm` None).
pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> f32 {
    match max_norm {
        Some(max) => (max / (norm + 1e-6)).min(1.0) as f32,
        None => 1.0,
    }
}

/// Clips `grads` to global norm `max_norm` (`clip_factor`) and applies one
/// AdamW step of learning rate `lr` to `params`, moments `m`, `v`. Returns
/// ‖g‖ before clipping; a non-finite norm is an error and nothing is updated.
#[allow(clippy::too_many_arguments)]
pub fn clip_and_update<B: Backend>(
    be: &B,
    params: &mut Adapters<B>,
    grads: &Adapters<B>,
    (m, v): (&mut Adapters<B>, &mut Adapters<B>),
    lr: f64,
    max_norm: Option<f64>,
    step: u64,
) -> Result<f64> {
    let norm = grads.sum_squares(be)?.sqrt();
    if !norm.is_finite() {
        return Err(Error::Invalid(format!(
            "step {step}: the adapters' gradient norm is {norm}"
        )));
    }
    let grad_scale = clip_factor(norm, max_norm);
    let hyper = AdamwStep {
        lr,
        beta1: BETA1,
        beta2: BETA2,
        eps: EPS,
        weight_decay: WEIGHT_DECAY,
        step,
        grad_scale,
    };
    let moments = m.tensors_mut().zip(v.tensors_mut());
    for (((p, n), (g, _)), ((m, _), (v, _))) in
        params.tensors_mut().zip(grads.tensors()).zip(moments)
    {
        be.adamw(p, g, m, v, n, hyper)?;
    }
    Ok(norm)
}

//! Launches of kernels/kl_div.cu: the two passes of the chunked distillation
//! KL (`Backend::kl_div` on the CUDA backend), one block per row of the
//! student's and the teacher's logits chunks `[rows, vc]`.
use super::Launch;
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// The per-row running statistics of both distributions (each `[rows]`
/// f32): the student's max `m_s` and sum `s_s`, the teacher's `m_t` and
/// `s_t`, and `a = Σ_v exp(lt_v − m_t)·(lt_v − ls_v)`.
pub struct KlStats<'a, D: Device> {
    pub m_s: &'a DevBuf<D, f32>,
    pub s_s: &'a DevBuf<D, f32>,
    pub m_t: &'a DevBuf<D, f32>,
    pub s_t: &'a DevBuf<D, f32>,
    pub a: &'a DevBuf<D, f32>,
}

/// kl_div.cu `kl_stats_f32`: folds the student's and the teacher's logits
/// chunks `[rows, vc]` into `st` for every row with `counted[r] != 0`.
pub fn kl_stats<D: Device>(
    dev: &D,
    logits: &DevBuf<D, f32>,
    teacher: &DevBuf<D, f32>,
    counted: &DevBuf<D, u32>,
    st: &KlStats<'_, D>,
    rows: usize,
    vc: usize,
) -> Result<()> {
    Launch::new(dev)
        .buf(logits, rows * vc, "kl student logits")
        .buf(teacher, rows * vc, "kl teacher logits")
        .buf(counted, rows, "kl counted")
        .buf(st.m_s, rows, "kl m_s")
        .buf(st.s_s, rows, "kl s_s")
        .buf(st.m_t, rows, "kl m_t")
        .buf(st.s_t, rows, "kl s_t")
        .buf(st.a, rows, "kl a")
        .int(vc, "vocab chunk")
        .run_if(rows > 0, "kl_stats_f32", LaunchCfg::linear(rows, 256))
}

/// kl_div.cu `kl_grad_f32`: turns the student's logits chunk into
/// `scale·(p_s − p_t)` in place (0 on rows not counted), given the final
/// statistics (`st.a` is not read).
#[allow(clippy::too_many_arguments)]
pub fn kl_grad<D: Device>(
    dev: &D,
    logits: &DevBuf<D, f32>,
    teacher: &DevBuf<D, f32>,
    counted: &DevBuf<D, u32>,
    st: &KlStats<'_, D>,
    rows: usize,
    vc: usize,
    scale: f32,
) -> Result<()> {
    Launch::new(dev)
        .buf(logits, rows * vc, "kl student logits")
        .buf(teacher, rows * vc, "kl teacher logits")
        .buf(counted, rows, "kl counted")
        .buf(st.m_s, rows, "kl m_s")
        .buf(st.s_s, rows, "kl s_s")
        .buf(st.m_t, rows, "kl m_t")
        .buf(st.s_t, rows, "kl s_t")
        .int(vc, "vocab chunk")
        .f32(scale)
        .run_if(rows > 0, "kl_grad_f32", LaunchCfg::linear(rows, 256))
}

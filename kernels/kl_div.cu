// Chunked distillation KL(p_teacher ‖ p_student) over the vocabulary: the
// student's logits ls = z·Wᵀ and the teacher's lt = z_t·W_tᵀ are produced one
// vocabulary chunk [v0, v0+vc) at a time by cuBLAS into two [rows, vc] f32
// buffers, and never exist for the whole vocabulary. Rows with counted[r] = 0
// are skipped (their stats stay as initialised) and get a zero gradient.
//   kl_stats_f32 (per chunk, online log-sum-exp of both, per row r):
//     m_s' = max(m_s, max_j ls_rj);  s_s' = s_s·exp(m_s − m_s') + Σ_j exp(ls_rj − m_s');
//     m_t', s_t' likewise from lt;
//     a' = a·exp(m_t − m_t') + Σ_j exp(lt_rj − m_t')·(lt_rj − ls_rj).
//   After the last chunk (host, f64), with p_t = exp(lt − m_t)/s_t:
//     KL_r = Σ_v p_t(v)·(lt_v − ls_v) − lse_t + lse_s
//          = a/s_t − (m_t + log s_t) + (m_s + log s_s).
//   kl_grad_f32 (per chunk, second pass, in place over the student chunk):
//     ls_rj ← scale·(exp(ls_rj − m_s − log s_s) − exp(lt_rj − m_t − log s_t)),
//     0 for rows not counted; then dz += dlogits·W_chunk (cuBLAS).
// Launch: grid (rows), block 256 striding over the chunk; block_max/block_sum.
// Bytes per chunk: stats 2·rows·vc·4, grad 3·rows·vc·4. Qwen2.5-7B at T=2048
// (vocab 152064): stats 2.5 GB, grad 3.7 GB in all → floors 2.5 / 3.7 ms on
// an RTX 4090 (1008 GB/s), 0.74 / 1.1 ms on an H100 (3.35 TB/s); the five
// lm_head products (two per pass, and dz; 2·2048·3584·152064 FLOP each)
// dominate.
#include "common.cuh"

extern "C" __global__ void kl_stats_f32(const float *__restrict__ ls_chunk, const float *__restrict__ lt_chunk,
                                        const unsigned *__restrict__ counted, float *__restrict__ m_s,
                                        float *__restrict__ s_s, float *__restrict__ m_t,
                                        float *__restrict__ s_t, float *__restrict__ a_run, int vc) {
    const int r = blockIdx.x;
    if (!counted[r]) return;  // the whole block leaves together
    const float *ls = ls_chunk + (size_t)r * vc, *lt = lt_chunk + (size_t)r * vc;
    float mx_s = -INFINITY, mx_t = -INFINITY;
    for (int j = threadIdx.x; j < vc; j += blockDim.x) {
        mx_s = fmaxf(mx_s, ls[j]);
        mx_t = fmaxf(mx_t, lt[j]);
    }
    const float ms_old = m_s[r], ms_new = fmaxf(ms_old, block_max(mx_s));
    const float mt_old = m_t[r], mt_new = fmaxf(mt_old, block_max(mx_t));
    float ss = 0.f, st = 0.f, a = 0.f;
    for (int j = threadIdx.x; j < vc; j += blockDim.x) {
        const float et = expf(lt[j] - mt_new);
        ss += expf(ls[j] - ms_new);
        st += et;
        a += et * (lt[j] - ls[j]);
    }
    ss = block_sum(ss);
    st = block_sum(st);
    a = block_sum(a);
    if (threadIdx.x == 0) {
        const float rescale_t = expf(mt_old - mt_new);
        s_s[r] = s_s[r] * expf(ms_old - ms_new) + ss;
        m_s[r] = ms_new;
        s_t[r] = s_t[r] * rescale_t + st;
        a_run[r] = a_run[r] * rescale_t + a;
        m_t[r] = mt_new;
    }
}

extern "C" __global__ void kl_grad_f32(float *__restrict__ ls_chunk, const float *__restrict__ lt_chunk,
                                       const unsigned *__restrict__ counted, const float *__restrict__ m_s,
                                       const float *__restrict__ s_s, const float *__restrict__ m_t,
                                       const float *__restrict__ s_t, int vc, float scale) {
    const int r = blockIdx.x;
    float *ls = ls_chunk + (size_t)r * vc;
    const float *lt = lt_chunk + (size_t)r * vc;
    if (!counted[r]) {
        for (int j = threadIdx.x; j < vc; j += blockDim.x) ls[j] = 0.f;
        return;
    }
    const float shift_s = m_s[r] + logf(s_s[r]), shift_t = m_t[r] + logf(s_t[r]);
    for (int j = threadIdx.x; j < vc; j += blockDim.x)
        ls[j] = scale * (expf(ls[j] - shift_s) - expf(lt[j] - shift_t));
}
RKU_EXPORT(kl_stats_f32)
RKU_EXPORT(kl_grad_f32)

// The LoRA recovery's optimiser (METHODS.md §10), elementwise over n f32 values.
//   adamw_f32: one AdamW update in place, in torch.optim.AdamW's order and
//     exactly the CPU's operations (src/backend/cpu/optim.rs), each rounded
//     to f32 on its own (the _rn intrinsics keep nvcc from fusing them into
//     FMAs, so the GPU gives the CPU's bits):
//       g ← grad_scale·g;  p ← p·decay;  m ← m + (1 − β1)·(g − m);
//       v ← v·β2 + ((1 − β2)·g)·g;  p ← p − step_size·(m / (√v / bc2_sqrt + ε)),
//     every scalar formed on the host in f64 and rounded to f32, as PyTorch
//     forms them (`AdamwStep::scalars`): decay = 1 − lr·wd, 1 − β1, 1 − β2,
//     step_size = lr/(1 − β1^t), bc2_sqrt = √(1 − β2^t).
//   sum_squares_f32: part[b] = Σ x_i² (f64) over the i block b visits of a
//     grid-stride walk; the host sums part (the gradient norm of the clipping).
// Launch: 1-D grid-stride, block 256 (sum_squares: at most 1024 blocks, one
// f64 block_sum each). Bytes: adamw 7·n·4 (reads p, g, m, v; writes p, m, v),
// sum_squares n·4. For 40 M LoRA parameters: adamw 1.1 GB → floor 1.1 ms on an
// RTX 4090 (1008 GB/s), 0.33 ms on an H100 (3.35 TB/s); sum_squares 160 MB →
// 0.16 / 0.05 ms.
#include "common.cuh"

extern "C" __global__ void adamw_f32(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ m,
                                     float *__restrict__ v, long long n, float decay, float one_b1, float beta2,
                                     float one_b2, float eps, float grad_scale, float step_size, float bc2_sqrt) {
    GRID_STRIDE(i, n) {
        const float gi = __fmul_rn(g[i], grad_scale);
        const float pi = __fmul_rn(p[i], decay);
        const float mi = __fadd_rn(m[i], __fmul_rn(one_b1, __fsub_rn(gi, m[i])));
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_b2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        p[i] = __fsub_rn(pi, __fmul_rn(step_size, __fdiv_rn(mi, denom)));
        m[i] = mi;
        v[i] = vi;
    }
}

extern "C" __global__ void sum_squares_f32(const float *__restrict__ x, double *__restrict__ part, long long n) {
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        const double xi = x[i];
        acc += xi * xi;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}
RKU_EXPORT(adamw_f32)
RKU_EXPORT(sum_squares_f32)

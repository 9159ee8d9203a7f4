// Compaction, the gather that removes FFN channels (METHODS.md §7):
//   rows: dst[i, :] = src[idx[i], :]   src [m, d] (gate_proj, up_proj), dst [k, d]
//   cols: dst[r, j] = src[r, idx[j]]   src [d, m] (down_proj),          dst [d, k]
// idx: [k] u32 kept channels (the export passes them ascending). Pure data
// movement, so kernels are named by word width, not dtype: bf16 and f16
// move as u16 words, f32 as u32 words (and any other matrix whose rows are
// whole 16- or 32-bit words, such as the ggml blocks' byte rows), bit for bit.
// Launch: rows — grid (k), block 256 striding over d; cols — 1-D grid-stride
// over d·k outputs (consecutive threads write consecutive j).
// Bytes: 2·k·d·sizeof(W) (+ idx). Qwen2.5-7B layer at 50 % (k = 9472, bf16):
// 3 matrices × 2 × 9472·3584·2 = 407 MB → floor 0.40 ms on an RTX 4090
// (1008 GB/s), 0.12 ms on an H100 (3.35 TB/s).
#include "common.cuh"

template <class W>
__device__ __forceinline__ void compact_rows(const W *__restrict__ src, const unsigned *__restrict__ idx,
                                             W *__restrict__ dst, int d) {
    const W *s = src + (size_t)idx[blockIdx.x] * d;
    W *o = dst + (size_t)blockIdx.x * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = s[j];
}

template <class W>
__device__ __forceinline__ void compact_cols(const W *__restrict__ src, const unsigned *__restrict__ idx,
                                             W *__restrict__ dst, int rows, int m, int k) {
    GRID_STRIDE(i, (long long)rows * k) {
        long long r = i / k, j = i % k;
        dst[i] = src[r * m + idx[j]];
    }
}

#define COMPACT(dt, W)                                                                           \
    extern "C" __global__ void compact_rows_##dt(const W *src, const unsigned *idx, W *dst, int d) { \
        compact_rows(src, idx, dst, d);                                                          \
    }                                                                                            \
    extern "C" __global__ void compact_cols_##dt(const W *src, const unsigned *idx, W *dst,        \
                                                 int rows, int m, int k) {                       \
        compact_cols(src, idx, dst, rows, m, k);                                                 \
    }

// The refit's gather (METHODS.md §9), widening to f64 for its normal
// equations: dst[r, j] = src[r, idx[j]] for j < k, and with ones, dst[r, k] = 1
// (the bias column). src [rows, m] f32 (h), dst [rows, k + ones] f64.
// Launch: 1-D grid-stride over the rows·(k + ones) outputs.
extern "C" __global__ void compact_cols_f32_to_f64(const float *__restrict__ src, const unsigned *__restrict__ idx,
                                                   double *__restrict__ dst, int rows, int m, int k, int ones) {
    const int w = k + ones;
    GRID_STRIDE(i, (long long)rows * w) {
        long long r = i / w, j = i % w;
        dst[i] = j < k ? (double)src[r * m + idx[j]] : 1.0;
    }
}

COMPACT(u16, uint16_t)
COMPACT(u32, uint32_t)
RKU_EXPORT(compact_rows_u16)
RKU_EXPORT(compact_cols_u16)
RKU_EXPORT(compact_rows_u32)
RKU_EXPORT(compact_cols_u32)
RKU_EXPORT(compact_cols_f32_to_f64)

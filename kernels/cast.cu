// Dtype conversion, elementwise over n values: cast_<from>_to_<to>; and the
// refit's widening difference diff_f32_to_f64.
// f32 → bf16/f16 rounds to nearest even (NaN stays NaN); bf16/f16 → f32 is exact.
// Launch: 1-D grid-stride, block 256.
// Bytes: n·(sizeof(from) + sizeof(to)). A 3584×18944 weight bf16 → f32:
// 407 MB → floor 0.40 ms on an RTX 4090 (1008 GB/s), 0.12 ms on an H100 (3.35 TB/s).
#include "common.cuh"

template <class S, class D>
__device__ __forceinline__ void cast(const S *__restrict__ src, D *__restrict__ dst, long long n) {
    GRID_STRIDE(i, n) dst[i] = from_f32<D>(to_f32(src[i]));
}

extern "C" __global__ void cast_bf16_to_f32(const bf16 *src, float *dst, long long n) { cast(src, dst, n); }
extern "C" __global__ void cast_f32_to_bf16(const float *src, bf16 *dst, long long n) { cast(src, dst, n); }
extern "C" __global__ void cast_f16_to_f32(const f16 *src, float *dst, long long n) { cast(src, dst, n); }
extern "C" __global__ void cast_f32_to_f16(const float *src, f16 *dst, long long n) { cast(src, dst, n); }
// The refit's target (METHODS.md §9), widened: dst = (double)a − (double)b
// with sub, dst = (double)a without (b is then not read).
extern "C" __global__ void diff_f32_to_f64(const float *__restrict__ a, const float *__restrict__ b,
                                           double *__restrict__ dst, long long n, int sub) {
    GRID_STRIDE(i, n) dst[i] = sub ? (double)a[i] - (double)b[i] : (double)a[i];
}
RKU_EXPORT(cast_bf16_to_f32)
RKU_EXPORT(cast_f32_to_bf16)
RKU_EXPORT(cast_f16_to_f32)
RKU_EXPORT(cast_f32_to_f16)
RKU_EXPORT(diff_f32_to_f64)

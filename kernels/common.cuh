// Shared by every kernel, in both builds: the bf16/f16 storage types with
// their f32 conversions (round-to-nearest-even, bit-identical between the
// host and nvcc builds), and warp/block reductions.
#pragma once

#ifdef RKU_EMU
#include "compat.cuh"

struct bf16 {
    uint16_t bits;
};
struct f16 {
    uint16_t bits;
};

__device__ __forceinline__ float to_f32(bf16 v) {
    uint32_t u = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fff};  // NaN, as __float2bfloat16
    return bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
__device__ __forceinline__ float to_f32(f16 v) {
    uint32_t sign = uint32_t(v.bits & 0x8000u) << 16, e = (v.bits >> 10) & 0x1fu, m = v.bits & 0x3ffu;
    if (e == 0) {
        float f = ldexpf(float(m), -24);  // zero or subnormal, exact
        return sign ? -f : f;
    }
    uint32_t u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
__device__ __forceinline__ f16 f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return f16{uint16_t(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};
    if (x >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds to ±inf
    if (x < 0x38800000u) {                                         // half subnormal or zero
        if (x < 0x33000000u) return f16{uint16_t(sign)};
        uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) ++h;
        return f16{uint16_t(sign | h)};
    }
    uint32_t h = (x - 0x38000000u) >> 13, rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return f16{uint16_t(sign | h)};
}

#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ bf16 f32_to_bf16(float f) { return __float2bfloat16_rn(f); }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }
__device__ __forceinline__ f16 f32_to_f16(float f) { return __float2half_rn(f); }

#define RKU_EXPORT(kernel)
#define RKU_DYN_SHARED(T, name)                                    \
    extern __shared__ __align__(16) unsigned char rku_dyn_smem[]; \
    T *name = reinterpret_cast<T *>(rku_dyn_smem)
#endif

// Full unrolling of a constant-trip loop (register arrays stay in registers);
// the host build has no use for it.
#ifdef RKU_EMU
#define RKU_UNROLL
#else
#define RKU_UNROLL _Pragma("unroll")
#endif

// Loads and stores through f32, whatever the storage type.
__device__ __forceinline__ float to_f32(float v) { return v; }
template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float v) { return f32_to_bf16(v); }
template <>
__device__ __forceinline__ f16 from_f32<f16>(float v) { return f32_to_f16(v); }

constexpr unsigned kFullMask = 0xffffffffu;

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32, at most 1024); every
// thread must call it and every thread gets the total.
template <class T>
__device__ __forceinline__ T block_sum(T v) {
    __shared__ T scratch[32];
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : T(0);
    return warp_sum(v);
}

// Max over a 1-D block, same contract as block_sum.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float scratch_max[32];
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch_max[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch_max[lane] : -INFINITY;
    return warp_max(v);
}

// Grid-stride loop over [0, n).
#define GRID_STRIDE(i, n)                                                              \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

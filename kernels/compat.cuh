// CUDA-on-CPU layer: lets the kernels in kernels/*.cu compile as C++20 for the
// host (`-x c++ -std=c++20 -pthread`, RKU_EMU defined by build.rs) so the
// emulated device runs exactly the code the GPU runs.
//
// Execution model of one launch (rku_emu::run_grid, kernels/compat.cpp):
// - the CUDA threads of a block are fibers on the launching OS thread (a
//   256 KiB stack each with a guard page below it, kept across launches); a
//   fiber runs until it reaches __syncthreads, __syncwarp or a shuffle's
//   exchange, then hands control back to the scheduler;
// - the scheduler resumes every ready fiber once per pass, then releases a
//   warp whose live lanes all wait at __syncwarp, or else the block when all
//   its live threads wait at __syncthreads; a thread that returns from the
//   kernel early drops out of both (as exited threads do on sm_70+); threads
//   waiting where no barrier can ever release them abort the process (a
//   divergent barrier, which would hang on a GPU);
// - the grid's blocks run one at a time, in order;
// - warp w is threads [32w, 32w+32) in linear thread order; shuffles go
//   through a per-warp exchange buffer between two __syncwarp;
// - static `__shared__` is a function-local `static`: correct because blocks
//   run one at a time and launches are serialised by a process-wide mutex;
//   dynamic shared memory (RKU_DYN_SHARED) is a launch-wide buffer, filled
//   with 0xFF bytes (NaN) before every block so a read-before-write shows;
// - atomics are std::atomic_ref.
// What a missing barrier does here: with one OS thread per CUDA thread (the
// model before this one) it was a race that showed now and then; with fibers
// it is deterministic. Between two barriers each thread runs alone up to the
// next one, so it sees exactly what the threads run before it in that pass
// wrote. The passes alternate direction (reverse linear order when
// block + pass is even, forward when odd), so a stretch of code between two
// barriers runs in reverse in one block and forward in the next: a thread
// reading, without a barrier in between, what a lower thread writes (thread
// 0's broadcast, lane 0's partial sum) or what a higher one writes reads the
// 0xFF poison or a stale value in one of any two consecutive blocks, every
// run. What no order shows: a race between two writes to one place (the last
// one wins, as it might on a GPU), and a missing barrier in a single-block
// launch whose one direction hides it (block 0 starts in reverse, the order
// that shows the common case of a value broadcast from thread or lane 0).
// Under nvcc this header is not included (see common.cuh).
#pragma once
#ifndef RKU_EMU
#error "compat.cuh is for host builds only"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
// `RKU_DYN_SHARED(T, name)` declares the dynamic shared memory of a kernel.
#define RKU_DYN_SHARED(T, name) T *name = reinterpret_cast<T *>(rku_emu::dyn_shared)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
using uint3 = dim3;

namespace rku_emu {

constexpr unsigned kWarp = 32;

// The thread being run and its launch, set by the scheduler before it
// resumes a fiber. Plain globals: one launch runs at a time, on one OS thread.
inline unsigned linear_tid = 0;
inline unsigned char *dyn_shared = nullptr;
inline uint64_t *exchange_slots = nullptr;  // one 8-byte slot per thread of the block

// Defined in compat.cpp (out of line, so the compiler reloads every global
// and `__shared__` static after a barrier): the calling fiber waits at the
// block's or its warp's barrier.
void sync_block();
void sync_warp();

// Runs body(ctx) as every thread of every block of the grid (see the top of
// this file), holding the process-wide launch mutex.
void run_grid(dim3 grid, dim3 blk, size_t shmem, void (*body)(void *), void *ctx);

}  // namespace rku_emu

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline void __syncthreads() { rku_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { rku_emu::sync_warp(); }

namespace rku_emu {
// Every lane publishes `v`, then reads the value of lane `src(lane)`.
template <class T, class F>
inline T exchange(T v, F src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    unsigned lane = linear_tid % kWarp, base = linear_tid - lane;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    exchange_slots[linear_tid] = bits;
    __syncwarp();
    unsigned from = src(lane);
    T out = v;
    if (from < kWarp) std::memcpy(&out, &exchange_slots[base + from], sizeof(T));
    __syncwarp();
    return out;
}
}  // namespace rku_emu

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
    return rku_emu::exchange(v, [&](unsigned l) { return l ^ unsigned(mask); });
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    return rku_emu::exchange(v, [&](unsigned l) { return l + delta < 32 ? l + delta : l; });
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
    return rku_emu::exchange(v, [&](unsigned) { return unsigned(src) % 32; });
}

template <class T>
inline T atomicAdd(T *p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v);
}

using std::max;
using std::min;

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
// IEEE round-to-nearest f32 operations, never fused (they are what nvcc must
// not contract into FMAs): on the host each operator already rounds alone.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }

namespace rku_emu {

// Runs `kernel(args...)` over the grid; `params` is cuLaunchKernel's kernelParams.
template <class... A, size_t... I>
void launch_impl(void (*kernel)(A...), dim3 grid, dim3 blk, size_t shmem, void **params,
                 std::index_sequence<I...>) {
    struct Call {
        void (*kernel)(A...);
        void **params;
    } call{kernel, params};
    run_grid(grid, blk, shmem, [](void *p) {
        const Call &c = *static_cast<const Call *>(p);
        c.kernel(*static_cast<std::remove_reference_t<A> *>(c.params[I])...);
    }, &call);
}

template <class... A>
void launch(void (*kernel)(A...), dim3 grid, dim3 blk, size_t shmem, void **params) {
    launch_impl(kernel, grid, blk, shmem, params, std::index_sequence_for<A...>{});
}

}  // namespace rku_emu

// Exports `emu_<kernel>(gx, gy, gz, bx, by, bz, shmem, params)` for the Rust
// emulated device; `params` is cuLaunchKernel's kernelParams array.
#define RKU_EXPORT(kernel)                                                                     \
    extern "C" void emu_##kernel(unsigned gx, unsigned gy, unsigned gz, unsigned bx,           \
                                 unsigned by, unsigned bz, size_t shmem, void **params) {      \
        rku_emu::launch(kernel, dim3{gx, gy, gz}, dim3{bx, by, bz}, shmem, params);            \
    }

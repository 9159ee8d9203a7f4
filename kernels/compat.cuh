// CUDA-on-CPU layer: lets the kernels in kernels/*.cu compile as C++20 for the
// host (`-x c++ -std=c++20 -pthread`, RKU_EMU defined by build.rs) so the
// emulated device runs exactly the code the GPU runs.
//
// Execution model of one launch (rku_emu::launch):
// - one std::thread per CUDA thread of a block (blockDim.x·y·z threads);
// - the grid's blocks run one at a time, in order; the same threads walk
//   from block to block, separated by a launch-wide barrier;
// - __syncthreads is a std::barrier per block; a thread that returns from the
//   kernel early drops out of it (as exited threads do on sm_70+);
// - warp w is threads [32w, 32w+32) in linear thread order; shuffles go
//   through a per-warp exchange buffer and a per-warp barrier;
// - static `__shared__` is a function-local `static`: correct because blocks
//   run one at a time and launches are serialised by a process-wide mutex;
//   dynamic shared memory (RKU_DYN_SHARED) is a launch-wide buffer, filled
//   with 0xFF bytes (NaN) before every block so a read-before-write shows;
// - atomics are std::atomic_ref.
// Under nvcc this header is not included (see common.cuh).
#pragma once
#ifndef RKU_EMU
#error "compat.cuh is for host builds only"
#endif

#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

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

// Synchronisation objects of the block being run.
struct Block {
    explicit Block(unsigned n) : sync(n) {
        for (unsigned w = 0; w * kWarp < n; ++w) {
            unsigned lanes = n - w * kWarp < kWarp ? n - w * kWarp : kWarp;
            warps.push_back(std::make_unique<std::barrier<>>(lanes));
        }
        exchange.resize(warps.size() * kWarp);
    }
    std::barrier<> sync;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> exchange;  // one 8-byte slot per thread
};

inline thread_local Block *block = nullptr;
inline thread_local unsigned linear_tid = 0;
inline thread_local unsigned char *dyn_shared = nullptr;

}  // namespace rku_emu

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { rku_emu::block->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    rku_emu::block->warps[rku_emu::linear_tid / rku_emu::kWarp]->arrive_and_wait();
}

namespace rku_emu {
// Every lane publishes `v`, then reads the value of lane `src(lane)`.
template <class T, class F>
inline T exchange(T v, F src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    unsigned lane = linear_tid % kWarp, base = linear_tid - lane;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    block->exchange[linear_tid] = bits;
    __syncwarp();
    unsigned from = src(lane);
    T out = v;
    if (from < kWarp && base + from < block->exchange.size()) {
        std::memcpy(&out, &block->exchange[base + from], sizeof(T));
    }
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

// One for the whole process (an inline variable: one instance across every
// translation unit and every kernel signature), so that two host threads
// launching different kernels never share a static `__shared__` at once.
inline std::mutex one_launch_at_a_time;

// Runs `kernel(args...)` over the grid as described at the top of this file.
template <class... A, size_t... I>
void launch_impl(void (*kernel)(A...), dim3 grid, dim3 blk, size_t shmem, void **params,
                 std::index_sequence<I...>) {
    std::lock_guard<std::mutex> guard(one_launch_at_a_time);
    const unsigned n = blk.x * blk.y * blk.z;
    const size_t blocks = size_t(grid.x) * grid.y * grid.z;
    std::vector<unsigned char> shared(shmem + 16);
    std::unique_ptr<Block> current;
    std::barrier<> step(n);
    auto body = [&](unsigned tid) {
        blockDim = blk;
        gridDim = grid;
        linear_tid = tid;
        threadIdx = {tid % blk.x, (tid / blk.x) % blk.y, tid / (blk.x * blk.y)};
        dyn_shared = shared.data();
        for (size_t b = 0; b < blocks; ++b) {
            if (tid == 0) {
                current = std::make_unique<Block>(n);
                // Shared memory starts undefined on a GPU: poison it (NaN bytes).
                std::memset(shared.data(), 0xFF, shared.size());
            }
            step.arrive_and_wait();
            block = current.get();
            blockIdx = {unsigned(b % grid.x), unsigned((b / grid.x) % grid.y),
                        unsigned(b / (size_t(grid.x) * grid.y))};
            kernel(*static_cast<std::remove_reference_t<A> *>(params[I])...);
            // Leave the block's barriers so threads still inside do not wait for us.
            block->warps[tid / kWarp]->arrive_and_drop();
            block->sync.arrive_and_drop();
            step.arrive_and_wait();
        }
    };
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned t = 1; t < n; ++t) threads.emplace_back(body, t);
    body(0);
    for (auto &t : threads) t.join();
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

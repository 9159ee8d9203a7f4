// Causal grouped-query attention, f32, tiled (flash-attention style: no T×T
// score matrix is ever stored, for any head).
//   q, out: [rows, H·hd]; k, v: [rows, KV·hd]; rows = seqs·t; query head h
//   reads kv head h / (H/KV); lse, delta: [seqs, H, t].
//   Sliding window W (the last int of every kernel; the host passes
//   min(W, t), and t for plain causal attention): query i attends to keys
//   i − W < j ≤ i, itself and the W − 1 before it (Mistral, transformers'
//   sliding_window_causal_mask_function). With W = t every extra condition
//   below is always true, so the results are those of the causal kernels.
//   fwd: s_ij = scale·q_i·k_j (i−W < j ≤ i, scale = 1/sqrt(hd)); p_ij = softmax_j(s_ij);
//        out_i = Σ_j p_ij v_j; lse_i = log Σ_j exp(s_ij) (kept for the backward).
//   bwd: p_ij = exp(s_ij − lse_i); D_i = dout_i·out_i; dp_ij = dout_i·v_j;
//        ds_ij = p_ij (dp_ij − D_i);
//        dq_i = scale Σ_j ds_ij k_j        (attention_bwd_dq_f32, also writes D)
//        dk_j = scale Σ_{h in group} Σ_i ds_ij q_i,  dv_j = Σ_{h in group} Σ_i p_ij dout_i
//                                          (attention_bwd_dkv_f32: no atomics)
// Launch (all three): block (32, 4) = 4 warps, one query (fwd, dq) or one key
// (dkv) per warp; grid (ceil(t/4), H or KV, seqs). Tiles of 32 keys (queries)
// go through shared memory with rows padded to hd+1 floats (no bank
// conflicts: hd is even, so the stride hd+1 is odd); in a tile lane j owns key
// (query) j for the dot products, and lane d owns output dims d, d+32, d+64,
// d+96 for the accumulation, with p broadcast by __shfl_sync. Any even
// hd ≤ 128 runs: the accumulators are a fixed kMaxDims = 4 registers per
// lane (fully unrolled), and slot dd of lane d is masked off when
// d + 32·dd ≥ hd (hd = 8: lanes 0..7 hold one live slot each).
// Online softmax: running max and sum per warp. Under a window, a block's
// key tiles start at the one holding key i_first − W + 1 (its first row's
// first key; the dkv pass's query tiles end at its last key + W), and a warp
// skips, warp-uniformly, a tile wholly before its own row's window, so the
// first tile it uses holds a key of its window and the running max is finite.
// Work and reads are O(t·W) per head instead of O(t²).
// Bytes (fwd): each block reads its keys/values once per 4 queries, so the
// floor is compute, not memory: 4·T²·hd·H/2 FLOP. Qwen2.5-7B layer at T=2048
// (H=28, hd=128): 30 GFLOP → 0.37 ms at the RTX 4090's 82.6 TFLOP/s f32,
// 0.45 ms at the H100's 67 TFLOP/s f32 (CUDA cores); minimum traffic
// (q, k, v, out once) 2·2048·(28+4)·128·4 = 67 MB → 66 µs / 20 µs.
#include "common.cuh"

constexpr int kAttnWarps = 4;  // blockDim.y
constexpr int kTile = 32;
constexpr int kMaxDims = 4;  // ceil(hd / 32) at most (hd ≤ 128)

struct AttnDims {
    int t, heads, kv_heads, hd;
    __device__ __forceinline__ int group() const { return heads / kv_heads; }
    __device__ __forceinline__ size_t q_off(int seq, int i, int h) const {
        return ((size_t)(seq * t + i) * heads + h) * hd;
    }
    __device__ __forceinline__ size_t kv_off(int seq, int j, int kvh) const {
        return ((size_t)(seq * t + j) * kv_heads + kvh) * hd;
    }
    __device__ __forceinline__ size_t row_off(int seq, int h, int i) const {
        return ((size_t)seq * heads + h) * t + i;
    }
};

// Copies rows [j0, j0+32) (clipped to t) of a [rows, nh·hd] tensor, head hh,
// into a padded [32][hd+1] shared tile, using the whole block: warp w copies
// rows w, w+4, …, lane d its elements d, d+32, … (coalesced, and no index
// division: with one flat index e the e / hd and e % hd by a runtime hd cost
// more instructions than the tile's dot products; an H200 profile had this
// kernel at 85% of a forward pass).
__device__ __forceinline__ void load_tile(float *tile, const float *src, const AttnDims &a, int seq,
                                          int j0, int nh, int hh) {
    const int stride = a.hd + 1;
    for (int jj = threadIdx.y; jj < kTile; jj += kAttnWarps) {
        const int j = j0 + jj;
        float *dst = tile + jj * stride;
        if (j < a.t) {
            const float *row = src + ((size_t)(seq * a.t + j) * nh + hh) * a.hd;
            for (int dd = threadIdx.x; dd < a.hd; dd += 32) dst[dd] = row[dd];
        } else {
            for (int dd = threadIdx.x; dd < a.hd; dd += 32) dst[dd] = 0.f;
        }
    }
}

__device__ __forceinline__ float dot_shared(const float *x, const float *y, int hd) {
    float s = 0.f;
    for (int d = 0; d < hd; ++d) s += x[d] * y[d];
    return s;
}

extern "C" __global__ void attention_fwd_f32(const float *__restrict__ q, const float *__restrict__ k,
                                             const float *__restrict__ v, float *__restrict__ out,
                                             float *__restrict__ lse, int t, int heads, int kv_heads,
                                             int hd, int window) {
    const AttnDims a{t, heads, kv_heads, hd};
    RKU_DYN_SHARED(float, smem);
    float *ks = smem, *vs = ks + kTile * (hd + 1), *qs = vs + kTile * (hd + 1);
    const int lane = threadIdx.x, w = threadIdx.y, h = blockIdx.y, seq = blockIdx.z;
    const int kvh = h / a.group(), i_first = blockIdx.x * kAttnWarps;
    const int i = min(i_first + w, t - 1);  // warps past the end compute row t−1 and write nothing
    const bool writes = i_first + w < t;
    const float scale = rsqrtf((float)hd);
    float *qw = qs + w * hd;
    for (int d = lane; d < hd; d += 32) qw[d] = q[a.q_off(seq, i, h) + d];
    float acc[kMaxDims] = {0.f, 0.f, 0.f, 0.f};
    float m_run = -INFINITY, l_run = 0.f;
    const int i_last = min(i_first + kAttnWarps, t) - 1;
    const int j_begin = max(0, i_first - window + 1) / kTile * kTile;
    for (int j0 = j_begin; j0 <= i_last; j0 += kTile) {
        __syncthreads();  // previous tile fully used
        load_tile(ks, k, a, seq, j0, kv_heads, kvh);
        load_tile(vs, v, a, seq, j0, kv_heads, kvh);
        __syncthreads();
        if (j0 + kTile <= i - window + 1) continue;  // warp-uniform: before this row's window
        const int j = j0 + lane;
        const bool live = j <= i && j > i - window;
        const float s = live ? scale * dot_shared(qw, ks + lane * (hd + 1), hd) : -INFINITY;
        // finite: the first tile used holds the row's first key
        const float m_new = fmaxf(m_run, warp_max(s));
        const float p = live ? expf(s - m_new) : 0.f, corr = expf(m_run - m_new);
        l_run = l_run * corr + warp_sum(p);
        RKU_UNROLL
        for (int dd = 0; dd < kMaxDims; ++dd) acc[dd] *= corr;
        for (int jj = 0; jj < kTile; ++jj) {
            const float pj = __shfl_sync(kFullMask, p, jj);
            RKU_UNROLL
            for (int dd = 0; dd < kMaxDims; ++dd)
                if (lane + 32 * dd < hd)
                    acc[dd] += pj * vs[jj * (hd + 1) + lane + 32 * dd];
        }
        m_run = m_new;
    }
    if (writes) {
        RKU_UNROLL
        for (int dd = 0; dd < kMaxDims; ++dd)
            if (lane + 32 * dd < hd)
                out[a.q_off(seq, i, h) + lane + 32 * dd] = acc[dd] / l_run;
        if (lane == 0) lse[a.row_off(seq, h, i)] = m_run + logf(l_run);
    }
}

extern "C" __global__ void attention_bwd_dq_f32(const float *__restrict__ dout, const float *__restrict__ q,
                                                const float *__restrict__ k, const float *__restrict__ v,
                                                const float *__restrict__ out, const float *__restrict__ lse,
                                                float *__restrict__ delta, float *__restrict__ dq, int t,
                                                int heads, int kv_heads, int hd, int window) {
    const AttnDims a{t, heads, kv_heads, hd};
    RKU_DYN_SHARED(float, smem);
    float *ks = smem, *vs = ks + kTile * (hd + 1), *qs = vs + kTile * (hd + 1), *dos = qs + kAttnWarps * hd;
    const int lane = threadIdx.x, w = threadIdx.y, h = blockIdx.y, seq = blockIdx.z;
    const int kvh = h / a.group(), i_first = blockIdx.x * kAttnWarps;
    const int i = min(i_first + w, t - 1);
    const bool writes = i_first + w < t;
    const float scale = rsqrtf((float)hd);
    float *qw = qs + w * hd, *dow = dos + w * hd;
    float di = 0.f;
    for (int d = lane; d < hd; d += 32) {
        qw[d] = q[a.q_off(seq, i, h) + d];
        dow[d] = dout[a.q_off(seq, i, h) + d];
        di += dow[d] * out[a.q_off(seq, i, h) + d];
    }
    di = warp_sum(di);
    const float lse_i = lse[a.row_off(seq, h, i)];
    float acc[kMaxDims] = {0.f, 0.f, 0.f, 0.f};
    const int i_last = min(i_first + kAttnWarps, t) - 1;
    const int j_begin = max(0, i_first - window + 1) / kTile * kTile;
    for (int j0 = j_begin; j0 <= i_last; j0 += kTile) {
        __syncthreads();
        load_tile(ks, k, a, seq, j0, kv_heads, kvh);
        load_tile(vs, v, a, seq, j0, kv_heads, kvh);
        __syncthreads();
        if (j0 + kTile <= i - window + 1) continue;  // warp-uniform: before this row's window
        const int j = j0 + lane;
        float ds = 0.f;
        if (j <= i && j > i - window) {
            const float p = expf(scale * dot_shared(qw, ks + lane * (hd + 1), hd) - lse_i);
            ds = p * (dot_shared(dow, vs + lane * (hd + 1), hd) - di);
        }
        for (int jj = 0; jj < kTile; ++jj) {
            const float dsj = __shfl_sync(kFullMask, ds, jj);
            RKU_UNROLL
            for (int dd = 0; dd < kMaxDims; ++dd)
                if (lane + 32 * dd < hd)
                    acc[dd] += dsj * ks[jj * (hd + 1) + lane + 32 * dd];
        }
    }
    if (writes) {
        RKU_UNROLL
        for (int dd = 0; dd < kMaxDims; ++dd)
            if (lane + 32 * dd < hd)
                dq[a.q_off(seq, i, h) + lane + 32 * dd] = scale * acc[dd];
        if (lane == 0) delta[a.row_off(seq, h, i)] = di;
    }
}

extern "C" __global__ void attention_bwd_dkv_f32(const float *__restrict__ dout, const float *__restrict__ q,
                                                 const float *__restrict__ k, const float *__restrict__ v,
                                                 const float *__restrict__ lse, const float *__restrict__ delta,
                                                 float *__restrict__ dk, float *__restrict__ dv, int t,
                                                 int heads, int kv_heads, int hd, int window) {
    const AttnDims a{t, heads, kv_heads, hd};
    RKU_DYN_SHARED(float, smem);
    float *qs = smem, *dos = qs + kTile * (hd + 1), *kw_all = dos + kTile * (hd + 1);
    float *vw_all = kw_all + kAttnWarps * hd, *lse_s = vw_all + kAttnWarps * hd, *del_s = lse_s + kTile;
    const int lane = threadIdx.x, w = threadIdx.y, kvh = blockIdx.y, seq = blockIdx.z;
    const int j_first = blockIdx.x * kAttnWarps;
    const int j = min(j_first + w, t - 1);
    const bool writes = j_first + w < t;
    const float scale = rsqrtf((float)hd);
    float *kw = kw_all + w * hd, *vw = vw_all + w * hd;
    for (int d = lane; d < hd; d += 32) {
        kw[d] = k[a.kv_off(seq, j, kvh) + d];
        vw[d] = v[a.kv_off(seq, j, kvh) + d];
    }
    float dk_acc[kMaxDims] = {0.f, 0.f, 0.f, 0.f}, dv_acc[kMaxDims] = {0.f, 0.f, 0.f, 0.f};
    const int tid = threadIdx.y * 32 + threadIdx.x;
    // Queries reaching this block's keys: j_first ≤ i < j_last + W.
    const int i_end = min(t, min(j_first + kAttnWarps, t) - 1 + window);
    for (int h = kvh * a.group(); h < (kvh + 1) * a.group(); ++h) {
        for (int i0 = j_first / kTile * kTile; i0 < i_end; i0 += kTile) {
            __syncthreads();
            load_tile(qs, q, a, seq, i0, heads, h);
            load_tile(dos, dout, a, seq, i0, heads, h);
            if (tid < kTile) {
                const int ii = min(i0 + tid, t - 1);
                lse_s[tid] = lse[a.row_off(seq, h, ii)];
                del_s[tid] = delta[a.row_off(seq, h, ii)];
            }
            __syncthreads();
            const int i = i0 + lane;
            float p = 0.f, ds = 0.f;
            if (i >= j && i < t && i - j < window) {
                p = expf(scale * dot_shared(qs + lane * (hd + 1), kw, hd) - lse_s[lane]);
                ds = p * (dot_shared(dos + lane * (hd + 1), vw, hd) - del_s[lane]);
            }
            for (int ii = 0; ii < kTile; ++ii) {
                const float pi = __shfl_sync(kFullMask, p, ii), dsi = __shfl_sync(kFullMask, ds, ii);
                RKU_UNROLL
                for (int dd = 0; dd < kMaxDims; ++dd)
                    if (lane + 32 * dd < hd) {
                        dv_acc[dd] += pi * dos[ii * (hd + 1) + lane + 32 * dd];
                        dk_acc[dd] += dsi * qs[ii * (hd + 1) + lane + 32 * dd];
                    }
            }
        }
    }
    if (writes) {
        RKU_UNROLL
        for (int dd = 0; dd < kMaxDims; ++dd)
            if (lane + 32 * dd < hd) {
                dk[a.kv_off(seq, j, kvh) + lane + 32 * dd] = scale * dk_acc[dd];
                dv[a.kv_off(seq, j, kvh) + lane + 32 * dd] = dv_acc[dd];
            }
    }
}
RKU_EXPORT(attention_fwd_f32)
RKU_EXPORT(attention_bwd_dq_f32)
RKU_EXPORT(attention_bwd_dkv_f32)

// KV-cache decoding: new queries against cached keys and values, f32, with
// the keys split across blocks and the splits merged afterwards
// (flash-decoding). The contract is Backend::attention_cached's.
//   k_cache, v_cache: [seqs, cap, KV·hd]; q, out: [seqs·n, H·hd];
//   k, v: [seqs·n, KV·hd]; pos: [seqs] int, the positions sequence s has cached.
//   The caches are rings: position p lives in row p mod cap (the same row
//   while p < cap, which is all there is without a window).
//   window: Mistral's sliding window W, 0 for none: query i of sequence s
//   attends to positions lo = max(0, pos[s]+i+1−W) ..= pos[s]+i (all from 0
//   without one); the host guarantees cap ≥ n + W − 1 when a ring wraps, so
//   the appended rows overwrite no key a new query reads.
//   kv_append_f32: cache[s, (pos[s]+i) mod cap, :] = k[s·n+i, :] (and v), i < n.
//   attention_decode_f32: new query i of sequence s, head h, kv head
//     g = h / (H/KV), attends to keys j ≤ lim = pos[s]+i:
//       s_j = q·K_j / sqrt(hd),  out = Σ_j softmax_j(s_j) V_j.
//     The keys from base = max(0, pos[s]+1−W) (the first key of row 0; 0
//     without a window) are cut into splits of `split` keys (a multiple of
//     32): split c holds positions base + c·split .. + split. Split c
//     meeting [lo, lim] gives, by an online softmax over tiles of 32 keys
//     (running max m and sum l: nothing of size cap is ever held),
//       o_c = Σ_{j∈c} e^{s_j−m_c} V_j / l_c,  lse_c = m_c + log l_c,
//     with m_c = max_{j∈c} s_j, l_c = Σ_{j∈c} e^{s_j−m_c}. A split past lim is
//     neither computed nor written.
//     o_part: [seqs·n, H, splits, hd], lse_part: [seqs·n, H, splits]; with one
//     split o_part has out's layout and is the answer.
//   attention_decode_combine_f32 (splits > 1), over the splits a query
//     reaches, (lo−base)/split ..= (lim−base)/split:
//       out = Σ_c e^{lse_c−M} o_c / Σ_c e^{lse_c−M},  M = max_c lse_c,
//     which is the softmax over all its keys (e^{lse_c} o_c = e^{m_c}·Σ_{j∈c}
//     e^{s_j−m_c} V_j). M is finite: every split combined holds a key of [lo, lim].
// Launch.
//   append: grid (seqs·n), block 128 striding over KV·hd.
//   decode: grid (tiles·splits, KV, seqs), block (32, 4) = 4 warps; block
//     (x, g, s) takes rows 4·(x mod tiles) .. +3 of the group·n query rows of
//     kv head g (row r = i·group + h mod group, so a block holds neighbouring
//     queries) against split x / tiles, one row per warp. As in attention.cu,
//     K/V tiles of 32 keys go through shared memory padded to hd+1 floats,
//     lane j owns key j for the dot products and lane d owns output dims d,
//     d+32, d+64, d+96 (any even hd ≤ 128) for the accumulation.
//     Why a block per (sequence, kv head) group rather than per (query,
//     head): the heads of a GQA group read the same keys, so one tile staged
//     in shared memory serves 4 query rows (group 7 takes two blocks, adjacent
//     in the grid, the second finding the tile in L2), and n > 1 (a prefill
//     chunk into a non-empty cache) is the same kernel with more rows. Why
//     splits: decoding one sequence of Qwen2.5-7B has 4 kv heads, 8 blocks
//     per split; splitting the keys is what lets a single sequence use the
//     whole GPU (the host picks the split: about 512 blocks, 64 keys at least).
//   combine: grid (seqs·n, H), block 32·ceil(hd/32), a thread per output dim.
// Shared memory: (2·32·(hd+1) + 4·hd)·4 bytes, 35 KB at hd = 128, whatever cap.
// Bytes: the live cache rows of each (sequence, kv head) are read once:
// 2·L·KV·hd·4 per sequence (L = pos+n), plus q, out, the appended rows and the
// partials (2·H·splits·hd·4 per query, written then read back, mostly in L2).
// Qwen2.5-7B (H=28, KV=4, hd=128), one sequence, one new token, L = 2048:
// 2·2048·4·128·4 = 8.39 MB per layer → floor 8.3 µs on an RTX 4090
// (1008 GB/s), 2.5 µs on an H100 (3.35 TB/s); 235 MB per token over the 28
// layers → 233 µs / 70 µs. Compute is 4·L·H·hd = 29 MFLOP per layer.
#include "common.cuh"

constexpr int kDecWarps = 4;    // blockDim.y: query rows per block, one per warp
constexpr int kDecTile = 32;    // keys per shared-memory tile, one per lane
constexpr int kDecMaxDims = 4;  // output dims per lane: ceil(hd / 32), hd ≤ 128

extern "C" __global__ void kv_append_f32(const float *__restrict__ k, const float *__restrict__ v,
                                         float *__restrict__ k_cache, float *__restrict__ v_cache,
                                         const int *__restrict__ pos, int n, int cap, int kvd) {
    const int r = blockIdx.x, s = r / n, i = r % n;
    const size_t src = (size_t)r * kvd, dst = ((size_t)s * cap + (pos[s] + i) % cap) * kvd;
    for (int e = threadIdx.x; e < kvd; e += blockDim.x) {
        k_cache[dst + e] = k[src + e];
        v_cache[dst + e] = v[src + e];
    }
}

// Copies cache rows [j0, j0+32) of one (sequence, kv head) into a padded
// [32][hd+1] shared tile with the whole block: warp w takes rows w, w+4, ...,
// lane l dims l, l+32, l+64, l+96 of each (coalesced). Both loops are fully
// unrolled, so a thread's 32 loads are all in flight before its first store.
// Rows from j_stop on are not read (they may be unwritten) and become zeros.
// Position j starts at head + (j mod cap)·kvd.
__device__ __forceinline__ void load_cache_tile(float *tile, const float *head, int j0, int j_stop,
                                                int kvd, int hd, int cap) {
    RKU_UNROLL
    for (int rr = 0; rr < kDecTile / kDecWarps; ++rr) {
        const int jj = threadIdx.y + rr * kDecWarps;
        const bool live = j0 + jj < j_stop;
        const float *src = head + (size_t)((live ? j0 + jj : j0) % cap) * kvd;  // row j0 is live
        RKU_UNROLL
        for (int dd = 0; dd < kDecMaxDims; ++dd) {
            const int d = threadIdx.x + 32 * dd;
            if (d < hd) tile[jj * (hd + 1) + d] = live ? src[d] : 0.f;
        }
    }
}

__device__ __forceinline__ float dot_row(const float *x, const float *y, int hd) {
    float s = 0.f;
    for (int d = 0; d < hd; ++d) s += x[d] * y[d];
    return s;
}

extern "C" __global__ void attention_decode_f32(const float *__restrict__ q,
                                                const float *__restrict__ k_cache,
                                                const float *__restrict__ v_cache,
                                                const int *__restrict__ pos, float *__restrict__ o_part,
                                                float *__restrict__ lse_part, int n, int cap, int heads,
                                                int kv_heads, int hd, int split, int window) {
    RKU_DYN_SHARED(float, smem);
    float *ks = smem, *vs = ks + kDecTile * (hd + 1), *qs = vs + kDecTile * (hd + 1);
    const int lane = threadIdx.x, w = threadIdx.y, g = blockIdx.y, s = blockIdx.z;
    const int group = heads / kv_heads, rows = group * n, kvd = kv_heads * hd;
    const int tiles = (rows + kDecWarps - 1) / kDecWarps, splits = gridDim.x / tiles;
    const int c = blockIdx.x / tiles, r_first = blockIdx.x % tiles * kDecWarps;
    const int r_last = min(r_first + kDecWarps, rows) - 1;
    const int r = min(r_first + w, r_last);  // warps past the last row redo it and write nothing
    const int i = r / group, h = g * group + r % group, lim = pos[s] + i;
    // First keys: of this row, of the block's first row, of the sequence's row 0.
    const int lo = window > 0 ? max(0, lim - window + 1) : 0;
    const int lo_first = window > 0 ? max(0, pos[s] + r_first / group - window + 1) : 0;
    const int base = window > 0 ? max(0, pos[s] - window + 1) : 0;
    // Keys of this split that some row of the block attends to: [j_begin, j_stop).
    const int j_begin = base + c * split, j_stop = min(j_begin + split, pos[s] + r_last / group + 1);
    // the whole block: no row reaches this split
    if (j_begin >= j_stop || j_begin + split <= lo_first) return;
    const float scale = rsqrtf((float)hd);
    const float *kh = k_cache + (size_t)s * cap * kvd + (size_t)g * hd;
    const float *vh = v_cache + (size_t)s * cap * kvd + (size_t)g * hd;
    const size_t q_row = ((size_t)(s * n + i) * heads + h);  // this row's (query, head)
    float *qw = qs + w * hd;
    for (int d = lane; d < hd; d += 32) qw[d] = q[q_row * hd + d];
    float acc[kDecMaxDims] = {0.f, 0.f, 0.f, 0.f};
    float m_run = -INFINITY, l_run = 0.f;
    for (int j0 = j_begin; j0 < j_stop; j0 += kDecTile) {
        __syncthreads();  // previous tile fully used (and q staged, first time)
        load_cache_tile(ks, kh, j0, j_stop, kvd, hd, cap);
        load_cache_tile(vs, vh, j0, j_stop, kvd, hd, cap);
        __syncthreads();
        // warp-uniform: this row's keys ended in an earlier tile or start in a later one
        if (j0 > lim || j0 + kDecTile <= lo) continue;
        const int j = j0 + lane;
        const bool live = j <= lim && j >= lo;
        const float sc = live ? scale * dot_row(qw, ks + lane * (hd + 1), hd) : -INFINITY;
        // finite: the first tile used holds key max(lo, j_begin) ≤ lim
        const float m_new = fmaxf(m_run, warp_max(sc));
        const float p = live ? expf(sc - m_new) : 0.f, corr = expf(m_run - m_new);
        l_run = l_run * corr + warp_sum(p);
        RKU_UNROLL
        for (int dd = 0; dd < kDecMaxDims; ++dd) acc[dd] *= corr;
        for (int jj = 0; jj < kDecTile; ++jj) {
            const float pj = __shfl_sync(kFullMask, p, jj);
            RKU_UNROLL
            for (int dd = 0; dd < kDecMaxDims; ++dd)
                if (lane + 32 * dd < hd)
                    acc[dd] += pj * vs[jj * (hd + 1) + lane + 32 * dd];
        }
        m_run = m_new;
    }
    if (r_first + w <= r_last && j_begin <= lim && lo < j_begin + split) {
        const size_t part = q_row * splits + c;
        const float inv = 1.f / l_run;  // l_run ≥ 1: the max key contributes e^0
        RKU_UNROLL
        for (int dd = 0; dd < kDecMaxDims; ++dd)
            if (lane + 32 * dd < hd)
                o_part[part * hd + lane + 32 * dd] = acc[dd] * inv;
        if (lane == 0) lse_part[part] = m_run + logf(l_run);
    }
}

extern "C" __global__ void attention_decode_combine_f32(const float *__restrict__ o_part,
                                                        const float *__restrict__ lse_part,
                                                        const int *__restrict__ pos,
                                                        float *__restrict__ out, int n, int heads,
                                                        int hd, int splits, int split, int window) {
    const int row = blockIdx.x, h = blockIdx.y, s = row / n, i = row % n, lim = pos[s] + i;
    const int first = window > 0 ? max(0, pos[s] - window + 1) : 0;  // key of split 0
    const int c0 = (window > 0 ? max(0, lim - window + 1) - first : 0) / split;
    const int used = (lim - first) / split + 1;  // the splits c0..used−1 hold this row's keys
    const size_t base = ((size_t)row * heads + h) * splits;
    float m = -INFINITY;  // every thread reads the same lse values: broadcasts
    for (int c = c0; c < used; ++c) m = fmaxf(m, lse_part[base + c]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.f, den = 0.f;
        for (int c = c0; c < used; ++c) {
            const float wc = expf(lse_part[base + c] - m);
            num += wc * o_part[(base + c) * hd + d];
            den += wc;
        }
        out[((size_t)row * heads + h) * hd + d] = num / den;
    }
}
RKU_EXPORT(kv_append_f32)
RKU_EXPORT(attention_decode_f32)
RKU_EXPORT(attention_decode_combine_f32)

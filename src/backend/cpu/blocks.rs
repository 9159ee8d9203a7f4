//! Few-row products `y = x·Wᵀ` read from ggml blocks (Q4_1, Q8_0) instead
//! of f32 weights: decoding steps, which are bound by reading W, read 3.5–5.3×
//! fewer bytes.
//!
//! At upload the blocks are repacked with their f16 scale (and min)
//! widened to f32, which is exact. Each weight is then rebuilt in registers
//! with the importer's arithmetic, in the same order and never fused:
//!   Q4_1: w = fl(fl(q·d) + m),   Q8_0: w = fl(q·d),
//! so it is bit for bit the f32 value the model's safetensors hold, and the
//! product differs from the f32 path only in summation order.
use super::mem::huge_page_collect;
use super::simd::{dispatch, Isa};
use crate::quant::{BlockKind, BlockMatrix, BLOCK_LEN};
use half::f16;

/// Up to this many rows, `y = x·Wᵀ` reads a weight's blocks when it has
/// them (`eval gen` decodes 8 sequences at once by default).
pub const BLOCK_ROWS: usize = 8;

/// A Q4_1 block: w_j = q_j·d + m, q_j the low nibble of `qs[j]` for j < 16
/// and the high nibble of `qs[j − 16]` after.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Q41 {
    d: f32,
    m: f32,
    qs: [u8; 16],
}

/// A Q8_0 block: w_j = qs_j·d.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Q80 {
    d: f32,
    qs: [i8; 32],
}

/// A `[rows, cols]` matrix as repacked blocks, row-major (`cols/32` per row).
#[derive(Clone, Debug)]
pub enum PackedBlocks {
    Q41(Vec<Q41>),
    Q80(Vec<Q80>),
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl PackedBlocks {
    /// Repacks the ggml bytes of `m` (huge-page backed, as f32 weights are).
    pub fn pack(m: &BlockMatrix<'_>) -> Self {
        let raw = m.data.chunks_exact(m.kind.block_bytes());
        let n = raw.len();
        match m.kind {
            BlockKind::Q4_1 => Self::Q41(huge_page_collect(
                n,
                raw.map(|b| Q41 {
                    d: f16_at(b, 0),
                    m: f16_at(b, 2),
                    qs: b[4..20].try_into().expect("20-byte block"),
                }),
            )),
            BlockKind::Q8_0 => Self::Q80(huge_page_collect(
                n,
                raw.map(|b| Q80 {
                    d: f16_at(b, 0),
                    qs: std::array::from_fn(|j| b[2 + j] as i8),
                }),
            )),
        }
    }

    /// Number of blocks.
    pub fn n_blocks(&self) -> usize {
        match self {
            Self::Q41(b) => b.len(),
            Self::Q80(b) => b.len(),
        }
    }

    /// Bytes held per block (for sizing parallel tasks).
    pub fn block_bytes(&self) -> usize {
        match self {
            Self::Q41(_) => std::mem::size_of::<Q41>(),
            Self::Q80(_) => std::mem::size_of::<Q80>(),
        }
    }

    /// `yc[o·rows + r] = x[r,:] · W[o0 + o,:]` for `o < yc.len() / rows`,
    /// with `x` `[rows, inp]`, `1 ≤ rows ≤ BLOCK_ROWS` and `inp` a multiple of 32.
    pub fn rows_dot(
        &self,
        isa: Isa,
        x: &[f32],
        rows: usize,
        inp: usize,
        o0: usize,
        yc: &mut [f32],
    ) {
        match rows {
            1 => self.rows_dot_n::<1>(isa, x, inp, o0, yc),
            2 => self.rows_dot_n::<2>(isa, x, inp, o0, yc),
            3 => self.rows_dot_n::<3>(isa, x, inp, o0, yc),
            4 => self.rows_dot_n::<4>(isa, x, inp, o0, yc),
            5 => self.rows_dot_n::<5>(isa, x, inp, o0, yc),
            6 => self.rows_dot_n::<6>(isa, x, inp, o0, yc),
            7 => self.rows_dot_n::<7>(isa, x, inp, o0, yc),
            8 => self.rows_dot_n::<8>(isa, x, inp, o0, yc),
            _ => panic!("block products take 1 to {BLOCK_ROWS} rows, not {rows}"),
        }
    }

    fn rows_dot_n<const R: usize>(
        &self,
        isa: Isa,
        x: &[f32],
        inp: usize,
        o0: usize,
        yc: &mut [f32],
    ) {
        assert_eq!(x.len(), R * inp);
        assert!(inp.is_multiple_of(BLOCK_LEN));
        let nb = inp / BLOCK_LEN;
        for (o, y) in yc.chunks_exact_mut(R).enumerate() {
            let row = (o0 + o) * nb..(o0 + o + 1) * nb;
            let y: &mut [f32; R] = y.try_into().expect("R outputs");
            match self {
                Self::Q41(b) => q4_1_row::<R>(isa, x, inp, &b[row], y),
                Self::Q80(b) => q8_0_row::<R>(isa, x, inp, &b[row], y),
            }
        }
    }
}

/// `y[r] = x[r,:] · w` for one W row given as Q4_1 blocks.
fn q4_1_row<const R: usize>(isa: Isa, x: &[f32], inp: usize, b: &[Q41], y: &mut [f32; R]) {
    dispatch!(
        isa,
        x86::q4_1_row_512::<R>(x, inp, b, y),
        x86::q4_1_row_256::<R>(x, inp, b, y),
        plain_row::<R>(x, inp, b.len(), y, |i, w| {
            let blk = &b[i];
            for j in 0..16 {
                w[j] = (blk.qs[j] & 0xF) as f32 * blk.d + blk.m;
                w[j + 16] = (blk.qs[j] >> 4) as f32 * blk.d + blk.m;
            }
        })
    )
}

/// `y[r] = x[r,:] · w` for one W row given as Q8_0 blocks.
fn q8_0_row<const R: usize>(isa: Isa, x: &[f32], inp: usize, b: &[Q80], y: &mut [f32; R]) {
    dispatch!(
        isa,
        x86::q8_0_row_512::<R>(x, inp, b, y),
        x86::q8_0_row_256::<R>(x, inp, b, y),
        plain_row::<R>(x, inp, b.len(), y, |i, w| {
            for (wj, &q) in w.iter_mut().zip(&b[i].qs) {
                *wj = q as f32 * b[i].d;
            }
        })
    )
}

/// The plain body: block i's 32 weights from `weights(i, &mut w)`.
fn plain_row<const R: usize>(
    x: &[f32],
    inp: usize,
    nb: usize,
    y: &mut [f32; R],
    weights: impl Fn(usize, &mut [f32; 32]),
) {
    let mut w = [0f32; 32];
    *y = [0.0; R];
    for i in 0..nb {
        weights(i, &mut w);
        for (r, yr) in y.iter_mut().enumerate() {
            let xb = &x[r * inp + i * BLOCK_LEN..][..BLOCK_LEN];
            *yr += xb.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK_LEN, Q41, Q80};
    use std::arch::x86_64::*;

    /// Bytes ahead of the block being read that `prefetch_ahead` asks for:
    /// the hardware prefetcher alone left the AVX-512 loop stalled on its
    /// first load of each block (a decoding step at about 10 GB/s).
    const PREFETCH_BYTES: usize = 2048;

    /// Hints the cache line `PREFETCH_BYTES` past `blk` into L1. A hint:
    /// past the end of the weights it reads nothing and faults never.
    #[inline(always)]
    unsafe fn prefetch_ahead<T>(blk: *const T) {
        let p = blk.cast::<i8>().wrapping_add(PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(p);
    }

    /// Adds block `i`'s product to each row's accumulators: `acc[r][k] +=
    /// w[k-th 16] · x[r, block i, k-th 16]`.
    #[inline(always)]
    unsafe fn fma_rows_512<const R: usize>(
        acc: &mut [[__m512; 2]; R],
        w: [__m512; 2],
        x: &[f32],
        inp: usize,
        i: usize,
    ) {
        for (r, a) in acc.iter_mut().enumerate() {
            let p = x.as_ptr().add(r * inp + i * BLOCK_LEN);
            a[0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(p), a[0]);
            a[1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(p.add(16)), a[1]);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn q4_1_row_512<const R: usize>(x: &[f32], inp: usize, b: &[Q41], y: &mut [f32; R]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let low = _mm512_set1_epi32(0xF);
        for (i, blk) in b.iter().enumerate() {
            prefetch_ahead(blk);
            let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.qs.as_ptr().cast()));
            let (d, m) = (_mm512_set1_ps(blk.d), _mm512_set1_ps(blk.m));
            let q_lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, low));
            let q_hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q));
            // q·d, then + m: two roundings, as the importer.
            let w = [
                _mm512_add_ps(_mm512_mul_ps(q_lo, d), m),
                _mm512_add_ps(_mm512_mul_ps(q_hi, d), m),
            ];
            fma_rows_512(&mut acc, w, x, inp, i);
        }
        for (yr, a) in y.iter_mut().zip(acc) {
            *yr = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn q8_0_row_512<const R: usize>(x: &[f32], inp: usize, b: &[Q80], y: &mut [f32; R]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (i, blk) in b.iter().enumerate() {
            prefetch_ahead(blk);
            let p = blk.qs.as_ptr().cast::<__m128i>();
            let d = _mm512_set1_ps(blk.d);
            let w = [
                _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p))),
                    d,
                ),
                _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(1)))),
                    d,
                ),
            ];
            fma_rows_512(&mut acc, w, x, inp, i);
        }
        for (yr, a) in y.iter_mut().zip(acc) {
            *yr = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        }
    }

    /// As `fma_rows_512` with four 8-lane quarters of the block.
    #[inline(always)]
    unsafe fn fma_rows_256<const R: usize>(
        acc: &mut [[__m256; 4]; R],
        w: [__m256; 4],
        x: &[f32],
        inp: usize,
        i: usize,
    ) {
        for (r, a) in acc.iter_mut().enumerate() {
            let p = x.as_ptr().add(r * inp + i * BLOCK_LEN);
            for k in 0..4 {
                a[k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(p.add(8 * k)), a[k]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum_256(a: [__m256; 4]) -> f32 {
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q4_1_row_256<const R: usize>(x: &[f32], inp: usize, b: &[Q41], y: &mut [f32; R]) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let low = _mm256_set1_epi32(0xF);
        for (i, blk) in b.iter().enumerate() {
            let p = blk.qs.as_ptr();
            // Bytes 0..8 and 8..16: their low nibbles are w_0..8 and
            // w_8..16, their high nibbles w_16..24 and w_24..32.
            let qa = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
            let qb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast()));
            let (d, m) = (_mm256_set1_ps(blk.d), _mm256_set1_ps(blk.m));
            let w = |q: __m256i| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), m);
            let w = [
                w(_mm256_and_si256(qa, low)),
                w(_mm256_and_si256(qb, low)),
                w(_mm256_srli_epi32::<4>(qa)),
                w(_mm256_srli_epi32::<4>(qb)),
            ];
            fma_rows_256(&mut acc, w, x, inp, i);
        }
        for (yr, a) in y.iter_mut().zip(acc) {
            *yr = hsum_256(a);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q8_0_row_256<const R: usize>(x: &[f32], inp: usize, b: &[Q80], y: &mut [f32; R]) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for (i, blk) in b.iter().enumerate() {
            let p = blk.qs.as_ptr();
            let d = _mm256_set1_ps(blk.d);
            let w: [__m256; 4] = std::array::from_fn(|k| {
                let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k).cast()));
                _mm256_mul_ps(_mm256_cvtepi32_ps(q), d)
            });
            fma_rows_256(&mut acc, w, x, inp, i);
        }
        for (yr, a) in y.iter_mut().zip(acc) {
            *yr = hsum_256(a);
        }
    }
}

#[cfg(test)]
/// Random ggml blocks of `kind` for a `[rows, cols]` matrix: f16 scales
/// of either sign and magnitude around 0.01–1, any nibbles/bytes.
pub(super) fn random_blocks(kind: BlockKind, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let n = rows * cols / BLOCK_LEN;
    let vals = super::test_values(n * 40, 0.0, 1.0, seed);
    let mut it = vals.into_iter();
    let half = |it: &mut std::vec::IntoIter<f32>| {
        let v = (it.next().unwrap() - 0.5) * 2.0;
        f16::from_f32(v * v * v).to_le_bytes()
    };
    let mut out = Vec::new();
    for _ in 0..n {
        out.extend(half(&mut it));
        if kind == BlockKind::Q4_1 {
            out.extend(half(&mut it));
        }
        let body = kind.block_bytes() - out.len() % kind.block_bytes();
        for _ in 0..body {
            out.push((it.next().unwrap() * 256.0) as u8);
        }
    }
    out
}

/// Random blocks (`random_blocks`) of a `[rows, cols]` matrix, packed, with
/// their dequantised values.
#[cfg(test)]
pub(super) fn random_packed(
    kind: BlockKind,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (PackedBlocks, Vec<f32>) {
    let data = random_blocks(kind, rows, cols, seed);
    let m = BlockMatrix {
        kind,
        rows,
        cols,
        data: &data,
    };
    (
        PackedBlocks::pack(&m),
        m.dequantize("w").expect("whole blocks"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_products_use_exactly_the_dequantised_weights() {
        for kind in [BlockKind::Q4_1, BlockKind::Q8_0] {
            for (inp, out) in [(32, 1), (64, 7), (576, 37)] {
                let (packed, w) = random_packed(kind, out, inp, (inp + out) as u64);
                for rows in 1..=BLOCK_ROWS {
                    let x = super::super::test_values(rows * inp, -1.0, 1.0, rows as u64);
                    for isa in Isa::available() {
                        let mut y = vec![0f32; out * rows];
                        packed.rows_dot(isa, &x, rows, inp, 0, &mut y);
                        for o in 0..out {
                            for r in 0..rows {
                                let want: f64 = (0..inp)
                                    .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                                    .sum();
                                let scale: f64 = (0..inp)
                                    .map(|i| (x[r * inp + i] as f64 * w[o * inp + i] as f64).abs())
                                    .sum();
                                let got = y[o * rows + r] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * scale + 1e-30,
                                    "{kind:?} {isa:?} {rows}x{inp}x{out} [{r},{o}]: {got} vs {want}"
                                );
                            }
                        }
                        // One-hot rows pick single weights: bit for bit the
                        // dequantised values (an FMA-fused q·d + m would not be).
                        let k = (rows * 13) % inp;
                        let mut hot = vec![0f32; rows * inp];
                        for r in 0..rows {
                            hot[r * inp + (k + r) % inp] = 1.0;
                        }
                        let mut picked = vec![0f32; out * rows];
                        packed.rows_dot(isa, &hot, rows, inp, 0, &mut picked);
                        for o in 0..out {
                            for r in 0..rows {
                                let want = w[o * inp + (k + r) % inp];
                                // `==`: a -0.0 weight sums to +0.0.
                                assert_eq!(picked[o * rows + r], want, "{kind:?} {isa:?}");
                            }
                        }
                        // Rows from the middle of W land where o0 says.
                        let mut tail = vec![0f32; rows];
                        packed.rows_dot(isa, &x, rows, inp, out - 1, &mut tail);
                        assert_eq!(tail[..], y[(out - 1) * rows..]);
                    }
                }
            }
        }
    }
}

//! Vector kernels of the CPU backend, with the instruction set chosen at run
//! time: AVX-512F (16 lanes, masked tails), AVX2 + FMA (8 lanes, tails run
//! through a padded register-sized buffer) or plain Rust on any other CPU.
//!
//! `Isa::get()` picks the widest variant the CPU runs, once per process.
//! Every kernel takes the `Isa` so that the tests can run each variant the
//! machine has against the plain one. Vector sums are formed lane-wise and
//! reduced at the end, so they differ from a sequential sum only in
//! summation order.
//!
//! The vector `exp` (plain Rust uses libm's): with n = round(x·log₂e) and
//! r = x − n·ln2 (ln2 split in a high part with few significant bits and a
//! low correction, Cody–Waite, so n·ln2_hi is exact), |r| ≤ ln2/2 and
//!   eˣ = 2ⁿ · eʳ,  eʳ ≈ 1 + r + r²·P(r),
//! P the degree-5 polynomial of Cephes' expf (relative error about 1e-7 on
//! that interval). Inputs are clamped to [−104, 88.8] first: below, eˣ is
//! 0 in f32 (smallest subnormal 2⁻¹⁴⁹ ≈ e^−103.3); above, +∞. NaN stays
//! NaN. 2ⁿ is applied with `vscalefps` (AVX-512, exact down through the
//! subnormals) or as two exactly representable powers 2^⌊n/2⌋·2^(n−⌊n/2⌋)
//! (AVX2), so the result is rounded once.
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Which body of the kernels runs. A variant other than `Scalar` is only
/// ever produced by `Isa::available`, after checking the CPU has it: the
/// unsafe dispatch below relies on that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest variant this CPU runs (detected once).
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| *Isa::available().last().unwrap_or(&Isa::Scalar))
    }

    /// Every variant this CPU runs, narrowest first.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }
}

/// Runs the AVX-512 body `$a`, the AVX2 body `$b` or the plain body `$s` for `$isa`.
macro_rules! dispatch {
    ($isa:expr, $a:expr, $b:expr, $s:expr) => {
        match $isa {
            // SAFETY: these variants come from `Isa::available`, which
            // checked that the CPU has the features the bodies enable.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { $a },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { $b },
            _ => $s,
        }
    };
}
pub(super) use dispatch;

/// `Σ a_i·b_i`.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    dispatch!(
        isa,
        x86::dot_512(a, b),
        x86::dot_256(a, b),
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    )
}

/// Four dot products of `x` (`[n]`) with the rows of `w` (`[4, n]`, row
/// stride `ld ≥ n`): the inner block of a matrix-vector product, reading
/// `x` once for four weight rows.
pub fn dot4(isa: Isa, x: &[f32], w: &[f32], ld: usize) -> [f32; 4] {
    let n = x.len();
    assert!(ld >= n && w.len() >= 3 * ld + n);
    dispatch!(
        isa,
        x86::dot4_512(x, w, ld),
        x86::dot4_256(x, w, ld),
        std::array::from_fn(|j| dot(Isa::Scalar, x, &w[j * ld..j * ld + n]))
    )
}

/// `max_i x_i` (−∞ for an empty slice; NaNs are skipped, as `f32::max` does).
pub fn max(isa: Isa, x: &[f32]) -> f32 {
    dispatch!(
        isa,
        x86::max_512(x),
        x86::max_256(x),
        x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    )
}

/// `y += a·x`.
pub fn axpy(isa: Isa, y: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(x.len(), y.len());
    dispatch!(
        isa,
        x86::axpy_512(y, a, x),
        x86::axpy_256(y, a, x),
        y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x)
    )
}

/// `x_i ← e^(x_i − shift)`; returns `Σ x_i` (the softmax denominator).
pub fn exp_sum(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    dispatch!(
        isa,
        x86::exp_sum_512(x, shift),
        x86::exp_sum_256(x, shift),
        {
            let mut sum = 0f32;
            for v in x.iter_mut() {
                *v = (*v - shift).exp();
                sum += *v;
            }
            sum
        }
    )
}

/// A sigmoid gate act(a) = a·σ(z), z = a·(α + β·a²): silu is α = 1, β = 0
/// (z = a exactly); gelu with the tanh approximation, 0.5·a·(1 + tanh(u))
/// with u = k·(a + c·a³), is the same function as a·σ(2u), so α = 2k,
/// β = 2k·c.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gate {
    pub alpha: f32,
    pub beta: f32,
}

impl Gate {
    pub const SILU: Gate = Gate {
        alpha: 1.0,
        beta: 0.0,
    };
    /// k = √(2/π), c = 0.044715 (kernels/swiglu.cu `gelu_tanh`).
    pub const GELU_TANH: Gate = Gate {
        alpha: 2.0 * 0.797_884_6,
        beta: 2.0 * 0.797_884_6 * 0.044715,
    };
}

/// `h = act(a)·b = a·b / (1 + e^−z)`, z = a·(α + β·a²) ([`Gate`]),
/// elementwise; writes every slot of `h`.
pub fn gated_mul(isa: Isa, gate: Gate, h: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
    assert!(a.len() == h.len() && b.len() == h.len());
    dispatch!(
        isa,
        x86::gated_mul_512(gate, h, a, b),
        x86::gated_mul_256(gate, h, a, b),
        for ((h, &a), &b) in h.iter_mut().zip(a).zip(b) {
            let z = a * gate.beta.mul_add(a * a, gate.alpha);
            h.write(a * b / (1.0 + (-z).exp()));
        }
    )
}

/// Backward of `gated_mul` given `dh`, with σ = 1/(1 + e^−z) and
/// z' = dz/da = α + 3β·a²: `da = dh·b·σ·(1 + a·z'·(1 − σ))`, `db = dh·a·σ`.
pub fn gated_mul_bwd(
    isa: Isa,
    gate: Gate,
    da: &mut [f32],
    db: &mut [f32],
    dh: &[f32],
    a: &[f32],
    b: &[f32],
) {
    let n = da.len();
    assert!(db.len() == n && dh.len() == n && a.len() == n && b.len() == n);
    dispatch!(
        isa,
        x86::gated_mul_bwd_512(gate, da, db, dh, a, b),
        x86::gated_mul_bwd_256(gate, da, db, dh, a, b),
        for i in 0..n {
            let (av, bv, g) = (a[i], b[i], dh[i]);
            let z = av * gate.beta.mul_add(av * av, gate.alpha);
            let dz = (3.0 * gate.beta).mul_add(av * av, gate.alpha);
            let s = 1.0 / (1.0 + (-z).exp());
            da[i] = g * bv * s * (av * dz).mul_add(1.0 - s, 1.0);
            db[i] = g * av * s;
        }
    )
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 (`_512`) and AVX2 (`_256`) bodies. Loops step a full
    //! register at a time; the last, partial step loads and stores through
    //! a lane mask (AVX-512) or a zero-padded buffer (AVX2).
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::Gate;

    const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 = LN2_HI + LN2_LO; LN2_HI has 9 significant bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// Cephes expf: eʳ ≈ 1 + r + r²·(((((P0·r + P1)·r + P2)·r + P3)·r + P4)·r + P5).
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5, // Cephes: 5.0000001e-1, which rounds to 0.5 in f32
    ];
    const X_MIN: f32 = -104.0;
    const X_MAX: f32 = 88.8;
    const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    /// Mask of the lanes of the step at `i` in a loop over `n` values.
    #[inline]
    fn mask16(n: usize, i: usize) -> __mmask16 {
        let rem = n - i;
        if rem >= 16 {
            0xffff
        } else {
            ((1u32 << rem) - 1) as __mmask16
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32, m: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(m, p)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store16(p: *mut f32, m: __mmask16, v: __m512) {
        _mm512_mask_storeu_ps(p, m, v)
    }

    /// Loads `k ≤ 8` values, zero-padded to 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const f32, k: usize) -> __m256 {
        if k == 8 {
            _mm256_loadu_ps(p)
        } else {
            let mut buf = [0f32; 8];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), k);
            _mm256_loadu_ps(buf.as_ptr())
        }
    }

    /// Stores lanes `0..k` (`k ≤ 8`) of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store8(p: *mut f32, k: usize, v: __m256) {
        if k == 8 {
            _mm256_storeu_ps(p, v)
        } else {
            let mut buf = [0f32; 8];
            _mm256_storeu_ps(buf.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, k);
        }
    }

    /// `v` with lanes `k..8` zeroed.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn keep8(v: __m256, k: usize) -> __m256 {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32), lanes);
        _mm256_and_ps(v, _mm256_castsi256_ps(m))
    }

    /// Horizontal sum of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// eˣ per lane (see the module doc).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        // max/min return their second operand when either is NaN: NaN passes.
        let x = _mm512_min_ps(
            _mm512_set1_ps(X_MAX),
            _mm512_max_ps(_mm512_set1_ps(X_MIN), x),
        );
        let n = _mm512_roundscale_ps::<ROUND>(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let er = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        _mm512_scalef_ps(er, n)
    }

    /// eˣ per lane (see the module doc).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_set1_ps(X_MAX),
            _mm256_max_ps(_mm256_set1_ps(X_MIN), x),
        );
        let n = _mm256_round_ps::<ROUND>(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let er = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        // n ∈ [−150, 128]: 2ⁿ = 2^n1 · 2^n2 with n1 = n >> 1, both normal,
        // each built from its biased exponent bits.
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(ni);
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let p1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias)));
        let p2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias)));
        _mm256_mul_ps(_mm256_mul_ps(er, p1), p2)
    }

    /// z = a·(α + β·a²) of a [`Gate`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gate_z16(g: Gate, a: __m512) -> __m512 {
        let a2 = _mm512_mul_ps(a, a);
        _mm512_mul_ps(
            a,
            _mm512_fmadd_ps(_mm512_set1_ps(g.beta), a2, _mm512_set1_ps(g.alpha)),
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gate_z8(g: Gate, a: __m256) -> __m256 {
        let a2 = _mm256_mul_ps(a, a);
        _mm256_mul_ps(
            a,
            _mm256_fmadd_ps(_mm256_set1_ps(g.beta), a2, _mm256_set1_ps(g.alpha)),
        )
    }

    /// `a·b / (1 + e^−z)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gated_mul16(g: Gate, a: __m512, b: __m512) -> __m512 {
        let den = _mm512_add_ps(
            _mm512_set1_ps(1.0),
            exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate_z16(g, a))),
        );
        _mm512_div_ps(_mm512_mul_ps(a, b), den)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gated_mul8(g: Gate, a: __m256, b: __m256) -> __m256 {
        let den = _mm256_add_ps(
            _mm256_set1_ps(1.0),
            exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate_z8(g, a))),
        );
        _mm256_div_ps(_mm256_mul_ps(a, b), den)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_512(a: &[f32], b: &[f32]) -> f32 {
        let (n, pa, pb) = (a.len(), a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            let j = i + 16;
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(j)), _mm512_loadu_ps(pb.add(j)), s1);
            i += 32;
        }
        while i < n {
            let m = mask16(n, i);
            s0 = _mm512_fmadd_ps(load16(pa.add(i), m), load16(pb.add(i), m), s0);
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_256(a: &[f32], b: &[f32]) -> f32 {
        let (n, pa, pb) = (a.len(), a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            let j = i + 8;
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j)), s1);
            i += 16;
        }
        while i < n {
            let k = (n - i).min(8);
            s0 = _mm256_fmadd_ps(load8(pa.add(i), k), load8(pb.add(i), k), s0);
            i += 8;
        }
        hsum8(_mm256_add_ps(s0, s1))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot4_512(x: &[f32], w: &[f32], ld: usize) -> [f32; 4] {
        let (n, px, pw) = (x.len(), x.as_ptr(), w.as_ptr());
        let (mut s0, mut s1, mut s2, mut s3) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let mut i = 0;
        while i < n {
            let m = mask16(n, i);
            let xv = load16(px.add(i), m);
            s0 = _mm512_fmadd_ps(load16(pw.add(i), m), xv, s0);
            s1 = _mm512_fmadd_ps(load16(pw.add(ld + i), m), xv, s1);
            s2 = _mm512_fmadd_ps(load16(pw.add(2 * ld + i), m), xv, s2);
            s3 = _mm512_fmadd_ps(load16(pw.add(3 * ld + i), m), xv, s3);
            i += 16;
        }
        [
            _mm512_reduce_add_ps(s0),
            _mm512_reduce_add_ps(s1),
            _mm512_reduce_add_ps(s2),
            _mm512_reduce_add_ps(s3),
        ]
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_256(x: &[f32], w: &[f32], ld: usize) -> [f32; 4] {
        let (n, px, pw) = (x.len(), x.as_ptr(), w.as_ptr());
        let (mut s0, mut s1, mut s2, mut s3) = (
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        );
        let mut i = 0;
        while i < n {
            let k = (n - i).min(8);
            let xv = load8(px.add(i), k);
            s0 = _mm256_fmadd_ps(load8(pw.add(i), k), xv, s0);
            s1 = _mm256_fmadd_ps(load8(pw.add(ld + i), k), xv, s1);
            s2 = _mm256_fmadd_ps(load8(pw.add(2 * ld + i), k), xv, s2);
            s3 = _mm256_fmadd_ps(load8(pw.add(3 * ld + i), k), xv, s3);
            i += 8;
        }
        [hsum8(s0), hsum8(s1), hsum8(s2), hsum8(s3)]
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn max_512(x: &[f32]) -> f32 {
        let (n, p) = (x.len(), x.as_ptr());
        let neg = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut m = neg;
        let mut i = 0;
        while i < n {
            let k = mask16(n, i);
            // Masked-off lanes load −∞; a NaN lane leaves m unchanged
            // (max returns its second operand when either is NaN).
            m = _mm512_max_ps(_mm512_mask_loadu_ps(neg, k, p.add(i)), m);
            i += 16;
        }
        _mm512_reduce_max_ps(m)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max_256(x: &[f32]) -> f32 {
        let (n, p) = (x.len(), x.as_ptr());
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            m = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), m);
            i += 8;
        }
        let mut buf = [0f32; 8];
        _mm256_storeu_ps(buf.as_mut_ptr(), m);
        x[i..]
            .iter()
            .chain(&buf)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_512(y: &mut [f32], a: f32, x: &[f32]) {
        let (n, py, px) = (y.len(), y.as_mut_ptr(), x.as_ptr());
        let av = _mm512_set1_ps(a);
        let mut i = 0;
        while i < n {
            let m = mask16(n, i);
            let v = _mm512_fmadd_ps(av, load16(px.add(i), m), load16(py.add(i), m));
            store16(py.add(i), m, v);
            i += 16;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_256(y: &mut [f32], a: f32, x: &[f32]) {
        let (n, py, px) = (y.len(), y.as_mut_ptr(), x.as_ptr());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i < n {
            let k = (n - i).min(8);
            let v = _mm256_fmadd_ps(av, load8(px.add(i), k), load8(py.add(i), k));
            store8(py.add(i), k, v);
            i += 8;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_sum_512(x: &mut [f32], shift: f32) -> f32 {
        let (n, p) = (x.len(), x.as_mut_ptr());
        let sh = _mm512_set1_ps(shift);
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let m = mask16(n, i);
            let e = exp16(_mm512_sub_ps(load16(p.add(i), m), sh));
            store16(p.add(i), m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            i += 16;
        }
        _mm512_reduce_add_ps(sum)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum_256(x: &mut [f32], shift: f32) -> f32 {
        let (n, p) = (x.len(), x.as_mut_ptr());
        let sh = _mm256_set1_ps(shift);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            let k = (n - i).min(8);
            let e = exp8(_mm256_sub_ps(load8(p.add(i), k), sh));
            store8(p.add(i), k, e);
            sum = _mm256_add_ps(sum, keep8(e, k));
            i += 8;
        }
        hsum8(sum)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gated_mul_512(g: Gate, h: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
        let (n, ph, pa, pb) = (
            h.len(),
            h.as_mut_ptr().cast::<f32>(),
            a.as_ptr(),
            b.as_ptr(),
        );
        let mut i = 0;
        while i < n {
            let m = mask16(n, i);
            store16(
                ph.add(i),
                m,
                gated_mul16(g, load16(pa.add(i), m), load16(pb.add(i), m)),
            );
            i += 16;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gated_mul_256(g: Gate, h: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
        let (n, ph, pa, pb) = (
            h.len(),
            h.as_mut_ptr().cast::<f32>(),
            a.as_ptr(),
            b.as_ptr(),
        );
        let mut i = 0;
        while i < n {
            let k = (n - i).min(8);
            store8(
                ph.add(i),
                k,
                gated_mul8(g, load8(pa.add(i), k), load8(pb.add(i), k)),
            );
            i += 8;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gated_mul_bwd_512(
        gate: Gate,
        da: &mut [f32],
        db: &mut [f32],
        dh: &[f32],
        a: &[f32],
        b: &[f32],
    ) {
        let n = da.len();
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = mask16(n, i);
            let av = load16(a.as_ptr().add(i), m);
            let bv = load16(b.as_ptr().add(i), m);
            let g = load16(dh.as_ptr().add(i), m);
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate_z16(gate, av)));
            let s = _mm512_div_ps(one, _mm512_add_ps(one, e)); // σ(z)
            let gs = _mm512_mul_ps(g, s);
            let dz = _mm512_fmadd_ps(
                _mm512_set1_ps(3.0 * gate.beta),
                _mm512_mul_ps(av, av),
                _mm512_set1_ps(gate.alpha),
            );
            // 1 + a·z'·(1 − σ)
            let t = _mm512_fmadd_ps(_mm512_mul_ps(av, dz), _mm512_sub_ps(one, s), one);
            store16(
                da.as_mut_ptr().add(i),
                m,
                _mm512_mul_ps(_mm512_mul_ps(gs, bv), t),
            );
            store16(db.as_mut_ptr().add(i), m, _mm512_mul_ps(gs, av));
            i += 16;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gated_mul_bwd_256(
        gate: Gate,
        da: &mut [f32],
        db: &mut [f32],
        dh: &[f32],
        a: &[f32],
        b: &[f32],
    ) {
        let n = da.len();
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let k = (n - i).min(8);
            let av = load8(a.as_ptr().add(i), k);
            let bv = load8(b.as_ptr().add(i), k);
            let g = load8(dh.as_ptr().add(i), k);
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate_z8(gate, av)));
            let s = _mm256_div_ps(one, _mm256_add_ps(one, e)); // σ(z)
            let gs = _mm256_mul_ps(g, s);
            let dz = _mm256_fmadd_ps(
                _mm256_set1_ps(3.0 * gate.beta),
                _mm256_mul_ps(av, av),
                _mm256_set1_ps(gate.alpha),
            );
            // 1 + a·z'·(1 − σ)
            let t = _mm256_fmadd_ps(_mm256_mul_ps(av, dz), _mm256_sub_ps(one, s), one);
            store8(
                da.as_mut_ptr().add(i),
                k,
                _mm256_mul_ps(_mm256_mul_ps(gs, bv), t),
            );
            store8(db.as_mut_ptr().add(i), k, _mm256_mul_ps(gs, av));
            i += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mem::written_slots;
    use super::super::test_values as values;
    use super::*;

    /// Distance in units in the last place between two non-negative floats
    /// (their bit patterns are ordered like their values, subnormals included).
    fn ulps(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    fn close(got: f64, want: f64, tol: f64) -> bool {
        (got - want).abs() <= tol * (1.0 + want.abs())
    }

    #[test]
    fn exp_is_within_two_ulps_of_f64_exp() {
        let mut x = values(200_003, -110.0, 90.0, 1);
        x.extend(values(50_001, -1.0, 1.0, 2));
        x.extend([
            0.0,
            -0.0,
            1e-30,
            88.72,
            88.7228,
            88.73,
            -87.33,
            -87.34,
            -100.0,
            -103.27,
            -103.98,
            -104.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        for isa in Isa::available() {
            let mut got = x.clone();
            // Chunks of 37 values: every step ends in a partial vector.
            for c in got.chunks_mut(37) {
                exp_sum(isa, c, 0.0);
            }
            let mut worst = 0;
            for (&xi, &g) in x.iter().zip(&got) {
                let want = (xi as f64).exp() as f32;
                let e = ulps(g, want);
                assert!(e <= 2, "{isa:?}: exp({xi}) = {g}, want {want} ({e} ulps)");
                worst = worst.max(e);
            }
            eprintln!("{isa:?}: worst exp error {worst} ulps");
            let mut nan = [f32::NAN, 1.0, f32::NAN];
            exp_sum(isa, &mut nan, 0.0);
            assert!(
                nan[0].is_nan() && nan[2].is_nan() && nan[1] == 1f32.exp(),
                "{isa:?}"
            );
        }
    }

    #[test]
    fn exp_sum_shifts_and_sums() {
        for isa in Isa::available() {
            for n in [1, 7, 8, 15, 16, 17, 33, 100] {
                let x = values(n, -20.0, 5.0, n as u64);
                let mut y = x.clone();
                let sum = exp_sum(isa, &mut y, 3.0);
                let want: Vec<f64> = x.iter().map(|&v| (v as f64 - 3.0).exp()).collect();
                for (g, w) in y.iter().zip(&want) {
                    assert!(close(*g as f64, *w, 1e-6), "{isa:?} n={n}: {g} vs {w}");
                }
                let ws: f64 = want.iter().sum();
                assert!(
                    close(sum as f64, ws, 1e-6),
                    "{isa:?} n={n}: sum {sum} vs {ws}"
                );
            }
        }
    }

    #[test]
    fn dot_and_dot4_match_a_plain_loop() {
        for isa in Isa::available() {
            for n in [1, 5, 8, 15, 16, 17, 31, 32, 33, 63, 577] {
                let ld = n + 3;
                let x = values(n, -1.0, 1.0, 3);
                let w = values(4 * ld, -1.0, 1.0, 4);
                let plain = |row: &[f32]| -> f64 {
                    x.iter().zip(row).map(|(a, b)| *a as f64 * *b as f64).sum()
                };
                let got = dot(isa, &x, &w[..n]);
                assert!(close(got as f64, plain(&w[..n]), 1e-5), "{isa:?} dot n={n}");
                let got4 = dot4(isa, &x, &w[..3 * ld + n], ld);
                for (j, g) in got4.iter().enumerate() {
                    let want = plain(&w[j * ld..j * ld + n]);
                    assert!(close(*g as f64, want, 1e-5), "{isa:?} dot4 n={n} row {j}");
                }
            }
        }
    }

    #[test]
    fn max_and_axpy_match_a_plain_loop() {
        for isa in Isa::available() {
            for n in [0, 1, 7, 8, 9, 16, 17, 40] {
                let x = values(n, -5.0, 5.0, 8 + n as u64);
                let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max(isa, &x), want, "{isa:?} max n={n}");
                let mut y = values(n, -1.0, 1.0, 9);
                let mut want = y.clone();
                axpy(isa, &mut y, 0.75, &x);
                want.iter_mut().zip(&x).for_each(|(w, x)| *w += 0.75 * x);
                for (g, w) in y.iter().zip(&want) {
                    assert!(close(*g as f64, *w as f64, 1e-6), "{isa:?} axpy n={n}");
                }
            }
        }
    }

    /// silu and gelu (tanh approximation) in f64 from their usual
    /// formulas, σ and tanh: act(a), act'(a).
    fn reference(gate: Gate, a: f64) -> (f64, f64) {
        if gate == Gate::SILU {
            let s = 1.0 / (1.0 + (-a).exp());
            return (a * s, s * (1.0 + a * (1.0 - s)));
        }
        let (k, c) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
        let t = (k * (a + c * a * a * a)).tanh();
        let d = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * k * (1.0 + 3.0 * c * a * a);
        (0.5 * a * (1.0 + t), d)
    }

    #[test]
    fn gated_mul_and_its_backward_match_the_formulas() {
        for gate in [Gate::SILU, Gate::GELU_TANH] {
            for isa in Isa::available() {
                for n in [1, 7, 9, 16, 19, 101] {
                    let a = values(n, -12.0, 12.0, 5);
                    let b = values(n, -2.0, 2.0, 6);
                    let dh = values(n, -2.0, 2.0, 7);
                    // SAFETY: gated_mul writes every slot.
                    let h = unsafe { written_slots(n, |h| gated_mul(isa, gate, h, &a, &b)) };
                    let (mut da, mut db) = (vec![0f32; n], vec![0f32; n]);
                    gated_mul_bwd(isa, gate, &mut da, &mut db, &dh, &a, &b);
                    for i in 0..n {
                        let (av, bv, g) = (a[i] as f64, b[i] as f64, dh[i] as f64);
                        let (act, d) = reference(gate, av);
                        let what = format!("{gate:?} {isa:?} [{i}] a = {av}");
                        assert!(close(h[i] as f64, act * bv, 1e-6), "h {what}");
                        assert!(close(da[i] as f64, g * bv * d, 1e-6), "da {what}");
                        assert!(close(db[i] as f64, g * act, 1e-6), "db {what}");
                    }
                }
            }
        }
    }
}

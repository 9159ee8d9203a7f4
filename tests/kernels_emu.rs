//! Every kernel of kernels/*.cu on the emulated device (and on a GPU when one
//! answers) against an independent plain-loop reference: random non-zero
//! inputs, sizes that are not multiples of the block size, outputs poisoned
//! with NaN before the launch, and llm.c's rule |got − want| ≤ atol + rtol·|want|.
use half::{bf16, f16};
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{
    has_kernels, kernels as k, CudaBackend, DevBuf, Device, EmuDevice, Gemm, GemmType, GpuDevice,
    PTXAS_LOG,
};
use rku_engine::backend::{AttnShape, Backend, CacheShape};
use std::sync::OnceLock;

const F32_TOL: (f32, f32) = (1e-5, 1e-4);
const BF16_TOL: (f32, f32) = (1e-2, 1e-2);

/// xorshift64*: deterministic inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1), never exactly zero.
    fn f(&mut self) -> f32 {
        let v = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if v == 0.0 {
            0.5
        } else {
            v
        }
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}
fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn assert_close(got: &[f32], want: &[f32], (atol, rtol): (f32, f32), what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn assert_close64(got: &[f64], want: &[f64], (atol, rtol): (f64, f64), what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// An output buffer filled with NaN, so an element no kernel writes fails.
fn poisoned<D: Device>(dev: &D, n: usize) -> DevBuf<D, f32> {
    DevBuf::upload(dev, &vec![f32::NAN; n]).unwrap()
}
fn poisoned_bf16<D: Device>(dev: &D, n: usize) -> DevBuf<D, bf16> {
    DevBuf::upload(dev, &vec![bf16::NAN; n]).unwrap()
}
fn up<D: Device>(dev: &D, v: &[f32]) -> DevBuf<D, f32> {
    DevBuf::upload(dev, v).unwrap()
}
fn up_bf16<D: Device>(dev: &D, v: &[f32]) -> DevBuf<D, bf16> {
    DevBuf::upload(dev, &to_bf16(v)).unwrap()
}
fn down<D: Device>(dev: &D, b: &DevBuf<D, f32>) -> Vec<f32> {
    b.download(dev).unwrap()
}
fn down_bf16<D: Device>(dev: &D, b: &DevBuf<D, bf16>) -> Vec<f32> {
    b.download(dev)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// The GPU, when this binary has kernels and a driver answers.
fn gpu() -> Option<&'static GpuDevice> {
    static GPU: OnceLock<Option<GpuDevice>> = OnceLock::new();
    GPU.get_or_init(|| match GpuDevice::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("GPU tests skipped: {e}");
            None
        }
    })
    .as_ref()
}

/// `#[test] fn $name` running `$check` on the emulated device, then on the GPU if present.
macro_rules! on_devices {
    ($($name:ident => $check:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            $check(&EmuDevice::new());
            match gpu() {
                Some(g) => $check(g),
                None => eprintln!("{}: GPU run skipped (no GPU device)", stringify!($name)),
            }
        }
    )*};
}

on_devices! {
    swiglu_f32 => check_swiglu_f32,
    swiglu_bf16 => check_swiglu_bf16,
    channel_stats_f32 => check_channel_stats_f32,
    channel_stats_bf16 => check_channel_stats_bf16,
    compact_all_dtypes => check_compact,
    rmsnorm_fwd_bwd_f32 => check_rmsnorm,
    embedding_bf16 => check_embedding,
    cast_all => check_cast,
    energy_fwd_bwd_f32 => check_energy,
    add_and_bias => check_add,
    rope_fwd_inverse => check_rope,
    attention_fwd_bwd_gqa => check_attention,
    attention_head_dim_8 => check_attention_hd8,
    attention_head_dim_40 => check_attention_hd40,
    attention_cached_splits => check_attention_cached,
    gemm_cublas_contract => check_gemm,
}

/// `#[test] fn $name` running `$check` on a `CudaBackend` over each device
/// (cross-entropy vocabulary chunks of 7, so small vocabularies take several).
macro_rules! on_backends {
    ($($name:ident => $check:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            $check(&CudaBackend::new(EmuDevice::new()).with_ce_chunk(7));
            match gpu() {
                Some(_) => $check(&CudaBackend::new(GpuDevice::new(0).unwrap()).with_ce_chunk(7)),
                None => eprintln!("{}: GPU run skipped (no GPU device)", stringify!($name)),
            }
        }
    )*};
}

on_backends! {
    backend_linear => check_backend_linear,
    backend_cross_entropy_chunked => check_cross_entropy,
    backend_channel_stats_energy => check_backend_channel_stats,
    backend_attention_cached_calls => check_backend_attention_cached,
    backend_gather_matches_cpu => check_backend_gather,
}

fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}
fn swiglu_ref(a: &[f32], b: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut h = vec![0.0; a.len()];
    let mut da = h.clone();
    let mut db = h.clone();
    for i in 0..a.len() {
        let s = 1.0 / (1.0 + (-a[i]).exp());
        h[i] = silu(a[i]) * b[i];
        da[i] = dh[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
        db[i] = dh[i] * silu(a[i]);
    }
    (h, da, db)
}

fn check_swiglu_f32<D: Device>(dev: &D) {
    let n = 1000;
    let mut r = Rng::new(1);
    let (a, b, dh) = (r.vec(n), r.vec(n), r.vec(n));
    let (h_ref, da_ref, db_ref) = swiglu_ref(&a, &b, &dh);
    let (ga, gb, gdh) = (up(dev, &a), up(dev, &b), up(dev, &dh));
    let (h, da, db) = (poisoned(dev, n), poisoned(dev, n), poisoned(dev, n));
    k::swiglu_fwd(dev, &ga, &gb, &h).unwrap();
    k::swiglu_bwd(dev, &gdh, &ga, &gb, &da, &db).unwrap();
    assert_close(&down(dev, &h), &h_ref, F32_TOL, "h");
    assert_close(&down(dev, &da), &da_ref, F32_TOL, "da");
    assert_close(&down(dev, &db), &db_ref, F32_TOL, "db");
}

fn check_swiglu_bf16<D: Device>(dev: &D) {
    let n = 777;
    let mut r = Rng::new(2);
    let (a, b, dh) = (
        round_bf16(&r.vec(n)),
        round_bf16(&r.vec(n)),
        round_bf16(&r.vec(n)),
    );
    let (h_ref, da_ref, db_ref) = swiglu_ref(&a, &b, &dh);
    let (ga, gb, gdh) = (up_bf16(dev, &a), up_bf16(dev, &b), up_bf16(dev, &dh));
    let (h, da, db) = (
        poisoned_bf16(dev, n),
        poisoned_bf16(dev, n),
        poisoned_bf16(dev, n),
    );
    k::swiglu_fwd(dev, &ga, &gb, &h).unwrap();
    k::swiglu_bwd(dev, &gdh, &ga, &gb, &da, &db).unwrap();
    assert_close(&down_bf16(dev, &h), &h_ref, BF16_TOL, "h");
    assert_close(&down_bf16(dev, &da), &da_ref, BF16_TOL, "da");
    assert_close(&down_bf16(dev, &db), &db_ref, BF16_TOL, "db");
}

/// part [5][seqs][m] in f64 by plain loops.
fn stats_ref(h: &[f32], g: &[f32], seqs: usize, t: usize, m: usize) -> Vec<f64> {
    let mut p = vec![0f64; 5 * seqs * m];
    for s in 0..seqs {
        for r in 0..t {
            for c in 0..m {
                let (hv, gv) = (h[(s * t + r) * m + c] as f64, g[(s * t + r) * m + c] as f64);
                let at = |k: usize| k * seqs * m + s * m + c;
                p[at(0)] += hv;
                p[at(1)] += hv * hv;
                p[at(2)] += gv * gv;
                p[at(3)] += (hv * gv).abs();
                p[at(4)] += hv * gv;
            }
        }
    }
    p
}

fn check_channel_stats_f32<D: Device>(dev: &D) {
    let (seqs, t, m) = (3, 13, 45);
    let mut r = Rng::new(3);
    let (h, g) = (r.vec(seqs * t * m), r.vec(seqs * t * m));
    let part = poisoned(dev, 5 * seqs * m);
    k::channel_stats(dev, &up(dev, &h), &up(dev, &g), &part, seqs, t, m).unwrap();
    let got: Vec<f64> = down(dev, &part).iter().map(|&v| v as f64).collect();
    assert_close64(&got, &stats_ref(&h, &g, seqs, t, m), (1e-5, 1e-4), "part");
}

fn check_channel_stats_bf16<D: Device>(dev: &D) {
    let (seqs, t, m) = (2, 21, 70);
    let mut r = Rng::new(4);
    let (h, g) = (
        round_bf16(&r.vec(seqs * t * m)),
        round_bf16(&r.vec(seqs * t * m)),
    );
    let part = poisoned(dev, 5 * seqs * m);
    k::channel_stats(dev, &up_bf16(dev, &h), &up_bf16(dev, &g), &part, seqs, t, m).unwrap();
    let got: Vec<f64> = down(dev, &part).iter().map(|&v| v as f64).collect();
    // Inputs are exactly representable: only the f32 accumulation differs.
    assert_close64(&got, &stats_ref(&h, &g, seqs, t, m), (1e-5, 1e-4), "part");
}

/// compact.cu moves words: f32 values as u32, bf16 and f16 as u16, bit for bit.
fn check_compact<D: Device>(dev: &D) {
    let (m, d) = (37, 29);
    let mut r = Rng::new(6);
    let keep: Vec<u32> = (0..m as u32).filter(|_| r.below(3) != 0).collect();
    let src = r.vec(m * d);
    let kn = keep.len();
    fn run<D: Device, W: k::Word + PartialEq + std::fmt::Debug>(
        dev: &D,
        src: &[W],
        keep: &[u32],
        (m, d, kn): (usize, usize, usize),
        poison: W,
    ) {
        let rows_ref: Vec<W> = keep
            .iter()
            .flat_map(|&c| src[c as usize * d..][..d].to_vec())
            .collect();
        // down_proj view: src as [d, m].
        let cols_ref: Vec<W> = (0..d)
            .flat_map(|row| keep.iter().map(move |&c| src[row * m + c as usize]))
            .collect();
        let s = DevBuf::upload(dev, src).unwrap();
        let rows = DevBuf::upload(dev, &vec![poison; kn * d]).unwrap();
        let cols = DevBuf::upload(dev, &vec![poison; d * kn]).unwrap();
        k::compact_rows(dev, &s, keep, &rows, m, d).unwrap();
        k::compact_cols(dev, &s, keep, &cols, d, m).unwrap();
        assert_eq!(
            rows.download(dev).unwrap(),
            rows_ref,
            "compact_rows_{}",
            W::NAME
        );
        assert_eq!(
            cols.download(dev).unwrap(),
            cols_ref,
            "compact_cols_{}",
            W::NAME
        );
        // An out-of-range channel is an error, not a wild read.
        assert!(k::compact_rows(dev, &s, &[m as u32], &rows, m, d).is_err());
    }
    let dims = (m, d, kn);
    let f32_bits: Vec<u32> = src.iter().map(|v| v.to_bits()).collect();
    run(dev, &f32_bits, &keep, dims, f32::NAN.to_bits());
    let bf16_bits: Vec<u16> = src.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    run(dev, &bf16_bits, &keep, dims, bf16::NAN.to_bits());
    let f16_bits: Vec<u16> = src.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
    run(dev, &f16_bits, &keep, dims, f16::NAN.to_bits());
}

/// `gather_rows`/`gather_cols` on the CUDA backend (compact.cu) against the
/// CPU backend, byte for byte: 2- and 4-byte elements, odd shapes, one kept
/// index, all kept, kept out of order; bad calls are errors on both.
fn check_backend_gather<D: Device>(be: &CudaBackend<D>) {
    let cpu = CpuBackend::new();
    let mut r = Rng::new(18);
    for (elem, rows, cols) in [(2, 37, 29), (4, 37, 29), (2, 1, 1), (4, 3, 1), (2, 1, 5)] {
        let bytes: Vec<u8> = (0..rows * cols * elem)
            .map(|_| r.below(256) as u8)
            .collect();
        let every = |n: usize| -> Vec<Vec<usize>> {
            vec![
                (0..n).collect(),
                vec![n - 1],
                (0..n).filter(|c| c % 3 != 1).collect(),
                (0..n).rev().collect(),
            ]
        };
        for keep in every(rows) {
            let what = format!("gather_rows {elem}-byte [{rows}, {cols}] keep {keep:?}");
            let want = cpu.gather_rows(&bytes, elem, cols, &keep).unwrap();
            assert_eq!(want.len(), keep.len() * cols * elem, "{what}");
            assert_eq!(
                be.gather_rows(&bytes, elem, cols, &keep).unwrap(),
                want,
                "{what}"
            );
        }
        for keep in every(cols) {
            let what = format!("gather_cols {elem}-byte [{rows}, {cols}] keep {keep:?}");
            let want = cpu.gather_cols(&bytes, elem, cols, &keep).unwrap();
            assert_eq!(want.len(), rows * keep.len() * elem, "{what}");
            assert_eq!(
                be.gather_cols(&bytes, elem, cols, &keep).unwrap(),
                want,
                "{what}"
            );
        }
        // An index out of range, bytes that are not whole rows, other widths.
        let bad: [(&[u8], usize, usize, &[usize], bool); 5] = [
            (&bytes, elem, cols, &[rows], true),
            (&bytes, elem, cols, &[cols], false),
            (&bytes[1..], elem, cols, &[0], true),
            (&bytes, 1, cols * elem, &[0], true),
            (&bytes, 8, cols, &[0], false),
        ];
        for (b, e, c, keep, by_rows) in bad {
            for (name, got) in [
                (
                    "cpu",
                    if by_rows {
                        cpu.gather_rows(b, e, c, keep)
                    } else {
                        cpu.gather_cols(b, e, c, keep)
                    },
                ),
                (
                    be.name(),
                    if by_rows {
                        be.gather_rows(b, e, c, keep)
                    } else {
                        be.gather_cols(b, e, c, keep)
                    },
                ),
            ] {
                let msg = got.expect_err(name).to_string();
                assert!(msg.contains("gather_"), "{name}: {msg}");
            }
        }
    }
}

fn check_rmsnorm<D: Device>(dev: &D) {
    let (rows, d, eps) = (5, 300, 1e-6);
    let mut r = Rng::new(7);
    let (x, w, dy) = (r.vec(rows * d), round_bf16(&r.vec(d)), r.vec(rows * d));
    let (mut y_ref, mut rstd_ref, mut dx_ref) =
        (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows * d]);
    for row in 0..rows {
        let xr = &x[row * d..][..d];
        let ms = xr.iter().map(|v| (v * v) as f64).sum::<f64>() / d as f64;
        let rs = (1.0 / (ms + eps as f64).sqrt()) as f32;
        rstd_ref[row] = rs;
        let dot = (0..d)
            .map(|j| (xr[j] * w[j] * dy[row * d + j]) as f64)
            .sum::<f64>()
            / d as f64;
        for j in 0..d {
            y_ref[row * d + j] = xr[j] * rs * w[j];
            dx_ref[row * d + j] = rs * w[j] * dy[row * d + j] - xr[j] * rs * rs * rs * dot as f32;
        }
    }
    let (gx, gw) = (up(dev, &x), up_bf16(dev, &w));
    let (y, rstd, dx) = (
        poisoned(dev, rows * d),
        poisoned(dev, rows),
        poisoned(dev, rows * d),
    );
    k::rmsnorm_fwd(dev, &gx, &gw, &y, &rstd, rows, d, eps).unwrap();
    k::rmsnorm_bwd(dev, &up(dev, &dy), &gx, &gw, &rstd, &dx, rows, d).unwrap();
    assert_close(&down(dev, &y), &y_ref, F32_TOL, "y");
    assert_close(&down(dev, &rstd), &rstd_ref, F32_TOL, "rstd");
    assert_close(&down(dev, &dx), &dx_ref, F32_TOL, "dx");
}

fn check_embedding<D: Device>(dev: &D) {
    let (vocab, d, rows) = (17, 70, 9);
    let mut r = Rng::new(8);
    let table = round_bf16(&r.vec(vocab * d));
    let ids: Vec<u32> = (0..rows).map(|_| r.below(vocab) as u32).collect();
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&i| table[i as usize * d..][..d].to_vec())
        .collect();
    let out = poisoned(dev, rows * d);
    let gt = up_bf16(dev, &table);
    k::embedding(dev, &ids, &gt, &out, d).unwrap();
    assert_eq!(down(dev, &out), want);
    assert!(k::embedding(dev, &[vocab as u32], &gt, &out, d).is_err());
}

fn check_cast<D: Device>(dev: &D) {
    let mut r = Rng::new(9);
    let mut v: Vec<f32> = r.vec(500).iter().map(|x| x * 1e3).collect();
    // Specials: ties, subnormals of each format, overflow, inf, NaN, signed zero.
    v.extend([
        0.0,
        -0.0,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        65504.0,
        65519.0,
        65520.0,
        1e6,
        6e-8,
        3e-8,
        2.9802322e-8,
        1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
    ]);
    let src = up(dev, &v);
    let b = DevBuf::<D, bf16>::alloc(dev, v.len()).unwrap();
    k::cast(dev, &src, &b).unwrap();
    let bits = |x: &[bf16]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    let want_b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    let got_b = b.download(dev).unwrap();
    for (i, (g, w)) in got_b.iter().zip(&want_b).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "bf16[{i}] of {}",
            v[i]
        );
    }
    let h = DevBuf::<D, f16>::alloc(dev, v.len()).unwrap();
    k::cast(dev, &src, &h).unwrap();
    let got_h = h.download(dev).unwrap();
    for (i, (g, &x)) in got_h.iter().zip(&v).enumerate() {
        let w = f16::from_f32(x);
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "f16[{i}] of {x}: {g} vs {w}"
        );
    }
    // Back to f32: exact.
    let back = poisoned(dev, v.len());
    k::cast(dev, &b, &back).unwrap();
    let want: Vec<f32> = got_b.iter().map(|e| e.to_f32()).collect();
    assert_eq!(bits(&got_b).len(), want.len());
    for (g, w) in down(dev, &back).iter().zip(&want) {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()));
    }
    k::cast(dev, &h, &back).unwrap();
    for (g, w) in down(dev, &back)
        .iter()
        .zip(got_h.iter().map(|e| e.to_f32()))
    {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()));
    }
}

fn check_energy<D: Device>(dev: &D) {
    let (rows, d, scale) = (7, 333, 0.37);
    let mut r = Rng::new(10);
    let z = r.vec(rows * d);
    let part_ref: Vec<f32> = (0..rows)
        .map(|row| 0.5 * scale * z[row * d..][..d].iter().map(|v| v * v).sum::<f32>())
        .collect();
    let gz = up(dev, &z);
    let (part, dz) = (poisoned(dev, rows), poisoned(dev, rows * d));
    k::energy_fwd(dev, &gz, &part, rows, d, scale).unwrap();
    k::energy_bwd(dev, &gz, &dz, scale).unwrap();
    assert_close(&down(dev, &part), &part_ref, F32_TOL, "part");
    let dz_ref: Vec<f32> = z.iter().map(|v| scale * v).collect();
    assert_close(&down(dev, &dz), &dz_ref, F32_TOL, "dz");
}

fn check_add<D: Device>(dev: &D) {
    let n = 1111;
    let mut r = Rng::new(11);
    let (x, y) = (r.vec(n), r.vec(n));
    let gx = up(dev, &x);
    k::add(dev, &gx, &up(dev, &y), n).unwrap();
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_close(&down(dev, &gx), &want, F32_TOL, "add_f32");
    let (xb, yb) = (round_bf16(&x), round_bf16(&y));
    let gxb = up_bf16(dev, &xb);
    k::add(dev, &gxb, &up_bf16(dev, &yb), n).unwrap();
    let want: Vec<f32> = xb.iter().zip(&yb).map(|(a, b)| a + b).collect();
    assert_close(&down_bf16(dev, &gxb), &want, BF16_TOL, "add_bf16");
    let (rows, out) = (11, 101);
    let (ym, bias) = (r.vec(rows * out), round_bf16(&r.vec(out)));
    let gy = up(dev, &ym);
    k::add_bias(dev, &gy, &up_bf16(dev, &bias), rows, out).unwrap();
    let want: Vec<f32> = ym
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % out])
        .collect();
    assert_close(&down(dev, &gy), &want, F32_TOL, "add_bias");
}

fn check_rope<D: Device>(dev: &D) {
    let (seqs, t, heads, hd) = (2, 7, 3, 10);
    let half = hd / 2;
    let rows = seqs * t;
    let mut r = Rng::new(12);
    let x = r.vec(rows * heads * hd);
    let (mut cos, mut sin) = (vec![0.0; t * half], vec![0.0; t * half]);
    for p in 0..t {
        for i in 0..half {
            let th = p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
            cos[p * half + i] = th.cos();
            sin[p * half + i] = th.sin();
        }
    }
    let mut want = x.clone();
    for row in 0..rows {
        let p = row % t;
        for h in 0..heads {
            let v = &mut want[(row * heads + h) * hd..][..hd];
            for i in 0..half {
                let (c, s) = (cos[p * half + i], sin[p * half + i]);
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
    let gx = up(dev, &x);
    let (gc, gs) = (up(dev, &cos), up(dev, &sin));
    k::rope(dev, &gx, &gc, &gs, rows, t, heads, hd, false).unwrap();
    assert_close(&down(dev, &gx), &want, F32_TOL, "rope");
    k::rope(dev, &gx, &gc, &gs, rows, t, heads, hd, true).unwrap();
    assert_close(&down(dev, &gx), &x, F32_TOL, "rope inverse");
}

/// Naive causal GQA attention: (out, lse, dq, dk, dv) in f64.
#[allow(clippy::type_complexity)]
fn attention_ref(
    q: &[f32],
    kk: &[f32],
    v: &[f32],
    dout: &[f32],
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, hh, kvh, hd) = (s.t, s.heads, s.kv_heads, s.head_dim);
    let rows = s.seqs * t;
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut out, mut lse) = (vec![0f64; rows * hh * hd], vec![0f64; s.seqs * hh * t]);
    let (mut dq, mut dk, mut dv) = (
        vec![0f64; rows * hh * hd],
        vec![0f64; rows * kvh * hd],
        vec![0f64; rows * kvh * hd],
    );
    for sq in 0..s.seqs {
        for h in 0..hh {
            let g = h / (hh / kvh);
            let qa = |i: usize| ((sq * t + i) * hh + h) * hd;
            let ka = |j: usize| ((sq * t + j) * kvh + g) * hd;
            for i in 0..t {
                let sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|e| q[qa(i) + e] as f64 * kk[ka(j) + e] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                lse[(sq * hh + h) * t + i] = mx + z.ln();
                let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / z).collect();
                for e in 0..hd {
                    out[qa(i) + e] = (0..=i).map(|j| p[j] * v[ka(j) + e] as f64).sum();
                }
                let dp: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|e| dout[qa(i) + e] as f64 * v[ka(j) + e] as f64)
                            .sum()
                    })
                    .collect();
                let di: f64 = (0..=i).map(|j| p[j] * dp[j]).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - di);
                    for e in 0..hd {
                        dq[qa(i) + e] += scale * ds * kk[ka(j) + e] as f64;
                        dk[ka(j) + e] += scale * ds * q[qa(i) + e] as f64;
                        dv[ka(j) + e] += p[j] * dout[qa(i) + e] as f64;
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    (f(out), f(lse), f(dq), f(dk), f(dv))
}

fn check_attention<D: Device>(dev: &D) {
    check_attention_at(
        dev,
        &[
            AttnShape {
                seqs: 2,
                t: 37,
                heads: 4,
                kv_heads: 2,
                head_dim: 32,
            },
            AttnShape {
                seqs: 1,
                t: 45,
                heads: 3,
                kv_heads: 1,
                head_dim: 64,
            },
        ],
    );
}

/// head_dim 8, the tiny fixtures' (one live accumulator slot on lanes 0..7).
fn check_attention_hd8<D: Device>(dev: &D) {
    check_attention_at(
        dev,
        &[AttnShape {
            seqs: 2,
            t: 33,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        }],
    );
}

/// head_dim 40, not a multiple of 32 (slot 1 live on lanes 0..7 only).
fn check_attention_hd40<D: Device>(dev: &D) {
    check_attention_at(
        dev,
        &[AttnShape {
            seqs: 1,
            t: 40,
            heads: 2,
            kv_heads: 1,
            head_dim: 40,
        }],
    );
}

fn check_attention_at<D: Device>(dev: &D, shapes: &[AttnShape]) {
    for &s in shapes {
        let rows = s.seqs * s.t;
        let mut r = Rng::new(13 + s.head_dim as u64);
        let q = r.vec(rows * s.heads * s.head_dim);
        let kk = r.vec(rows * s.kv_heads * s.head_dim);
        let v = r.vec(rows * s.kv_heads * s.head_dim);
        let dout = r.vec(rows * s.heads * s.head_dim);
        let (out_r, lse_r, dq_r, dk_r, dv_r) = attention_ref(&q, &kk, &v, &dout, s);
        let (gq, gk, gv) = (up(dev, &q), up(dev, &kk), up(dev, &v));
        let (out, lse) = (poisoned(dev, q.len()), poisoned(dev, rows * s.heads));
        k::attention_fwd(dev, &gq, &gk, &gv, &out, &lse, s).unwrap();
        assert_close(&down(dev, &out), &out_r, F32_TOL, "attention out");
        assert_close(&down(dev, &lse), &lse_r, F32_TOL, "attention lse");
        let (dq, dk, dv) = (
            poisoned(dev, q.len()),
            poisoned(dev, kk.len()),
            poisoned(dev, v.len()),
        );
        k::attention_bwd(
            dev,
            &up(dev, &dout),
            &gq,
            &gk,
            &gv,
            &out,
            &lse,
            &dq,
            &dk,
            &dv,
            s,
        )
        .unwrap();
        assert_close(&down(dev, &dq), &dq_r, F32_TOL, "attention dq");
        assert_close(&down(dev, &dk), &dk_r, F32_TOL, "attention dk");
        assert_close(&down(dev, &dv), &dv_r, F32_TOL, "attention dv");
    }
}

/// Inputs of one `attention_cached` call. The caches hold random rows below
/// pos[s] and NaN from pos[s] on: the new rows must land at pos[s]..pos[s]+n,
/// and a row past that read (NaN in the output) or written shows.
struct CacheCase {
    sh: CacheShape,
    pos: Vec<usize>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
}

impl CacheCase {
    fn new(sh: CacheShape, pos: &[usize], seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let (rows, kvd) = (sh.seqs * sh.n, sh.kv_heads * sh.head_dim);
        let mut cache = || {
            let mut c = r.vec(sh.seqs * sh.cap * kvd);
            for (s, &p) in pos.iter().enumerate() {
                c[(s * sh.cap + p) * kvd..(s + 1) * sh.cap * kvd].fill(f32::NAN);
            }
            c
        };
        let (k_cache, v_cache) = (cache(), cache());
        CacheCase {
            sh,
            pos: pos.to_vec(),
            q: r.vec(rows * sh.heads * sh.head_dim),
            k: r.vec(rows * kvd),
            v: r.vec(rows * kvd),
            k_cache,
            v_cache,
        }
    }

    /// The caches after the call: rows pos[s]..pos[s]+n replaced by the new ones.
    fn appended(&self) -> (Vec<f32>, Vec<f32>) {
        let (n, kvd) = (self.sh.n, self.sh.kv_heads * self.sh.head_dim);
        let (mut kc, mut vc) = (self.k_cache.clone(), self.v_cache.clone());
        for (s, &p) in self.pos.iter().enumerate() {
            let at = (s * self.sh.cap + p) * kvd;
            kc[at..at + n * kvd].copy_from_slice(&self.k[s * n * kvd..(s + 1) * n * kvd]);
            vc[at..at + n * kvd].copy_from_slice(&self.v[s * n * kvd..(s + 1) * n * kvd]);
        }
        (kc, vc)
    }

    /// The CPU backend's output.
    fn cpu_out(&self) -> Vec<f32> {
        let (mut kc, mut vc) = (self.k_cache.clone(), self.v_cache.clone());
        CpuBackend::new()
            .attention_cached(
                &self.q, &self.k, &self.v, &mut kc, &mut vc, &self.pos, self.sh,
            )
            .unwrap()
    }
}

/// Bit-for-bit equality (NaN equals the same NaN).
fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g}, want {w}");
    }
}

/// attention_decode.cu against the CPU backend's `attention_cached`, each
/// case with one split (direct output) and several (combine), splits that
/// some sequences never reach, and query tiles of 4 rows left partial.
fn check_attention_cached<D: Device>(dev: &D) {
    let shape = |seqs, n, cap, heads, kv_heads, head_dim| CacheShape {
        seqs,
        n,
        cap,
        heads,
        kv_heads,
        head_dim,
    };
    let cases: [(CacheShape, &[usize], &[usize]); 3] = [
        // Decoding one token at three depths (an empty cache, the last free
        // position of a 71-row prefix); hd 40 is not a multiple of 32.
        (shape(3, 1, 80, 4, 2, 40), &[0, 37, 70], &[32, 64, 96]),
        // A prefill chunk of 5 into non-empty caches, group 3: 15 query rows
        // per kv head, the last block holding 3; hd 8, the tiny fixtures'.
        (shape(2, 5, 60, 6, 2, 8), &[3, 41], &[32, 64]),
        // hd 128 (four accumulator slots per lane), no grouping, n = 2.
        (shape(2, 2, 48, 2, 2, 128), &[33, 5], &[32, 64]),
    ];
    for (sh, pos, splits) in cases {
        let c = CacheCase::new(sh, pos, 40 + sh.head_dim as u64);
        let want = c.cpu_out();
        let (kc_want, vc_want) = c.appended();
        for &split in splits {
            let what = format!("attention_cached {sh:?} split {split}");
            let (kc, vc) = (up(dev, &c.k_cache), up(dev, &c.v_cache));
            let out = poisoned(dev, c.q.len());
            k::attention_cached(
                dev,
                &up(dev, &c.q),
                &up(dev, &c.k),
                &up(dev, &c.v),
                &kc,
                &vc,
                pos,
                &out,
                sh,
                split,
            )
            .unwrap();
            assert_close(&down(dev, &out), &want, F32_TOL, &format!("{what} out"));
            assert_same_bits(&down(dev, &kc), &kc_want, &format!("{what} k_cache"));
            assert_same_bits(&down(dev, &vc), &vc_want, &format!("{what} v_cache"));
        }
    }
}

/// `CudaBackend::attention_cached` (its own choice of split) against the
/// CPU backend over a run of calls on the same caches, as a decoder makes
/// them: a prefill chunk, single tokens, another chunk, then lengths past
/// 64 (two splits) up to the last position; and its argument checks.
fn check_backend_attention_cached<D: Device>(be: &CudaBackend<D>) {
    let cpu = CpuBackend::new();
    let (seqs, cap, heads, kv_heads, head_dim) = (3, 100, 4, 2, 16);
    let kvd = kv_heads * head_dim;
    let mut r = Rng::new(77);
    let (mut kc_want, mut vc_want) = (r.vec(seqs * cap * kvd), r.vec(seqs * cap * kvd));
    let (mut kc, mut vc) = (be.upload(&kc_want).unwrap(), be.upload(&vc_want).unwrap());
    let calls: [(usize, [usize; 3]); 5] = [
        (7, [0, 2, 0]),
        (1, [7, 5, 3]),
        (3, [8, 40, 4]),
        (1, [70, 43, 99]),
        (1, [71, 0, 12]),
    ];
    for (n, pos) in calls {
        let sh = CacheShape {
            seqs,
            n,
            cap,
            heads,
            kv_heads,
            head_dim,
        };
        let (q, kk, v) = (
            r.vec(seqs * n * heads * head_dim),
            r.vec(seqs * n * kvd),
            r.vec(seqs * n * kvd),
        );
        let want = cpu
            .attention_cached(&q, &kk, &v, &mut kc_want, &mut vc_want, &pos, sh)
            .unwrap();
        let (gq, gk, gv) = (
            be.upload(&q).unwrap(),
            be.upload(&kk).unwrap(),
            be.upload(&v).unwrap(),
        );
        let got = be
            .attention_cached(&gq, &gk, &gv, &mut kc, &mut vc, &pos, sh)
            .unwrap();
        let what = format!("{} attention_cached n {n} pos {pos:?}", be.name());
        assert_close(&be.download(&got).unwrap(), &want, F32_TOL, &what);
        assert_same_bits(&be.download(&kc).unwrap(), &kc_want, &what);
        assert_same_bits(&be.download(&vc).unwrap(), &vc_want, &what);
        if n == 1 {
            let err = be
                .attention_cached(&gq, &gk, &gv, &mut kc, &mut vc, &pos[..2], sh)
                .err()
                .unwrap();
            assert!(err.to_string().contains("2 positions for 3"), "{err}");
            let full = [pos[0], pos[1], cap];
            let err = be
                .attention_cached(&gq, &gk, &gv, &mut kc, &mut vc, &full, sh)
                .err()
                .unwrap();
            assert!(err.to_string().contains("KV cache full"), "{err}");
        }
    }
}

/// The split policy: one sequence of Qwen2.5-7B decoding at 2048 cached
/// positions is cut into 32 splits of 64 keys (256 blocks); a 512-token
/// prefill chunk already fills the GPU and gets one split.
#[test]
fn decode_split_policy() {
    let sh = CacheShape {
        seqs: 1,
        n: 1,
        cap: 4096,
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
    };
    assert_eq!(k::decode_split(sh, &[2047]), 64);
    assert_eq!(k::decode_split(sh, &[0]), 64);
    assert_eq!(k::decode_split(CacheShape { n: 512, ..sh }, &[1024]), 1536);
    assert_eq!(
        k::decode_split(CacheShape { seqs: 64, ..sh }, &[2047; 64]),
        2048
    );
}

/// Column-major C = alpha·op(A)·op(B) + beta·C per batch, by plain loops.
fn gemm_ref(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    for bi in 0..g.batch {
        for j in 0..g.n {
            for i in 0..g.m {
                let mut s = 0f64;
                for l in 0..g.k {
                    let av = if g.trans_a {
                        a[bi * g.stride_a + l + i * g.lda]
                    } else {
                        a[bi * g.stride_a + i + l * g.lda]
                    };
                    let bv = if g.trans_b {
                        b[bi * g.stride_b + j + l * g.ldb]
                    } else {
                        b[bi * g.stride_b + l + j * g.ldb]
                    };
                    s += av as f64 * bv as f64;
                }
                let ci = bi * g.stride_c + i + j * g.ldc;
                c[ci] = g.alpha * s as f32 + if g.beta == 0.0 { 0.0 } else { g.beta * c[ci] };
            }
        }
    }
}

fn check_gemm<D: Device>(dev: &D) {
    let mut r = Rng::new(14);
    let (m, n, kk, batch) = (13, 7, 11, 3);
    for (ta, tb, ab, beta) in [
        (false, false, GemmType::F32, 0.0),
        (true, false, GemmType::F32, 0.5),
        (false, true, GemmType::F32, 0.0),
        (true, true, GemmType::F32, -1.0),
        (true, false, GemmType::Bf16, 0.0),
        (false, true, GemmType::Bf16, 1.0),
    ] {
        let (ra, ca) = if ta { (kk, m) } else { (m, kk) };
        let (rb, cb) = if tb { (n, kk) } else { (kk, n) };
        let (lda, ldb, ldc) = (ra + 3, rb + 1, m + 2);
        let (sa, sb, sc) = (lda * ca + 5, ldb * cb + 2, ldc * n + 1);
        let mut a = r.vec(sa * batch);
        let mut b = r.vec(sb * batch);
        if ab == GemmType::Bf16 {
            a = round_bf16(&a);
            b = round_bf16(&b);
        }
        let c0 = r.vec(sc * batch);
        let (ga, gb) = match ab {
            GemmType::F32 => (up(dev, &a).addr_keep(), up(dev, &b).addr_keep()),
            GemmType::Bf16 => (up_bf16(dev, &a).addr_keep(), up_bf16(dev, &b).addr_keep()),
        };
        let gc = up(dev, &c0);
        let g = Gemm {
            trans_a: ta,
            trans_b: tb,
            m,
            n,
            k: kk,
            alpha: 0.75,
            a: ga.addr(dev),
            lda,
            stride_a: sa,
            b: gb.addr(dev),
            ldb,
            stride_b: sb,
            beta,
            c: gc.addr(dev),
            ldc,
            stride_c: sc,
            batch,
            ab,
        };
        unsafe { dev.gemm(&g) }.unwrap();
        let mut want = c0.clone();
        gemm_ref(&g, &a, &b, &mut want);
        assert_close(
            &down(dev, &gc),
            &want,
            (1e-4, 1e-4),
            &format!("gemm {ta} {tb} {ab:?}"),
        );
    }
}

/// Keeps an uploaded operand alive whatever its dtype.
enum Operand<D: Device> {
    F(DevBuf<D, f32>),
    B(DevBuf<D, bf16>),
}
impl<D: Device> Operand<D> {
    fn addr(&self, dev: &D) -> u64 {
        match self {
            Operand::F(b) => b.addr(dev),
            Operand::B(b) => b.addr(dev),
        }
    }
}
trait Keep<D: Device> {
    fn addr_keep(self) -> Operand<D>;
}
impl<D: Device> Keep<D> for DevBuf<D, f32> {
    fn addr_keep(self) -> Operand<D> {
        Operand::F(self)
    }
}
impl<D: Device> Keep<D> for DevBuf<D, bf16> {
    fn addr_keep(self) -> Operand<D> {
        Operand::B(self)
    }
}

fn check_backend_linear<D: Device>(be: &CudaBackend<D>) {
    let (rows, inp, out) = (5, 19, 23);
    let mut r = Rng::new(15);
    let (x, w, bias, dy) = (
        r.vec(rows * inp),
        r.vec(out * inp),
        r.vec(out),
        r.vec(rows * out),
    );
    let (xb, wb, bb) = (round_bf16(&x), round_bf16(&w), round_bf16(&bias));
    let gw = be.upload_weight(&w).unwrap();
    let gb = be.upload_weight(&bias).unwrap();
    let y = be
        .linear(&be.upload(&x).unwrap(), &gw, Some(&gb), rows, inp, out)
        .unwrap();
    let mut want = vec![0f32; rows * out];
    for i in 0..rows {
        for o in 0..out {
            want[i * out + o] = (0..inp)
                .map(|j| xb[i * inp + j] * wb[o * inp + j])
                .sum::<f32>()
                + bb[o];
        }
    }
    assert_close(&be.download(&y).unwrap(), &want, F32_TOL, "linear");
    let dx = be
        .linear_bwd_input(&be.upload(&dy).unwrap(), &gw, rows, inp, out)
        .unwrap();
    let dyb = round_bf16(&dy);
    let mut want = vec![0f32; rows * inp];
    for i in 0..rows {
        for j in 0..inp {
            want[i * inp + j] = (0..out).map(|o| dyb[i * out + o] * wb[o * inp + j]).sum();
        }
    }
    assert_close(
        &be.download(&dx).unwrap(),
        &want,
        F32_TOL,
        "linear_bwd_input",
    );
    // Every temporary is freed again.
    drop((y, dx, gw, gb));
    assert_eq!(be.device().mem_stats().current, 0);
    assert!(be.device().mem_stats().high_water > 0);
}

fn check_cross_entropy<D: Device>(be: &CudaBackend<D>) {
    // Vocabulary 30 in chunks of 7 (see on_backends!): four full chunks and a short one.
    let (rows, d, vocab, scale) = (6, 33, 30, 0.25);
    let mut r = Rng::new(16);
    let (z, w) = (r.vec(rows * d), r.vec(vocab * d));
    let mut targets: Vec<u32> = (0..rows).map(|_| r.below(vocab) as u32).collect();
    targets[2] = u32::MAX;
    let (zb, wb) = (round_bf16(&z), round_bf16(&w));
    let (mut nll, mut count, mut dz) = (0f64, 0usize, vec![0f32; rows * d]);
    for i in 0..rows {
        let l: Vec<f64> = (0..vocab)
            .map(|v| {
                (0..d)
                    .map(|e| zb[i * d + e] as f64 * wb[v * d + e] as f64)
                    .sum()
            })
            .collect();
        if targets[i] == u32::MAX {
            continue;
        }
        let mx = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lz = mx + l.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        nll += lz - l[targets[i] as usize];
        count += 1;
        for v in 0..vocab {
            let g = (l[v] - lz).exp() - if v == targets[i] as usize { 1.0 } else { 0.0 };
            for e in 0..d {
                dz[i * d + e] += (scale as f64 * g * wb[v * d + e] as f64) as f32;
            }
        }
    }
    let gw = be.upload_weight(&w).unwrap();
    let (got_nll, got_count, got_dz) = be
        .cross_entropy(
            &be.upload(&z).unwrap(),
            &gw,
            &targets,
            rows,
            d,
            vocab,
            scale,
            true,
        )
        .unwrap();
    assert_eq!(got_count, count);
    assert!(
        (got_nll - nll).abs() <= 1e-4 * nll.abs(),
        "nll {got_nll} vs {nll}"
    );
    // dlogits is rounded to bf16 before the product with W.
    assert_close(
        &be.download(&got_dz.unwrap()).unwrap(),
        &dz,
        BF16_TOL,
        "ce dz",
    );
    let (nll2, _, none) = be
        .cross_entropy(
            &be.upload(&z).unwrap(),
            &gw,
            &targets,
            rows,
            d,
            vocab,
            scale,
            false,
        )
        .unwrap();
    assert!(none.is_none() && nll2 == got_nll);
}

fn check_backend_channel_stats<D: Device>(be: &CudaBackend<D>) {
    let (seqs, t, m) = (2, 9, 40);
    let mut r = Rng::new(17);
    let (h, g) = (r.vec(seqs * t * m), r.vec(seqs * t * m));
    let p = be
        .channel_stats(&be.upload(&h).unwrap(), &be.upload(&g).unwrap(), seqs, t, m)
        .unwrap();
    let want = stats_ref(&h, &g, seqs, t, m);
    let total = |k: usize| {
        (0..m)
            .map(|c| (0..seqs).map(|s| want[k * seqs * m + s * m + c]).sum())
            .collect::<Vec<f64>>()
    };
    let tol = (1e-5, 1e-4);
    assert_close64(&p.s1, &total(0), tol, "s1");
    assert_close64(&p.s2, &total(1), tol, "s2");
    assert_close64(&p.f2, &total(2), tol, "f2");
    assert_close64(&p.k1, &total(3), tol, "k1");
    assert_close64(&p.hg_seq, &want[4 * seqs * m..], tol, "hg_seq");
    let (j, dz) = be
        .energy(&be.upload(&h).unwrap(), seqs * t, m, 0.5)
        .unwrap();
    let j_ref: f64 = h.iter().map(|&v| 0.25 * (v as f64) * (v as f64)).sum();
    assert!((j - j_ref).abs() <= 1e-5 * j_ref);
    assert_eq!(be.download(&dz).unwrap().len(), h.len());
}

#[test]
fn ptxas_no_spills_no_stack() {
    let Some(log) = PTXAS_LOG else {
        eprintln!("ptxas check skipped: built without nvcc (no fatbin)");
        return;
    };
    assert!(has_kernels());
    let mut entries = 0;
    let mut current = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().unwrap_or("").to_string();
            entries += 1;
        }
        if line.contains("bytes stack frame") {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            assert_eq!(
                nums,
                vec![0, 0, 0],
                "{current}: stack frame / spills: {line}"
            );
        }
    }
    assert!(entries > 0, "no entry functions in the ptxas log");
}

/// Every `Backend` op on `be` over fixed random inputs: `(name, output, tolerance)`.
/// Inputs that meet a matrix product are bf16-exact, so the CUDA backend's
/// rounding of its activation operand changes nothing; only cross-entropy's
/// dlogits (rounded to bf16 before its product with W) needs the bf16 tolerance.
fn all_ops<B: Backend>(be: &B) -> Vec<(&'static str, Vec<f32>, (f32, f32))> {
    let tol = (1e-4, 1e-3);
    let (seqs, t, d, m, vocab) = (2, 11, 64, 40, 29);
    let s = AttnShape {
        seqs,
        t,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    let rows = seqs * t;
    let mut r = Rng::new(99);
    let mut bf = |n: usize| round_bf16(&r.vec(n));
    let (x, w, bias, wg, emb, lm) = (
        bf(rows * d),
        bf(m * d),
        bf(m),
        bf(d),
        bf(vocab * d),
        bf(vocab * d),
    );
    let (dy, q, kv, dh) = (bf(rows * m), bf(rows * 128), bf(rows * 64), bf(rows * m));
    let (v2, dyn_) = (bf(rows * 64), bf(rows * d));
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % vocab as u32).collect();
    let mut targets: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 5 + 3) % vocab as u32)
        .collect();
    targets[rows - 1] = u32::MAX;
    let mut cos = vec![0.0; t * 16];
    let mut sin = vec![0.0; t * 16];
    for (i, (c, sn)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        let th = (i / 16) as f32 * 0.3 / (1.0 + (i % 16) as f32);
        (*c, *sn) = (th.cos(), th.sin());
    }
    let up = |v: &[f32]| be.upload(v).unwrap();
    let dl = |b: &B::Buf| be.download(b).unwrap();
    let mut out = Vec::new();
    let (gx, gw, gb) = (
        up(&x),
        be.upload_weight(&w).unwrap(),
        be.upload_weight(&bias).unwrap(),
    );
    let y = be.linear(&gx, &gw, Some(&gb), rows, d, m).unwrap();
    out.push(("linear", dl(&y), tol));
    out.push((
        "linear_bwd_input",
        dl(&be.linear_bwd_input(&up(&dy), &gw, rows, d, m).unwrap()),
        tol,
    ));
    let e = be
        .embedding(&ids, &be.upload_weight(&emb).unwrap(), d)
        .unwrap();
    out.push(("embedding", dl(&e), tol));
    let gwg = be.upload_weight(&wg).unwrap();
    let (yn, rstd) = be.rmsnorm_fwd(&gx, &gwg, rows, d, 1e-5).unwrap();
    out.push(("rmsnorm_fwd", dl(&yn), tol));
    out.push(("rmsnorm_rstd", dl(&rstd), tol));
    let dx = be
        .rmsnorm_bwd(&up(&dyn_), &gx, &gwg, &rstd, rows, d)
        .unwrap();
    out.push(("rmsnorm_bwd", dl(&dx), tol));
    let (gc, gs) = (up(&cos), up(&sin));
    let mut gq = up(&q);
    be.rope(&mut gq, &gc, &gs, seqs, t, 4, 32, false).unwrap();
    out.push(("rope", dl(&gq), tol));
    let mut gq2 = up(&q);
    be.rope(&mut gq2, &gc, &gs, seqs, t, 4, 32, true).unwrap();
    out.push(("rope_inverse", dl(&gq2), tol));
    let (gk, gv) = (up(&kv), up(&v2));
    let (ao, lse) = be.attention_fwd(&gq, &gk, &gv, s).unwrap();
    out.push(("attention_out", dl(&ao), tol));
    out.push(("attention_lse", dl(&lse), tol));
    let (dq, dk, dv) = be
        .attention_bwd(&up(&q), &gq, &gk, &gv, &ao, &lse, s)
        .unwrap();
    out.push(("attention_dq", dl(&dq), tol));
    out.push(("attention_dk", dl(&dk), tol));
    out.push(("attention_dv", dl(&dv), tol));
    // Decoding: 3 new tokens per sequence after 4 and 9 cached positions.
    let csh = CacheShape {
        seqs,
        n: 3,
        cap: 16,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    let new_rows = seqs * csh.n;
    let (mut kc, mut vc) = (up(&bf(seqs * 16 * 64)), up(&bf(seqs * 16 * 64)));
    let ac = be
        .attention_cached(
            &up(&q[..new_rows * 128]),
            &up(&kv[..new_rows * 64]),
            &up(&v2[..new_rows * 64]),
            &mut kc,
            &mut vc,
            &[4, 9],
            csh,
        )
        .unwrap();
    out.push(("attention_cached", dl(&ac), tol));
    out.push(("attention_cached_k_cache", dl(&kc), tol));
    out.push(("attention_cached_v_cache", dl(&vc), tol));
    let (ga, gbb) = (up(&dy), up(&dh));
    let h = be.swiglu_fwd(&ga, &gbb, rows * m).unwrap();
    out.push(("swiglu_fwd", dl(&h), tol));
    let (da, db) = be.swiglu_bwd(&up(&dl(&y)), &ga, &gbb, rows * m).unwrap();
    out.push(("swiglu_da", dl(&da), tol));
    out.push(("swiglu_db", dl(&db), tol));
    let mut acc = up(&dy);
    be.add_assign(&mut acc, &gbb, rows * m).unwrap();
    out.push(("add_assign", dl(&acc), tol));
    let p = be.channel_stats(&h, &da, seqs, t, m).unwrap();
    for (name, v) in [
        ("s1", &p.s1),
        ("s2", &p.s2),
        ("f2", &p.f2),
        ("k1", &p.k1),
        ("hg_seq", &p.hg_seq),
    ] {
        out.push((name, v.iter().map(|&e| e as f32).collect(), tol));
    }
    let (j, dz) = be.energy(&gx, rows, d, 0.1).unwrap();
    out.push(("energy_j", vec![j as f32], tol));
    out.push(("energy_dz", dl(&dz), tol));
    let z = up(&x);
    let (nll, count, gz) = be
        .cross_entropy(
            &z,
            &be.upload_weight(&lm).unwrap(),
            &targets,
            rows,
            d,
            vocab,
            0.5,
            true,
        )
        .unwrap();
    out.push(("ce_nll", vec![nll as f32, count as f32], tol));
    out.push(("ce_dz", dl(&gz.unwrap()), BF16_TOL));
    out
}

#[test]
fn backend_ops_match_cpu_backend() {
    let want = all_ops(&CpuBackend::new());
    let mut backends: Vec<(&str, Vec<_>)> =
        vec![("cuda-emu", all_ops(&CudaBackend::new(EmuDevice::new())))];
    match GpuDevice::new(0) {
        Ok(g) => backends.push(("cuda", all_ops(&CudaBackend::new(g)))),
        Err(e) => eprintln!("GPU comparison skipped: {e}"),
    }
    for (label, got) in backends {
        for ((name, g, tol), (_, w, _)) in got.iter().zip(&want) {
            assert_close(g, w, *tol, &format!("{label} {name}"));
        }
    }
}

#[test]
fn gpu_device_errs_instead_of_panicking() {
    match GpuDevice::new(0) {
        Ok(g) => eprintln!("GPU present: {}", g.device_name()),
        Err(e) => {
            let msg = e.to_string();
            if !has_kernels() {
                assert!(msg.contains("built without kernels"), "{msg}");
            }
            eprintln!("no GPU: {msg}");
        }
    }
}

/// Buffers freed while kernels that read them are still queued, and their
/// memory handed out again at once (the GPU's stream-ordered pool), keep
/// what those kernels read; uploads on the copy stream (`upload_async`)
/// issued between such frees land intact; live bytes return to where they
/// started. Own devices: the shared `gpu()` would see other tests' bytes.
fn check_memory_reuse<D: Device>(dev: &D, n: usize) {
    let base = dev.mem_stats().current;
    let a = Rng::new(31).vec(n);
    let mut kept = Vec::new();
    for round in 0..6 {
        let vals: Vec<f32> = a.iter().map(|x| x + round as f32).collect();
        let x = DevBuf::<D, f32>::zeros(dev, n).unwrap();
        let y = up(dev, &vals);
        k::add(dev, &x, &y, n).unwrap();
        drop(y); // the add may not have run yet
        let junk = up(dev, &vec![f32::NAN; n]); // likely y's block
        let w = DevBuf::upload_async(dev, &vals).unwrap();
        k::add(dev, &junk, &x, n).unwrap();
        drop(junk);
        kept.push((x, w, vals));
    }
    dev.upload_fence().unwrap();
    for (round, (x, w, vals)) in kept.iter().enumerate() {
        assert!(down(dev, x) == *vals, "round {round}: add after free");
        assert!(down(dev, w) == *vals, "round {round}: upload_async");
    }
    drop(kept);
    dev.synchronize().unwrap();
    assert_eq!(dev.mem_stats().current, base);
}

#[test]
fn memory_reuse_in_stream_order() {
    check_memory_reuse(&EmuDevice::new(), 5003);
    match gpu() {
        Some(_) => check_memory_reuse(&GpuDevice::new(0).unwrap(), (1 << 24) + 3),
        None => eprintln!("memory_reuse_in_stream_order: GPU run skipped (no GPU device)"),
    }
}

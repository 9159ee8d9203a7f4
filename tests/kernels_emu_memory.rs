//! Data movement on the emulated device (and on a GPU when one answers):
//! compact.cu's word gathers and the backends' `gather_rows`/`gather_cols`
//! built on them (against tests/common/naive.rs and the CPU backend, bit
//! for bit), embedding.cu, cast.cu (rounding of every special value), and
//! device memory reused in stream order.
mod common;
use common::naive::{self, f32s, f64s};
use common::ops::*;
use half::{bf16, f16};
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{kernels as k, CudaBackend, DevBuf, Device, EmuDevice, GpuDevice};
use rku_engine::backend::Backend;

on_devices! {
    compact_words => check_compact,
    embedding_bf16 => check_embedding,
    cast_all => check_cast,
}

on_backends! {
    backend_gather_matches_naive => check_backend_gather,
}

/// compact.cu moves words: f32 values as u32, bf16 and f16 as u16, bit for bit.
fn check_compact<D: Device>(dev: &D) {
    let (m, d) = (37, 29);
    // About two thirds of the channels, in order.
    let keep: Vec<u32> = (0..m as u32)
        .zip(indices(m, 3, 1))
        .filter(|&(_, draw)| draw != 0)
        .map(|(c, _)| c)
        .collect();
    let src = uniform(m * d, 2);
    let kn = keep.len();
    fn run<D: Device, W: k::Word>(
        dev: &D,
        src: &[W],
        keep: &[u32],
        (m, d, kn): (usize, usize, usize),
        poison: W,
    ) {
        let (bytes, elem) = (bytemuck::cast_slice(src), std::mem::size_of::<W>());
        let keep_idx: Vec<usize> = keep.iter().map(|&c| c as usize).collect();
        // gate/up view: src as [m, d]; down_proj view: src as [d, m].
        let rows_ref = naive::gather_rows(bytes, elem, d, &keep_idx);
        let cols_ref = naive::gather_cols(bytes, elem, m, &keep_idx);
        let s = DevBuf::upload(dev, src).unwrap();
        let rows = DevBuf::upload(dev, &vec![poison; kn * d]).unwrap();
        let cols = DevBuf::upload(dev, &vec![poison; d * kn]).unwrap();
        k::compact_rows(dev, &s, keep, &rows, m, d).unwrap();
        k::compact_cols(dev, &s, keep, &cols, d, m).unwrap();
        let what = W::NAME;
        assert!(
            rows.download_bytes(dev).unwrap() == rows_ref,
            "compact_rows_{what}"
        );
        assert!(
            cols.download_bytes(dev).unwrap() == cols_ref,
            "compact_cols_{what}"
        );
        // An out-of-range channel is an error, not a wild read.
        assert!(k::compact_rows(dev, &s, &[m as u32], &rows, m, d).is_err());
        assert!(k::compact_cols(dev, &s, &[m as u32], &cols, d, m).is_err());
    }
    let dims = (m, d, kn);
    let f32_bits: Vec<u32> = src.iter().map(|v| v.to_bits()).collect();
    run(dev, &f32_bits, &keep, dims, f32::NAN.to_bits());
    let bf16_bits: Vec<u16> = src.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    run(dev, &bf16_bits, &keep, dims, bf16::NAN.to_bits());
    let f16_bits: Vec<u16> = src.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
    run(dev, &f16_bits, &keep, dims, f16::NAN.to_bits());
}

/// `gather_rows` (`by_rows`) or `gather_cols` on `be`.
fn gather<B: Backend>(
    be: &B,
    by_rows: bool,
    bytes: &[u8],
    elem: usize,
    cols: usize,
    keep: &[usize],
) -> rku_engine::Result<Vec<u8>> {
    if by_rows {
        be.gather_rows(bytes, elem, cols, keep)
    } else {
        be.gather_cols(bytes, elem, cols, keep)
    }
}

/// `gather_rows`/`gather_cols` on the CUDA backend (compact.cu) and on the
/// CPU backend against the naive gathers, byte for byte: 2- and 4-byte
/// elements, odd shapes, every index kept, one kept, an irregular subset,
/// all in reverse; bad calls are errors on both backends, not panics.
fn check_backend_gather<D: Device>(be: &CudaBackend<D>) {
    let cpu = CpuBackend::new();
    let shapes = [(2, 37, 29), (4, 37, 29), (2, 1, 1), (4, 3, 1), (2, 1, 5)];
    for (case, (elem, rows, cols)) in shapes.into_iter().enumerate() {
        let bytes: Vec<u8> = indices(rows * cols * elem, 256, 20 + case as u64)
            .iter()
            .map(|&b| b as u8)
            .collect();
        for (by_rows, n) in [(true, rows), (false, cols)] {
            let keeps: [Vec<usize>; 4] = [
                (0..n).collect(),
                vec![n - 1],
                (0..n).filter(|c| c % 3 != 1).collect(),
                (0..n).rev().collect(),
            ];
            for keep in keeps {
                let what = format!("rows {by_rows} {elem}-byte [{rows}, {cols}] keep {keep:?}");
                let want = if by_rows {
                    naive::gather_rows(&bytes, elem, cols, &keep)
                } else {
                    naive::gather_cols(&bytes, elem, cols, &keep)
                };
                let got = gather(&cpu, by_rows, &bytes, elem, cols, &keep).unwrap();
                assert!(got == want, "cpu gather {what}");
                let got = gather(be, by_rows, &bytes, elem, cols, &keep).unwrap();
                assert!(got == want, "{} gather {what}", be.name());
            }
        }
        // (bytes, elem, cols, keep, by rows): an index out of range either
        // way, bytes that are not whole rows, unsupported widths.
        let bad = [
            (&bytes[..], elem, cols, vec![rows], true),
            (&bytes[..], elem, cols, vec![0, cols], false),
            (&bytes[1..], elem, cols, vec![0], true),
            (&bytes[1..], elem, cols, vec![0], false),
            (&bytes[..], 1, cols * elem, vec![0], true),
            (&bytes[..], 8, cols, vec![0], false),
        ];
        for (b, e, c, keep, by_rows) in bad {
            for (name, got) in [
                ("cpu", gather(&cpu, by_rows, b, e, c, &keep)),
                (be.name(), gather(be, by_rows, b, e, c, &keep)),
            ] {
                let msg = got.expect_err(name).to_string();
                assert!(msg.contains("gather_"), "{name}: {msg}");
            }
        }
    }
}

fn check_embedding<D: Device>(dev: &D) {
    let (vocab, d, rows) = (17, 70, 9);
    let table = round_bf16(&uniform(vocab * d, 3));
    let ids: Vec<u32> = indices(rows, vocab, 4).iter().map(|&i| i as u32).collect();
    let want = f32s(&naive::embedding(&ids, &f64s(&table), d));
    let out = poisoned(dev, rows * d);
    let gt = up_bf16(dev, &table);
    k::embedding(dev, &ids, &gt, &out, d, 1.0).unwrap();
    assert_eq!(down(dev, &out), want);
    // Gemma 3's √hidden: one f32 product per element.
    let scale = (640f64).sqrt() as f32;
    let out = poisoned(dev, rows * d);
    k::embedding(dev, &ids, &gt, &out, d, scale).unwrap();
    let scaled: Vec<f32> = want.iter().map(|&x| x * scale).collect();
    assert_eq!(down(dev, &out), scaled);
    assert!(k::embedding(dev, &[vocab as u32], &gt, &out, d, 1.0).is_err());
}

fn check_cast<D: Device>(dev: &D) {
    let mut v: Vec<f32> = uniform(500, 5).iter().map(|x| x * 1e3).collect();
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

/// Buffers freed while kernels that read them are still queued, and their
/// memory handed out again at once (the GPU's stream-ordered pool), keep
/// what those kernels read; uploads on the copy stream (`upload_async`)
/// issued between such frees land intact; live bytes return to where they
/// started. Own devices: the shared `gpu()` would see other tests' bytes.
fn check_memory_reuse<D: Device>(dev: &D, n: usize) {
    let base = dev.mem_stats().current;
    let a = uniform(n, 6);
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

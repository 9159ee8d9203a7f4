//! Criterion benchmarks of the CUDA kernels, each reporting achieved bytes/s
//! (criterion's "thrpt") next to its time, so the distance to the memory
//! floor stated at the top of each .cu file is visible. Runs on the emulated
//! device with tiny shapes (a block's CUDA threads as fibers on one OS
//! thread: these numbers measure the emulation, not a GPU) and, when a GPU answers, on the GPU with
//! one Qwen2.5-7B layer's shapes.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use rku_engine::backend::cuda::backend::CE_CHUNK;
use rku_engine::backend::cuda::{kernels as k, DevBuf, Device, EmuDevice, GpuDevice};
use rku_engine::backend::{AdamwStep, AttnShape, CacheShape, GluAct};
use std::time::Duration;

/// Shapes of one run: FFN rows × width, hidden size, vocabulary chunk of
/// the losses, attention, and KV-cache decoding with `cached` positions
/// already in every sequence; `window`: the sliding window of the windowed
/// attention entries (decoding into a ring of n + window − 1 slots).
struct Shapes {
    rows: usize,
    m: usize,
    d: usize,
    vc: usize,
    attn: AttnShape,
    cache: CacheShape,
    cached: usize,
    window: usize,
}

fn filled<D: Device>(dev: &D, n: usize) -> DevBuf<D, f32> {
    let v: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
    DevBuf::upload(dev, &v).unwrap()
}

fn bench_device<D: Device>(c: &mut Criterion, dev: &D, s: &Shapes) {
    let label = dev.backend_name();
    let mut g = c.benchmark_group(format!("kernels/{label}"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1));
    let n = s.rows * s.m;
    let (a, b, h) = (filled(dev, n), filled(dev, n), filled(dev, n));
    let (da, db) = (filled(dev, n), filled(dev, n));

    g.throughput(Throughput::BytesDecimal(3 * 4 * n as u64));
    for (act, name) in [(GluAct::Silu, "swiglu"), (GluAct::GeluTanh, "geglu")] {
        g.throughput(Throughput::BytesDecimal(3 * 4 * n as u64));
        g.bench_function(BenchmarkId::new(format!("{name}_fwd_f32"), n), |it| {
            it.iter(|| {
                k::swiglu_fwd(dev, act, &a, &b, &h).unwrap();
                dev.synchronize().unwrap()
            })
        });
        g.throughput(Throughput::BytesDecimal(5 * 4 * n as u64));
        g.bench_function(BenchmarkId::new(format!("{name}_bwd_f32"), n), |it| {
            it.iter(|| {
                k::swiglu_bwd(dev, act, &h, &a, &b, &da, &db).unwrap();
                dev.synchronize().unwrap()
            })
        });
    }
    let part = filled(dev, 5 * s.m);
    g.throughput(Throughput::BytesDecimal((2 * 4 * n + 20 * s.m) as u64));
    g.bench_function(BenchmarkId::new("channel_stats_f32", n), |it| {
        it.iter(|| {
            k::channel_stats(dev, &a, &b, &part, 1, s.rows, s.m).unwrap();
            dev.synchronize().unwrap()
        })
    });
    // The prompt rows of a trace: every other row zeroed.
    let keep: Vec<bool> = (0..s.rows).map(|r| r % 2 == 1).collect();
    g.throughput(Throughput::BytesDecimal((4 * (s.rows / 2) * s.m) as u64));
    g.bench_function(BenchmarkId::new("zero_rows_f32", n), |it| {
        it.iter(|| {
            k::zero_rows(dev, &da, s.m, &keep).unwrap();
            dev.synchronize().unwrap()
        })
    });
    let wb = DevBuf::<D, bf16>::alloc(dev, n).unwrap();
    g.throughput(Throughput::BytesDecimal(6 * n as u64));
    g.bench_function(BenchmarkId::new("cast_f32_to_bf16", n), |it| {
        it.iter(|| {
            k::cast(dev, &a, &wb).unwrap();
            dev.synchronize().unwrap()
        })
    });
    // bf16 weights move as u16 words.
    let words = DevBuf::<D, u16>::alloc(dev, n).unwrap();
    let keep: Vec<u32> = (0..s.rows as u32).step_by(2).collect();
    let dst = DevBuf::<D, u16>::alloc(dev, keep.len() * s.m).unwrap();
    g.throughput(Throughput::BytesDecimal((2 * 2 * keep.len() * s.m) as u64));
    g.bench_function(
        BenchmarkId::new("compact_rows_u16", keep.len() * s.m),
        |it| it.iter(|| k::compact_rows(dev, &words, &keep, &dst, s.rows, s.m).unwrap()),
    );
    let (x, y, rstd) = (
        filled(dev, s.rows * s.d),
        filled(dev, s.rows * s.d),
        filled(dev, s.rows),
    );
    let w = DevBuf::<D, bf16>::upload(dev, &vec![bf16::ONE; s.d]).unwrap();
    g.throughput(Throughput::BytesDecimal((2 * 4 * s.rows * s.d) as u64));
    g.bench_function(BenchmarkId::new("rmsnorm_fwd_f32", s.rows * s.d), |it| {
        it.iter(|| {
            k::rmsnorm_fwd(dev, &x, &w, &y, &rstd, s.rows, s.d, 1e-6).unwrap();
            dev.synchronize().unwrap()
        })
    });
    // Qwen3's per-head q/k norm: the same launch over rows of head_dim 128
    // (one block of 256 threads per head row, half of them idle).
    let hd = 128;
    let head_rows = s.rows * s.d / hd;
    let rstd_h = filled(dev, head_rows);
    let wh = DevBuf::<D, bf16>::upload(dev, &vec![bf16::ONE; hd]).unwrap();
    g.throughput(Throughput::BytesDecimal((2 * 4 * head_rows * hd) as u64));
    g.bench_function(
        BenchmarkId::new("rmsnorm_fwd_f32_head_rows", head_rows * hd),
        |it| {
            it.iter(|| {
                k::rmsnorm_fwd(dev, &x, &wh, &y, &rstd_h, head_rows, hd, 1e-6).unwrap();
                dev.synchronize().unwrap()
            })
        },
    );
    // The distillation KL over one vocabulary chunk of every row, all rows counted.
    let (ls, lt) = (filled(dev, s.rows * s.vc), filled(dev, s.rows * s.vc));
    let counted = DevBuf::<D, u32>::upload(dev, &vec![1; s.rows]).unwrap();
    let (m_s, m_t) = (filled(dev, s.rows), filled(dev, s.rows));
    let (s_s, s_t, acc) = (
        DevBuf::<D, f32>::upload(dev, &vec![1.0; s.rows]).unwrap(),
        DevBuf::<D, f32>::upload(dev, &vec![1.0; s.rows]).unwrap(),
        filled(dev, s.rows),
    );
    let st = k::KlStats {
        m_s: &m_s,
        s_s: &s_s,
        m_t: &m_t,
        s_t: &s_t,
        a: &acc,
    };
    g.throughput(Throughput::BytesDecimal((2 * 4 * s.rows * s.vc) as u64));
    g.bench_function(BenchmarkId::new("kl_stats_f32", s.rows * s.vc), |it| {
        it.iter(|| {
            k::kl_stats(dev, &ls, &lt, &counted, &st, s.rows, s.vc).unwrap();
            dev.synchronize().unwrap()
        })
    });
    // In place: every iteration turns the student chunk's values into p_s − p_t.
    g.throughput(Throughput::BytesDecimal((3 * 4 * s.rows * s.vc) as u64));
    g.bench_function(BenchmarkId::new("kl_grad_f32", s.rows * s.vc), |it| {
        it.iter(|| {
            k::kl_grad(dev, &ls, &lt, &counted, &st, s.rows, s.vc, 1.0).unwrap();
            dev.synchronize().unwrap()
        })
    });
    // The optimiser over rows·m parameters: p = h, g = a, m = b (all finite).
    let step = AdamwStep {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 10,
        grad_scale: 1.0,
    };
    let vmom = DevBuf::<D, f32>::upload(dev, &vec![1e-3; n]).unwrap();
    g.throughput(Throughput::BytesDecimal(7 * 4 * n as u64));
    g.bench_function(BenchmarkId::new("adamw_f32", n), |it| {
        it.iter(|| {
            k::adamw(dev, &h, &a, &b, &vmom, n, step).unwrap();
            dev.synchronize().unwrap()
        })
    });
    let sq_part = DevBuf::<D, f64>::alloc(dev, k::sum_squares_blocks(n)).unwrap();
    g.throughput(Throughput::BytesDecimal(4 * n as u64));
    g.bench_function(BenchmarkId::new("sum_squares_f32", n), |it| {
        it.iter(|| {
            k::sum_squares(dev, &a, &sq_part, n).unwrap();
            dev.synchronize().unwrap()
        })
    });
    let at = s.attn;
    let (q_len, kv_len) = (
        at.seqs * at.t * at.heads * at.head_dim,
        at.seqs * at.t * at.kv_heads * at.head_dim,
    );
    let (q, kk, v, out) = (
        filled(dev, q_len),
        filled(dev, kv_len),
        filled(dev, kv_len),
        filled(dev, q_len),
    );
    let lse = filled(dev, at.seqs * at.heads * at.t);
    g.throughput(Throughput::BytesDecimal(
        (4 * (2 * q_len + 2 * kv_len)) as u64,
    ));
    g.bench_function(BenchmarkId::new("attention_fwd_f32", at.t), |it| {
        it.iter(|| {
            k::attention_fwd(dev, &q, &kk, &v, &out, &lse, at, None).unwrap();
            dev.synchronize().unwrap()
        })
    });
    // Sliding window W: each query reads at most W keys (of t).
    let w = s.window;
    g.throughput(Throughput::BytesDecimal(
        (4 * (2 * q_len + 2 * kv_len)) as u64,
    ));
    g.bench_function(
        BenchmarkId::new(format!("attention_fwd{w}_f32"), at.t),
        |it| {
            it.iter(|| {
                k::attention_fwd(dev, &q, &kk, &v, &out, &lse, at, Some(w)).unwrap();
                dev.synchronize().unwrap()
            })
        },
    );
    let (dq, dk, dv) = (filled(dev, q_len), filled(dev, kv_len), filled(dev, kv_len));
    g.throughput(Throughput::BytesDecimal(
        (4 * (4 * q_len + 4 * kv_len)) as u64,
    ));
    for (name, window) in [
        ("attention_bwd_f32".to_string(), None),
        (format!("attention_bwd{w}_f32"), Some(w)),
    ] {
        g.bench_function(BenchmarkId::new(name, at.t), |it| {
            it.iter(|| {
                k::attention_bwd(
                    dev, &out, &q, &kk, &v, &out, &lse, &dq, &dk, &dv, at, window,
                )
                .unwrap()
            })
        });
    }
    // Decoding: every call appends the same rows at `cached` (so the caches
    // stay as they are) and reads the pos+n live rows of both caches.
    let cs = s.cache;
    let (new_rows, kvd) = (cs.seqs * cs.n, cs.kv_heads * cs.head_dim);
    let qd = cs.heads * cs.head_dim;
    let (cq, ck, cv, cout) = (
        filled(dev, new_rows * qd),
        filled(dev, new_rows * kvd),
        filled(dev, new_rows * kvd),
        filled(dev, new_rows * qd),
    );
    let (kc, vc) = (
        filled(dev, cs.seqs * cs.cap * kvd),
        filled(dev, cs.seqs * cs.cap * kvd),
    );
    let pos = vec![s.cached; cs.seqs];
    let split = k::decode_split(cs, &pos);
    let live = cs.seqs * (s.cached + cs.n) * kvd;
    g.throughput(Throughput::BytesDecimal(
        (4 * (2 * live + 2 * new_rows * qd + 4 * new_rows * kvd)) as u64,
    ));
    g.bench_function(
        BenchmarkId::new("attention_decode_f32", s.cached + cs.n),
        |it| {
            it.iter(|| {
                k::attention_cached(dev, &cq, &ck, &cv, &kc, &vc, &pos, &cout, cs, split, None)
                    .unwrap()
            })
        },
    );
    // The same step under the window, into a ring of n + W − 1 slots (the
    // position `cached` wraps it): reads n + W − 1 rows of both caches.
    let ring = CacheShape {
        cap: cs.n + w - 1,
        ..cs
    };
    let (rk, rv) = (
        filled(dev, ring.seqs * ring.cap * kvd),
        filled(dev, ring.seqs * ring.cap * kvd),
    );
    let split = k::decode_split_window(ring, &pos, Some(w));
    let live = ring.seqs * ring.cap * kvd;
    g.throughput(Throughput::BytesDecimal(
        (4 * (2 * live + 2 * new_rows * qd + 4 * new_rows * kvd)) as u64,
    ));
    g.bench_function(
        BenchmarkId::new(format!("attention_decode_window{w}_f32"), s.cached + cs.n),
        |it| {
            it.iter(|| {
                k::attention_cached(
                    dev,
                    &cq,
                    &ck,
                    &cv,
                    &rk,
                    &rv,
                    &pos,
                    &cout,
                    ring,
                    split,
                    Some(w),
                )
                .unwrap()
            })
        },
    );
    g.finish();
}

fn kernels(c: &mut Criterion) {
    let tiny = Shapes {
        rows: 16,
        m: 1000,
        d: 300,
        vc: 1000,
        attn: AttnShape {
            seqs: 1,
            t: 64,
            heads: 2,
            kv_heads: 1,
            head_dim: 64,
        },
        cache: CacheShape {
            seqs: 1,
            n: 1,
            cap: 256,
            heads: 2,
            kv_heads: 1,
            head_dim: 64,
        },
        cached: 199,
        window: 24,
    };
    bench_device(c, &EmuDevice::new(), &tiny);
    match GpuDevice::new(0) {
        Ok(gpu) => {
            let layer = Shapes {
                rows: 2048,
                m: 18944,
                d: 3584,
                vc: CE_CHUNK,
                attn: AttnShape {
                    seqs: 1,
                    t: 2048,
                    heads: 28,
                    kv_heads: 4,
                    head_dim: 128,
                },
                // One sequence decoding one token at 2048 live positions.
                cache: CacheShape {
                    seqs: 1,
                    n: 1,
                    cap: 4096,
                    heads: 28,
                    kv_heads: 4,
                    head_dim: 128,
                },
                cached: 2047,
                // Mistral-7B's 4096 would cover t = 2048; a quarter of it cuts.
                window: 512,
            };
            bench_device(c, &gpu, &layer);
        }
        Err(e) => eprintln!("GPU benchmarks skipped: {e}"),
    }
}

/// The host side of a streamed weight upload on the CUDA backend: one
/// Qwen2.5-7B down_proj (3584 × 18944) stored as f32 in the mapped file,
/// to the bf16 bytes the device copies. Before: `to_f32` into a vector,
/// rounded to bf16 into a second one, copied into the staging buffer.
/// Now: `TensorRef::write_bf16` straight into the staging buffer.
fn staging(c: &mut Criterion) {
    use rayon::prelude::*;
    use rku_engine::io::safetensors_io::{FloatType, TensorRef};
    let (rows, cols) = (3584, 18944);
    let bytes: Vec<u8> = (0..rows * cols)
        .flat_map(|i| (((i % 997) as f32 - 498.0) / 500.0).to_le_bytes())
        .collect();
    let shape = [rows, cols];
    let t = TensorRef {
        name: "model.layers.0.mlp.down_proj.weight",
        file: std::path::Path::new("bench.safetensors"),
        dtype: FloatType::F32,
        shape: &shape,
        bytes: &bytes,
    };
    let mut staging = vec![0u8; 2 * rows * cols];
    let mut g = c.benchmark_group("staging f32 file to bf16 upload bytes");
    g.sample_size(10)
        .throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("to_f32, round, copy (before)", |b| {
        b.iter(|| {
            let wide = t.to_f32().unwrap();
            let narrow: Vec<bf16> = wide.par_iter().map(|&v| bf16::from_f32(v)).collect();
            staging
                .par_chunks_mut(4 << 20)
                .zip(bytemuck::cast_slice::<bf16, u8>(&narrow).par_chunks(4 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
        })
    });
    g.bench_function("write_bf16 (now)", |b| {
        b.iter(|| t.write_bf16(&mut staging).unwrap())
    });
    g.finish();
    // A bf16 file (what save_pretrained writes): before, a parallel scan for
    // non-finite values, then a parallel copy; now the same `write_bf16`.
    let narrow: Vec<u8> = t
        .to_f32()
        .unwrap()
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let t = TensorRef {
        dtype: FloatType::BF16,
        bytes: &narrow,
        ..t
    };
    let mut g = c.benchmark_group("staging bf16 file to bf16 upload bytes");
    g.sample_size(10)
        .throughput(Throughput::Bytes(narrow.len() as u64));
    g.bench_function("scan, copy (before)", |b| {
        b.iter(|| {
            let values: &[u16] = bytemuck::cast_slice(&narrow);
            assert!(values.par_iter().all(|v| v & 0x7F80 != 0x7F80));
            staging
                .par_chunks_mut(4 << 20)
                .zip(narrow.par_chunks(4 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
        })
    });
    g.bench_function("write_bf16 (now)", |b| {
        b.iter(|| t.write_bf16(&mut staging).unwrap())
    });
    g.finish();
}

criterion_group!(benches, kernels, staging);
criterion_main!(benches);

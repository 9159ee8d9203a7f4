//! Every `Backend` op of the CUDA backend on the emulated device (and on a
//! GPU when one answers) against the CPU backend on the same inputs; the
//! GPU device's errors when there is none; and, in a build with nvcc,
//! ptxas's report of every kernel: no register spills, no stack.
mod common;
use common::ops::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{has_kernels, CudaBackend, EmuDevice, GpuDevice, PTXAS_LOG};
use rku_engine::backend::{AttnShape, Backend, CacheShape, GluAct};

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
    let mut seed = 99;
    let mut bf = |n: usize| {
        seed += 1;
        round_bf16(&uniform(n, seed))
    };
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
        .embedding(&ids, &be.upload_weight(&emb).unwrap(), d, 8.0)
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
    let (ao, lse) = be.attention_fwd(&gq, &gk, &gv, s, None).unwrap();
    out.push(("attention_out", dl(&ao), tol));
    out.push(("attention_lse", dl(&lse), tol));
    let (dq, dk, dv) = be
        .attention_bwd(&up(&q), &gq, &gk, &gv, &ao, &lse, s, None)
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
            None,
        )
        .unwrap();
    out.push(("attention_cached", dl(&ac), tol));
    out.push(("attention_cached_k_cache", dl(&kc), tol));
    out.push(("attention_cached_v_cache", dl(&vc), tol));
    let (ga, gbb) = (up(&dy), up(&dh));
    let h = be.glu_fwd(GluAct::Silu, &ga, &gbb, rows * m).unwrap();
    out.push(("swiglu_fwd", dl(&h), tol));
    let (da, db) = be
        .glu_bwd(GluAct::Silu, &up(&dl(&y)), &ga, &gbb, rows * m)
        .unwrap();
    out.push(("swiglu_da", dl(&da), tol));
    out.push(("swiglu_db", dl(&db), tol));
    let hg = be.glu_fwd(GluAct::GeluTanh, &ga, &gbb, rows * m).unwrap();
    out.push(("geglu_fwd", dl(&hg), tol));
    let (dag, dbg) = be
        .glu_bwd(GluAct::GeluTanh, &up(&dl(&y)), &ga, &gbb, rows * m)
        .unwrap();
    out.push(("geglu_da", dl(&dag), tol));
    out.push(("geglu_db", dl(&dbg), tol));
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

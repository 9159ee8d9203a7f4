//! LoRA distillation recovery (METHODS.md §10) against the independent
//! PyTorch reference of scripts/make_lora_fixtures.py (tests/fixtures/lora/).
//!
//! Tolerances. The reference runs in float64; the engine in f32, so
//! gradients agree to float32 rounding amplified through three layers
//! (1e-4 relative to each tensor's scale, the bound). AdamW and
//! clipping are elementwise f32 in both: 1e-6.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::{AdamwStep, Backend};
use rku_engine::model::forward::Geometry;
use rku_engine::model::lora::{Adapters, Proj};
use rku_engine::model::Model;
use rku_engine::recover::step::{clip_factor, loss_and_grads, RecoverLoss};
use std::collections::HashMap;

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The fixture's adapters, their scale s = α / r, ids and geometry.
fn fixture_adapters(
    be: &CpuBackend,
    model: &Model<CpuBackend>,
    refs: &HashMap<String, RefTensor>,
) -> (Adapters<CpuBackend>, f32, Vec<u32>, Geometry) {
    let rank = refs["rank"].data[0] as usize;
    let scale = (refs["alpha"].data[0] / rank as f64) as f32;
    let ad = Adapters::build(be, &model.cfg, rank, |l, p, _, _| {
        Ok((
            f32s(&refs[&format!("lora_a.{l}.{}", p.name())].data),
            f32s(&refs[&format!("lora_b.{l}.{}", p.name())].data),
        ))
    })
    .unwrap();
    let ids_t = &refs["ids"];
    let geo = Geometry {
        seqs: ids_t.shape[0],
        t: ids_t.shape[1],
    };
    let ids = ids_t.data.iter().map(|&v| v as u32).collect();
    (ad, scale, ids, geo)
}

/// Loss and every adapter gradient of `loss` equal autograd's (the student
/// is the fixture model with the fixture's adapters, the teacher the same
/// model without them).
fn check_grads(name: &str, loss: RecoverLoss) {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture(name)).unwrap();
    let refs = load_reference(&fixture(&format!("lora/{name}.safetensors")));
    let (ad, scale, ids, geo) = fixture_adapters(&be, &model, &refs);
    let mut grads = ad.zeros_like(&be).unwrap();
    let got = loss_and_grads(
        &be,
        &model,
        Some(&model),
        (&ad, scale),
        &mut grads,
        &ids,
        geo,
        loss,
    )
    .unwrap();
    let key = loss.name();
    let want = refs[&format!("{key}.loss")].data[0];
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "{name} {key} loss {got} vs {want}"
    );
    let mut worst = 0f64;
    for (l, row) in grads.layers.iter().enumerate() {
        for (p, g) in Proj::ALL.iter().zip(row) {
            for (which, buf) in [("a", &g.a), ("b", &g.b)] {
                let want = &refs[&format!("{key}.grad_{which}.{l}.{}", p.name())].data;
                let got = f64s(&be.download(buf).unwrap());
                assert!(want.iter().any(|&v| v != 0.0));
                let err = max_rel_err(&got, want);
                worst = worst.max(err);
                assert!(
                    err < 1e-4,
                    "{name} {key} ∂{which} layer {l} {}: {err:e}",
                    p.name()
                );
            }
        }
    }
    println!("{name} {key}: loss {got} (torch {want}), worst gradient error {worst:e}");
}

#[test]
fn kd_gradients_match_autograd_llama3() {
    check_grads("tiny-llama3", RecoverLoss::Kd);
}

#[test]
fn kd_gradients_match_autograd_qwen2() {
    check_grads("tiny-qwen2", RecoverLoss::Kd);
}

#[test]
fn ce_gradients_match_autograd() {
    check_grads("tiny-llama3", RecoverLoss::Ce);
    check_grads("tiny-qwen2", RecoverLoss::Ce);
}

#[test]
fn adamw_steps_match_torch() {
    let be = CpuBackend::new();
    let refs = load_reference(&fixture("lora/optim.safetensors"));
    let h = &refs["adamw.hyper"].data;
    let mut p = be.upload(&f32s(&refs["adamw.p0"].data)).unwrap();
    let n = refs["adamw.p0"].data.len();
    let (mut m, mut v) = (be.zeros(n).unwrap(), be.zeros(n).unwrap());
    for t in 1..=3u64 {
        let g = be
            .upload(&f32s(&refs[&format!("adamw.g.{t}")].data))
            .unwrap();
        let step = AdamwStep {
            lr: h[0],
            beta1: h[1],
            beta2: h[2],
            eps: h[3],
            weight_decay: h[4],
            step: t,
            grad_scale: 1.0,
        };
        be.adamw(&mut p, &g, &mut m, &mut v, n, step).unwrap();
        for (what, buf) in [("p", &p), ("m", &m), ("v", &v)] {
            let want = &refs[&format!("adamw.{what}.{t}")].data;
            let err = max_rel_err(&f64s(&be.download(buf).unwrap()), want);
            assert!(err < 1e-6, "AdamW step {t} {what}: {err:e}");
        }
    }
}

#[test]
fn clipping_matches_clip_grad_norm() {
    let be = CpuBackend::new();
    let refs = load_reference(&fixture("lora/optim.safetensors"));
    let grads: Vec<Vec<f32>> = (0..3)
        .map(|j| f32s(&refs[&format!("clip.g.{j}")].data))
        .collect();
    let sq: f64 = grads
        .iter()
        .map(|g| be.sum_squares(&be.upload(g).unwrap(), g.len()).unwrap())
        .sum();
    let norm = sq.sqrt();
    let want_norm = refs["clip.norm"].data[0];
    assert!(
        ((norm - want_norm) / want_norm).abs() < 1e-6,
        "{norm} vs {want_norm}"
    );
    let factor = clip_factor(norm, Some(1.0));
    assert!(factor < 1.0);
    for (j, g) in grads.iter().enumerate() {
        let got: Vec<f64> = g.iter().map(|&x| (x * factor) as f64).collect();
        let err = max_rel_err(&got, &refs[&format!("clip.out.{j}")].data);
        assert!(err < 1e-6, "clipped gradient {j}: {err:e}");
    }
    assert_eq!(clip_factor(norm, None), 1.0);
    assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
}

#[test]
fn kl_div_matches_torch() {
    let be = CpuBackend::new();
    let refs = load_reference(&fixture("lora/optim.safetensors"));
    let (rows, d) = (refs["kl.z"].shape[0], refs["kl.z"].shape[1]);
    let vocab = refs["kl.w"].shape[0];
    let up = |k: &str| be.upload(&f32s(&refs[k].data)).unwrap();
    let weight = |k: &str| be.upload_weight(&f32s(&refs[k].data)).unwrap();
    let counted: Vec<bool> = refs["kl.counted"].data.iter().map(|&c| c != 0.0).collect();
    let count = counted.iter().filter(|&&c| c).count();
    let (w, wt) = (weight("kl.w"), weight("kl.w_t"));
    let (sum, n, dz) = be
        .kl_div(
            &up("kl.z"),
            &w,
            &up("kl.z_t"),
            &wt,
            &counted,
            rows,
            d,
            vocab,
            1.0 / count as f32,
            true,
        )
        .unwrap();
    assert_eq!(n, count);
    let want = refs["kl.sum"].data[0];
    assert!(((sum - want) / want).abs() < 1e-5, "Σ KL {sum} vs {want}");
    let err = max_rel_err(
        &f64s(&be.download(&dz.unwrap()).unwrap()),
        &refs["kl.dz"].data,
    );
    assert!(err < 1e-5, "dz: {err:e}");
}

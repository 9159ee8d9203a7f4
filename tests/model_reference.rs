//! Forward logits and backward statistics of the CPU runtime against
//! PyTorch/transformers references (tests/fixtures, made by scripts/make_fixtures.py).
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::model::backward::backward_channel_stats;
use rku_engine::model::forward::{forward, logits, ForwardOut, Keep};
use rku_engine::model::objective::{EnergyAt, Objective};
use rku_engine::model::{Geometry, Model};

fn check_logits(name: &str) {
    let dir = fixture(name);
    let r = load_reference(&dir.join("reference.safetensors"));
    let ids_t = &r["input_ids"];
    let (n, t) = (ids_t.shape[0], ids_t.shape[1]);
    let ids: Vec<u32> = ids_t.data.iter().map(|&x| x as u32).collect();
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let got = logits(&be, &model, &ids, Geometry { seqs: n, t }).unwrap();
    let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    let err = max_rel_err(&got, &r["logits"].data);
    println!("{name}: max |Δlogit| / max |logit| = {err:.2e}");
    assert!(err < 1e-4, "{name}: logits differ from transformers: {err}");
}

#[test]
fn tiny_qwen2_logits_match_transformers() {
    check_logits("tiny-qwen2");
}

#[test]
fn tiny_llama3_logits_match_transformers() {
    check_logits("tiny-llama3");
}

/// Qwen3: per-head q/k RMSNorm before RoPE, head_dim 24 ≠ hidden / heads.
#[test]
fn tiny_qwen3_logits_match_transformers() {
    check_logits("tiny-qwen3");
}

fn check_stats(name: &str) {
    let dir = fixture(name);
    let r = load_reference(&dir.join("reference.safetensors"));
    let ids_t = &r["input_ids"];
    let (n, t) = (ids_t.shape[0], ids_t.shape[1]);
    let ids: Vec<u32> = ids_t.data.iter().map(|&x| x as u32).collect();
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let geo = Geometry { seqs: n, t };
    let layers = model.cfg.layers;
    let energy = (Objective::Energy, "energy", 1.0 / (n * t) as f32);
    let ce = (Objective::Ce, "ce", 1.0 / (n * (t - 1)) as f32);
    // The first backward pass reads the activations the forward pass kept
    // of every layer but layer 0 (recomputed); the second recomputes every
    // layer. Both orders, so each objective takes both paths.
    for order in [[energy, ce], [ce, energy]] {
        let mut fwd = forward(&be, &model, &ids, geo, Keep::acts(layers - 1)).unwrap();
        for (obj, prefix, scale) in order {
            check_pass(
                name,
                &r,
                &be,
                &model,
                &mut fwd,
                &ids,
                geo,
                (obj, prefix, scale),
            );
        }
    }
}

/// One objective's backward pass over `fwd` against the autograd reference `r`.
#[allow(clippy::too_many_arguments)]
fn check_pass(
    name: &str,
    r: &std::collections::HashMap<String, RefTensor>,
    be: &CpuBackend,
    model: &Model<CpuBackend>,
    fwd: &mut ForwardOut<CpuBackend>,
    ids: &[u32],
    geo: Geometry,
    (obj, prefix, scale): (Objective, &str, f32),
) {
    let n = geo.seqs;
    {
        let mut parts = vec![None; model.cfg.layers];
        let at = EnergyAt::FinalNorm;
        let j = backward_channel_stats(be, model, fwd, ids, geo, obj, at, scale, |l, p| {
            parts[l] = Some(p);
            Ok(())
        })
        .unwrap();
        let want_j = if prefix == "energy" {
            r["energy.J"].data[0]
        } else {
            r["ce.loss"].data[0]
        };
        assert!(
            (j - want_j).abs() <= 1e-4 * want_j.abs(),
            "{name} {prefix}: J {j} vs {want_j}"
        );
        for (l, p) in parts.into_iter().enumerate() {
            let p = p.expect("every layer reported");
            let m = p.s1.len();
            let tk: Vec<f64> = (0..m)
                .map(|c| (0..n).map(|s| p.hg_seq[s * m + c].abs()).sum())
                .collect();
            let mut checks = vec![("f2", p.f2.clone()), ("k1", p.k1.clone())];
            if prefix == "energy" {
                checks.push(("s1", p.s1.clone()));
                checks.push(("s2", p.s2.clone()));
            } else {
                checks.push(("tk", tk));
            }
            for (stat, got) in checks {
                let key = format!("{prefix}.{l}.{stat}");
                let err = max_rel_err(&got, &r[&key].data);
                assert!(err < 1e-4, "{name} {key}: relative error {err:.2e}");
            }
        }
    }
}

#[test]
fn tiny_qwen2_stats_match_autograd() {
    check_stats("tiny-qwen2");
}

#[test]
fn tiny_llama3_stats_match_autograd() {
    check_stats("tiny-llama3");
}

/// The gradients flow through Qwen3's q/k norms (`rmsnorm_bwd` per head row).
#[test]
fn tiny_qwen3_stats_match_autograd() {
    check_stats("tiny-qwen3");
}

/// Mistral with sliding_window 6 over sequences of 16 tokens: the window cuts.
#[test]
fn tiny_mistral_logits_match_transformers() {
    check_logits("tiny-mistral");
}

#[test]
fn tiny_mistral_stats_match_autograd() {
    check_stats("tiny-mistral");
}

/// Gemma 3: GeGLU, (1 + w) norms before and after attention and the FFN,
/// √hidden embedding scale, q/k norms, query_pre_attn_scalar 20 with
/// head_dim 24, local layers (window 6 over 16 tokens, base 100) around
/// a global one (base 10000), tied embeddings.
#[test]
fn tiny_gemma3_logits_match_transformers() {
    check_logits("tiny-gemma3");
}

/// The gradients flow through GeGLU, the post-branch norms and the window.
#[test]
fn tiny_gemma3_stats_match_autograd() {
    check_stats("tiny-gemma3");
}

/// `linear` RoPE scaling (tests/fixtures/rope-linear): the config of `src`
/// with the scaling (`NAME.json`) next to `src`'s weights; logits and
/// inverse frequencies against transformers'.
fn check_rope_linear(name: &str, src: &str) {
    let r = load_reference(&fixture("rope-linear/reference.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(&format!("rope-linear/{name}.json")),
        tmp.path().join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        fixture(src).join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let be = CpuBackend::new();
    let model = Model::load(&be, tmp.path()).unwrap();
    for (local, key) in [(false, "inv_freq"), (true, "inv_freq_local")] {
        if let Some(want) = r.get(&format!("{name}.{key}")) {
            let got = model.cfg.rope_inv_freq(local);
            let err = max_rel_err(&got, &want.data);
            assert!(err < 1e-6, "{name} {key}: {err:.2e}");
        }
    }
    let ids: Vec<u32> = r[&format!("{name}.input_ids")]
        .data
        .iter()
        .map(|&x| x as u32)
        .collect();
    let t = ids.len();
    let got = logits(&be, &model, &ids, Geometry { seqs: 1, t }).unwrap();
    let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
    let err = max_rel_err(&got, &r[&format!("{name}.logits")].data);
    println!("rope-linear {name}: max |Δlogit| / max |logit| = {err:.2e}");
    assert!(err < 1e-4, "{name}: logits differ from transformers: {err}");
}

/// Gemma 3 4B's kind of scaling: linear on the global layer only (the
/// local layers keep their default base-100 frequencies).
#[test]
fn gemma3_linear_rope_scaling_matches_transformers() {
    check_rope_linear("gemma3", "tiny-gemma3");
}

/// The same scaling on LLaMA (factor 4) and Qwen2 (factor 2.5).
#[test]
fn llama_and_qwen2_linear_rope_scaling_match_transformers() {
    check_rope_linear("llama3", "tiny-llama3");
    check_rope_linear("qwen2", "tiny-qwen2");
}

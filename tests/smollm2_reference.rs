//! The imported SmolLM2-135M-Instruct (assets/models/smollm2, made by
//! scripts/fetch-assets.sh --import) against transformers run on the same
//! GGUF (tests/fixtures/smollm2, made by scripts/make_fixtures.py): logits,
//! the DATA.md loss, and the channel statistics. Skipped with a printed
//! reason when the model has not been imported, a failure under CI.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::model::backward::backward_channel_stats;
use rku_engine::model::forward::{forward, logits, nll, Keep};
use rku_engine::model::objective::{EnergyAt, Objective};
use rku_engine::model::{Geometry, Model};

fn ids_of(r: &std::collections::HashMap<String, RefTensor>, key: &str) -> Vec<u32> {
    r[key].data.iter().map(|&x| x as u32).collect()
}

#[test]
fn smollm2_logits_and_loss_match_transformers() {
    let Some(dir) = asset("models/smollm2") else {
        return;
    };
    let r = load_reference(&fixture("smollm2/reference.safetensors"));
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let vocab = model.cfg.vocab;
    let cols: Vec<usize> = r["logit_columns"]
        .data
        .iter()
        .map(|&x| x as usize)
        .collect();
    for p in 0..3 {
        let ids = ids_of(&r, &format!("prompt{p}.input_ids"));
        let t = ids.len();
        let got = logits(&be, &model, &ids, Geometry { seqs: 1, t }).unwrap();
        let sel: Vec<f64> = (0..t)
            .flat_map(|i| cols.iter().map(move |&c| (i, c)))
            .map(|(i, c)| got[i * vocab + c] as f64)
            .collect();
        let err = max_rel_err(&sel, &r[&format!("prompt{p}.logits_cols")].data);
        let last: Vec<f64> = got[(t - 1) * vocab..].iter().map(|&x| x as f64).collect();
        let err_last = max_rel_err(&last, &r[&format!("prompt{p}.last_logits")].data);
        println!(
            "prompt {p}: max |Δ|/scale {err:.2e} (sampled columns), {err_last:.2e} (last position)"
        );
        assert!(
            err <= 1e-3 && err_last <= 1e-3,
            "prompt {p}: logits differ ({err:.2e}, {err_last:.2e})"
        );
        let argmax: Vec<u32> = (0..t)
            .map(|i| {
                let row = &got[i * vocab..(i + 1) * vocab];
                (0..vocab)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap() as u32
            })
            .collect();
        assert_eq!(
            argmax,
            ids_of(&r, &format!("prompt{p}.argmax")),
            "prompt {p}: argmax"
        );
    }
    let ids = ids_of(&r, "france.input_ids");
    let (sum, n) = nll(
        &be,
        &model,
        &ids,
        Geometry {
            seqs: 1,
            t: ids.len(),
        },
    )
    .unwrap();
    let loss = sum / n as f64;
    println!("France sentence: mean loss {loss:.5} (DATA.md: 1.43641)");
    assert!((loss - 1.43641).abs() <= 1e-3, "loss {loss}");
}

#[test]
fn smollm2_stats_match_autograd() {
    let Some(dir) = asset("models/smollm2") else {
        return;
    };
    let r = load_reference(&fixture("smollm2/reference.safetensors"));
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let ids = ids_of(&r, "calib.input_ids");
    let (n, t) = (r["calib.input_ids"].shape[0], r["calib.input_ids"].shape[1]);
    let geo = Geometry { seqs: n, t };
    let mut fwd = forward(&be, &model, &ids, geo, Keep::acts(model.cfg.layers)).unwrap();
    for (obj, prefix, scale) in [
        (Objective::Energy, "energy", 1.0 / (n * t) as f32),
        (Objective::Ce, "ce", 1.0 / (n * (t - 1)) as f32),
    ] {
        let mut worst = 0f64;
        let mut layers = 0;
        let at = EnergyAt::FinalNorm;
        backward_channel_stats(&be, &model, &mut fwd, &ids, geo, obj, at, scale, |l, p| {
            layers += 1;
            let m = p.s1.len();
            let tk: Vec<f64> = (0..m)
                .map(|c| (0..n).map(|s| p.hg_seq[s * m + c].abs()).sum())
                .collect();
            let mut checks = vec![("f2", &p.f2), ("k1", &p.k1)];
            if prefix == "energy" {
                checks.extend([("s1", &p.s1), ("s2", &p.s2)]);
            } else {
                checks.push(("tk", &tk));
            }
            for (stat, got) in checks {
                // The float64 autograd statistics are the ground truth.
                let key = format!("f64.{prefix}.{l}.{stat}");
                let err = max_rel_err(got, &r[&key].data);
                worst = worst.max(err);
                assert!(err <= 1e-4, "{key}: relative error {err:.2e}");
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(layers, model.cfg.layers, "{prefix}: every layer reported");
        println!("{prefix}: worst per-layer relative error {worst:.2e}");
    }
}

//! Multiple choice by log-likelihood against a hand computation from full
//! logits, and the data reader's field names and errors.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::eval::mc::{encode_pair, evaluate_mc, read_items, McArgs};
use rku_engine::io::text::Tokenizer;
use rku_engine::model::forward::logits;
use rku_engine::model::{Geometry, Model};

/// Σ log softmax(logits)[cont_j] over the continuation, in f64, from one
/// full forward pass over ctx + cont (batch 1, no padding).
fn hand_loglik(be: &CpuBackend, model: &Model<CpuBackend>, ctx: &[u32], cont: &[u32]) -> f64 {
    let ids: Vec<u32> = ctx.iter().chain(cont).copied().collect();
    let vocab = model.cfg.vocab;
    let l = logits(
        be,
        model,
        &ids,
        Geometry {
            seqs: 1,
            t: ids.len(),
        },
    )
    .unwrap();
    let mut sum = 0f64;
    for (j, &target) in cont.iter().enumerate() {
        let row = &l[(ctx.len() - 1 + j) * vocab..][..vocab];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        sum += row[target as usize] as f64 - lse;
    }
    sum
}

const DATA: &str = r#"{"query": "The train leaves at", "choices": ["noon", "11:05", "the station in the morning"], "gold": 1}
{"question": "Numbers: 2024 and", "choices": ["3.14", "cats", "7"], "label": 0}

{"context": "New paragraph. ", "choices": ["It", "The teacher said so", "a"], "answer": "a"}
{"query": "said the", "choices": ["teacher", "train"], "gold": 0}
"#;

#[test]
fn tiny_qwen2_mc_matches_hand_computation() {
    let dir = fixture("tiny-qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mc.jsonl");
    std::fs::write(&data, DATA).unwrap();
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let items = read_items(&data).unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[2].gold, 2);
    assert_eq!(items[2].context, "New paragraph. ");

    let out = tmp.path().join("records.jsonl");
    // Batch 3 mixes items and lengths in one padded forward pass.
    let args = McArgs {
        batch: 3,
        out: Some(out.clone()),
        ..McArgs::new(data.clone())
    };
    let (res, recs) = evaluate_mc(&be, &model, &tok, &args).unwrap();
    assert_eq!(res.n, 4);
    assert_eq!(res.choices, 11);
    assert_eq!(res.task, "mc");
    let (mut acc, mut acc_norm) = (0, 0);
    for (it, rec) in items.iter().zip(&recs) {
        let mut want = Vec::new();
        for ch in &it.choices {
            // lm-eval split by hand: whole = enc(ctx.trim_end() + ws + " " + choice).
            let trimmed = it.context.trim_end();
            let ws = &it.context[trimmed.len()..];
            let whole = tok.encode(&format!("{trimmed}{ws} {ch}")).unwrap();
            let ctx = tok.encode(trimmed).unwrap();
            assert_eq!(
                encode_pair(&tok, &it.context, ch, 0).unwrap(),
                (ctx.clone(), whole[ctx.len()..].to_vec())
            );
            want.push(hand_loglik(&be, &model, &ctx, &whole[ctx.len()..]));
        }
        for (g, w) in rec.loglik.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-4 * w.abs().max(1.0),
                "loglik {g} vs hand {w}"
            );
        }
        let best = (0..want.len()).fold(0, |b, i| if want[i] > want[b] { i } else { b });
        let norm: Vec<f64> = want
            .iter()
            .zip(&it.choices)
            .map(|(l, c)| l / c.chars().count() as f64)
            .collect();
        let best_norm = (0..norm.len()).fold(0, |b, i| if norm[i] > norm[b] { i } else { b });
        assert_eq!(rec.pred, best);
        assert_eq!(rec.pred_norm, best_norm);
        acc += (best == it.gold) as usize;
        acc_norm += (best_norm == it.gold) as usize;
    }
    println!(
        "acc {} acc_norm {} (hand: {acc}/4, {acc_norm}/4)",
        res.acc, res.acc_norm
    );
    assert_eq!(res.acc, acc as f64 / 4.0);
    assert_eq!(res.acc_norm, acc_norm as f64 / 4.0);
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert!(lines.lines().next().unwrap().contains("\"loglik\""));

    // The batch size changes nothing.
    let (res1, recs1) = evaluate_mc(
        &be,
        &model,
        &tok,
        &McArgs {
            batch: 1,
            ..McArgs::new(data)
        },
    )
    .unwrap();
    assert_eq!((res1.acc, res1.acc_norm), (res.acc, res.acc_norm));
    for (a, b) in recs.iter().zip(&recs1) {
        for (x, y) in a.loglik.iter().zip(&b.loglik) {
            assert!((x - y).abs() < 1e-4, "batch 3 vs 1: {x} vs {y}");
        }
    }
}

#[test]
fn bad_mc_rows_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    for (row, needle) in [
        (
            r#"{"query": "q", "choices": ["a", "b"], "gold": 2}"#,
            "not an index",
        ),
        (
            r#"{"query": "q", "choices": ["a"], "gold": 0}"#,
            "at least 2",
        ),
        (r#"{"choices": ["a", "b"], "gold": 0}"#, "query"),
        (
            r#"{"query": "q", "choices": ["a", "b"], "gold": "c"}"#,
            "not an index",
        ),
        ("{not json", "not valid JSON"),
    ] {
        let p = tmp.path().join("bad.jsonl");
        std::fs::write(
            &p,
            format!(
                "{}\n{row}\n",
                r#"{"query": "ok", "choices": ["a", "b"], "gold": 1}"#
            ),
        )
        .unwrap();
        let e = read_items(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad.jsonl") && e.contains("line 2") && e.contains(needle),
            "{e}"
        );
    }
}

/// An item longer than the model's positions is refused at once, naming
/// the file and the item (a 100,000-character query used to run for hours).
#[test]
fn an_item_past_the_models_positions_is_refused() {
    let dir = fixture("tiny-qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("long.jsonl");
    let query = "the train leaves at noon ".repeat(4000);
    let rows = format!(
        "{}\n{}\n",
        r#"{"query": "said the", "choices": ["teacher", "train"], "gold": 0}"#,
        serde_json::json!({"query": query, "choices": ["a", "b"], "gold": 1})
    );
    std::fs::write(&data, rows).unwrap();
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let err = evaluate_mc(&be, &model, &tok, &McArgs::new(data.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("long.jsonl") && err.contains("item 1") && err.contains("max_position"),
        "{err}"
    );
}

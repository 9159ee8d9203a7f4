//! KV-cache decoding against full recomputation, the portable fallback of
//! `attention_cached` against the CPU's native one, and (when the assets
//! exist) SmolLM2 greedy ids against transformers.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::{attention_cached_portable, Backend, CacheShape};
use rku_engine::io::text::Tokenizer;
use rku_engine::model::decode::{argmax, generate, Decoder, Finish, GenerateOptions};
use rku_engine::model::forward::logits;
use rku_engine::model::{Geometry, Model};
use std::path::Path;

/// Greedy decoding by full recompute: one `forward` over the whole prefix
/// per new token, argmax of the last row. Returns (ids, last-step logits of each step).
fn greedy_recompute(
    be: &CpuBackend,
    model: &Model<CpuBackend>,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let vocab = model.cfg.vocab;
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    let mut all = Vec::new();
    for _ in 0..max_new {
        let l = logits(be, model, &ids, Geometry { seqs: 1, t: ids.len() }).unwrap();
        let last = l[(ids.len() - 1) * vocab..].to_vec();
        let id = argmax(&last);
        all.push(last);
        if eos.contains(&id) {
            break;
        }
        out.push(id);
        ids.push(id);
    }
    (out, all)
}

/// Smallest gap between the best and second-best logit over the steps: a
/// near tie there could legitimately flip between two exact-arithmetic-equal paths.
fn min_top2_gap(steps: &[Vec<f32>]) -> f32 {
    steps
        .iter()
        .map(|l| {
            let mut s = l.clone();
            s.sort_by(|a, b| b.partial_cmp(a).unwrap());
            s[0] - s[1]
        })
        .fold(f32::INFINITY, f32::min)
}

fn check_cache_vs_recompute(dir: &Path, texts: &[&str], max_new: usize) {
    let be = CpuBackend::new();
    let model = Model::load(&be, dir).unwrap();
    let tok = Tokenizer::load(dir).unwrap();
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens.iter().any(|&l| l != lens[0]), "prompts must differ in length: {lens:?}");
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        ..Default::default()
    };
    let (gens, stats) = generate(&be, &model, &tok, &prompts, &opts).unwrap();
    println!(
        "{}: {} prompts, lengths {lens:?}, {} decode tokens in {:.3}s = {:.1} tokens/s",
        dir.display(),
        prompts.len(),
        stats.decode_tokens,
        stats.decode_s,
        stats.decode_tokens_per_s()
    );
    for (p, g) in prompts.iter().zip(&gens) {
        let (want, steps) = greedy_recompute(&be, &model, p, max_new, &[]);
        println!("  min top-2 logit gap {:.2e}; ids {:?}", min_top2_gap(&steps), g.ids);
        assert_eq!(g.ids, want, "cache and recompute disagree for prompt {p:?}");
        assert_eq!(g.finish, Finish::MaxTokens);
        assert_eq!(g.text, tok.decode(&want).unwrap());
    }
}

#[test]
fn tiny_qwen2_cache_equals_recompute() {
    check_cache_vs_recompute(
        &fixture("tiny-qwen2"),
        &[
            "The train leaves at 11:05, said the teacher.",
            "Numbers: 2024",
            "New paragraph. It was a long and quiet morning in the old town",
            "a",
        ],
        24,
    );
}

/// The decoder's logits after a prefill and after each step equal the
/// last row of a full forward pass, with a batch of unequal prompts:
/// padding changes nothing.
#[test]
fn tiny_qwen2_decoder_logits_match_forward() {
    let dir = fixture("tiny-qwen2");
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let vocab = model.cfg.vocab;
    let mut seqs: Vec<Vec<u32>> = vec![vec![5, 9, 33, 101, 7], vec![300], vec![17, 18, 19]];
    let mut dec = Decoder::new(&be, &model, seqs.len(), 16).unwrap();
    let mut got = dec.extend(&seqs).unwrap();
    for step in 0..6 {
        assert_eq!(dec.lens(), seqs.iter().map(Vec::len).collect::<Vec<_>>().as_slice());
        for (s, ids) in seqs.iter().enumerate() {
            let full = logits(&be, &model, ids, Geometry { seqs: 1, t: ids.len() }).unwrap();
            let want = &full[(ids.len() - 1) * vocab..];
            let err = want
                .iter()
                .zip(&got[s * vocab..(s + 1) * vocab])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "step {step}, sequence {s}: max |Δlogit| {err}");
        }
        let next: Vec<u32> = (0..seqs.len()).map(|s| ((step * 37 + s * 11) % vocab) as u32).collect();
        for (s, &t) in next.iter().enumerate() {
            seqs[s].push(t);
        }
        got = dec.step(&next).unwrap();
    }
    let full: Vec<Vec<u32>> = vec![vec![1; 11]; 3];
    assert!(dec.extend(&full).is_err(), "overflowing the cache must fail");
}

/// EOS ends a sequence without being emitted, stop strings cut the text,
/// and a zero budget generates nothing.
#[test]
fn tiny_qwen2_generate_stops() {
    let dir = fixture("tiny-qwen2");
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let prompts = vec![tok.encode("The train leaves at").unwrap(), tok.encode("Numbers:").unwrap()];
    let free = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let (base, _) = generate(&be, &model, &tok, &prompts, &free).unwrap();
    // EOS: make the 4th generated id of the first prompt an end-of-sequence id.
    let eos = base[0].ids[3];
    let cut = base[0].ids.iter().position(|&i| i == eos).unwrap();
    let opts = GenerateOptions {
        eos_ids: vec![eos],
        ..free.clone()
    };
    let (g, _) = generate(&be, &model, &tok, &prompts, &opts).unwrap();
    assert_eq!(g[0].ids, base[0].ids[..cut]);
    assert_eq!(g[0].finish, Finish::Eos);
    // Stop string: the decoded text of the first three ids' last token.
    let piece = tok.decode(&base[1].ids[2..3]).unwrap();
    assert!(!piece.is_empty());
    let opts = GenerateOptions {
        stop: vec![piece.clone()],
        ..free.clone()
    };
    let (g, _) = generate(&be, &model, &tok, &prompts, &opts).unwrap();
    assert_eq!(g[1].finish, Finish::StopString);
    let start = base[1].text.find(&piece).unwrap();
    assert_eq!(g[1].text, base[1].text[..start]);
    assert!(!g[1].text.contains(&piece));
    let none = GenerateOptions::default();
    let (g, _) = generate(&be, &model, &tok, &prompts, &none).unwrap();
    assert!(g.iter().all(|g| g.ids.is_empty()));
}

/// The portable fallback (host copies + `attention_fwd`) equals the CPU's
/// native `attention_cached`, caches included, for prefill- and step-shaped calls.
#[test]
fn portable_attention_cached_equals_native() {
    let be = CpuBackend::new();
    let mut seed = 12345u64;
    let mut rnd = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    };
    for (seqs, n, cap, pos) in [(2usize, 5usize, 12usize, vec![0usize, 0]), (3, 1, 9, vec![4, 0, 8]), (2, 3, 10, vec![7, 2])] {
        let sh = CacheShape {
            seqs,
            n,
            cap,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let (qd, kd) = (32, 16);
        let (q, k, v) = (rnd(seqs * n * qd), rnd(seqs * n * kd), rnd(seqs * n * kd));
        let (kc0, vc0) = (rnd(seqs * cap * kd), rnd(seqs * cap * kd));
        let (mut kc1, mut vc1) = (kc0.clone(), vc0.clone());
        let (mut kc2, mut vc2) = (kc0.clone(), vc0.clone());
        let a = be.attention_cached(&q, &k, &v, &mut kc1, &mut vc1, &pos, sh).unwrap();
        let b = attention_cached_portable(&be, &q, &k, &v, &mut kc2, &mut vc2, &pos, sh).unwrap();
        assert_eq!(kc1, kc2);
        assert_eq!(vc1, vc2);
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err < 1e-5, "{seqs}×{n} at {pos:?}: max |Δ| {err}");
        // Only the written rows changed.
        for s in 0..seqs {
            for p in 0..cap {
                let r = (s * cap + p) * kd..(s * cap + p + 1) * kd;
                if p < pos[s] || p >= pos[s] + n {
                    assert_eq!(kc1[r.clone()], kc0[r]);
                }
            }
        }
        let over = vec![cap - n + 1; seqs];
        assert!(be.attention_cached(&q, &k, &v, &mut kc1, &mut vc1, &over, sh).is_err());
    }
}

#[test]
fn smollm2_cache_equals_recompute() {
    let Some(dir) = asset("models/smollm2") else { return };
    check_cache_vs_recompute(
        &dir,
        &["The capital of France is", "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"],
        16,
    );
}

/// Greedy ids from transformers (tests/fixtures/smollm2/greedy.json:
/// `prompt_ids` and `generated_ids`, one list per prompt or a single one).
#[test]
fn smollm2_greedy_matches_transformers() {
    let Some(dir) = asset("models/smollm2") else { return };
    let path = fixture("smollm2/greedy.json");
    if !path.exists() {
        eprintln!("skipped: {} not present", path.display());
        return;
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let lists = |key: &str| -> Vec<Vec<u32>> {
        let x = &v[key];
        let as_ids = |a: &serde_json::Value| -> Vec<u32> {
            a.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
        };
        match x.as_array() {
            Some(a) if a.first().map(|f| f.is_array()).unwrap_or(false) => a.iter().map(as_ids).collect(),
            Some(_) => vec![as_ids(x)],
            None => panic!("{}: no list `{key}`", path.display()),
        }
    };
    let (prompts, want) = (lists("prompt_ids"), lists("generated_ids"));
    assert_eq!(prompts.len(), want.len());
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let max_new = want.iter().map(Vec::len).max().unwrap();
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        ..Default::default()
    };
    let (gens, _) = generate(&be, &model, &tok, &prompts, &opts).unwrap();
    for (g, w) in gens.iter().zip(&want) {
        // No EOS given here, so every sequence runs the full budget; a list
        // from transformers that stopped at EOS is a prefix (EOS included).
        assert_eq!(&g.ids[..w.len()], &w[..], "engine vs transformers greedy ids");
    }
}

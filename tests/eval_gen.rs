//! KV-cache decoding against full recomputation, the portable fallback of
//! `attention_cached` against the CPU's native one, and (when the assets
//! exist) SmolLM2 greedy ids against transformers.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::{attention_cached_portable, Backend, CacheShape};
use rku_engine::eval::answer::extract_answer;
use rku_engine::eval::gen::{
    evaluate_gen, plain_prompt, read_problems, ChatTemplate, GenArgs, Problem, PromptFormat,
};
use rku_engine::io::text::Tokenizer;
use rku_engine::model::decode::{argmax, generate, Decoder, Finish, GenerateOptions};
use rku_engine::model::forward::logits;
use rku_engine::model::weights::{LoadOptions, Residency};
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

/// KV-cache greedy decoding (from the ggml blocks when `dir` has them)
/// equals greedy decoding by full recompute (f32 matrix products).
fn check_cache_vs_recompute(dir: &Path, texts: &[&str], max_new: usize) -> Model<CpuBackend> {
    let be = CpuBackend::new();
    let model = Model::load_with(&be, dir, DECODE_FROM_BLOCKS).unwrap();
    let tok = Tokenizer::load(dir).unwrap();
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(
        lens.iter().any(|&l| l != lens[0]),
        "prompts must differ in length: {lens:?}"
    );
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
        println!(
            "  min top-2 logit gap {:.2e}; ids {:?}",
            min_top2_gap(&steps),
            g.ids
        );
        assert_eq!(g.ids, want, "cache and recompute disagree for prompt {p:?}");
        assert_eq!(g.finish, Finish::MaxTokens);
        assert_eq!(g.text, tok.decode(&want).unwrap());
    }
    model
}

/// How `eval gen` loads a model: with its ggml blocks, when it has them.
const DECODE_FROM_BLOCKS: LoadOptions = LoadOptions {
    residency: Residency::Resident,
    ggml_blocks: true,
};

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

/// Qwen3 (q/k norms before RoPE, head_dim ≠ hidden / heads).
#[test]
fn tiny_qwen3_cache_equals_recompute() {
    check_cache_vs_recompute(
        &fixture("tiny-qwen3"),
        &[
            "The train leaves at 11:05, said the teacher.",
            "Numbers: 2024",
            "a",
        ],
        16,
    );
}

/// The decoder's logits after a prefill and after each step equal the
/// last row of a full forward pass, with a batch of unequal prompts:
/// padding changes nothing.
#[test]
fn tiny_qwen2_decoder_logits_match_forward() {
    check_decoder_logits_match_forward("tiny-qwen2");
}

#[test]
fn tiny_qwen3_decoder_logits_match_forward() {
    check_decoder_logits_match_forward("tiny-qwen3");
}

fn check_decoder_logits_match_forward(name: &str) {
    let dir = fixture(name);
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let vocab = model.cfg.vocab;
    let mut seqs: Vec<Vec<u32>> = vec![vec![5, 9, 33, 101, 7], vec![300], vec![17, 18, 19]];
    let mut dec = Decoder::new(&be, &model, seqs.len(), 16).unwrap();
    let mut got = dec.extend(&seqs).unwrap();
    for step in 0..6 {
        assert_eq!(
            dec.lens(),
            seqs.iter().map(Vec::len).collect::<Vec<_>>().as_slice()
        );
        for (s, ids) in seqs.iter().enumerate() {
            let full = logits(
                &be,
                &model,
                ids,
                Geometry {
                    seqs: 1,
                    t: ids.len(),
                },
            )
            .unwrap();
            let want = &full[(ids.len() - 1) * vocab..];
            let err = want
                .iter()
                .zip(&got[s * vocab..(s + 1) * vocab])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "step {step}, sequence {s}: max |Δlogit| {err}");
        }
        let next: Vec<u32> = (0..seqs.len())
            .map(|s| ((step * 37 + s * 11) % vocab) as u32)
            .collect();
        for (s, &t) in next.iter().enumerate() {
            seqs[s].push(t);
        }
        got = dec.step(&next).unwrap();
    }
    let full: Vec<Vec<u32>> = vec![vec![1; 11]; 3];
    assert!(
        dec.extend(&full).is_err(),
        "overflowing the cache must fail"
    );
    // Dropping the middle sequence keeps the others' caches intact.
    dec.retain(&[true, false, true]).unwrap();
    seqs.remove(1);
    assert_eq!(dec.lens(), [11, 9]);
    let got = dec.extend(&[vec![3, 4], vec![5]]).unwrap();
    seqs[0].extend([3, 4]);
    seqs[1].push(5);
    for (s, ids) in seqs.iter().enumerate() {
        let full = logits(
            &be,
            &model,
            ids,
            Geometry {
                seqs: 1,
                t: ids.len(),
            },
        )
        .unwrap();
        let want = &full[(ids.len() - 1) * vocab..];
        let err = want
            .iter()
            .zip(&got[s * vocab..(s + 1) * vocab])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-5, "after retain, sequence {s}: max |Δlogit| {err}");
    }
    assert!(dec.retain(&[false, false]).is_err());
}

/// EOS ends a sequence without being emitted, stop strings cut the text,
/// and a zero budget generates nothing.
#[test]
fn tiny_qwen2_generate_stops() {
    let dir = fixture("tiny-qwen2");
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let prompts = vec![
        tok.encode("The train leaves at").unwrap(),
        tok.encode("Numbers:").unwrap(),
    ];
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
    // The other sequence, decoded on alone after the first was dropped, is unchanged.
    let cut1 = base[1].ids.iter().position(|&i| i == eos).unwrap_or(12);
    assert_eq!(g[1].ids, base[1].ids[..cut1]);
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
    // Every draw its own seed: 1, 2, 3, ...
    let mut seed = 0u64;
    let mut rnd = |len: usize| -> Vec<f32> {
        seed += 1;
        values(len, -1.0, 1.0, seed)
    };
    for (seqs, n, cap, pos) in [
        (2usize, 5usize, 12usize, vec![0usize, 0]),
        (3, 1, 9, vec![4, 0, 8]),
        (2, 3, 10, vec![7, 2]),
    ] {
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
        let a = be
            .attention_cached(&q, &k, &v, &mut kc1, &mut vc1, &pos, sh, None)
            .unwrap();
        let b =
            attention_cached_portable(&be, &q, &k, &v, &mut kc2, &mut vc2, &pos, sh, None).unwrap();
        assert_eq!(kc1, kc2);
        assert_eq!(vc1, vc2);
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-5, "{seqs}×{n} at {pos:?}: max |Δ| {err}");
        // The new keys land at pos[s].., nothing else changes.
        for (s, &ps) in pos.iter().enumerate() {
            for p in 0..cap {
                let r = (s * cap + p) * kd..(s * cap + p + 1) * kd;
                if (ps..ps + n).contains(&p) {
                    assert_eq!(kc1[r], k[(s * n + p - ps) * kd..][..kd]);
                } else {
                    assert_eq!(kc1[r.clone()], kc0[r]);
                }
            }
        }
        let over = vec![cap - n + 1; seqs];
        assert!(be
            .attention_cached(&q, &k, &v, &mut kc1, &mut vc1, &over, sh, None)
            .is_err());
    }
}

#[test]
fn smollm2_cache_equals_recompute() {
    let Some(dir) = asset("models/smollm2") else {
        return;
    };
    let model = check_cache_vs_recompute(
        &dir,
        &[
            "The capital of France is",
            "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
        ],
        16,
    );
    // The import (scripts/fetch-assets.sh) keeps the GGUF's blocks.
    assert!(model.has_ggml_blocks(), "{}: no ggml blocks", dir.display());
}

/// Greedy ids from transformers (tests/fixtures/smollm2/greedy.json:
/// `cases`, each with `prompt_ids` and `generated_ids`, pure greedy without
/// stopping at EOS).
#[test]
fn smollm2_greedy_matches_transformers() {
    let Some(dir) = asset("models/smollm2") else {
        return;
    };
    // A committed fixture (scripts/make_fixtures.py): never skipped.
    let path = fixture("smollm2/greedy.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |a: &serde_json::Value| -> Vec<u32> {
        a.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = v["cases"].as_array().expect("a `cases` list");
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["generated_ids"])).collect();
    assert!(!prompts.is_empty());
    let be = CpuBackend::new();
    let tok = Tokenizer::load(&dir).unwrap();
    let max_new = want.iter().map(Vec::len).max().unwrap();
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        ..Default::default()
    };
    // Decoding from the f32 weights, and from the ggml blocks.
    for load in [LoadOptions::default(), DECODE_FROM_BLOCKS] {
        let model = Model::load_with(&be, &dir, load).unwrap();
        let (gens, _) = generate(&be, &model, &tok, &prompts, &opts).unwrap();
        for (g, w) in gens.iter().zip(&want) {
            // No EOS given here, so every sequence runs the full budget; a list
            // from transformers that stopped at EOS is a prefix (EOS included).
            assert_eq!(
                &g.ids[..w.len()],
                &w[..],
                "engine vs transformers greedy ids, blocks: {}",
                model.has_ggml_blocks()
            );
        }
    }
}

const SMOLLM2_TEMPLATE: &str = r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The non-tool part of Qwen2.5-Instruct's template (block tags with
/// "-" trimming, attribute access to fields that are absent).
const QWEN25_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {{- tools | tojson }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- raise_exception('tool calls are not supported') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

fn problem(q: &str, a: &str, gold: &str) -> Problem {
    Problem {
        question: q.into(),
        answer: a.into(),
        gold: gold.into(),
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    let shots = [problem("1+1?", "1+1=2\n#### 2", "2")];
    let smol = ChatTemplate::new(SMOLLM2_TEMPLATE, String::new(), "<|im_end|>".into()).unwrap();
    assert_eq!(
        smol.prompt(&shots, " 2+3? ").unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n1+1=2\n#### 2<|im_end|>\n\
         <|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    );
    let qwen = ChatTemplate::new(QWEN25_TEMPLATE, String::new(), "<|im_end|>".into()).unwrap();
    assert_eq!(
        qwen.prompt(&[problem("a?", "7", "7")], "b?").unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\na?<|im_end|>\n<|im_start|>assistant\n#### 7<|im_end|>\n\
         <|im_start|>user\nb?<|im_end|>\n<|im_start|>assistant\n"
    );
    // Python string methods, bos_token and raise_exception as in transformers.
    let py = ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('x') %}{{ raise_exception('no x') }}{% endif %}{{ m.content.strip().upper() }}|{% endfor %}",
        "<s>".into(),
        String::new(),
    )
    .unwrap();
    assert_eq!(py.render(&[("user", "  hi ")]).unwrap(), "<s>HI|");
    assert!(py
        .render(&[("user", "xy")])
        .unwrap_err()
        .to_string()
        .contains("no x"));
}

#[test]
fn plain_prompt_layout() {
    let shots = [
        problem("1+1?", "1+1=2\n#### 2", "2"),
        problem("3-5?", "-2", "-2"),
    ];
    assert_eq!(
        plain_prompt(&shots, "Why 4?\n"),
        "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 3-5?\nAnswer: #### -2\n\nQuestion: Why 4?\nAnswer:"
    );
}

const GSM: &str = r#####"{"question": "Shot one: 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
{"question": "Shot two: 10 - 3?", "answer": 7}
{"question": "A farmer has 3 cows and buys 4 more. How many cows?", "answer": "3 + 4 = 7\n#### 7"}
{"question": "What is 1,000 + 250?", "answer": "#### 1,250"}
{"question": "Numbers: 2024 minus 2000?", "answer": "24"}
"#####;

#[test]
fn tiny_qwen2_gen_eval_is_consistent() {
    let dir = fixture("tiny-qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("gsm_symbolic.jsonl");
    std::fs::write(&data, GSM).unwrap();
    let problems = read_problems(&data).unwrap();
    assert_eq!(
        problems.iter().map(|p| p.gold.as_str()).collect::<Vec<_>>(),
        ["4", "7", "7", "1250", "24"]
    );
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let out = tmp.path().join("out/gen.jsonl");
    let args = GenArgs {
        shots: 2,
        batch: 2,
        max_new_tokens: 20,
        out: Some(out.clone()),
        task: Some("GSM-symbolic".into()),
        ..GenArgs::new(data.clone())
    };
    let (res, recs) = evaluate_gen(&be, &model, &tok, &args).unwrap();
    println!("{}", serde_json::to_string(&res).unwrap());
    assert_eq!((res.n, res.task.as_str()), (3, "GSM-symbolic"));
    assert_eq!(recs.iter().map(|r| r.index).collect::<Vec<_>>(), [2, 3, 4]);
    for (r, p) in recs.iter().zip(&problems[2..]) {
        assert_eq!(r.prompt, plain_prompt(&problems[..2], &p.question));
        assert_eq!(r.extracted, extract_answer(&r.generation));
        assert_eq!(r.correct, r.extracted.as_deref() == Some(p.gold.as_str()));
        assert!(r.new_tokens <= 20 && !r.generation.contains("Question:"));
    }
    assert_eq!(
        res.accuracy,
        recs.iter().filter(|r| r.correct).count() as f64 / 3.0
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
    // Batch size and order change nothing; a shots file replaces held-out rows.
    let shots = tmp.path().join("shots.jsonl");
    std::fs::write(&shots, GSM.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
    let (_, recs1) = evaluate_gen(
        &be,
        &model,
        &tok,
        &GenArgs {
            shots: 2,
            shots_file: Some(shots),
            batch: 1,
            max_new_tokens: 20,
            ..GenArgs::new(data.clone())
        },
    )
    .unwrap();
    assert_eq!(recs1.len(), 5);
    for (a, b) in recs.iter().zip(&recs1[2..]) {
        assert_eq!((&a.prompt, &a.generation), (&b.prompt, &b.generation));
    }
    // --skip: a later slice keeps its rows' indices and equals that part of
    // the whole run; skipping past the end leaves nothing, an error.
    let slice = |skip, limit| {
        evaluate_gen(
            &be,
            &model,
            &tok,
            &GenArgs {
                shots: 2,
                skip,
                limit,
                batch: 2,
                max_new_tokens: 20,
                ..GenArgs::new(data.clone())
            },
        )
    };
    let (_, part) = slice(1, Some(1)).unwrap();
    assert_eq!(part.len(), 1);
    assert_eq!(
        (part[0].index, &part[0].prompt, &part[0].generation),
        (3, &recs[1].prompt, &recs[1].generation)
    );
    let e = slice(3, None).unwrap_err().to_string();
    assert!(e.contains("no problems left"), "{e}");
    // The fixture has no chat template: a clear error.
    let e = evaluate_gen(
        &be,
        &model,
        &tok,
        &GenArgs {
            format: PromptFormat::Chat,
            shots: 0,
            ..GenArgs::new(data)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("chat_template"), "{e}");
}

#[test]
fn bad_gen_rows_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.jsonl");
    std::fs::write(&p, "{\"question\": \"q\", \"answer\": \"#### 3\"}\n{\"question\": \"q\", \"answer\": \"3 or 4\"}\n").unwrap();
    let e = read_problems(&p).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
}

/// The files of scripts/make-eval-data.py parse, row for row, and their
/// gold numbers are the generator's answers.
#[test]
fn eval_assets_parse() {
    let Some(dir) = asset("eval") else { return };
    let gsm = dir.join("gsm_symbolic.jsonl");
    let problems = read_problems(&gsm).unwrap();
    let text = std::fs::read_to_string(&gsm).unwrap();
    assert!(!problems.is_empty(), "{}: no problems", gsm.display());
    assert_eq!(problems.len(), text.lines().count(), "one problem per row");
    for (p, line) in problems.iter().zip(text.lines()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(p.gold, v["answer_value"].to_string(), "{line}");
        assert_eq!(v["label"], "GSM-symbolic");
    }
    for task in ["winowhy", "strategyqa", "physical_intuition"] {
        let path = dir.join(format!("bigbench_{task}.jsonl"));
        let items = rku_engine::eval::mc::read_items(&path).unwrap();
        let rows = std::fs::read_to_string(&path).unwrap().lines().count();
        println!("{task}: {} items", items.len());
        assert!(!items.is_empty(), "{}: no items", path.display());
        assert_eq!(items.len(), rows, "{task}: one item per row");
        for it in &items {
            assert!(it.choices.len() >= 2 && it.gold < it.choices.len());
        }
    }
}

/// The imported SmolLM2's own chat template renders and tokenizes its
/// markers as single special tokens.
#[test]
fn smollm2_chat_prompt() {
    let Some(dir) = asset("models/smollm2") else {
        return;
    };
    let tok = Tokenizer::load(&dir).unwrap();
    let t = ChatTemplate::load(&dir).unwrap();
    let p = t.prompt(&[], "What is 2+2?").unwrap();
    assert!(p.ends_with("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"));
    let ids = tok.encode(&p).unwrap();
    let start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == start).count(), 3);
}

/// Mistral (sliding window 6): greedy decoding with ring caches (prompts
/// prefilled in chunks, sequences far longer than the window) equals
/// greedy decoding by full recompute.
#[test]
fn tiny_mistral_cache_equals_recompute() {
    let model = check_cache_vs_recompute(
        &fixture("tiny-mistral"),
        &[
            "The train leaves at 11:05, said the teacher.",
            "Numbers: 2024",
            "a",
        ],
        20,
    );
    assert_eq!(model.cfg.sliding_window, Some(6));
}

/// Gemma 3 (window 6 on layers 0 and 2, a global layer 1): greedy
/// decoding with ring caches on the local layers and a full cache on the
/// global one equals greedy decoding by full recompute.
#[test]
fn tiny_gemma3_cache_equals_recompute() {
    let model = check_cache_vs_recompute(
        &fixture("tiny-gemma3"),
        &[
            "The train leaves at 11:05, said the teacher.",
            "Numbers: 2024",
            "a",
        ],
        20,
    );
    assert_eq!(model.cfg.window(0), Some(6));
    assert_eq!(model.cfg.window(1), None);
}

/// The decoder's logits equal the last row of a full forward pass under a
/// sliding window, through ring caches (capacity 40, window 6: 11 slots),
/// chunked prefills of unequal prompts, steps, `retain`, and a chunk whose
/// padding rows wrap the ring.
#[test]
fn tiny_mistral_decoder_logits_match_forward() {
    check_windowed_decoder_logits_match_forward("tiny-mistral");
}

/// The same on Gemma 3, whose global layer keeps all 40 positions beside
/// the local layers' rings, each kind with its RoPE base.
#[test]
fn tiny_gemma3_decoder_logits_match_forward() {
    check_windowed_decoder_logits_match_forward("tiny-gemma3");
}

fn check_windowed_decoder_logits_match_forward(name: &str) {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture(name)).unwrap();
    let vocab = model.cfg.vocab;
    let check = |seqs: &[Vec<u32>], got: &[f32], what: &str| {
        for (s, ids) in seqs.iter().enumerate() {
            let geo = Geometry {
                seqs: 1,
                t: ids.len(),
            };
            let full = logits(&be, &model, ids, geo).unwrap();
            let want = &full[(ids.len() - 1) * vocab..];
            let err = want
                .iter()
                .zip(&got[s * vocab..(s + 1) * vocab])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{what}, sequence {s}: max |Δlogit| {err}");
        }
    };
    let mut seqs: Vec<Vec<u32>> = vec![
        (1..14).collect(), // 13 tokens: chunks of 6, 6, 1
        vec![300],
        vec![17, 18, 19, 20, 21, 22, 23, 24],
    ];
    let mut dec = Decoder::new(&be, &model, seqs.len(), 40).unwrap();
    let got = dec.extend(&seqs).unwrap();
    assert_eq!(dec.lens(), [13, 1, 8]);
    check(&seqs, &got, "prefill");
    for step in 0..9 {
        let next: Vec<u32> = (0..seqs.len())
            .map(|s| ((step * 37 + s * 11 + 1) % vocab) as u32)
            .collect();
        for (s, &t) in next.iter().enumerate() {
            seqs[s].push(t);
        }
        let got = dec.step(&next).unwrap();
        check(&seqs, &got, &format!("step {step}"));
    }
    dec.retain(&[false, true, true]).unwrap();
    seqs.remove(0);
    let more = vec![(40..50).collect::<Vec<u32>>(), vec![7, 8]];
    for (s, m) in seqs.iter_mut().zip(&more) {
        s.extend(m);
    }
    let got = dec.extend(&more).unwrap();
    check(&seqs, &got, "after retain");
    assert_eq!(dec.lens(), [20, 19]);
}

/// The portable fallback equals the CPU's native `attention_cached`
/// on ring caches (positions past the capacity wrap), caches included.
#[test]
fn portable_attention_cached_window_equals_native() {
    use rku_engine::backend::attention_cached_portable;
    let be = CpuBackend::new();
    let mut seed = 100u64;
    let mut rnd = |len: usize| -> Vec<f32> {
        seed += 1;
        values(len, -1.0, 1.0, seed)
    };
    // (seqs, n, cap, window, pos): prefill and step shapes, some wrapping.
    for (seqs, n, cap, w, pos) in [
        (2usize, 5usize, 12usize, 6usize, vec![0usize, 30]),
        (3, 1, 7, 7, vec![4, 0, 29]),
        (2, 3, 10, 4, vec![7, 15]),
        (1, 6, 11, 6, vec![13]),
    ] {
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
        let a = be
            .attention_cached(&q, &k, &v, &mut kc1, &mut vc1, &pos, sh, Some(w))
            .unwrap();
        let b = attention_cached_portable(&be, &q, &k, &v, &mut kc2, &mut vc2, &pos, sh, Some(w))
            .unwrap();
        assert_eq!(kc1, kc2);
        assert_eq!(vc1, vc2);
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            err < 1e-5,
            "{seqs}×{n} window {w} at {pos:?}: max |Δ| {err}"
        );
        // A ring too small for n + w − 1 whose positions wrap is refused.
        let small = CacheShape {
            cap: n + w - 2,
            ..sh
        };
        let far = vec![small.cap; seqs];
        let e = be
            .attention_cached(&q, &k, &v, &mut kc1, &mut vc1, &far, small, Some(w))
            .unwrap_err();
        assert!(e.to_string().contains("KV cache full"), "{e}");
    }
}

/// generation_config.json's `eos_token_id` is read as config.json's is:
/// an id past u32 (once cast into another token: decoding stopped early
/// with exit 0), a negative one or a string is an error naming the file.
#[test]
fn a_bad_generation_config_eos_is_refused_by_name() {
    use rku_engine::eval::gen::eos_ids;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("tiny-qwen2").join(f), dir.join(f)).unwrap();
    }
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let gen = dir.join("generation_config.json");
    for (eos, ok) in [
        ("[7, 0]", true),
        ("null", true),
        ("4294967499", false),
        ("-1", false),
        ("\"</s>\"", false),
        ("[7, 4294967296]", false),
    ] {
        std::fs::write(&gen, format!("{{\"eos_token_id\": {eos}}}")).unwrap();
        match eos_ids(&model, &tok) {
            Ok(ids) => {
                assert!(ok, "eos_token_id {eos} accepted: {ids:?}");
                assert_eq!(ids.contains(&7), eos.contains('7'), "{eos}: {ids:?}");
            }
            Err(e) => {
                assert!(!ok, "eos_token_id {eos} refused: {e}");
                assert!(e.to_string().contains("generation_config.json"), "{e}");
            }
        }
    }
}

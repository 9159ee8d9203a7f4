//! Gemma 3 270M imported from its GGUF against transformers loading the
//! same file (tests/fixtures/gemma3-270m, made by
//! scripts/make_gemma_fixtures.py): config, every tensor, token ids, and
//! the CPU runtime's logits on three prompts after BOS.
//!
//! Tolerances: the sampled values are compared bit for bit (both sides
//! dequantise the same blocks with the same f32 arithmetic, and subtract 1
//! from the norms in f32). The per-tensor sums are f64 sums of the same f32
//! values in a different order (numpy's pairwise summation, here chunks of
//! 1024): each order's rounding error is below (1024 + n/1024)·2⁻⁵³·Σ|x| ≤
//! 2·10⁻¹¹·Σ|x| for n ≤ 1.7·10⁸, so 10⁻¹⁰·Σ|x| bounds their difference;
//! a norm left at 1 + w moves its sum by its length (≥ 256 ≫ the bound).
//! `rms_norm_eps` is 1e-6 here and the f32 value widened
//! (9.999999974752427e-07) in transformers: 10⁻⁷ relative.
//!
//! Logits: both sides run the same f32 weights through 18 layers in f32
//! with different summation orders (gemm's blocking here, MKL/oneDNN
//! there), so they agree to rounding, not bit for bit; 10⁻³ of the
//! prompt's largest |logit| is far above that rounding and far below what
//! a wrong norm, RoPE base, window or scale changes.
mod common;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::eval::gen::ChatTemplate;
use rku_engine::io::ggml_blocks::BlockFile;
use rku_engine::io::import::{import_gguf, ImportOptions};
use rku_engine::io::safetensors_out::OutDtype;
use rku_engine::io::text::{windows, Tokenizer};
use rku_engine::model::forward::logits;
use rku_engine::model::ModelConfig;
use rku_engine::model::{Geometry, Model};
use rku_engine::prune::calibrate::bos_id;
use rku_engine::quant::BlockKind;
use safetensors::SafeTensors;
use serde_json::Value as Json;
use std::path::Path;

const GGUF: &str = "llm_gemma/gemma-3-270m-q4_k_m.gguf";

fn read_json(path: &Path) -> Json {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn values<T, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|b| from(b.try_into().unwrap()))
        .collect()
}

/// Keys transformers writes that the importer does not: the GGUF's name,
/// the writer's version, the tokenizer's unk id (not a Gemma3TextConfig
/// field; the GGUF loader copies it over) and the record that the weights
/// came from a GGUF (the imported ones are plain tensors).
const NOT_WRITTEN: [&str; 4] = [
    "_model_name_or_path",
    "transformers_version",
    "unk_token_id",
    "quantization_config",
];

fn check_config(out: &Path) {
    let got = read_json(&out.join("config.json"));
    let want = read_json(&common::fixture("gemma3-270m/config.json"));
    let (got, want) = (got.as_object().unwrap(), want.as_object().unwrap());
    assert_eq!(
        got["architectures"],
        serde_json::json!(["Gemma3ForCausalLM"])
    );
    for (k, w) in want
        .iter()
        .filter(|(k, _)| !NOT_WRITTEN.contains(&k.as_str()))
    {
        let g = got
            .get(k)
            .unwrap_or_else(|| panic!("config.json lacks {k}"));
        if k == "rms_norm_eps" {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-7 * w, "rms_norm_eps {g} vs {w}");
        } else {
            assert_eq!(g, w, "{k}");
        }
    }
    for k in got.keys() {
        assert!(
            want.contains_key(k) || k == "architectures",
            "config.json has {k}, which transformers does not write"
        );
    }
    // The key order of save_pretrained (sorted).
    let keys: Vec<&String> = got.keys().collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
}

fn check_tensors(out: &Path) {
    let file = std::fs::File::open(out.join("model.safetensors")).unwrap();
    // SAFETY: a read-only map of a file only this test wrote.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let got = SafeTensors::deserialize(&map).unwrap();
    let fixture = std::fs::read(common::fixture("gemma3-270m/tensors.safetensors")).unwrap();
    let want = SafeTensors::deserialize(&fixture).unwrap();
    let (_, header) = SafeTensors::read_metadata(&fixture).unwrap();
    let shapes = header.metadata().as_ref().unwrap();

    let mut names: Vec<String> = got.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want_names: Vec<String> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix("shape."))
        .map(String::from)
        .collect();
    want_names.sort();
    assert_eq!(names, want_names);
    assert_eq!(names.len(), 2 + 18 * 13);

    for name in &names {
        let t = got.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let shape: Vec<usize> = shapes[&format!("shape.{name}")]
            .split(',')
            .map(|d| d.parse().unwrap())
            .collect();
        assert_eq!(t.shape(), shape, "{name}");
        let x = values(t.data(), f32::from_le_bytes);
        let n = x.len();
        let sample = values(
            want.tensor(&format!("{name}.sample")).unwrap().data(),
            f32::from_le_bytes,
        );
        for (k, w) in sample.iter().enumerate() {
            let at = k * (n - 1) / (sample.len() - 1);
            assert_eq!(
                x[at].to_bits(),
                w.to_bits(),
                "{name}[{at}]: {} vs {w}",
                x[at]
            );
        }
        let stats = values(
            want.tensor(&format!("{name}.stats")).unwrap().data(),
            f64::from_le_bytes,
        );
        let (mut sum, mut abs, mut sq) = (0.0, 0.0, 0.0);
        for chunk in x.chunks(1024) {
            let f = |g: fn(f64) -> f64| chunk.iter().map(|&v| g(v as f64)).sum::<f64>();
            sum += f(|v| v);
            abs += f(f64::abs);
            sq += f(|v| v * v);
        }
        let tol = 1e-10 * stats[1];
        assert!(
            (sum - stats[0]).abs() <= tol,
            "{name}: sum {sum} vs {}",
            stats[0]
        );
        assert!(
            (abs - stats[1]).abs() <= tol,
            "{name}: sum|x| {abs} vs {}",
            stats[1]
        );
        assert!(
            (sq - stats[2]).abs() <= 1e-10 * stats[2],
            "{name}: sum x² {sq} vs {}",
            stats[2]
        );
    }

    // Blocks are kept for the Q8_0 matrices only (the file's Q4_1/Q8_0
    // kinds the runtime reads; its Q5_0, Q4_K and Q6_K are f32 only).
    let blocks = BlockFile::open(out)
        .unwrap()
        .expect("ggml_blocks.safetensors");
    let matrices = blocks.matrices();
    assert!(matrices.iter().any(|m| m.0 == "model.embed_tokens.weight"));
    for (name, kind, _) in matrices {
        assert_eq!(kind, BlockKind::Q8_0, "{name}");
        assert!(names.iter().any(|n| n == name), "{name}");
    }
}

fn check_tokenizer(out: &Path) {
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 262144);
    for case in read_json(&common::fixture("gemma3-270m/ids.json"))
        .as_array()
        .unwrap()
    {
        let text = case["text"].as_str().unwrap();
        let ids = |k: &str| -> Vec<u32> { serde_json::from_value(case[k].clone()).unwrap() };
        let short: String = text.chars().take(40).collect();
        assert_eq!(
            tok.encode(text, false).unwrap().get_ids(),
            ids("ids"),
            "{short:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap().get_ids(),
            ids("ids_bos"),
            "{short:?}"
        );
        assert_eq!(
            tok.decode(&ids("ids"), false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{short:?}"
        );
    }
    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
        (Some("<bos>"), Some("<eos>"))
    );
    assert_eq!(tc["add_bos_token"], true);
    let chat = ChatTemplate::load(out).unwrap();
    let prompt = chat
        .render(&[
            ("system", "Be brief."),
            ("user", " Hi "),
            ("assistant", "Hello."),
            ("user", "2+2?"),
        ])
        .unwrap();
    assert_eq!(
        prompt,
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
         <start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    );
    let err = chat
        .render(&[("assistant", "first")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("alternate"), "{err}");
}

/// Logits of the imported model (CPU backend) on the prompts of
/// `logits.safetensors`: the ids are the engine's own (its tokenizer, then
/// BOS as `--bos` puts it, the default on Gemma 3) and must equal
/// transformers'; at every position the logits at the fixture's vocabulary
/// columns and at transformers' top-k ids must equal transformers' within
/// 10⁻³ of the prompt's max |logit| (which must agree too), and the argmax
/// must be transformers' unless its top two are within that tolerance.
fn check_logits(out: &Path) {
    const TOL: f64 = 1e-3;
    let r = common::load_reference(&common::fixture("gemma3-270m/logits.safetensors"));
    let fixture = std::fs::read(common::fixture("gemma3-270m/logits.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&fixture).unwrap();
    let texts = header.metadata().as_ref().unwrap();
    let be = CpuBackend::new();
    let model = Model::load(&be, out).unwrap();
    let cfg = &model.cfg;
    let tok = Tokenizer::load(out).unwrap();
    let bos = bos_id(cfg, cfg.arch.bos_by_default()).unwrap();
    assert_eq!(bos, Some(2), "Gemma's BOS, on by default");
    let columns: Vec<usize> = r["columns"].data.iter().map(|&c| c as usize).collect();
    let v = cfg.vocab;
    let mut worst = 0f64;
    for i in 0..3 {
        let text = &texts[&format!("prompt{i}")];
        let text_ids = tok.encode(text).unwrap();
        let ids = windows(&text_ids, 1, text_ids.len() + 1, bos).unwrap();
        let want_ids: Vec<u32> = r[&format!("prompt{i}.input_ids")]
            .data
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(
            ids, want_ids,
            "prompt {i}: token ids differ from transformers'"
        );
        let t = ids.len();
        let got = logits(&be, &model, &ids, Geometry { seqs: 1, t }).unwrap();
        let want_scale = r[&format!("prompt{i}.scale")].data[0];
        let scale = got.iter().fold(0f64, |a, &x| a.max((x as f64).abs()));
        let err = |g: f32, w: f64| (g as f64 - w).abs() / want_scale;
        let mut prompt_worst = err(scale as f32, want_scale);
        let cols = &r[&format!("prompt{i}.cols")].data;
        let top_ids = &r[&format!("prompt{i}.topk_ids")];
        let top = &r[&format!("prompt{i}.topk")].data;
        let k = top_ids.shape[1];
        for p in 0..t {
            let row = &got[p * v..(p + 1) * v];
            for (j, &c) in columns.iter().enumerate() {
                prompt_worst = prompt_worst.max(err(row[c], cols[p * columns.len() + j]));
            }
            for j in 0..k {
                let id = top_ids.data[p * k + j] as usize;
                prompt_worst = prompt_worst.max(err(row[id], top[p * k + j]));
            }
            let argmax = (0..v).fold(0, |a, c| if row[c] > row[a] { c } else { a });
            let want_argmax = top_ids.data[p * k] as usize;
            assert!(
                argmax == want_argmax || (top[p * k] - top[p * k + 1]) / want_scale <= TOL,
                "prompt {i} position {p}: argmax {argmax}, transformers' {want_argmax}"
            );
        }
        println!(
            "Gemma 3 270M prompt {i} ({t} tokens): max |logit| {scale:.4} vs {want_scale:.4}, \
             worst |Δlogit| / max |logit| = {prompt_worst:.2e}"
        );
        assert!(
            prompt_worst <= TOL,
            "prompt {i}: logits differ from transformers' by {prompt_worst:.2e} of the scale"
        );
        worst = worst.max(prompt_worst);
    }
    println!("Gemma 3 270M logits against transformers: worst {worst:.2e} of max |logit|");
}

/// The 253 MB GGUF imported at f32 (a 1.1 GB directory under the build's
/// scratch directory, removed after).
#[test]
fn gemma3_270m_imports_like_transformers() {
    let Some(src) = common::asset(GGUF) else {
        return;
    };
    let tmp = common::large_tempdir();
    let out = tmp.path().join("gemma");
    let start = std::time::Instant::now();
    let summary = import_gguf(
        &src,
        &out,
        &ImportOptions {
            dtype: OutDtype::F32,
            force: false,
            blocks: true,
            check_config: ModelConfig::check,
        },
    )
    .unwrap();
    eprintln!("Gemma 3 270M import (f32): {:.2?}", start.elapsed());
    assert_eq!(
        (summary.architecture.as_str(), summary.n_layers),
        ("gemma3", 18)
    );
    check_config(&out);
    check_tensors(&out);
    check_tokenizer(&out);
    check_logits(&out);
}

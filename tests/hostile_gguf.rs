//! GGUF files crafted to be inconsistent: duplicate keys or tensors,
//! non-finite hyperparameters, zero dimensions, and weights that overflow
//! the requested output dtype. Each is a clear error naming the file and
//! the key or tensor; none panics, and nothing is written.
mod common;

use common::gguf_writer::Gguf;
use common::{bin, fixture, run_err};
use rku_engine::io::gguf::{GgufFile, Value};
use std::path::Path;

fn base() -> Gguf {
    Gguf::default()
        .kv_str("general.architecture", "llama")
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .tensor("token_embd.weight", &[8, 4])
}

fn open_err(path: &Path) -> String {
    match GgufFile::open(path) {
        Ok(_) => panic!("{} should be refused", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_writer_makes_files_the_reader_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let g = GgufFile::open(&base().write(tmp.path(), "ok.gguf")).unwrap();
    assert_eq!(g.tensor("token_embd.weight").unwrap().dims, vec![8, 4]);
    assert!(g.get("llama.attention.layer_norm_rms_epsilon").is_some());
}

#[test]
fn inconsistent_headers_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "dup-key.gguf",
            base().kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-6),
            "\"llama.attention.layer_norm_rms_epsilon\" appears twice",
        ),
        (
            "dup-tensor.gguf",
            base().tensor("token_embd.weight", &[8, 4]),
            "tensor token_embd.weight appears twice",
        ),
        (
            "zero-dim.gguf",
            base().tensor("output.weight", &[8, 0]),
            "tensor output.weight: a zero dimension",
        ),
        (
            "nan-eps.gguf",
            Gguf::default()
                .kv_str("general.architecture", "llama")
                .kv_f32("llama.attention.layer_norm_rms_epsilon", f32::NAN),
            "not a finite number",
        ),
        (
            "inf-theta.gguf",
            base().kv_f32("llama.rope.freq_base", f32::INFINITY),
            "\"llama.rope.freq_base\" is inf",
        ),
    ];
    for (name, g, needle) in cases {
        let path = g.write(tmp.path(), name);
        let msg = open_err(&path);
        assert!(msg.contains(needle), "{name}: {needle:?} not in {msg}");
        assert!(msg.contains(name), "{name}: no file name in {msg}");
        // The command line says the same and writes nothing.
        let out = tmp.path().join(format!("{name}.out"));
        let err = run_err(bin().arg("import").arg(&path).arg("--out").arg(&out));
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!out.exists(), "{name}: wrote {}", out.display());
    }
}

/// A weight of 1e6 fits f32 and bf16 but not f16: importing as f16 names
/// the tensor instead of writing inf.
#[test]
fn a_weight_that_overflows_f16_is_refused() {
    let src = fixture("gguf/tiny_llama.gguf");
    let g = GgufFile::open(&src).unwrap();
    let t = g.tensor("output_norm.weight").unwrap();
    let mut b = std::fs::read(&src).unwrap();
    b[t.offset..t.offset + 4].copy_from_slice(&1e6f32.to_le_bytes());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("big.gguf");
    std::fs::write(&path, &b).unwrap();
    let out = tmp.path().join("f16");
    let err = run_err(
        bin()
            .arg("import")
            .arg(&path)
            .args(["--dtype", "f16", "--out"])
            .arg(&out),
    );
    assert!(
        err.contains("output_norm.weight") && err.contains("float16") && err.contains("inf"),
        "{err}"
    );
    assert!(!out.exists());
    for dtype in ["bf16", "f32"] {
        let out = tmp.path().join(dtype);
        common::run_ok(
            bin()
                .arg("import")
                .arg(&path)
                .args(["--dtype", dtype, "--out"])
                .arg(&out),
        );
        assert!(out.join("model.safetensors").exists());
    }
}

/// A gemma3 file that lacks what the importer cannot assume, or states what
/// the engine does not implement, is refused by key, before any weight is
/// written; re-encoding the unedited file imports (the writer is faithful).
#[test]
fn inconsistent_gemma3_metadata_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let gemma = || Gguf::from_file(&fixture("gguf/tiny_gemma3.gguf"));
    let ok = gemma().write(tmp.path(), "same.gguf");
    let out = tmp.path().join("same.out");
    common::run_ok(bin().arg("import").arg(&ok).arg("--out").arg(&out));
    assert!(out.join("tokenizer.json").exists());

    let cases = vec![
        (
            "no-window.gguf",
            gemma().without("gemma3.attention.sliding_window"),
            "gemma3.attention.sliding_window is missing",
        ),
        (
            "zero-window.gguf",
            gemma().with("gemma3.attention.sliding_window", Value::U32(0)),
            "gemma3.attention.sliding_window = U32(0) is not a positive integer",
        ),
        (
            "no-key-length.gguf",
            gemma().without("gemma3.attention.key_length"),
            "gemma3.attention.key_length is missing",
        ),
        (
            "value-length.gguf",
            gemma().with("gemma3.attention.value_length", Value::U32(8)),
            "gemma3.attention.value_length = U32(8), but key_length is 16",
        ),
        (
            "rope-scaling.gguf",
            gemma().with("gemma3.rope.scaling.type", Value::String("linear".into())),
            "gemma3.rope.scaling.type",
        ),
        (
            "softcap.gguf",
            gemma().with("gemma3.final_logit_softcapping", Value::F32(30.0)),
            "gemma3.final_logit_softcapping",
        ),
        (
            "space-prefix.gguf",
            gemma().with("tokenizer.ggml.add_space_prefix", Value::Bool(true)),
            "tokenizer.ggml.add_space_prefix",
        ),
        (
            "no-unk.gguf",
            gemma().without("tokenizer.ggml.unknown_token_id"),
            "tokenizer.ggml.unknown_token_id is missing",
        ),
        (
            "no-bytes.gguf",
            gemma().with(
                "tokenizer.ggml.token_type",
                Value::Array(vec![Value::I32(1); 13 + 256 + 22]),
            ),
            "0 distinct byte tokens (type 6)",
        ),
        (
            "short-types.gguf",
            gemma().with(
                "tokenizer.ggml.token_type",
                Value::Array(vec![Value::I32(1)]),
            ),
            "tokenizer.ggml.token_type is not one integer per token",
        ),
        (
            "no-post-norm.gguf",
            gemma().without_tensor("blk.2.post_ffw_norm.weight"),
            "missing tensor blk.2.post_ffw_norm.weight",
        ),
    ];
    import_refused(tmp.path(), cases);
}

/// llama, qwen2 and qwen3 metadata the engine cannot run (RoPE scaling
/// other than linear, partial rotary), that contradicts itself, or that
/// every loader would refuse in the config.json it gives (an epsilon,
/// rope base or context length of 0, a negative factor, tokens past the
/// embedding's rows): refused by key, naming the file, nothing written.
#[test]
fn unrunnable_llama_and_qwen_metadata_is_refused_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = |name: &str| Gguf::from_file(&fixture(&format!("gguf/tiny_{name}.gguf")));
    let (llama, qwen2, qwen3) = (|| tiny("llama"), || tiny("qwen2"), || tiny("qwen3"));
    let s = |v: &str| Value::String(v.into());
    let f = Value::F32;
    // 316 tokens for an embedding of 266 rows, bos and eos past the rows.
    let g = GgufFile::open(&fixture("gguf/tiny_qwen2.gguf")).unwrap();
    let list = |k: &str| g.get(k).and_then(Value::as_array).unwrap().to_vec();
    let (mut tokens, mut types) = (
        list("tokenizer.ggml.tokens"),
        list("tokenizer.ggml.token_type"),
    );
    assert_eq!(g.tensor("token_embd.weight").unwrap().dims[1], 266);
    tokens.extend((0..50).map(|i| s(&format!("<extra_{i}>"))));
    types.extend((0..50).map(|_| Value::I32(1)));
    let eps = "qwen2.attention.layer_norm_rms_epsilon";
    let cases = vec![
        (
            "yarn.gguf",
            qwen2()
                .with("qwen2.rope.scaling.type", s("yarn"))
                .with("qwen2.rope.scaling.factor", f(4.0))
                .with("qwen2.rope.scaling.original_context_length", Value::U32(64)),
            "metadata qwen2.rope.scaling.type = \"yarn\": RoPE scaling other than linear",
        ),
        (
            "longrope.gguf",
            qwen3().with("qwen3.rope.scaling.type", s("longrope")),
            "metadata qwen3.rope.scaling.type = \"longrope\"",
        ),
        (
            "linear-no-factor.gguf",
            llama().with("llama.rope.scaling.type", s("linear")),
            "llama.rope.scaling.type = \"linear\" without llama.rope.scaling.factor",
        ),
        (
            "none-but-factor.gguf",
            qwen2()
                .with("qwen2.rope.scaling.type", s("none"))
                .with("qwen2.rope.scaling.factor", f(4.0)),
            "qwen2.rope.scaling.type = \"none\", but qwen2.rope.scaling.factor = 4",
        ),
        (
            "negative-factor.gguf",
            llama().with("llama.rope.scaling.factor", f(-2.0)),
            "metadata llama.rope.scaling.factor gives a config.json every loader refuses: rope_scaling.factor = -2",
        ),
        (
            "partial-rotary.gguf",
            llama().with("llama.rope.dimension_count", Value::U32(4)),
            "metadata llama.rope.dimension_count = 4: RoPE on 4 of head_dim 8",
        ),
        (
            "partial-rotary-qwen3.gguf",
            qwen3().with("qwen3.rope.dimension_count", Value::U32(8)),
            "qwen3.rope.dimension_count = 8: RoPE on 8 of head_dim 12",
        ),
        (
            "eps-0.gguf",
            qwen2().with(eps, f(0.0)),
            "metadata qwen2.attention.layer_norm_rms_epsilon gives a config.json every loader refuses: rms_norm_eps = 0",
        ),
        (
            "eps-minus-1.gguf",
            qwen2().with(eps, f(-1.0)),
            "metadata qwen2.attention.layer_norm_rms_epsilon gives a config.json every loader refuses: rms_norm_eps = -1",
        ),
        (
            "theta-0.gguf",
            qwen2().with("qwen2.rope.freq_base", f(0.0)),
            "metadata qwen2.rope.freq_base gives a config.json every loader refuses: rope_theta = 0",
        ),
        (
            "context-0.gguf",
            llama().with("llama.context_length", Value::U32(0)),
            "metadata llama.context_length gives a config.json every loader refuses: `max_position_embeddings` is 0",
        ),
        (
            "tokens-past-rows.gguf",
            qwen2()
                .with("tokenizer.ggml.tokens", Value::Array(tokens))
                .with("tokenizer.ggml.token_type", Value::Array(types))
                .with("tokenizer.ggml.bos_token_id", Value::U32(300))
                .with("tokenizer.ggml.eos_token_id", Value::U32(301)),
            "tokenizer.ggml.tokens holds 316 tokens, but token_embd.weight has 266 rows",
        ),
        (
            "kv-heads.gguf",
            llama().with("llama.attention.head_count_kv", Value::U32(1)),
            "blk.0.attn_k.weight",
        ),
    ];
    import_refused(tmp.path(), cases);
}

/// Each `(file name, GGUF, needle)`: `import` of it fails with the needle
/// and the file's name in the error, and writes nothing.
fn import_refused(dir: &Path, cases: Vec<(&str, Gguf, &str)>) {
    for (name, g, needle) in cases {
        let path = g.write(dir, name);
        let out = dir.join(format!("{name}.out"));
        let err = run_err(bin().arg("import").arg(&path).arg("--out").arg(&out));
        assert!(err.contains(needle), "{name}: {needle:?} not in {err}");
        assert!(err.contains(name), "{name}: no file name in {err}");
        assert!(!out.exists(), "{name}: wrote {}", out.display());
    }
}

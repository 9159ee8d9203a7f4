//! Bad model directories: each gives a clear error naming the file or
//! tensor and the problem, never a panic.
mod common;
use common::fixture;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::model::forward::{forward, Geometry, Keep};
use rku_engine::model::weights::Residency;
use rku_engine::model::Model;
use std::path::Path;

/// A copy of tiny-qwen2 in a temporary directory, for corrupting.
fn copy_model(tmp: &Path) -> std::path::PathBuf {
    copy_fixture(tmp, "tiny-qwen2")
}

/// A copy of fixture `name` in a temporary directory.
fn copy_fixture(tmp: &Path, name: &str) -> std::path::PathBuf {
    let dst = tmp.join("m");
    std::fs::create_dir(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture(name).join(f), dst.join(f)).unwrap();
    }
    dst
}

fn load_err_with(dir: &Path, residency: Residency) -> String {
    match Model::load_with(&CpuBackend::new(), dir, residency) {
        Ok(_) => panic!(
            "{} loaded ({residency:?}) but should not have",
            dir.display()
        ),
        Err(e) => e.to_string(),
    }
}

/// The load error of `dir`; a streamed load (which reads names and shapes
/// at load and values only at upload) must refuse it with the same error.
fn load_err(dir: &Path) -> String {
    let e = load_err_with(dir, Residency::Resident);
    assert_eq!(e, load_err_with(dir, Residency::Streamed));
    e
}

/// Rewrites model.safetensors with `edit` applied to the tensors.
fn rewrite(
    dir: &Path,
    edit: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(Vec<usize>, Vec<f32>)>,
) {
    use safetensors::{serialize, tensor::TensorView, Dtype, SafeTensors};
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in st.tensors() {
        let vals: Vec<f32> = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if let Some((shape, vals)) = edit(&name, v.shape().to_vec(), vals) {
            kept.push((
                name,
                shape,
                vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        serialize(views, None).unwrap(),
    )
    .unwrap();
}

#[test]
fn truncated_safetensors_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    std::fs::write(&f, b"short").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    rewrite(&dir, |n, s, v| {
        (n != "model.layers.1.mlp.up_proj.weight").then_some((s, v))
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    rewrite(&dir, |n, s, v| {
        if n == "model.layers.0.mlp.gate_proj.weight" {
            Some((vec![s[0] - 1, s[1]], v[..(s[0] - 1) * s[1]].to_vec()))
        } else {
            Some((s, v))
        }
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("shape"),
        "{e}"
    );
}

/// Qwen3's per-head q/k norm weights `[head_dim]`: a wrong shape or a
/// missing one is refused naming the tensor (and, for the shape, the file).
#[test]
fn qwen3_qk_norm_shape_and_presence_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture(tmp.path(), "tiny-qwen3");
    // [hidden / heads] = [16] where head_dim is 24: the mistake a loader
    // deriving head_dim from hidden_size would accept.
    rewrite(&dir, |n, s, v| {
        if n == "model.layers.1.self_attn.k_norm.weight" {
            Some((vec![16], v[..16].to_vec()))
        } else {
            Some((s, v))
        }
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.1.self_attn.k_norm.weight")
            && e.contains("shape [16]")
            && e.contains("expected [24]")
            && e.contains("model.safetensors"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture(tmp.path(), "tiny-qwen3");
    rewrite(&dir, |n, s, v| {
        (n != "model.layers.2.self_attn.q_norm.weight").then_some((s, v))
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.2.self_attn.q_norm.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn nan_in_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    rewrite(&dir, |n, s, mut v| {
        if n == "model.layers.2.self_attn.v_proj.weight" {
            v[5] = f32::NAN;
        }
        Some((s, v))
    });
    let e = load_err_with(&dir, Residency::Resident);
    assert!(
        e.contains("model.layers.2.self_attn.v_proj.weight") && e.contains("non-finite"),
        "{e}"
    );
    // Streamed, the values are read when the first pass reaches layer 2.
    let be = CpuBackend::new();
    let model = Model::load_with(&be, &dir, Residency::Streamed).unwrap();
    let geo = Geometry { seqs: 1, t: 4 };
    let e = match forward(&be, &model, &[1, 2, 3, 4], geo, Keep::OUTPUT) {
        Ok(_) => panic!("a forward pass over a NaN weight succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("model.layers.2.self_attn.v_proj.weight") && e.contains("non-finite"),
        "{e}"
    );
    // On the emulated device the values go straight from the file into the
    // upload's bf16 staging bytes (`TensorRef::write_bf16`): the same
    // refusal, resident at load and streamed at the upload.
    use rku_engine::backend::cuda::{CudaBackend, EmuDevice};
    let emu = CudaBackend::new(EmuDevice::new());
    let e = match Model::load(&emu, &dir) {
        Ok(_) => panic!("loaded a NaN weight on the emulated device"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("v_proj.weight") && e.contains("flat index 5 "),
        "{e}"
    );
    let model = Model::load_with(&emu, &dir, Residency::Streamed).unwrap();
    let e = match forward(&emu, &model, &[1, 2, 3, 4], geo, Keep::OUTPUT) {
        Ok(_) => panic!("a streamed forward pass over a NaN weight succeeded on the device"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("v_proj.weight") && e.contains("flat index 5 "),
        "{e}"
    );
}

/// The embedding is read by rows at each lookup: a NaN in one row is
/// refused, naming the tensor and the value's index, when a batch looks
/// that token up; other tokens run. A tied model's first logits load the
/// whole matrix as its head, which refuses the NaN whatever the tokens.
#[test]
fn nan_in_an_embedding_row_is_refused_at_its_lookup() {
    use rku_engine::model::forward::logits;
    for (name, tied) in [("tiny-qwen2", false), ("tiny-llama3", true)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy_fixture(tmp.path(), name);
        let d = rku_engine::model::ModelConfig::load(&dir.join("config.json"))
            .unwrap()
            .hidden;
        rewrite(&dir, |n, s, mut v| {
            if n == "model.embed_tokens.weight" {
                v[7 * d + 3] = f32::NAN;
            }
            Some((s, v))
        });
        let be = CpuBackend::new();
        let model = Model::load(&be, &dir).unwrap();
        let geo = Geometry { seqs: 1, t: 4 };
        forward(&be, &model, &[1, 2, 3, 4], geo, Keep::OUTPUT).unwrap();
        let e = match forward(&be, &model, &[1, 7, 3, 4], geo, Keep::OUTPUT) {
            Ok(_) => panic!("{name}: a lookup of a NaN row succeeded"),
            Err(e) => e.to_string(),
        };
        let index = format!("flat index {}", 7 * d + 3);
        assert!(
            e.contains("model.embed_tokens.weight")
                && e.contains("non-finite")
                && e.contains(&index),
            "{name}: {e}"
        );
        match (tied, logits(&be, &model, &[1, 2, 3, 4], geo)) {
            (true, Ok(_)) => panic!("{name}: the tied head loaded with a NaN"),
            (true, Err(e)) => assert!(e.to_string().contains("model.embed_tokens.weight"), "{e}"),
            (false, r) => assert!(
                r.is_ok(),
                "{name}: the untied head never reads the embedding"
            ),
        }
    }
}

#[test]
fn unsupported_architecture_and_bad_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("Qwen2ForCausalLM", "Gemma2ForCausalLM")
            .replace("\"qwen2\"", "\"gemma2\""),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("Gemma2ForCausalLM") && e.contains("supported"),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"hidden_size\": 32,", ""),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("hidden_size"), "{e}");
}

#[test]
fn missing_directory_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json"), "{e}");
}

/// A model re-saved as bf16 shards behind a `model.safetensors.index.json`
/// loads and computes the f32 model's logits within bf16 rounding.
#[test]
fn sharded_bf16_model_loads() {
    use rku_engine::io::safetensors_io::SafeModel;
    use rku_engine::io::safetensors_out::{write_model, OutDtype, OutTensor};
    use rku_engine::model::forward::logits;
    use rku_engine::model::Geometry;
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny-qwen2");
    let dst = tmp.path().join("sharded");
    std::fs::create_dir(&dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let files = SafeModel::open_dir(&src).unwrap();
    let tensors: Vec<OutTensor> = files
        .names()
        .into_iter()
        .map(|n| {
            let t = files.get_any(n).unwrap();
            OutTensor::from_f32(n, OutDtype::BF16, t.shape.to_vec(), &t.to_f32().unwrap())
        })
        .collect();
    write_model(&dst, &tensors, 40_000).unwrap();
    assert!(
        dst.join("model.safetensors.index.json").exists()
            && !dst.join("model.safetensors").exists()
    );
    let be = CpuBackend::new();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 320) as u32).collect();
    let geo = Geometry { seqs: 2, t: 12 };
    let want = logits(&be, &Model::load(&be, &src).unwrap(), &ids, geo).unwrap();
    let got = logits(&be, &Model::load(&be, &dst).unwrap(), &ids, geo).unwrap();
    let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale;
    assert!(err < 3e-2, "bf16 sharded logits differ by {err}");
    assert!(err > 0.0, "bf16 rounding should change something");

    // An infinity in a bf16 tensor is refused like one in an f32 tensor.
    let bad = "model.layers.1.mlp.down_proj.weight";
    let tensors: Vec<OutTensor> = files
        .names()
        .into_iter()
        .map(|n| {
            let t = files.get_any(n).unwrap();
            let mut v = t.to_f32().unwrap();
            if n == bad {
                v[3] = f32::INFINITY;
            }
            OutTensor::from_f32(n, OutDtype::BF16, t.shape.to_vec(), &v)
        })
        .collect();
    let dst = tmp.path().join("inf");
    std::fs::create_dir(&dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    write_model(&dst, &tensors, 40_000).unwrap();
    let e = load_err_with(&dst, Residency::Resident);
    assert!(e.contains(bad) && e.contains("non-finite"), "{e}");
}

/// A q_proj bias in a LLaMA model's files (no `attention_bias`): as in
/// transformers, which ignores it, the engine does not use it (it warns
/// that the tensor is unused); the logits equal the model without it.
#[test]
fn qkv_biases_outside_qwen2_are_ignored_as_transformers_does() {
    use safetensors::{serialize, tensor::TensorView, Dtype, SafeTensors};
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture(tmp.path(), "tiny-llama3");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let be = CpuBackend::new();
    let clean = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let q = clean.cfg.q_dim();
    let ones: Vec<u8> = (0..q).flat_map(|_| 1f32.to_le_bytes()).collect();
    let mut views: Vec<(String, TensorView)> = st.tensors();
    views.push((
        "model.layers.0.self_attn.q_proj.bias".into(),
        TensorView::new(Dtype::F32, vec![q], &ones).unwrap(),
    ));
    std::fs::write(
        dir.join("model.safetensors"),
        serialize(views, None).unwrap(),
    )
    .unwrap();
    let biased = Model::load(&be, &dir).unwrap();
    let ids: Vec<u32> = (0..10)
        .map(|i| (i * 7 + 3) % clean.cfg.vocab as u32)
        .collect();
    let geo = Geometry { seqs: 1, t: 10 };
    let z = |m: &Model<CpuBackend>| forward(&be, m, &ids, geo, Keep::OUTPUT).unwrap().z;
    assert_eq!(z(&clean), z(&biased));
}

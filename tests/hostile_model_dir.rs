//! Model directories that lie: shard indexes naming files outside the
//! directory or the wrong shard, a tensor in two shards, a layer count
//! that disagrees with the weights, a FIFO where a file belongs. Each is
//! refused with the file named.
mod common;

use common::{failed_without_panic, fixture};
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::io::safetensors_io::SafeModel;
use rku_engine::model::Model;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A copy of tiny-llama3 whose tensors are split over two shards by
/// `shard_of(name) -> 0 | 1`, with `extra` tensors (name, shard) written
/// into the shards too, and `index` edits applied to the written index.
fn sharded(
    dir: &Path,
    shard_of: impl Fn(&str) -> usize,
    extra: &[(&str, usize)],
    edit: impl FnOnce(&mut Value),
) {
    let src = fixture("tiny-llama3");
    for f in ["config.json", "tokenizer.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    }
    let model = SafeModel::open_dir(&src).unwrap();
    let mut shards: [Vec<(String, TensorView)>; 2] = [Vec::new(), Vec::new()];
    let mut map = serde_json::Map::new();
    let names = model.names();
    let dtype = |t: &rku_engine::io::safetensors_io::TensorRef| match t.dtype.size() {
        4 => Dtype::F32,
        _ => Dtype::BF16,
    };
    for name in &names {
        let t = model.get_any(name).unwrap();
        let k = shard_of(name);
        let view = TensorView::new(dtype(&t), t.shape.to_vec(), t.bytes).unwrap();
        shards[k].push((name.to_string(), view));
        map.insert(
            name.to_string(),
            json!(format!("model-0000{}-of-00002.safetensors", k + 1)),
        );
    }
    for &(name, k) in extra {
        let t = model.get_any(name).unwrap();
        let view = TensorView::new(dtype(&t), t.shape.to_vec(), t.bytes).unwrap();
        shards[k].push((name.to_string(), view));
    }
    for (k, views) in shards.into_iter().enumerate() {
        let path = dir.join(format!("model-0000{}-of-00002.safetensors", k + 1));
        safetensors::serialize_to_file(views, None, &path).unwrap();
    }
    let mut index = json!({"metadata": {}, "weight_map": Value::Object(map)});
    edit(&mut index);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string(&index).unwrap(),
    )
    .unwrap();
}

fn half(name: &str) -> usize {
    usize::from(name.contains("layers.1."))
}

fn load_err(dir: &Path) -> String {
    match Model::load(&CpuBackend::new(), dir) {
        Ok(_) => panic!("{} should be refused", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_consistent_sharded_copy_loads() {
    let tmp = tempfile::tempdir().unwrap();
    sharded(tmp.path(), half, &[], |_| {});
    Model::load(&CpuBackend::new(), tmp.path()).unwrap();
}

#[test]
fn shard_names_outside_the_directory_are_refused() {
    for bad in [
        "../model-00001-of-00002.safetensors",
        "/etc/passwd",
        "sub/model-00001-of-00002.safetensors",
        "",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        sharded(tmp.path(), half, &[], |index| {
            index["weight_map"]["model.norm.weight"] = json!(bad);
        });
        let e = load_err(tmp.path());
        assert!(
            e.contains("model.safetensors.index.json") && e.contains("not a plain file name"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn a_tensor_in_the_wrong_shard_or_in_two_shards_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    sharded(tmp.path(), half, &[], |index| {
        index["weight_map"]["model.norm.weight"] = json!("model-00002-of-00002.safetensors");
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("lies in model-00001-of-00002"),
        "{e}"
    );

    let tmp = tempfile::tempdir().unwrap();
    sharded(tmp.path(), half, &[("model.norm.weight", 1)], |_| {});
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("found in both"),
        "{e}"
    );

    let tmp = tempfile::tempdir().unwrap();
    sharded(tmp.path(), half, &[], |index| {
        index["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("model.norm.weight");
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("not in the weight_map"),
        "{e}"
    );
}

#[test]
fn a_layer_count_below_the_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    sharded(tmp.path(), half, &[], |_| {});
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap();
    assert!(layers >= 2, "the fixture needs two layers");
    for n in [layers - 1, 0] {
        cfg["num_hidden_layers"] = json!(n);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let e = load_err(tmp.path());
        assert!(
            e.contains("config.json") && e.contains("num_hidden_layers"),
            "{n}: {e}"
        );
    }
}

#[test]
fn sizes_listed_in_the_weights_must_match_the_config_sizes() {
    // A config asking for a wider FFN than the weights hold is refused by
    // tensor name rather than read out of bounds.
    let tmp = tempfile::tempdir().unwrap();
    sharded(tmp.path(), half, &[], |_| {});
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let m = cfg["intermediate_size"].as_u64().unwrap();
    cfg.insert("intermediate_size".into(), json!(m + 1));
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("mlp.gate_proj.weight") || e.contains("mlp."),
        "{e}"
    );
}

/// A weights file truncated or rewritten under a streamed run stops it with
/// a named error at the next layer it reads, instead of SIGBUS or other weights.
#[test]
fn a_weights_file_changed_under_a_streamed_run_is_detected() {
    use rku_engine::model::forward::{forward, Keep};
    use rku_engine::model::weights::Residency;
    use rku_engine::model::Geometry;
    for truncate in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let src = fixture("tiny-llama3");
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        let be = CpuBackend::new();
        let model = Model::load_with(&be, tmp.path(), Residency::Streamed).unwrap();
        let geo = Geometry { seqs: 1, t: 4 };
        forward(&be, &model, &[1, 2, 3, 4], geo, Keep::OUTPUT).unwrap();
        let weights = tmp.path().join("model.safetensors");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&weights)
            .unwrap();
        let len = file.metadata().unwrap().len();
        if truncate {
            file.set_len(len / 2).unwrap();
        } else {
            // Same length, later modification time: rewritten in place.
            let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
            file.set_modified(later).unwrap();
        }
        let e = match forward(&be, &model, &[1, 2, 3, 4], geo, Keep::OUTPUT) {
            Ok(_) => panic!("truncate={truncate}: the change went unnoticed"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("model.safetensors") && e.contains("changed"),
            "truncate={truncate}: {e}"
        );
    }
}

/// Runs `cmd`, which must fail within a minute (a FIFO opened for reading
/// would block it forever: killed and failed here instead of hanging the
/// suite); returns its stderr.
fn run_err_promptly(cmd: &mut std::process::Command) -> String {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{cmd:?} still running after 60 s (blocked on a FIFO?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    failed_without_panic(cmd, &out)
}

fn mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "mkfifo {}", path.display());
}

/// A FIFO where a model file, a shard or a statistics file should be is
/// refused by name before it is opened, not read (which blocks forever).
#[test]
fn fifos_are_refused_promptly_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = common::calib_text(tmp.path(), 50);
    let score = |model: &Path| {
        let mut c = common::bin();
        c.arg("score")
            .arg("--model")
            .arg(model)
            .arg("--calib")
            .arg(&calib)
            .args(["--seq-len", "16", "--samples", "1", "--backend", "cpu"])
            .arg("--out")
            .arg(tmp.path().join("never.st"));
        c
    };
    let src = fixture("tiny-llama3");
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        let dir = tmp.path().join(format!("fifo-{file}"));
        std::fs::create_dir(&dir).unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        std::fs::remove_file(dir.join(file)).unwrap();
        mkfifo(&dir.join(file));
        let e = run_err_promptly(&mut score(&dir));
        assert!(
            e.contains(&dir.join(file).display().to_string()) && e.contains("not a regular file"),
            "{file}: {e}"
        );
    }
    let dir = tmp.path().join("fifo-shard");
    std::fs::create_dir(&dir).unwrap();
    sharded(&dir, half, &[], |_| {});
    let shard = dir.join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let e = run_err_promptly(&mut score(&dir));
    assert!(
        e.contains(&shard.display().to_string()) && e.contains("not a regular file"),
        "shard: {e}"
    );
    assert!(!tmp.path().join("never.st").exists());

    let stats = tmp.path().join("stats.st");
    mkfifo(&stats);
    let out = tmp.path().join("pruned");
    let e = run_err_promptly(
        common::bin()
            .arg("prune")
            .arg("--model")
            .arg(&src)
            .arg("--stats")
            .arg(&stats)
            .args(["--sparsity", "0.5", "--backend", "cpu", "--out"])
            .arg(&out),
    );
    assert!(
        e.contains(&stats.display().to_string()) && e.contains("not a regular file"),
        "stats: {e}"
    );
    assert!(!out.exists());
}

//! Statistics files that were damaged or would be double-counted: a flipped
//! bit anywhere in the tensors, and shards that share calibration windows.
mod common;

use common::{bin, calib_text, fixture, run_err, run_ok};
use std::path::{Path, PathBuf};

/// `score` on tiny-llama3 over `samples` windows of 16 tokens of one text.
fn score(dir: &Path, name: &str, text: &Path, samples: usize) -> PathBuf {
    let out = dir.join(name);
    run_ok(
        bin()
            .arg("score")
            .arg("--model")
            .arg(fixture("tiny-llama3"))
            .arg("--calib")
            .arg(text)
            .args(["--seq-len", "16", "--samples", &samples.to_string()])
            .args(["--backend", "cpu", "--out"])
            .arg(&out),
    );
    out
}

#[test]
fn overlapping_shards_are_refused_naming_files_and_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let t = calib_text(tmp.path(), 200);
    let a = score(tmp.path(), "a.st", &t, 2);
    let b = score(tmp.path(), "b.st", &t, 3);
    let out = tmp.path().join("merged.st");
    let e = run_err(
        bin()
            .args(["stats", "merge"])
            .arg(&a)
            .arg(&b)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        e.contains("window 0 of") && e.contains("a.st") && e.contains("b.st"),
        "{e}"
    );
    assert!(e.contains("same calibration window"), "{e}");
    assert!(!out.exists());
}

#[test]
fn a_flipped_bit_in_any_tensor_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = calib_text(tmp.path(), 200);
    let good = score(tmp.path(), "good.st", &t, 2);
    let bytes = std::fs::read(&good).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = 8 + header;
    // Flip one exponent bit in a handful of places across the tensor data:
    // a changed statistic would change the mask with exit 0.
    let n = bytes.len() - data;
    for (k, at) in [0, n / 7, n / 3, n / 2, n - 9].into_iter().enumerate() {
        let mut b = bytes.clone();
        b[data + at] ^= 0x40;
        let bad = tmp.path().join(format!("bad{k}.st"));
        std::fs::write(&bad, &b).unwrap();
        let e = run_err(
            bin()
                .arg("prune")
                .arg("--model")
                .arg(fixture("tiny-llama3"))
                .arg("--stats")
                .arg(&bad)
                .args(["--sparsity", "0.5", "--backend", "cpu", "--out"])
                .arg(tmp.path().join(format!("out{k}"))),
        );
        assert!(
            e.contains(&format!("bad{k}.st")) && e.contains("checksum"),
            "{e}"
        );
        assert!(!tmp.path().join(format!("out{k}")).exists());
    }
}

/// Statistics whose values are finite but far past anything this model's
/// activations give (s1 × 1e41, the checksum recomputed as a crafted file
/// would): FLAP's bias compensation would not fit f32, and the export
/// would hold -inf. Refused with nothing written.
#[test]
fn flap_bias_past_f32_is_refused() {
    use rku_engine::prune::Stats;
    let tmp = tempfile::tempdir().unwrap();
    let t = calib_text(tmp.path(), 200);
    let good = score(tmp.path(), "good.st", &t, 2);
    let mut stats = Stats::load(&good).unwrap();
    for layer in &mut stats.layers {
        layer.s1.iter_mut().for_each(|s| *s *= 1e41);
    }
    let big = tmp.path().join("big.st");
    stats.save(&big).unwrap();
    let prune = |stats: &Path, out: &Path| {
        let mut c = bin();
        c.arg("prune")
            .arg("--model")
            .arg(fixture("tiny-llama3"))
            .arg("--stats")
            .arg(stats)
            .args(["--method", "flap", "--sparsity", "0.3", "--backend", "cpu"])
            .arg("--out")
            .arg(out);
        c
    };
    let out = tmp.path().join("out");
    let e = run_err(&mut prune(&big, &out));
    assert!(e.contains("FLAP") && e.contains("layer 0"), "{e}");
    assert!(!out.exists());
    // The same command on the file as scored succeeds.
    run_ok(&mut prune(&good, &out));
}

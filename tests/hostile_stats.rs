//! Statistics files that were damaged or would be double-counted: a flipped
//! bit anywhere in the tensors, and shards that share calibration windows.
mod common;

use common::{bin, calib_text, fixture, run_err, run_ok};
use std::path::{Path, PathBuf};

/// `score` on tiny-llama3 over `samples` windows of 16 tokens of one text.
fn score(dir: &Path, name: &str, text: &Path, samples: usize) -> PathBuf {
    score_with(dir, name, text, samples, &[])
}

/// [`score`] with `extra` flags (a `--shard`).
fn score_with(dir: &Path, name: &str, text: &Path, samples: usize, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    run_ok(
        bin()
            .arg("score")
            .arg("--model")
            .arg(fixture("tiny-llama3"))
            .arg("--calib")
            .arg(text)
            .args(["--seq-len", "16", "--samples", &samples.to_string()])
            .args(extra)
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

/// `stats merge` of `files` (with `--expect-complete` when `complete`).
fn merge(files: &[&Path], complete: bool, out: &Path) -> std::process::Command {
    let mut cmd = bin();
    cmd.args(["stats", "merge"]).args(files);
    if complete {
        cmd.arg("--expect-complete");
    }
    cmd.arg("--out").arg(out);
    cmd
}

/// Headers whose counts are consistent one by one but not together: shard
/// records claiming sets of 2^60 or 2^40 + 1 sequences (which once sized
/// an allocation, or a walk over every shard, by the header), and two
/// files whose token counts add up past 2^64 (which once wrapped into a
/// merged file with exit 0). Each is an error naming what is wrong.
#[test]
fn counts_that_cannot_be_one_set_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let t = calib_text(d, 200);
    let shard = score_with(d, "shard.st", &t, 4, &["--shard", "0/2"]);
    let base = rku_engine::prune::Stats::load(&shard).unwrap();
    assert_eq!(base.meta.samples, 2);
    let out = d.join("merged.st");

    // A set of 2^60 sequences: shard 0/2 of it would hold 2^59, not 2.
    let mut s = base.clone();
    s.meta.shard.as_mut().unwrap().set_samples = 1 << 60;
    let huge = d.join("huge.st");
    s.save(&huge).unwrap();
    let e = run_err(&mut merge(&[&huge], true, &out));
    assert!(e.contains("huge.st") && e.contains("shard_samples"), "{e}");

    // Shard 0 of 2^40 in a set of 2^40 + 1 holds sequences 0 and 2^40:
    // a consistent header, and 2^40 − 1 shards are missing.
    let n = 1usize << 40;
    let mut s = base.clone();
    let r = s.meta.shard.as_mut().unwrap();
    (r.count, r.set_samples) = (n, n + 1);
    let many = d.join("many.st");
    s.save(&many).unwrap();
    let e = run_err(&mut merge(&[&many], true, &out));
    assert!(
        e.contains(&format!("missing shard 1/{n} (sequences 1; 1 in all)")),
        "{e}"
    );
    assert!(e.contains(&format!("and {} more shards", n - 9)), "{e}");

    // Two whole passes of T tokens a window, 1 and 2 windows: 3T > 2^64.
    let windows = |name: &str, samples: usize, text: &Path| {
        let p = score(d, name, text, samples);
        let mut s = rku_engine::prune::Stats::load(&p).unwrap();
        let t = (1u128 << 64).div_ceil(3) as u64; // 3t = 2^64 + 2
        s.meta.seq_len = t as usize;
        s.meta.tokens = samples as u64 * t;
        s.meta.predicted = samples as u64 * (t - 1);
        s.meta.norms.energy = s.meta.tokens;
        s.meta.norms.ce = s.meta.predicted;
        s.save_with(&p, true).unwrap();
        p
    };
    let other = d.join("other.txt");
    let text: String = (0..200)
        .map(|i| format!("Row {i} of another text, with {} numbers.\n", i * 7))
        .collect();
    std::fs::write(&other, text).unwrap();
    let a = windows("a.st", 1, &t);
    let b = windows("b.st", 2, &other);
    // Each file alone is a readable statistics file.
    rku_engine::prune::Stats::load(&a).unwrap();
    rku_engine::prune::Stats::load(&b).unwrap();
    let e = run_err(&mut merge(&[&a, &b], false, &out));
    assert!(
        e.contains("add up to more than 2^64") && e.contains("a.st") && e.contains("b.st"),
        "{e}"
    );
    assert!(!out.exists());
}

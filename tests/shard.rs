//! Sharded scoring (METHODS.md §4): `score --shard i/n` (or the scheduler's
//! environment) and `stats merge --expect-complete` against one pass.
mod common;
use common::*;
use rku_engine::prune::Stats;
use std::path::{Path, PathBuf};
use std::process::Command;

const SCHEDULER_VARS: [&str; 5] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
    "RANK",
    "WORLD_SIZE",
];

/// `score` of tiny-qwen2 on `input` (calibration text, or traces with
/// `traces`), with the scheduler's variables cleared and `extra` appended.
/// One sequence per batch: the CPU's f32 products depend on a batch's row
/// count (measured 1.5e-8 relative on s1 between batches of 3 and of 2), so
/// only batches of one make the sums of a shard and of the single pass
/// differ by their f64 summation order alone, which is what is checked.
fn score(input: &Path, traces: bool, out: &Path, extra: &[&str]) -> Command {
    score_on("cpu", input, traces, out, extra)
}

/// [`score`] on `backend`.
fn score_on(backend: &str, input: &Path, traces: bool, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    for v in SCHEDULER_VARS {
        c.env_remove(v);
    }
    c.args([
        "score",
        "--backend",
        backend,
        "--objective",
        "both",
        "--model",
    ])
    .arg(fixture("tiny-qwen2"));
    if traces {
        c.arg("--traces").arg(input).args(["--batch", "1"]);
    } else {
        c.arg("--calib")
            .arg(input)
            .args(["--samples", "10", "--seq-len", "12", "--batch", "1"]);
    }
    c.arg("--out").arg(out).args(extra);
    c
}

fn merge(files: &[PathBuf], out: &Path) -> Command {
    let mut c = bin();
    c.args(["stats", "merge", "--expect-complete"])
        .args(files)
        .arg("--out")
        .arg(out);
    c
}

/// Every statistic of `a` within 1e-12 relative of `b`'s, and the same
/// metadata but the engine version.
fn assert_same_pass(a: &Stats, b: &Stats) {
    assert_eq!(a.meta, b.meta, "metadata");
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        for (name, p, q) in [
            ("s1", &x.s1, &y.s1),
            ("s2", &x.s2, &y.s2),
            ("f2", &x.f2, &y.f2),
            ("k1", &x.k1, &y.k1),
            ("tk", &x.tk, &y.tk),
        ] {
            assert_eq!(p.len(), q.len(), "layer {l} {name}");
            let scale = q.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (c, (u, v)) in p.iter().zip(q).enumerate() {
                assert!(
                    (u - v).abs() <= 1e-12 * scale,
                    "layer {l} {name} channel {c}: {u} vs {v} (scale {scale})"
                );
            }
        }
    }
}

/// Scores `input` once and as 4 shards, merges the shards with
/// --expect-complete, and checks the merge is the single pass.
fn check_four_shards_equal_one_pass(input: &Path, traces: bool, dir: &Path) {
    let single = dir.join("single.st");
    run_ok(&mut score(input, traces, &single, &[]));
    let shards: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = dir.join(format!("shard{i}.st"));
            run_ok(&mut score(
                input,
                traces,
                &p,
                &["--shard", &format!("{i}/4")],
            ));
            p
        })
        .collect();
    let part = Stats::load(&shards[1]).unwrap();
    let shard = part.meta.shard.as_ref().expect("a shard record");
    assert_eq!((shard.index, shard.count), (1, 4));
    let merged = dir.join("merged.st");
    // Given in any order.
    let order = [
        shards[2].clone(),
        shards[0].clone(),
        shards[3].clone(),
        shards[1].clone(),
    ];
    run_ok(&mut merge(&order, &merged));
    assert_same_pass(
        &Stats::load(&merged).unwrap(),
        &Stats::load(&single).unwrap(),
    );
}

#[test]
fn four_window_shards_merge_to_one_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib_text(tmp.path(), 200);
    check_four_shards_equal_one_pass(&calib, false, tmp.path());
}

#[test]
fn four_trace_shards_merge_to_one_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-qwen2");
    let digest = rku_engine::io::traces::tokenizer_digest(&model).unwrap();
    // 9 traces of three lengths, so the shards batch differently.
    let traces: Vec<(Vec<u32>, Vec<u32>)> = (0..9)
        .map(|i| {
            let mut next = xorshift(31 + i as u64);
            let s: Vec<u32> = (0..8 + 3 * (i % 3))
                .map(|_| (next() % 100) as u32)
                .collect();
            (s[..4].to_vec(), s[4..].to_vec())
        })
        .collect();
    let file = tmp.path().join("t.jsonl");
    write_trace_file(&file, &digest, &traces);
    check_four_shards_equal_one_pass(&file, true, tmp.path());
}

/// The scheduler's variables pick the shard `--shard` names.
#[test]
fn scheduler_variables_pick_the_same_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib_text(tmp.path(), 200);
    let flag = tmp.path().join("flag.st");
    run_ok(&mut score(&calib, false, &flag, &["--shard", "2/4"]));
    let want = Stats::load(&flag).unwrap();
    for (i, vars) in [
        vec![
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ],
        vec![("RANK", "2"), ("WORLD_SIZE", "4")],
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("env{i}.st"));
        let mut c = score(&calib, false, &out, &[]);
        c.envs(vars);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("shard 2/4 (from "), "{err}");
        assert_eq!(Stats::load(&out).unwrap(), want, "environment {i}");
    }
    // A malformed variable is an error naming it.
    let mut c = score(&calib, false, &tmp.path().join("bad.st"), &[]);
    c.envs([("RANK", "two"), ("WORLD_SIZE", "4")]);
    assert!(run_err(&mut c).contains("RANK"));
}

#[test]
fn incomplete_overlapping_and_foreign_shards_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let calib = calib_text(dir, 200);
    let shard = |spec: &str| {
        let p = dir.join(format!("s{}.st", spec.replace('/', "of")));
        run_ok(&mut score(&calib, false, &p, &["--shard", spec]));
        p
    };
    let (s0, s1, s2) = (shard("0/4"), shard("1/4"), shard("2/4"));
    let out = dir.join("m.st");
    let err = run_err(&mut merge(&[s0.clone(), s1.clone(), s2.clone()], &out));
    assert!(
        err.contains("missing shard 3/4 (sequences 3, 7; 2 in all)"),
        "{err}"
    );
    // The same shard twice.
    let copy = dir.join("copy.st");
    std::fs::copy(&s1, &copy).unwrap();
    let err = run_err(&mut merge(&[s0.clone(), s1.clone(), copy], &out));
    assert!(err.contains("counted twice"), "{err}");
    // 0/2 holds sequences 0, 2, 4, … and overlaps 0/4.
    let half = shard("0/2");
    let err = run_err(&mut merge(&[s0.clone(), half], &out));
    assert!(err.contains("same calibration window"), "{err}");
    // 1/2 is disjoint from 0/4 but a shard of another split.
    let other = shard("1/2");
    let err = run_err(&mut merge(&[s0.clone(), other], &out));
    assert!(err.contains("not shards of one set"), "{err}");
    // A whole pass (over other text) is not a shard.
    let other_text = dir.join("other.txt");
    let text: String = (0..200)
        .map(|i| format!("Row {i} of another text, with {} numbers.\n", i * 3))
        .collect();
    std::fs::write(&other_text, text).unwrap();
    let whole = dir.join("whole.st");
    run_ok(&mut score(&other_text, false, &whole, &[]));
    let err = run_err(&mut merge(&[s0, whole], &out));
    assert!(err.contains("is not a shard"), "{err}");
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
}

#[test]
fn bad_shard_flags_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib_text(tmp.path(), 200);
    let out = tmp.path().join("x.st");
    for (spec, why) in [
        ("3/2", "not below the shard count"),
        ("0/0", "at least one shard"),
        ("1/x", "non-negative integers"),
        ("1", "expected i/n"),
    ] {
        let err = run_err(&mut score(&calib, false, &out, &["--shard", spec]));
        assert!(err.contains(why), "--shard {spec}: {err}");
    }
    // 10 windows cannot fill 11 shards: refused for the empty shard, and
    // for a shard that would hold one (its file could never be merged).
    for spec in ["10/11", "0/11", "0/18446744073709551615"] {
        let err = run_err(&mut score(&calib, false, &out, &["--shard", spec]));
        assert!(
            err.contains("use at most 10 shards"),
            "--shard {spec}: {err}"
        );
        assert!(!out.exists());
    }
}

/// `--devices 0,1,2` on emulated devices: one share per device, summed,
/// equals the one-device pass on the same backend (its metadata, and its
/// statistics up to f64 summation order), and a shard of it equals
/// `--shard` alone.
#[test]
fn devices_sum_to_one_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = calib_text(tmp.path(), 200);
    let on = |out: &Path, extra: &[&str]| score_on("cuda-emu", &calib, false, out, extra);
    let one = tmp.path().join("one.st");
    run_ok(&mut on(&one, &[]));
    let three = tmp.path().join("three.st");
    run_ok(&mut on(&three, &["--devices", "0,1,2"]));
    assert_same_pass(&Stats::load(&three).unwrap(), &Stats::load(&one).unwrap());
    let err = run_err(&mut on(&tmp.path().join("x.st"), &["--devices", "0,0"]));
    assert!(err.contains("twice"), "{err}");
    let err = run_err(&mut score(
        &calib,
        false,
        &tmp.path().join("y.st"),
        &["--devices", "0,1"],
    ));
    assert!(err.contains("--backend cuda"), "{err}");
}

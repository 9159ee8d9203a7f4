//! `rku-engine report` end to end on the tiny Qwen2 fixture: every cell is
//! there and equals what the single-purpose commands (`eval ppl`, `eval mc`,
//! `iou`) give on the same pruned models; the plots are SVG with one line
//! per method; reruns skip finished cells, recompute a deleted one, and
//! refuse inputs that would make finished cells inconsistent.
mod common;
use common::*;
use rku_engine::prune::Stats;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

const METHODS: [&str; 5] = ["rku", "agf", "wanda-struct", "flap", "taylor"];
const SPARSITIES: [&str; 2] = ["0.3", "0.5"];

const GSM: &str = r#####"{"question": "Shot one: 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
{"question": "A farmer has 3 cows and buys 4 more. How many cows?", "answer": "3 + 4 = 7\n#### 7"}
{"question": "What is 1,000 + 250?", "answer": "#### 1,250"}
{"question": "Numbers: 2024 minus 2000?", "answer": "24"}
"#####;

const MC: &str = r#"{"query": "The train leaves at", "choices": ["noon", "11:05", "the station in the morning"], "gold": 1}
{"question": "Numbers: 2024 and", "choices": ["3.14", "cats", "7"], "label": 0}
{"query": "said the", "choices": ["teacher", "train"], "gold": 0}
"#;

/// Calibration/held-out text, gen and mc data in `dir`.
struct Inputs {
    text: PathBuf,
    gsm: PathBuf,
    mc: PathBuf,
}

fn inputs(dir: &Path) -> Inputs {
    let text: String = (0..300)
        .map(|i| {
            format!(
                "Line {i}: the quick brown fox jumps over {} lazy dogs.\n",
                i * 7
            )
        })
        .collect();
    let i = Inputs {
        text: dir.join("text.txt"),
        gsm: dir.join("gsm.jsonl"),
        mc: dir.join("mc.jsonl"),
    };
    std::fs::write(&i.text, text).unwrap();
    std::fs::write(&i.gsm, GSM).unwrap();
    std::fs::write(&i.mc, MC).unwrap();
    i
}

/// The last JSON line of a command's output.
fn json_line(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The full report of the first test: every evaluation on, models kept.
fn full_report(i: &Inputs, out: &Path) -> Command {
    let mut c = bin();
    c.arg("report")
        .arg("--model")
        .arg(fixture("tiny-qwen2"))
        .arg("--calib")
        .arg(&i.text)
        .args(["--samples", "4", "--seq-len", "24"])
        .args(["--methods", &METHODS.join(","), "--sparsity", "0.3,0.5"])
        .arg("--ppl-text")
        .arg(&i.text)
        .args(["--ppl-seq-len", "24", "--ppl-max-windows", "12"])
        .arg("--gen-data")
        .arg(&i.gsm)
        .args(["--gen-shots", "1", "--gen-max-new-tokens", "6"])
        .arg("--mc-data")
        .arg(&i.mc)
        .args(["--limit", "2"])
        .args(["--prefill-seq-len", "16", "--prefill-repeats", "1"])
        .arg("--keep-models")
        .arg("--out")
        .arg(out);
    c
}

/// "report: N cells computed, M skipped ..." → (N, M).
fn counts(stdout: &str) -> (usize, usize) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("report:"))
        .unwrap_or_else(|| panic!("no summary line in {stdout}"));
    let num = |word: &str| -> usize {
        let at = line.find(word).unwrap();
        line[..at]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num(" cells computed"), num(" skipped"))
}

/// Modification time of every file under `dir`, by name.
fn mtimes(dir: &Path) -> BTreeMap<String, SystemTime> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().modified().unwrap(),
            )
        })
        .collect()
}

/// Checks one plot: an SVG document in which every series of the report
/// is exactly one polyline in its colour with its number of points, and
/// whose labels are the methods and the dense reference.
fn check_svg(out: &Path, plot: &Value, points_per_method: usize, dense_points: usize) {
    let file = out.join(plot["file"].as_str().unwrap());
    let text = std::fs::read_to_string(&file).unwrap();
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{}: not XML: {e}", file.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let series = plot["series"].as_array().unwrap();
    let labels: Vec<&str> = series
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = METHODS.to_vec();
    want.push("dense");
    assert_eq!(labels, want, "{}", file.display());
    let polylines: Vec<roxmltree::Node> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .collect();
    for s in series {
        let color = s["color"].as_str().unwrap();
        let mine: Vec<&roxmltree::Node> = polylines
            .iter()
            .filter(|n| {
                n.attribute("stroke")
                    .unwrap_or("")
                    .eq_ignore_ascii_case(color)
            })
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "{}: series {} ({color}) should be one polyline",
            file.display(),
            s["label"]
        );
        let n = mine[0]
            .attribute("points")
            .unwrap()
            .split_whitespace()
            .count();
        let want = if s["label"] == "dense" {
            dense_points
        } else {
            points_per_method
        };
        assert_eq!(n, want, "{}: points of {}", file.display(), s["label"]);
        assert_eq!(s["points"].as_u64().unwrap() as usize, n);
        // Its legend entry.
        assert!(
            doc.descendants().any(|t| t.has_tag_name("text")
                && t.text()
                    .is_some_and(|x| x.trim() == s["label"].as_str().unwrap())),
            "{}: no legend text for {}",
            file.display(),
            s["label"]
        );
    }
}

#[test]
fn report_cells_match_single_commands_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let i = inputs(tmp.path());
    let out = tmp.path().join("report");
    let cells_total = 1 + 3 + METHODS.len() * SPARSITIES.len() * 5;
    let (computed, skipped) = counts(&run_ok(&mut full_report(&i, &out)));
    assert_eq!((computed, skipped), (cells_total, 0));

    let r = read_json(&out.join("report.json"));
    assert_eq!(r["complete"], true);
    assert!(out.join("stats.safetensors").exists());
    assert_eq!(r["stats"]["objectives"], "energy,ce", "taylor needs ce");
    let dense_ppl = r["dense"]["ppl"]["ppl"].as_f64().unwrap();
    assert!(dense_ppl.is_finite() && dense_ppl > 1.0);
    // Every perplexity says whether its windows started with BOS (the
    // report's never do), report.md's inputs line too.
    assert_eq!(r["dense"]["ppl"]["bos"], false);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.lines()
            .any(|l| l.starts_with("- ppl: ") && l.contains("tokens, without BOS")),
        "{md}"
    );
    let cells = r["cells"].as_array().unwrap();
    assert_eq!(cells.len(), METHODS.len() * SPARSITIES.len());
    let models = out.join("models");
    for s in SPARSITIES {
        for m in METHODS {
            let c = cells
                .iter()
                .find(|c| c["method"] == m && c["sparsity"].as_f64() == s.parse().ok())
                .unwrap_or_else(|| panic!("no cell {m} {s}"));
            let dir = models.join(format!("{m}-s{s}"));
            // Perplexity equals `eval ppl` on the same pruned model.
            let ppl = c["ppl"]["ppl"].as_f64().unwrap();
            assert!(ppl.is_finite() && ppl > 1.0, "{m} {s}: ppl {ppl}");
            assert_eq!(c["ppl"]["bos"], false, "{m} {s}");
            let single = json_line(&run_ok(
                bin()
                    .args(["eval", "ppl", "--model"])
                    .arg(&dir)
                    .arg("--text")
                    .arg(&i.text)
                    .args(["--seq-len", "24", "--max-windows", "12", "--json"]),
            ));
            assert_eq!(
                ppl,
                single["ppl"].as_f64().unwrap(),
                "{m} {s}: report vs eval ppl"
            );
            assert_ne!(ppl, dense_ppl, "{m} {s}: pruning changed nothing?");
            // Sizes are the model's own.
            let rec = read_json(&dir.join("pruning.json"));
            assert_eq!(c["size"]["widths"], rec["layer_widths"], "{m} {s}");
            assert_eq!(c["size"]["params_after"], rec["params_after"], "{m} {s}");
            let acc = c["gen"]["accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc));
            assert_eq!(c["gen"]["n"], 2, "--limit caps gen");
            assert_eq!(c["mc"]["n"], 2, "--limit caps mc");
            let speedup = c["prefill"]["speedup"].as_f64().unwrap();
            assert!(speedup.is_finite() && speedup > 0.0);
            assert_eq!(c["prefill"]["seq_len"], 16);
        }
    }
    // One mc cell against `eval mc` on its model.
    let c = &cells[3];
    let name = format!("{}-s{}", c["method"].as_str().unwrap(), c["sparsity"]);
    let records = tmp.path().join("mc-records.jsonl");
    let single = json_line(&run_ok(
        bin()
            .args(["eval", "mc", "--model"])
            .arg(models.join(&name))
            .arg("--data")
            .arg(&i.mc)
            .args(["--limit", "2", "--json", "--out"])
            .arg(&records),
    ));
    assert_eq!(c["mc"]["acc"], single["acc"], "{name}");
    assert_eq!(c["mc"]["acc_norm"], single["acc_norm"], "{name}");
    // Down to the log-likelihood of every choice (the report keeps its records).
    assert_eq!(
        std::fs::read_to_string(out.join(format!("records/{name}.mc.jsonl"))).unwrap(),
        std::fs::read_to_string(&records).unwrap()
    );

    // IoU: diagonal 1, symmetric, and what `iou` says on the pruned outputs.
    let iou = r["iou"].as_array().unwrap();
    assert_eq!(iou.len(), SPARSITIES.len());
    for (mat, s) in iou.iter().zip(SPARSITIES) {
        let names: Vec<&str> = mat["methods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert_eq!(names, METHODS);
        let mean = &mat["mean"];
        for (a, ma) in METHODS.iter().enumerate() {
            assert_eq!(mean[a][a].as_f64().unwrap(), 1.0);
            for (b, mb) in METHODS.iter().enumerate().skip(a + 1) {
                assert_eq!(mean[a][b], mean[b][a], "{s}: not symmetric");
                let single = json_line(&run_ok(
                    bin()
                        .arg("iou")
                        .arg(models.join(format!("{ma}-s{s}")))
                        .arg(models.join(format!("{mb}-s{s}")))
                        .arg("--json"),
                ));
                assert_eq!(mean[a][b], single["mean"], "{s}: {ma} vs {mb}");
                assert_eq!(mat["per_layer"][a][b], single["per_layer"]);
            }
        }
    }
    // Two different methods do not prune identically here.
    assert!(iou[1]["mean"][0][1].as_f64().unwrap() < 1.0);

    // Plots: ppl, gen and mc against sparsity, widths at each sparsity.
    let plots = r["plots"].as_array().unwrap();
    let files: Vec<&str> = plots.iter().map(|p| p["file"].as_str().unwrap()).collect();
    assert_eq!(
        files,
        [
            "plots/ppl.svg",
            "plots/gen.svg",
            "plots/mc.svg",
            "plots/widths-s0.3.svg",
            "plots/widths-s0.5.svg"
        ]
    );
    for p in &plots[..3] {
        check_svg(&out, p, SPARSITIES.len(), 2);
    }
    for p in &plots[3..] {
        check_svg(&out, p, 3, 3); // tiny-qwen2 has 3 layers
    }

    // The tables: a row per method, a column per sparsity and metric.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for col in ["30% ppl", "50% gen acc", "30% mc acc", "50% prefill"] {
        assert!(md.contains(col), "report.md lacks column {col}");
    }
    for m in METHODS {
        assert!(md.contains(&format!("| {m} |")), "report.md lacks row {m}");
    }
    let flap_ppl = cells
        .iter()
        .find(|c| c["method"] == "flap" && c["sparsity"].as_f64() == Some(0.5))
        .unwrap()["ppl"]["ppl"]
        .as_f64()
        .unwrap();
    assert!(
        md.contains(&format!("{flap_ppl:.2}")),
        "flap ppl not in report.md"
    );

    // A rerun computes nothing and rewrites no cell.
    let cells_dir = out.join("cells");
    let before = mtimes(&cells_dir);
    assert_eq!(before.len(), cells_total);
    let stats_time = std::fs::metadata(out.join("stats.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let rerun = run_ok(&mut full_report(&i, &out));
    assert_eq!(counts(&rerun), (0, cells_total));
    assert_eq!(mtimes(&cells_dir), before);
    assert_eq!(
        std::fs::metadata(out.join("stats.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        stats_time
    );

    // Deleting one cell recomputes that cell alone, to the same value.
    let victim = "agf-s0.5.mc.json";
    let old = read_json(&cells_dir.join(victim));
    std::fs::remove_file(cells_dir.join(victim)).unwrap();
    let rerun = run_ok(&mut full_report(&i, &out));
    assert_eq!(counts(&rerun), (1, cells_total - 1));
    let after = mtimes(&cells_dir);
    for (name, t) in &before {
        if name != victim {
            assert_eq!(after[name], *t, "{name} was rewritten");
        }
    }
    let new = read_json(&cells_dir.join(victim));
    for k in ["acc", "acc_norm", "n", "choices"] {
        assert_eq!(new["value"][k], old["value"][k], "{victim}: {k}");
    }
}

/// A small report: rku at 30%, perplexity only; `args` replace the
/// defaults of the flags they name, or add flags.
fn small(model: &str, text: &Path, out: &Path, args: &[&str]) -> Command {
    let mut flags: Vec<(String, Option<String>)> = [
        ("--samples", "4"),
        ("--seq-len", "24"),
        ("--methods", "rku"),
        ("--sparsity", "0.3"),
        ("--ppl-seq-len", "24"),
        ("--ppl-max-windows", "8"),
    ]
    .iter()
    .map(|(f, v)| (f.to_string(), Some(v.to_string())))
    .collect();
    let mut it = args.iter().peekable();
    while let Some(f) = it.next() {
        let value = it.next_if(|v| !v.starts_with("--")).map(|v| v.to_string());
        match flags.iter_mut().find(|(g, _)| g == f) {
            Some(slot) => slot.1 = value,
            None => flags.push((f.to_string(), value)),
        }
    }
    let mut c = bin();
    c.arg("report")
        .arg("--model")
        .arg(fixture(model))
        .arg("--calib")
        .arg(text)
        .arg("--ppl-text")
        .arg(text)
        .arg("--no-prefill")
        .arg("--out")
        .arg(out);
    for (f, v) in flags {
        c.arg(f);
        c.args(v);
    }
    c
}

#[test]
fn report_refuses_inconsistent_reruns() {
    let tmp = tempfile::tempdir().unwrap();
    let i = inputs(tmp.path());
    let out = tmp.path().join("report");
    let (computed, _) = counts(&run_ok(&mut small("tiny-qwen2", &i.text, &out, &[])));
    assert_eq!(computed, 4); // stats, dense.ppl, rku-s0.3.prune, rku-s0.3.ppl
    assert!(
        !out.join("models").exists(),
        "pruned models are removed unless --keep-models"
    );
    let cells = out.join("cells");
    let before = mtimes(&cells);

    // Another model: every cell would be inconsistent.
    let e = run_err(&mut small("tiny-llama3", &i.text, &out, &[]));
    assert!(e.contains("model.digest") && e.contains("--force"), "{e}");
    // Other calibration windows.
    let e = run_err(&mut small(
        "tiny-qwen2",
        &i.text,
        &out,
        &["--seq-len", "16"],
    ));
    assert!(e.contains("calib.seq_len: 24 → 16"), "{e}");
    assert!(e.contains("stats") && !e.contains("dense.ppl"), "{e}");
    // Another perplexity setting: only the ppl cells, named.
    let e = run_err(&mut small(
        "tiny-qwen2",
        &i.text,
        &out,
        &["--ppl-max-windows", "5"],
    ));
    assert!(e.contains("ppl.max_windows: 8 → 5"), "{e}");
    assert!(e.contains("dense.ppl") && !e.contains("prune"), "{e}");
    assert_eq!(mtimes(&cells), before, "a refused run changed cells");

    // --force recomputes exactly the cells whose inputs changed.
    let forced = run_ok(&mut small(
        "tiny-qwen2",
        &i.text,
        &out,
        &["--ppl-max-windows", "5", "--force"],
    ));
    assert_eq!(counts(&forced), (2, 2));
    let after = mtimes(&cells);
    assert_eq!(after["stats.json"], before["stats.json"]);
    assert_eq!(after["rku-s0.3.prune.json"], before["rku-s0.3.prune.json"]);
    assert_ne!(after["dense.ppl.json"], before["dense.ppl.json"]);
    let r = read_json(&out.join("report.json"));
    assert_eq!(r["dense"]["ppl"]["windows"], 5);
    assert_eq!(r["cells"][0]["ppl"]["windows"], 5);

    // Fewer evaluations than before is no conflict: their columns are left out.
    let fewer = bin()
        .arg("report")
        .arg("--model")
        .arg(fixture("tiny-qwen2"))
        .arg("--calib")
        .arg(&i.text)
        .args(["--samples", "4", "--seq-len", "24"])
        .args(["--methods", "rku", "--sparsity", "0.3", "--no-prefill"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(fewer.status.success());
    assert_eq!(counts(&String::from_utf8_lossy(&fewer.stdout)), (0, 2));
    let r = read_json(&out.join("report.json"));
    assert!(r["dense"]["ppl"].is_null() && r["cells"][0]["ppl"].is_null());
    assert!(!std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("ppl"));

    // A directory that is not a report, and bad arguments.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep-me"), b"x").unwrap();
    let e = run_err(&mut small("tiny-qwen2", &i.text, &other, &[]));
    assert!(e.contains("not a report directory"), "{e}");
    let fresh = tmp.path().join("fresh");
    for (args, needle) in [
        (&["--sparsity", "0.3,1.2"][..], "between 0 and 1"),
        (&["--methods", "rku,magic"][..], "magic"),
        (&["--methods", "rku,rku"][..], "twice"),
        (&["--samples", "5000"][..], "windows"),
        // Refused before any work: it once reached the trainer, which
        // gathered a batch of that size and aborted on the allocation.
        (
            &["--recover-steps", "1", "--recover-batch", "16777216"][..],
            "--recover-batch 16777216 is more than the 4 calibration windows (--samples)",
        ),
    ] {
        let e = run_err(&mut small("tiny-qwen2", &i.text, &fresh, args));
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    assert!(
        !fresh.exists(),
        "a refused run created its output directory"
    );
}

/// `--refit` adds the refitted export of every mask as its own rows
/// (`<method>+refit`), equal to `prune --refit` then `eval ppl` on the same
/// windows; it resumes, and another refit setting invalidates only the
/// refitted cells.
#[test]
fn report_adds_a_methods_objective_to_finished_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let i = inputs(tmp.path());
    let out = tmp.path().join("report");
    run_ok(&mut small("tiny-qwen2", &i.text, &out, &[]));
    let rku_cell = out.join("cells/rku-s0.3.prune.json");
    let rku_before = std::fs::read(&rku_cell).unwrap();
    let rku_time = mtimes(&out.join("cells"))["rku-s0.3.prune.json"];
    let stats = |dir: &Path| Stats::load(&dir.join("stats.safetensors")).unwrap();
    assert_eq!(stats(&out).meta.objectives.to_string(), "energy");

    // Taylor needs ce: only its pass runs and joins the statistics; the
    // RKU cells built on them are kept, not recomputed.
    let both = ["--methods", "rku,taylor"];
    let run = small("tiny-qwen2", &i.text, &out, &both).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("stats: scored for energy; adding the ce objective"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    // stats, taylor prune and ppl computed; dense ppl, rku prune and ppl kept.
    assert_eq!(counts(&stdout), (3, 3));
    assert_eq!(std::fs::read(&rku_cell).unwrap(), rku_before);
    assert_eq!(mtimes(&out.join("cells"))["rku-s0.3.prune.json"], rku_time);

    // The same as scoring both objectives at once, and the same cells.
    let fresh = tmp.path().join("fresh");
    run_ok(&mut small("tiny-qwen2", &i.text, &fresh, &both));
    assert_eq!(stats(&out), stats(&fresh));
    let (joined, direct) = (
        read_json(&out.join("report.json")),
        read_json(&fresh.join("report.json")),
    );
    assert_eq!(joined["stats"]["objectives"], "energy,ce");
    assert_eq!(joined["cells"], direct["cells"]);
}

#[test]
fn report_refit_rows_match_prune_refit_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let i = inputs(tmp.path());
    let out = tmp.path().join("report");
    let first = run_ok(&mut small("tiny-qwen2", &i.text, &out, &["--refit"]));
    // stats, dense.ppl, and for rku-s0.3 and rku-s0.3+refit: prune, ppl.
    assert_eq!(counts(&first).0, 6);
    assert!(out.join("cells/rku-s0.3+refit.prune.json").exists());
    let r = read_json(&out.join("report.json"));
    let names: Vec<&str> = (r["cells"].as_array().unwrap().iter())
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rku", "rku+refit"]);
    assert_eq!(r["methods"][1]["name"], "rku+refit");
    assert!(
        r["iou"][0]["methods"].as_array().unwrap().len() == 1,
        "a mask is listed once"
    );
    let refit_ppl = r["cells"][1]["ppl"]["ppl"].as_f64().unwrap();
    assert_ne!(refit_ppl, r["cells"][0]["ppl"]["ppl"].as_f64().unwrap());

    // The same through the single commands.
    let pruned = tmp.path().join("pruned");
    run_ok(
        bin()
            .args(["prune", "--model"])
            .arg(fixture("tiny-qwen2"))
            .arg("--calib")
            .arg(&i.text)
            .args(["--samples", "4", "--seq-len", "24", "--method", "rku"])
            .args(["--sparsity", "0.3", "--refit", "--out"])
            .arg(&pruned),
    );
    let ppl = json_line(&run_ok(
        bin()
            .args(["eval", "ppl", "--model"])
            .arg(&pruned)
            .arg("--text")
            .arg(&i.text)
            .args(["--seq-len", "24", "--max-windows", "8", "--json"]),
    ));
    assert_eq!(ppl["ppl"].as_f64().unwrap(), refit_ppl);

    // Resumes; without --refit the refitted rows are simply left out.
    assert_eq!(
        counts(&run_ok(&mut small(
            "tiny-qwen2",
            &i.text,
            &out,
            &["--refit"]
        )))
        .0,
        0
    );
    assert_eq!(
        counts(&run_ok(&mut small("tiny-qwen2", &i.text, &out, &[]))).0,
        0
    );
    // Another target: only the refitted cells are inconsistent.
    let e = run_err(&mut small(
        "tiny-qwen2",
        &i.text,
        &out,
        &["--refit", "residual"],
    ));
    assert!(e.contains("refit.target") && e.contains("+refit"), "{e}");
    assert!(!e.contains("rku-s0.3.prune"), "{e}");
}

/// `--recover-steps` adds every model recovered by LoRA-KD as its own rows
/// (`<method>+lora`, and `<method>+refit+lora` with `--refit`), equal to
/// `prune`, then `recover` on the calibration windows, then `eval ppl`;
/// it resumes, and another step count invalidates only the recovered cells.
#[test]
fn report_recover_rows_match_prune_recover_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let i = inputs(tmp.path());
    let out = tmp.path().join("report");
    // Two steps of two windows: the report's four calibration windows, which
    // are also the first four windows `recover --data` takes from the text.
    let args = ["--refit", "--recover-steps", "2", "--recover-batch", "2"];
    let first = run_ok(&mut small("tiny-qwen2", &i.text, &out, &args));
    // stats, dense.ppl, and for rku-s0.3{,+lora,+refit,+refit+lora}: prune, ppl.
    assert_eq!(counts(&first).0, 10);
    let r = read_json(&out.join("report.json"));
    let names: Vec<&str> = (r["cells"].as_array().unwrap().iter())
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rku", "rku+lora", "rku+refit", "rku+refit+lora"]);
    let ppl_of = |k: usize| r["cells"][k]["ppl"]["ppl"].as_f64().unwrap();
    assert_ne!(ppl_of(1), ppl_of(0));
    assert_ne!(ppl_of(3), ppl_of(2));
    assert!(
        !out.join("models").exists(),
        "models are removed once evaluated"
    );

    // The same through the single commands.
    let pruned = tmp.path().join("pruned");
    run_ok(
        bin()
            .args(["prune", "--model"])
            .arg(fixture("tiny-qwen2"))
            .arg("--calib")
            .arg(&i.text)
            .args(["--samples", "4", "--seq-len", "24", "--method", "rku"])
            .args(["--sparsity", "0.3", "--out"])
            .arg(&pruned),
    );
    let recovered = tmp.path().join("recovered");
    run_ok(
        bin()
            .args(["recover", "--model"])
            .arg(&pruned)
            .arg("--teacher")
            .arg(fixture("tiny-qwen2"))
            .arg("--data")
            .arg(&i.text)
            .args(["--seq-len", "24", "--batch", "2", "--steps", "2", "--out"])
            .arg(&recovered),
    );
    let ppl = json_line(&run_ok(
        bin()
            .args(["eval", "ppl", "--model"])
            .arg(&recovered)
            .arg("--text")
            .arg(&i.text)
            .args(["--seq-len", "24", "--max-windows", "8", "--json"]),
    ));
    assert_eq!(ppl["ppl"].as_f64().unwrap(), ppl_of(1));

    // Resumes; another step count: only the recovered cells are inconsistent.
    assert_eq!(
        counts(&run_ok(&mut small("tiny-qwen2", &i.text, &out, &args))).0,
        0
    );
    let other = ["--refit", "--recover-steps", "3", "--recover-batch", "2"];
    let e = run_err(&mut small("tiny-qwen2", &i.text, &out, &other));
    assert!(e.contains("recover.steps") && e.contains("+lora"), "{e}");
    assert!(!e.contains("rku-s0.3+refit.prune"), "{e}");
}

/// `--traces` calibrates every method a second time on self-generated
/// traces (rows `<method>@traces`, the calibration column) and
/// `--trace-ppl` adds trace perplexity: each trace-calibrated cell equals
/// `prune --traces`, then `eval ppl --traces`; the report resumes, and
/// another token rule invalidates only the trace-calibrated cells.
#[test]
fn report_trace_calibration_rows_match_prune_traces() {
    let tmp = tempfile::tempdir().unwrap();
    let i = inputs(tmp.path());
    let (calib, held_out) = (tmp.path().join("t.jsonl"), tmp.path().join("h.jsonl"));
    for (out, skip) in [(&calib, 1), (&held_out, 0)] {
        let prompts = tmp.path().join(format!("p{skip}.jsonl"));
        let rows: Vec<String> = GSM.lines().skip(skip).map(str::to_string).collect();
        std::fs::write(&prompts, rows.join("\n") + "\n").unwrap();
        run_ok(
            bin()
                .args(["traces", "--backend", "cpu", "--max-new-tokens", "6"])
                .arg("--model")
                .arg(fixture("tiny-qwen2"))
                .arg("--prompts")
                .arg(&prompts)
                .arg("--out")
                .arg(out),
        );
    }
    let out = tmp.path().join("report");
    let (c, h) = (calib.to_str().unwrap(), held_out.to_str().unwrap());
    let args = |tokens: &'static str| {
        vec![
            "--methods",
            "rku,wanda-struct",
            "--traces",
            c,
            "--traces-tokens",
            tokens,
            "--trace-ppl",
            h,
        ]
    };
    let first = run_ok(&mut small("tiny-qwen2", &i.text, &out, &args("generated")));
    // stats, stats@traces, dense.{ppl,trace_ppl}, and for each of the two
    // methods and two calibrations: prune, ppl, trace_ppl.
    assert_eq!(counts(&first).0, 16, "{first}");
    let r = read_json(&out.join("report.json"));
    let rows: Vec<(&str, &str)> = (r["cells"].as_array().unwrap().iter())
        .map(|c| {
            (
                c["method"].as_str().unwrap(),
                c["calibration"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("rku", "text"),
            ("rku@traces", "traces"),
            ("wanda-struct", "text"),
            ("wanda-struct@traces", "traces")
        ]
    );
    assert_eq!(r["methods"][1]["method"], "rku");
    assert_eq!(r["traces_stats"]["samples"], 3);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| method | calibration | allocation |"), "{md}");
    assert!(md.contains("| rku | traces |"), "{md}");
    assert!(md.contains("trace ppl"), "{md}");
    // The text and trace masks are compared in the IoU matrix.
    assert_eq!(
        r["iou"][0]["methods"],
        serde_json::json!(["rku", "rku@traces", "wanda-struct", "wanda-struct@traces"])
    );
    // The trace perplexity plot: one line per row and the dense reference,
    // the trace rows in a lighter shade of their method's colour.
    let plot = (r["plots"].as_array().unwrap().iter())
        .find(|p| p["file"] == "plots/trace-ppl.svg")
        .expect("a trace perplexity plot");
    let colors: Vec<&str> = (plot["series"].as_array().unwrap().iter())
        .map(|s| s["color"].as_str().unwrap())
        .collect();
    assert_eq!(colors.len(), 5);
    assert_eq!(colors[0], "#1f77b4");
    assert_eq!(colors[1], "#8fbbd9");
    assert!(out.join("plots/trace-ppl.svg").exists());

    // The same through the single commands.
    let pruned = tmp.path().join("pruned");
    run_ok(
        bin()
            .args(["prune", "--backend", "cpu", "--model"])
            .arg(fixture("tiny-qwen2"))
            .args(["--traces", c, "--tokens", "generated"])
            .args(["--method", "rku", "--sparsity", "0.3", "--out"])
            .arg(&pruned),
    );
    let kept = read_json(&out.join("cells/rku-s0.3@traces.prune.json"))["value"]["kept"].clone();
    assert_eq!(read_json(&pruned.join("pruning.json"))["kept"], kept);
    let ppl = json_line(&run_ok(
        bin()
            .args(["eval", "ppl", "--backend", "cpu", "--model"])
            .arg(&pruned)
            .args(["--traces", h, "--tokens", "generated", "--json"]),
    ));
    assert_eq!(r["cells"][1]["trace_ppl"]["ppl"], ppl["ppl"]);
    assert_eq!(r["cells"][1]["trace_ppl"]["tokens"], ppl["tokens"]);
    // The text-calibrated mask is another one.
    assert_ne!(
        read_json(&out.join("cells/rku-s0.3.prune.json"))["value"]["kept"],
        kept
    );

    // Resumes; another token rule makes only the trace-calibrated cells stale.
    let again = run_ok(&mut small("tiny-qwen2", &i.text, &out, &args("generated")));
    assert_eq!(counts(&again).0, 0);
    let e = run_err(&mut small("tiny-qwen2", &i.text, &out, &args("all")));
    assert!(
        e.contains("traces.tokens") && e.contains("stats@traces"),
        "{e}"
    );
    assert!(!e.contains("rku-s0.3.prune,"), "{e}");
    let forced = [&args("all")[..], &["--force"]].concat();
    // stats@traces, and the two prune and four eval cells of the trace rows.
    assert_eq!(
        counts(&run_ok(&mut small("tiny-qwen2", &i.text, &out, &forced))).0,
        7
    );

    // With --refit, a trace-calibrated mask is refitted on the same traces:
    // as `prune --traces --refit --refit-traces`, bit for bit.
    let refit = [&args("generated")[..], &["--refit", "--keep-models"]].concat();
    let r2 = tmp.path().join("r2");
    // stats, stats@traces, dense.{ppl,trace_ppl}, and per method and
    // calibration: prune, ppl, trace_ppl, as cut and refitted.
    assert_eq!(
        counts(&run_ok(&mut small("tiny-qwen2", &i.text, &r2, &refit))).0,
        28
    );
    let refitted = tmp.path().join("refitted");
    run_ok(
        bin()
            .args(["prune", "--backend", "cpu", "--model"])
            .arg(fixture("tiny-qwen2"))
            .args([
                "--traces",
                c,
                "--tokens",
                "generated",
                "--refit",
                "--refit-traces",
                c,
            ])
            .args(["--method", "rku", "--sparsity", "0.3", "--out"])
            .arg(&refitted),
    );
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    let in_report = r2.join("models/rku-s0.3@traces+refit");
    assert_eq!(weights(&in_report), weights(&refitted));
    assert_ne!(
        weights(&in_report),
        weights(&r2.join("models/rku-s0.3@traces"))
    );
    let record = &read_json(&in_report.join("pruning.json"))["refit"]["calibration"];
    assert_eq!(record["traces"]["tokens"], "generated", "{record}");
}

/// `--ppl-bos`: every perplexity cell starts its windows with BOS, says so,
/// equals `eval ppl --bos`, and the flag is part of the cells' inputs (a
/// rerun without it refuses the finished report).
#[test]
fn report_ppl_with_bos_equals_eval_ppl_with_bos() {
    let dir = tempfile::tempdir().unwrap();
    let i = inputs(dir.path());
    let out = dir.path().join("bos");
    let report = |bos: &[&str]| {
        let mut c = bin();
        c.arg("report")
            .arg("--model")
            .arg(fixture("tiny-qwen2"))
            .arg("--calib")
            .arg(&i.text)
            .args(["--samples", "4", "--seq-len", "24"])
            .args(["--methods", "rku", "--sparsity", "0.5", "--no-prefill"])
            .arg("--ppl-text")
            .arg(&i.text)
            .args(["--ppl-seq-len", "24", "--ppl-max-windows", "6"])
            .args(bos)
            .arg("--out")
            .arg(&out);
        c
    };
    run_ok(&mut report(&["--ppl-bos"]));
    let r = read_json(&out.join("report.json"));
    let dense = &r["dense"]["ppl"];
    assert_eq!(dense["bos"], true);
    let single = json_line(&run_ok(
        bin()
            .args(["eval", "ppl", "--model"])
            .arg(fixture("tiny-qwen2"))
            .arg("--text")
            .arg(&i.text)
            .args(["--seq-len", "24", "--max-windows", "6", "--bos", "--json"]),
    ));
    assert_eq!(single["bos"], true);
    assert_eq!(dense["ppl"].as_f64(), single["ppl"].as_f64());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("each after BOS"), "{md}");
    let err = run_err(&mut report(&[]));
    assert!(err.contains("ppl"), "{err}");
}

/// A finished cell edited into what no evaluation gives (perplexity 0, a
/// negative one, an accuracy that is not correct/n) is refused on the
/// rerun, naming the cell file, instead of printed in report.md.
#[test]
fn report_refuses_impossible_cell_values() {
    let tmp = tempfile::tempdir().unwrap();
    let i = inputs(tmp.path());
    let out = tmp.path().join("report");
    run_ok(&mut small("tiny-qwen2", &i.text, &out, &[]));
    let rerun_ok = || run_ok(&mut small("tiny-qwen2", &i.text, &out, &[]));
    let cell = out.join("cells/dense.ppl.json");
    let good = std::fs::read_to_string(&cell).unwrap();
    let edits: [(&str, serde_json::Value); 4] = [
        ("ppl", serde_json::json!(0.0)),
        ("ppl", serde_json::json!(-5.0)),
        ("nll", serde_json::json!(-1e308)),
        ("windows", serde_json::json!(0)),
    ];
    for (field, value) in edits {
        let mut v: Value = serde_json::from_str(&good).unwrap();
        v["value"][field] = value.clone();
        std::fs::write(&cell, serde_json::to_string(&v).unwrap()).unwrap();
        let md = std::fs::read(out.join("report.md")).unwrap();
        let e = run_err(&mut small("tiny-qwen2", &i.text, &out, &[]));
        assert!(
            e.contains("dense.ppl.json") && e.contains("no evaluation gives"),
            "{field} = {value}: {e}"
        );
        assert_eq!(std::fs::read(out.join("report.md")).unwrap(), md);
    }
    std::fs::write(&cell, good).unwrap();
    rerun_ok();
}

/// A finished prune or prefill cell edited into what no run gives (a mask
/// that does not fit the dense model, a negative time) is refused on the
/// rerun, naming the cell file; and a directory put by hand where the
/// report keeps a pruned model is refused, never deleted.
#[test]
fn report_refuses_impossible_masks_and_timings_and_keeps_foreign_models() {
    let tmp = tempfile::tempdir().unwrap();
    let i = inputs(tmp.path());
    let out = tmp.path().join("report");
    let prefill = |c: &mut Command| {
        c.arg("report")
            .arg("--model")
            .arg(fixture("tiny-qwen2"))
            .arg("--calib")
            .arg(&i.text)
            .args(["--samples", "4", "--seq-len", "24", "--methods", "rku"])
            .args([
                "--sparsity",
                "0.3",
                "--prefill-seq-len",
                "16",
                "--prefill-repeats",
                "1",
            ])
            .arg("--out")
            .arg(&out);
    };
    let run = || {
        let mut c = bin();
        prefill(&mut c);
        c
    };
    run_ok(&mut run());
    let edit = |cell: &str, f: &dyn Fn(&mut Value)| {
        let path = out.join("cells").join(cell);
        let good = std::fs::read_to_string(&path).unwrap();
        let mut v: Value = serde_json::from_str(&good).unwrap();
        f(&mut v["value"]);
        std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        let e = run_err(&mut run());
        assert!(
            e.contains(cell) && e.contains("delete it to recompute the cell"),
            "{cell}: {e}"
        );
        std::fs::write(&path, good).unwrap();
    };
    let prune = "rku-s0.3.prune.json";
    edit(prune, &|v| v["kept"][0][0] = 1_000_000.into());
    edit(prune, &|v| {
        let k = v["kept"][0].as_array_mut().unwrap();
        k.swap(0, 1);
    });
    edit(prune, &|v| v["kept"].as_array_mut().unwrap().truncate(1));
    edit(prune, &|v| v["params_after"] = (1u64 << 62).into());
    edit(prune, &|v| v["widths"][0] = 3.into());
    let timing = "rku-s0.3.prefill.json";
    edit(timing, &|v| v["dense"]["median_s"] = (-5.0).into());
    edit(timing, &|v| v["speedup"] = 1e308.into());
    edit(timing, &|v| v["repeats"] = 0.into());
    run_ok(&mut run());

    let model = out.join("models/rku-s0.3");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("precious.txt"), "mine").unwrap();
    run_err(&mut run());
    assert_eq!(
        std::fs::read_to_string(model.join("precious.txt")).unwrap(),
        "mine"
    );
}

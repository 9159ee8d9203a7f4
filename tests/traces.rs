//! `traces` (METHODS.md §11) on the tiny LLaMA-3 fixture: greedy traces
//! are `eval gen`'s generations, sampled ones are reproducible across runs
//! and batch sizes, a tiny temperature is greedy, a resumed file equals an
//! uninterrupted one, and bad input is refused with a clear error.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::eval::gen::{
    default_stop, eos_ids, evaluate_gen, read_questions, GenArgs, PromptFormat,
};
use rku_engine::eval::traces::{
    read_traces, run_traces, tokenizer_digest, TraceFinish, TraceRecord, TracesArgs,
};
use rku_engine::io::text::Tokenizer;
use rku_engine::model::decode::{generate, Finish, GenerateOptions, Sampling};
use rku_engine::model::Model;
use std::path::{Path, PathBuf};

/// Two shots, then five problems (one without an answer).
const PROBLEMS: &str = r#####"{"question": "Shot one: 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
{"question": "Shot two: 10 - 3?", "answer": 7}
{"question": "A farmer has 3 cows and buys 4 more. How many cows?", "answer": "3 + 4 = 7\n#### 7"}
{"question": "What is 1,000 + 250?", "answer": "#### 1,250"}

{"question": "Numbers: 2024 minus 2000?", "answer": "24"}
{"question": "Tell me a number."}
{"question": "Half of 10?", "answer": null}
"#####;

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    data: PathBuf,
    be: CpuBackend,
    model: Model<CpuBackend>,
    tok: Tokenizer,
}

fn fixture_setup() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let data = dir.join("problems.jsonl");
    std::fs::write(&data, PROBLEMS).unwrap();
    let model_dir = fixture("tiny-llama3");
    let be = CpuBackend::new();
    let model = Model::load(&be, &model_dir).unwrap();
    let tok = Tokenizer::load(&model_dir).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        data,
        be,
        model,
        tok,
    }
}

impl Fixture {
    fn args(&self, out: &str) -> TracesArgs {
        TracesArgs {
            shots: 2,
            max_new_tokens: 16,
            batch: 3,
            ..TracesArgs::new(self.data.clone(), self.dir.join(out))
        }
    }

    fn run(&self, args: &TracesArgs) -> Vec<TraceRecord> {
        let (summary, recs) = run_traces(&self.be, &self.model, &self.tok, args).unwrap();
        println!("{}", serde_json::to_string(&summary).unwrap());
        assert_eq!(
            read_traces(&args.out).unwrap(),
            recs,
            "file = returned records"
        );
        recs
    }
}

fn sampled(temperature: f64, top_p: f64, seed: u64) -> Option<Sampling> {
    Some(Sampling {
        temperature,
        top_p,
        seed,
    })
}

/// (generated ids, text) of every record.
fn outputs(recs: &[TraceRecord]) -> Vec<(Vec<u32>, String)> {
    recs.iter()
        .map(|r| (r.generated_ids.clone(), r.text.clone()))
        .collect()
}

#[test]
fn greedy_traces_are_eval_gens_generations() {
    let f = fixture_setup();
    let recs = f.run(&f.args("greedy.jsonl"));
    // Rows 2..7 of the file (the blank line is not a row), one trace each.
    let keys: Vec<(usize, usize)> = recs.iter().map(|r| (r.prompt_index, r.sample)).collect();
    assert_eq!(keys, [(2, 0), (3, 0), (4, 0), (5, 0), (6, 0)]);
    let digest = tokenizer_digest(&fixture("tiny-llama3")).unwrap();
    let rows = read_questions(&f.data).unwrap();
    for (r, q) in recs.iter().zip(&rows[2..]) {
        assert_eq!(r.question, q.question);
        assert_eq!(r.gold, q.gold);
        assert_eq!(r.correct.is_some(), r.gold.is_some());
        assert_eq!(r.tokenizer_digest, digest);
        assert_eq!(r.sampling.temperature, None);
        assert_eq!(
            (r.prompt_tokens, r.generated_tokens),
            (r.prompt_ids.len(), r.generated_ids.len())
        );
        assert!(r.generated_tokens <= 16);
        if r.finish == TraceFinish::Length {
            assert_eq!(r.generated_tokens, 16);
        }
    }
    // eval gen on the rows with answers: the same generations.
    let gen_data = f.dir.join("with_answers.jsonl");
    let with_answers: Vec<&str> = PROBLEMS
        .lines()
        .filter(|l| l.contains("\"answer\": \"") || l.contains("\"answer\": 7"))
        .collect();
    std::fs::write(&gen_data, with_answers.join("\n")).unwrap();
    let args = GenArgs {
        shots: 2,
        batch: 2,
        max_new_tokens: 16,
        ..GenArgs::new(gen_data)
    };
    let (_, gens) = evaluate_gen(&f.be, &f.model, &f.tok, &args).unwrap();
    assert_eq!(gens.len(), 3);
    for (g, r) in gens.iter().zip(&recs) {
        assert_eq!(g.index, r.prompt_index);
        assert_eq!(g.generation, r.text);
        assert_eq!(g.new_tokens, r.generated_tokens);
        assert_eq!(g.extracted, r.answer);
        assert_eq!(Some(g.correct), r.correct);
        let finish = match g.finish {
            Finish::Eos => TraceFinish::Eos,
            Finish::StopString => TraceFinish::Stop,
            Finish::MaxTokens => TraceFinish::Length,
        };
        assert_eq!(finish, r.finish);
    }
    // And the ids are greedy decoding's, decoded one prompt at a time.
    let opts = GenerateOptions {
        max_new_tokens: 16,
        eos_ids: eos_ids(&f.model, &f.tok).unwrap(),
        stop: default_stop(PromptFormat::Plain),
    };
    for r in &recs {
        let (g, _) = generate(
            &f.be,
            &f.model,
            &f.tok,
            std::slice::from_ref(&r.prompt_ids),
            &opts,
        )
        .unwrap();
        assert_eq!((&g[0].ids, &g[0].text), (&r.generated_ids, &r.text));
    }
}

#[test]
fn sampled_traces_are_reproducible_across_runs_and_batches() {
    let f = fixture_setup();
    let args = |out: &str, batch: usize, seed: u64| TracesArgs {
        samples: 3,
        sampling: sampled(1.5, 0.95, seed),
        batch,
        ..f.args(out)
    };
    let a = f.run(&args("a.jsonl", 8, 11));
    assert_eq!(a.len(), 15);
    let b = f.run(&args("b.jsonl", 8, 11));
    let c = f.run(&args("c.jsonl", 1, 11));
    assert_eq!(a, b, "a repeated run");
    assert_eq!(a, c, "batch 1 against batch 8");
    assert_eq!(
        std::fs::read(f.dir.join("a.jsonl")).unwrap(),
        std::fs::read(f.dir.join("c.jsonl")).unwrap()
    );
    let s = a[0].sampling;
    assert_eq!(
        (s.temperature, s.top_p, s.seed),
        (Some(1.5), Some(0.95), Some(11))
    );
    // It does sample: samples of a prompt differ, and another seed differs.
    for p in a.chunks(3) {
        assert!(
            p[0].generated_ids != p[1].generated_ids || p[1].generated_ids != p[2].generated_ids,
            "three identical samples of prompt {}",
            p[0].prompt_index
        );
    }
    let d = f.run(&args("d.jsonl", 8, 12));
    assert_ne!(outputs(&a), outputs(&d));
}

#[test]
fn a_tiny_temperature_is_greedy() {
    let f = fixture_setup();
    let greedy = f.run(&f.args("greedy.jsonl"));
    let tiny = f.run(&TracesArgs {
        sampling: sampled(1e-6, 1.0, 5),
        ..f.args("tiny.jsonl")
    });
    assert_eq!(outputs(&greedy), outputs(&tiny));
    assert_eq!(tiny[0].sampling.temperature, Some(1e-6));
    // Temperature 0 is greedy outright, recorded as greedy.
    let zero = f.run(&TracesArgs {
        sampling: rku_engine::eval::traces::sampling_mode(1, Some(0.0), None, Some(3)).unwrap(),
        ..f.args("zero.jsonl")
    });
    assert_eq!(greedy, zero);
}

#[test]
fn a_resumed_file_equals_one_full_run() {
    let f = fixture_setup();
    let args = |out: &str, limit: Option<usize>| TracesArgs {
        samples: 2,
        sampling: sampled(1.0, 0.9, 3),
        limit,
        ..f.args(out)
    };
    let full = f.run(&args("full.jsonl", None));
    let part = f.run(&args("resumed.jsonl", Some(2)));
    assert_eq!(part.len(), 4);
    assert_eq!(part[..], full[..4]);
    let resumed = f.run(&args("resumed.jsonl", None));
    assert_eq!(resumed, full);
    assert_eq!(
        std::fs::read(f.dir.join("full.jsonl")).unwrap(),
        std::fs::read(f.dir.join("resumed.jsonl")).unwrap()
    );
    // Nothing missing: nothing generated, the file unchanged.
    let (summary, again) =
        run_traces(&f.be, &f.model, &f.tok, &args("resumed.jsonl", None)).unwrap();
    assert_eq!((summary.written, summary.total), (0, 10));
    assert_eq!(again, full);
    // Other settings are refused, naming what differs; --force starts over.
    let before = std::fs::read(f.dir.join("resumed.jsonl")).unwrap();
    for (other, says) in [
        (
            TracesArgs {
                sampling: sampled(1.0, 0.9, 4),
                ..args("resumed.jsonl", None)
            },
            "seed 4",
        ),
        (
            TracesArgs {
                sampling: None,
                samples: 1,
                ..args("resumed.jsonl", None)
            },
            "greedy",
        ),
        (
            TracesArgs {
                max_new_tokens: 20,
                ..args("resumed.jsonl", None)
            },
            "--max-new-tokens",
        ),
        (
            TracesArgs {
                shots: 1,
                ..args("resumed.jsonl", None)
            },
            "another prompt",
        ),
        // A smaller --limit than the file holds: its extra traces would be
        // read as this run's by score and recover.
        (args("resumed.jsonl", Some(2)), "past this run's --limit 2"),
    ] {
        let e = run_traces(&f.be, &f.model, &f.tok, &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be resumed") && e.contains(says), "{e}");
        assert_eq!(std::fs::read(f.dir.join("resumed.jsonl")).unwrap(), before);
    }
    let greedy = f.run(&TracesArgs {
        sampling: None,
        samples: 1,
        force: true,
        ..args("resumed.jsonl", None)
    });
    assert_eq!(greedy.len(), 5);
}

/// A traces file with one line damaged at a time: an error naming the
/// file and the line, never a panic.
#[test]
fn damaged_traces_files_name_file_and_line() {
    let f = fixture_setup();
    let recs = f.run(&TracesArgs {
        limit: Some(2),
        ..f.args("t.jsonl")
    });
    let path = f.dir.join("t.jsonl");
    let good = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    assert_eq!(lines.len(), recs.len());
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let mut damaged = Vec::new();
    damaged.push(lines[1][..lines[1].len() / 2].to_string()); // truncated
    for (key, value) in [
        ("prompt_index", serde_json::json!(-1)),
        ("sample", serde_json::json!("0")),
        ("generated_ids", serde_json::json!([1, 2.5])),
        ("generated_tokens", serde_json::json!(999)),
        ("finish", serde_json::json!("stop_string")),
        ("sampling", serde_json::json!(null)),
        ("prompt_index", first["prompt_index"].clone()), // a duplicate of line 1
    ] {
        let mut v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        v[key] = value;
        damaged.push(v.to_string());
    }
    damaged.push("[1, 2]".into());
    damaged.push(format!(
        "{{\"tokenizer_digest\": {}}}",
        first["tokenizer_digest"]
    ));
    for bad in damaged {
        std::fs::write(&path, format!("{}\n{bad}\n", lines[0])).unwrap();
        let e = read_traces(&path).unwrap_err().to_string();
        assert!(e.contains("t.jsonl") && e.contains("line 2"), "{bad}: {e}");
    }
    std::fs::write(&path, "").unwrap();
    assert!(read_traces(&path)
        .unwrap_err()
        .to_string()
        .contains("no trace records"));
}

/// Records that pass the reader but that this run could not have written
/// (a sample index past --samples-per-prompt, a generated id past the
/// vocabulary) are refused on resume, naming the file, the line and what
/// is wrong, and the file is left as it was.
#[test]
fn resumed_records_this_run_could_not_write_are_refused() {
    let f = fixture_setup();
    let args = || TracesArgs {
        limit: Some(2),
        ..f.args("t.jsonl")
    };
    f.run(&args());
    let path = f.dir.join("t.jsonl");
    let good = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    assert_eq!(f.model.cfg.vocab, 384);
    let sample = |v: &mut serde_json::Value| v["sample"] = serde_json::json!(5);
    let id = |v: &mut serde_json::Value| v["generated_ids"][0] = serde_json::json!(999);
    for (key, edit, says) in [
        (
            "sample",
            &sample as &dyn Fn(&mut serde_json::Value),
            "sample 5 is not one of the 1 samples per prompt",
        ),
        (
            "generated_ids",
            &id,
            "generated token id 999, not below this model's vocab_size 384",
        ),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        edit(&mut v);
        let crafted = format!("{}\n{v}\n", lines[0]);
        std::fs::write(&path, &crafted).unwrap();
        // The reader takes the record: only this run's settings exclude it.
        assert_eq!(read_traces(&path).unwrap().len(), 2, "{key}");
        let e = run_traces(&f.be, &f.model, &f.tok, &args())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&path.display().to_string())
                && e.contains("cannot be resumed")
                && e.contains("line 2:")
                && e.contains(says),
            "{key}: {e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), crafted);
    }
}

/// Words of the help text of `flag` in clap's `--help` output: the rest of
/// its line and the lines under it, up to the next flag or a blank line.
fn help_words(help: &str, flag: &str) -> usize {
    let lines: Vec<&str> = help.lines().collect();
    let is_flag_line = |l: &str| l.trim_start().starts_with('-');
    let Some(i) = lines
        .iter()
        .position(|l| is_flag_line(l) && l.split([' ', ',']).any(|w| w == flag))
    else {
        return 0;
    };
    let mut text: Vec<&str> = lines[i]
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && !w.starts_with('<'))
        .collect();
    for l in &lines[i + 1..] {
        if l.trim().is_empty() || is_flag_line(l) {
            break;
        }
        text.extend(l.split_whitespace());
    }
    text.iter()
        .filter(|w| w.chars().any(char::is_alphabetic))
        .count()
}

fn traces_cmd(dir: &Path, data: &Path, out: &Path) -> std::process::Command {
    let mut c = bin();
    c.args([
        "traces",
        "--backend",
        "cpu",
        "--max-new-tokens",
        "8",
        "--model",
    ])
    .arg(fixture("tiny-llama3"))
    .arg("--prompts")
    .arg(data)
    .arg("--out")
    .arg(out)
    .current_dir(dir);
    c
}

#[test]
fn the_command_runs_resumes_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("p.jsonl");
    std::fs::write(&data, PROBLEMS).unwrap();
    let out = dir.join("t.jsonl");
    let stdout =
        run_ok(traces_cmd(dir, &data, &out).args(["--shots", "2", "--limit", "2", "--json"]));
    assert!(stdout.contains("traces: 2 written"), "{stdout}");
    assert!(stdout.contains("accuracy"), "{stdout}");
    let stdout = run_ok(traces_cmd(dir, &data, &out).args(["--shots", "2"]));
    assert!(stdout.contains("traces: 3 written, 5 in"), "{stdout}");
    assert_eq!(read_traces(&out).unwrap().len(), 5);

    // Every flag has help text.
    let help = run_ok(bin().args(["traces", "--help"]));
    for flag in [
        "--model",
        "--prompts",
        "--chat",
        "--shots",
        "--shots-file",
        "--samples-per-prompt",
        "--temperature",
        "--top-p",
        "--seed",
        "--max-new-tokens",
        "--limit",
        "--batch",
        "--out",
        "--force",
        "--json",
    ] {
        let words = help_words(&help, flag);
        assert!(words >= 3, "{flag}: {words} words of help in\n{help}");
    }

    // A row without a question: file and line.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"ok?\"}\n{\"q\": \"where?\"}\n").unwrap();
    let e = run_err(&mut traces_cmd(dir, &bad, &dir.join("x.jsonl")));
    assert!(
        e.contains("bad.jsonl") && e.contains("line 2") && e.contains("question"),
        "{e}"
    );
    assert!(!dir.join("x.jsonl").exists());

    // An existing file of another kind: refused, with and without --force.
    let other = dir.join("other.jsonl");
    std::fs::write(&other, "{\"index\": 0, \"text\": \"mine\"}\n").unwrap();
    let e = run_err(&mut traces_cmd(dir, &data, &other));
    assert!(e.contains("already exists"), "{e}");
    let e = run_err(traces_cmd(dir, &data, &other).arg("--force"));
    assert!(
        e.contains("will not replace") && e.contains("no field"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(&other).unwrap(),
        "{\"index\": 0, \"text\": \"mine\"}\n"
    );
    // The prompts file itself is never an output.
    let e = run_err(traces_cmd(dir, &data, &data).arg("--force"));
    assert!(e.contains("input"), "{e}");

    // Sampling settings out of range.
    for (flags, says) in [
        (vec!["--temperature", "0.5", "--top-p", "0"], "(0, 1]"),
        (vec!["--temperature", "0.5", "--top-p", "1.5"], "(0, 1]"),
        (vec!["--temperature", "-1"], "≥ 0"),
        (vec!["--temperature", "nan"], "≥ 0"),
        (vec!["--top-p", "0.9"], "--temperature"),
    ] {
        let e = run_err(traces_cmd(dir, &data, &dir.join("y.jsonl")).args(&flags));
        assert!(e.contains(says), "{flags:?}: {e}");
    }
    assert!(!dir.join("y.jsonl").exists());
}

/// scripts/make-eval-data.py's calibration prompts are never evaluation
/// questions (their generator seeds are disjoint, and the script drops any
/// collision).
#[test]
fn calibration_prompts_are_not_evaluation_questions() {
    let (Some(eval), Some(calib)) = (
        asset("eval/gsm_symbolic.jsonl"),
        asset("eval/gsm_symbolic_calibration.jsonl"),
    ) else {
        return;
    };
    let eval: std::collections::HashSet<String> = read_questions(&eval)
        .unwrap()
        .into_iter()
        .map(|q| q.question)
        .collect();
    let calib = read_questions(&calib).unwrap();
    assert!(!calib.is_empty());
    for q in &calib {
        assert!(
            !eval.contains(&q.question),
            "calibration line {} is an evaluation question: {:?}",
            q.line,
            q.question
        );
    }
    println!(
        "{} calibration prompts, {} evaluation questions, none shared",
        calib.len(),
        eval.len()
    );
}

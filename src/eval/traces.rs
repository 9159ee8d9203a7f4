//! `traces` (METHODS.md §11): the model answers prompts and its
//! generations are kept, one jsonl record per (prompt, sample), for
//! self-generated calibration and trace statistics.
//!
//! Prompts are read, laid out and tokenized exactly as `eval gen` does
//! (`eval::gen`: its reader, shots, plain or chat prompt, EOS ids and stop
//! strings), and the answer is extracted by `eval::answer`. Decoding is
//! batched with the KV cache: greedy (`decode::generate`), or temperature /
//! top-p sampling whose every draw depends only on (seed, prompt index,
//! sample index, position) (`decode::generate_sampled`), so a trace is the
//! same at any `--batch` and in any run.
//!
//! The records and their reader are the traces file's (src/io/traces.rs).
//!
//! Resuming: an existing `--out` that holds traces of the same tokenizer,
//! sampling, prompts and token budget is read back, only the missing
//! (prompt_index, sample) pairs are generated, and the whole file is
//! rewritten atomically (temporary sibling + rename) every
//! [`SAVE_EVERY_S`] seconds and at the end, records sorted by
//! (prompt_index, sample).
use super::answer::extract_answer;
use super::gen::{
    build_prompts, default_stop, eos_ids, read_questions, take_shots, write_jsonl, PromptFormat,
};
use crate::backend::Backend;
use crate::io::output;
use crate::io::text::Tokenizer;
use crate::io::traces::read_trace_lines;
pub use crate::io::traces::{
    read_traces, tokenizer_digest, SamplingRecord, TraceFinish, TraceRecord, FIELDS, TRACES,
};
use crate::model::decode::{
    generate, generate_sampled, DecodeStats, Finish, GenerateOptions, Sampling, StreamKey,
};
use crate::model::Model;
use crate::progress::{self, Progress};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Seconds between rewrites of the output while generating.
pub const SAVE_EVERY_S: f64 = 30.0;

impl From<Finish> for TraceFinish {
    fn from(f: Finish) -> Self {
        match f {
            Finish::Eos => TraceFinish::Eos,
            Finish::StopString => TraceFinish::Stop,
            Finish::MaxTokens => TraceFinish::Length,
        }
    }
}

impl SamplingRecord {
    /// The record of a run: `None` (or temperature 0) is greedy.
    pub fn of(sampling: Option<Sampling>) -> Self {
        match sampling {
            Some(s) if s.temperature != 0.0 => Self {
                temperature: Some(s.temperature),
                top_p: Some(s.top_p),
                seed: Some(s.seed),
            },
            _ => Self {
                temperature: None,
                top_p: None,
                seed: None,
            },
        }
    }

    /// The sampling it records; `None` for greedy.
    pub fn sampling(&self) -> Option<Sampling> {
        match (self.temperature, self.top_p, self.seed) {
            (Some(temperature), Some(top_p), Some(seed)) => Some(Sampling {
                temperature,
                top_p,
                seed,
            }),
            _ => None,
        }
    }
}

/// The decoding a command line asks for: `samples` traces per prompt,
/// `--temperature`, `--top-p`, `--seed`. Greedy (`None`) when K = 1 and no
/// temperature is given, or when the temperature is 0; otherwise sampling
/// at the temperature (default 1), top-p (default 1) and seed (default 0).
/// `--top-p` or `--seed` without sampling would be silently ignored, so
/// they are refused there.
pub fn sampling_mode(
    samples: usize,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
) -> Result<Option<Sampling>> {
    if temperature.is_none() && samples <= 1 && (top_p.is_some() || seed.is_some()) {
        return Err(Error::Invalid(
            "--top-p and --seed set how traces are sampled, but one sample per prompt \
             without --temperature is greedy: give --temperature (or --samples-per-prompt > 1)"
                .into(),
        ));
    }
    if temperature.is_none() && samples <= 1 {
        return Ok(None);
    }
    let s = Sampling {
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        seed: seed.unwrap_or(0),
    };
    s.check()?;
    Ok((s.temperature != 0.0).then_some(s))
}

/// What to generate and where.
#[derive(Clone, Debug)]
pub struct TracesArgs {
    /// Prompts (jsonl, `question` and optionally `answer`).
    pub prompts: PathBuf,
    /// Few-shot examples per prompt.
    pub shots: usize,
    /// Where shots come from (its first `shots` rows); default: the first
    /// `shots` rows of `prompts`, which then get no traces.
    pub shots_file: Option<PathBuf>,
    pub format: PromptFormat,
    /// Traces per prompt (K).
    pub samples: usize,
    /// `None`: greedy (see [`sampling_mode`]).
    pub sampling: Option<Sampling>,
    pub max_new_tokens: usize,
    /// Traces for at most this many prompts (after the held-out shots).
    pub limit: Option<usize>,
    /// Sequences decoded together.
    pub batch: usize,
    pub out: PathBuf,
    /// Replace an existing `out` that cannot be resumed (a traces file of
    /// other settings, or an empty file); never another kind of file.
    pub force: bool,
}

impl TracesArgs {
    /// Defaults: plain prompts without shots, one greedy trace each, 512
    /// new tokens, batch 8.
    pub fn new(prompts: PathBuf, out: PathBuf) -> Self {
        Self {
            prompts,
            shots: 0,
            shots_file: None,
            format: PromptFormat::Plain,
            samples: 1,
            sampling: None,
            max_new_tokens: 512,
            limit: None,
            batch: 8,
            out,
            force: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct TracesSummary {
    pub out: PathBuf,
    /// Prompts this run covers (after the shots and `--limit`).
    pub prompts: usize,
    pub samples_per_prompt: usize,
    pub sampling: SamplingRecord,
    /// Traces generated by this run.
    pub written: usize,
    /// Records in the file now (earlier ones included).
    pub total: usize,
    /// Records in the file with a gold answer, and how many are correct.
    pub with_gold: usize,
    pub correct: usize,
    /// correct / with_gold; `None` without gold answers.
    pub accuracy: Option<f64>,
    /// Σ generated tokens of this run's traces.
    pub generated_tokens: usize,
    pub decode_tokens_per_s: f64,
    pub prefill_tokens_per_s: f64,
    pub seconds: f64,
}

/// Whether an existing `out` is an earlier traces file (to resume), is
/// absent, or may be replaced (`force`); refuses anything else, before any
/// work. Returns true for a file to resume.
pub fn check_out(out: &Path, force: bool) -> Result<bool> {
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(out, e)),
        Ok(m) if m.is_file() && m.len() > 0 && output::check(out, TRACES, true).is_ok() => {
            return Ok(true)
        }
        Ok(_) => {}
    }
    output::check(out, TRACES, force)?;
    Ok(false)
}

/// Generates the missing traces of `args` and writes the file; returns
/// the summary and every record of the file, sorted.
pub fn run_traces<B: Backend>(
    be: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    args: &TracesArgs,
) -> Result<(TracesSummary, Vec<TraceRecord>)> {
    // Before the work; the records never replace what is read.
    for input in [
        Some(&model.dir),
        Some(&args.prompts),
        args.shots_file.as_ref(),
    ] {
        input.into_iter().for_each(|p| output::protect(p));
    }
    let resume = check_out(&args.out, args.force)?;
    if let Some(s) = &args.sampling {
        s.check()?;
    }
    let start = Instant::now();
    let digest = tokenizer_digest(&model.dir)?;
    let sampling = SamplingRecord::of(args.sampling);
    let mut rows = read_questions(&args.prompts)?;
    let (shots, first) = take_shots(
        &mut rows,
        &args.prompts,
        args.shots,
        args.shots_file.as_deref(),
    )?;
    if rows.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no prompts left after {} shots",
            args.prompts.display(),
            args.shots
        )));
    }
    let questions = rows.iter().map(|q| q.question.as_str());
    let prompts = build_prompts(&model.dir, args.format, &shots, questions)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_>>()?;
    if let Some(i) = ids.iter().position(Vec::is_empty) {
        return Err(Error::format(
            &args.prompts,
            format!("line {}: the prompt has no tokens", rows[i].line),
        ));
    }

    // The prompts this run traces: the first `limit` rows (after the shots).
    let n_prompts = rows.len().min(args.limit.unwrap_or(usize::MAX));
    // Earlier records, each checked against this run's settings.
    let matches = |r: &TraceRecord| -> std::result::Result<(), String> {
        if r.tokenizer_digest != digest {
            return Err(format!(
                "it was written with another tokenizer (tokenizer.json sha256 {}, this model's {digest})",
                r.tokenizer_digest
            ));
        }
        if r.sampling != sampling {
            return Err(format!(
                "it was written with {}; this run asks for {sampling}",
                r.sampling
            ));
        }
        let at = |what: &str| {
            format!(
                "its record of prompt_index {} sample {} {what}",
                r.prompt_index, r.sample
            )
        };
        let Some(i) = r
            .prompt_index
            .checked_sub(first)
            .filter(|&i| i < rows.len())
        else {
            return Err(at(&format!(
                "is not a prompt of {} (prompt indices {first}..{})",
                args.prompts.display(),
                first + rows.len()
            )));
        };
        // A trace past --limit would be counted as one of this run's (by
        // statistics and recovery reading the file) though the run never asked for it.
        if i >= n_prompts {
            return Err(at(&format!(
                "is past this run's --limit {n_prompts} (prompt indices {first}..{})",
                first + n_prompts
            )));
        }
        if r.question != rows[i].question || r.prompt_ids != ids[i] {
            return Err(at(
                "has another prompt than this run's (another --prompts, --shots, --shots-file or --chat?)",
            ));
        }
        if r.gold != rows[i].gold {
            return Err(at("has another gold answer than this run's prompts file"));
        }
        // A sample index or a token id this run could not have produced
        // would be counted as one of its traces.
        if r.sample >= args.samples {
            return Err(at(&format!(
                "is not one of the {} samples per prompt of this run (--samples-per-prompt)",
                args.samples
            )));
        }
        let vocab = model.cfg.vocab;
        if let Some(id) = r.generated_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(at(&format!(
                "generated token id {id}, not below this model's vocab_size {vocab}"
            )));
        }
        let n = args.max_new_tokens;
        if r.generated_tokens > n || (r.finish == TraceFinish::Length && r.generated_tokens != n) {
            return Err(at(&format!(
                "stopped at {} tokens ({:?}): it was written with another --max-new-tokens than {n}",
                r.generated_tokens, r.finish
            )));
        }
        Ok(())
    };
    let mut records: BTreeMap<(usize, usize), TraceRecord> = BTreeMap::new();
    if resume {
        let earlier = read_trace_lines(&args.out).and_then(|recs| {
            recs.iter().try_for_each(|(line, r)| {
                matches(r).map_err(|why| {
                    Error::Invalid(format!(
                        "{} cannot be resumed by this run: line {line}: {why}; pass --force to \
                         start it over, or choose another --out",
                        args.out.display()
                    ))
                })
            })?;
            Ok(recs.into_iter().map(|(_, r)| r))
        });
        match earlier {
            Ok(recs) => {
                records.extend(recs.into_iter().map(|r| ((r.prompt_index, r.sample), r)));
                progress::println(&format!(
                    "{}: resuming, {} traces already there",
                    args.out.display(),
                    records.len()
                ));
            }
            Err(e) if args.force => progress::println(&format!(
                "--force: starting {} over ({e})",
                args.out.display()
            )),
            Err(e) => return Err(e),
        }
    }

    // The missing traces, longest prompts first so each batch holds
    // similar lengths (the traces do not depend on the batching).
    let mut todo: Vec<(usize, usize)> = (0..n_prompts)
        .flat_map(|i| (0..args.samples).map(move |s| (i, s)))
        .filter(|&(i, s)| !records.contains_key(&(first + i, s)))
        .collect();
    todo.sort_by_key(|&(i, _)| std::cmp::Reverse(ids[i].len()));
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        eos_ids: eos_ids(model, tok)?,
        stop: default_stop(args.format),
    };
    let mut stats = DecodeStats::default();
    let mut replace = args.force || resume;
    let mut saved = Instant::now();
    let mut generated_tokens = 0;
    let progress = Progress::new(todo.len() as u64, "traces");
    for (done, chunk) in todo.chunks(args.batch.max(1)).enumerate() {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&(i, _)| ids[i].clone()).collect();
        let (gens, st) = match &args.sampling {
            None => generate(be, model, tok, &batch, &opts)?,
            Some(sm) => {
                let keys: Vec<StreamKey> = chunk
                    .iter()
                    .map(|&(i, s)| StreamKey {
                        prompt: (first + i) as u64,
                        sample: s as u64,
                    })
                    .collect();
                generate_sampled(be, model, tok, &batch, &opts, sm, &keys)?
            }
        };
        stats.add(&st);
        for (&(i, s), g) in chunk.iter().zip(gens) {
            let answer = extract_answer(&g.text);
            let gold = rows[i].gold.clone();
            let correct = gold.as_deref().map(|gd| answer.as_deref() == Some(gd));
            generated_tokens += g.ids.len();
            let r = TraceRecord {
                prompt_index: first + i,
                sample: s,
                question: rows[i].question.clone(),
                prompt_ids: ids[i].clone(),
                prompt_tokens: ids[i].len(),
                generated_tokens: g.ids.len(),
                generated_ids: g.ids,
                text: g.text,
                finish: g.finish.into(),
                answer,
                gold,
                correct,
                tokenizer_digest: digest.clone(),
                sampling,
            };
            records.insert((r.prompt_index, r.sample), r);
        }
        progress.note(&format!(
            "{:.1} tokens/s",
            generated_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
        ));
        progress.inc(chunk.len() as u64);
        let last = (done + 1) * args.batch.max(1) >= todo.len();
        if last || saved.elapsed().as_secs_f64() >= SAVE_EVERY_S {
            let all: Vec<&TraceRecord> = records.values().collect();
            write_jsonl(&args.out, &all, TRACES, replace)?;
            replace = true;
            saved = Instant::now();
        }
    }
    progress.finish();
    let records: Vec<TraceRecord> = records.into_values().collect();
    let with_gold = records.iter().filter(|r| r.correct.is_some()).count();
    let correct = records.iter().filter(|r| r.correct == Some(true)).count();
    let summary = TracesSummary {
        out: args.out.clone(),
        prompts: n_prompts,
        samples_per_prompt: args.samples,
        sampling,
        written: todo.len(),
        total: records.len(),
        with_gold,
        correct,
        accuracy: (with_gold > 0).then(|| correct as f64 / with_gold as f64),
        generated_tokens,
        decode_tokens_per_s: stats.decode_tokens_per_s(),
        prefill_tokens_per_s: if stats.prefill_s > 0.0 {
            stats.prompt_tokens as f64 / stats.prefill_s
        } else {
            0.0
        },
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((summary, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn record() -> TraceRecord {
        TraceRecord {
            prompt_index: 0,
            sample: 0,
            question: "q".into(),
            prompt_ids: vec![1, 2],
            generated_ids: vec![3],
            text: "7".into(),
            prompt_tokens: 2,
            generated_tokens: 1,
            finish: TraceFinish::Length,
            answer: Some("7".into()),
            gold: Some("7".into()),
            correct: Some(true),
            tokenizer_digest: "0".repeat(64),
            sampling: SamplingRecord::of(None),
        }
    }

    #[test]
    fn a_record_serialises_to_exactly_its_fields_and_reads_back() {
        let r = record();
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, FIELDS);
        assert_eq!(v["finish"], "length");
        assert_eq!(
            v["sampling"],
            serde_json::json!({"temperature": null, "top_p": null, "seed": null})
        );
        assert_eq!(TraceRecord::from_json(&v).unwrap(), r);
        let s = SamplingRecord::of(Some(Sampling {
            temperature: 0.7,
            top_p: 0.95,
            seed: 3,
        }));
        let r = TraceRecord {
            sampling: s,
            ..record()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(TraceRecord::from_json(&v).unwrap(), r);
        // Temperature 0 is recorded as greedy.
        let zero = Sampling {
            temperature: 0.0,
            top_p: 0.5,
            seed: 1,
        };
        assert_eq!(SamplingRecord::of(Some(zero)), SamplingRecord::of(None));
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let good = serde_json::to_value(record()).unwrap();
        for (key, value, says) in [
            ("prompt_tokens", serde_json::json!(3), "`prompt_tokens`"),
            ("correct", serde_json::json!(false), "`correct`"),
            ("correct", Value::Null, "`correct` is null"),
            ("finish", serde_json::json!("done"), "unknown variant"),
            (
                "generated_ids",
                serde_json::json!([-1]),
                "field `generated_ids`",
            ),
            ("tokenizer_digest", serde_json::json!("ABC"), "sha256"),
            (
                "sampling",
                serde_json::json!({"temperature": 1.0, "top_p": null, "seed": 0}),
                "all set",
            ),
            (
                "sampling",
                serde_json::json!({"temperature": 1.0, "top_p": 2.0, "seed": 0}),
                "(0, 1]",
            ),
            (
                "sampling",
                serde_json::json!({"temperature": 1.0, "top_p": 1.0}),
                "no field `seed`",
            ),
        ] {
            let mut v = good.clone();
            v[key] = value;
            let e = TraceRecord::from_json(&v).unwrap_err();
            assert!(e.contains(says), "{key}: {e}");
        }
        let mut v = good.clone();
        v.as_object_mut().unwrap().remove("gold");
        assert!(TraceRecord::from_json(&v)
            .unwrap_err()
            .contains("no field `gold`"));
        let mut v = good;
        v["extra"] = Value::Bool(true);
        assert!(TraceRecord::from_json(&v)
            .unwrap_err()
            .contains("unknown field `extra`"));
    }

    #[test]
    fn sampling_modes() {
        assert_eq!(sampling_mode(1, None, None, None).unwrap(), None);
        assert_eq!(
            sampling_mode(1, Some(0.0), Some(0.9), Some(4)).unwrap(),
            None
        );
        let s = sampling_mode(4, None, None, None).unwrap().unwrap();
        assert_eq!((s.temperature, s.top_p, s.seed), (1.0, 1.0, 0));
        let s = sampling_mode(1, Some(0.6), Some(0.9), Some(4))
            .unwrap()
            .unwrap();
        assert_eq!((s.temperature, s.top_p, s.seed), (0.6, 0.9, 4));
        assert!(sampling_mode(1, None, Some(0.9), None).is_err());
        assert!(sampling_mode(1, None, None, Some(1)).is_err());
        assert!(sampling_mode(2, Some(-1.0), None, None).is_err());
        assert!(sampling_mode(2, Some(1.0), Some(0.0), None).is_err());
        assert!(sampling_mode(2, Some(1.0), Some(1.01), None).is_err());
    }
}

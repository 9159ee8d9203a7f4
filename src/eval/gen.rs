//! GSM8K-style generative evaluation (METHODS.md section 8, `gen`): build a
//! few-shot prompt per problem, decode greedily with the KV cache in
//! batches, extract the final number (`eval::answer`) and score exact
//! match against the gold number.
//!
//! Data: jsonl, one problem per line, `question` (string) and `answer`
//! (a solution ending "#### N", a number as a string, or a JSON number).
//! Prompt formats:
//! - `Plain`: K shots `"Question: {q}\nAnswer: {a}\n\n"` then
//!   `"Question: {q}\nAnswer:"` (lm-eval's gsm8k layout); a shot's answer is
//!   its solution text, or `"#### N"` when the file has only the number.
//!   Default stop strings: "Question:", "</s>", "<|im_end|>".
//! - `Chat`: the model's `chat_template` from tokenizer_config.json,
//!   rendered with minijinja as transformers does (trim_blocks,
//!   lstrip_blocks, `add_generation_prompt`, `bos_token`/`eos_token`,
//!   `raise_exception`, Python string methods): each shot a user/assistant
//!   turn pair, then the question as a user turn. Default stop strings:
//!   "<|im_end|>", "</s>", "<|eot_id|>".
//!
//! EOS ids (always stop): config.json and generation_config.json
//! `eos_token_id`, and tokenizer_config.json's `eos_token`.
use super::answer::{extract_answer, gold_answer};
use crate::backend::Backend;
use crate::io::output::{self, Kind};
use crate::io::text::jsonl_rows;
use crate::io::text::Tokenizer;
use crate::model::config::token_ids;
use crate::model::decode::{generate, DecodeStats, Finish, GenerateOptions};
use crate::model::Model;
use crate::progress::Progress;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One word problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub question: String,
    /// The answer as written in the file (a solution or a number).
    pub answer: String,
    /// Canonical gold number (`answer::gold_answer`).
    pub gold: String,
}

/// A row of a problems file whose answer may be absent (the prompts of
/// `traces`, METHODS.md §11).
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// 1-based line in the file.
    pub line: usize,
    pub question: String,
    pub answer: Option<String>,
    /// Canonical gold number, when there is an answer.
    pub gold: Option<String>,
}

impl Question {
    /// As a [`Problem`] (a shot or an evaluated row), which needs the answer.
    pub fn into_problem(self, path: &Path) -> Result<Problem> {
        match (self.answer, self.gold) {
            (Some(answer), Some(gold)) => Ok(Problem {
                question: self.question,
                answer,
                gold,
            }),
            _ => Err(Error::format(
                path,
                format!(
                    "line {}: no field `answer` (a string or a number)",
                    self.line
                ),
            )),
        }
    }
}

/// Reads the rows of a problems file (see the module doc), each with a
/// string `question` and, when present and not null, an `answer` that
/// holds a single gold number; errors name file and line.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let mut out = Vec::new();
    for (line, v) in jsonl_rows(path)? {
        let bad = |msg: String| Error::format(path, format!("line {line}: {msg}"));
        let question = v
            .get("question")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no string field `question`".into()))?
            .to_string();
        let answer = match v.get("answer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(bad("field `answer` is not a string or a number".into())),
        };
        let gold = match &answer {
            None => None,
            Some(a) => Some(gold_answer(a).ok_or_else(|| {
                bad(format!(
                    "answer {a:?} holds no single gold number (after \"####\")"
                ))
            })?),
        };
        out.push(Question {
            line,
            question,
            answer,
            gold,
        });
    }
    if out.is_empty() {
        return Err(Error::format(path, "no problems"));
    }
    Ok(out)
}

/// Reads problems from jsonl (see the module doc): [`read_questions`]
/// with an answer on every row; errors name file and line.
pub fn read_problems(path: &Path) -> Result<Vec<Problem>> {
    read_questions(path)?
        .into_iter()
        .map(|q| q.into_problem(path))
        .collect()
}

/// The few-shot examples: the first `k` rows of `shots_file`, or else
/// the first `k` of `rows` (read from `data`), which are then removed from
/// it. Returns the shots and the index in `data` of the first row left.
pub fn take_shots(
    rows: &mut Vec<Question>,
    data: &Path,
    k: usize,
    shots_file: Option<&Path>,
) -> Result<(Vec<Problem>, usize)> {
    let (shots, first) = match shots_file {
        Some(f) => (read_problems(f)?.into_iter().take(k).collect::<Vec<_>>(), 0),
        None => (
            rows.drain(..k.min(rows.len()))
                .map(|q| q.into_problem(data))
                .collect::<Result<_>>()?,
            k,
        ),
    };
    if shots.len() < k {
        return Err(Error::format(
            shots_file.unwrap_or(data),
            format!("{k} shots requested, {} available", shots.len()),
        ));
    }
    Ok((shots, first))
}

/// How prompts are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    Plain,
    Chat,
}

impl PromptFormat {
    /// The format a `--chat` flag asks for.
    pub fn from_chat_flag(chat: bool) -> Self {
        if chat {
            PromptFormat::Chat
        } else {
            PromptFormat::Plain
        }
    }
}

/// A shot's answer text: the solution, or "#### N" for a bare number.
fn shot_answer(p: &Problem) -> String {
    if p.answer.contains("####") {
        p.answer.trim().to_string()
    } else {
        format!("#### {}", p.gold)
    }
}

/// The plain few-shot prompt for `question`.
pub fn plain_prompt(shots: &[Problem], question: &str) -> String {
    let mut s = String::new();
    for p in shots {
        s.push_str(&format!(
            "Question: {}\nAnswer: {}\n\n",
            p.question.trim(),
            shot_answer(p)
        ));
    }
    s.push_str(&format!("Question: {}\nAnswer:", question.trim()));
    s
}

/// The prompt text of each question: plain, or the model's chat template
/// (`model_dir`), after `shots`.
pub fn build_prompts<'a>(
    model_dir: &Path,
    format: PromptFormat,
    shots: &[Problem],
    questions: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>> {
    let chat = match format {
        PromptFormat::Chat => Some(ChatTemplate::load(model_dir)?),
        PromptFormat::Plain => None,
    };
    questions
        .into_iter()
        .map(|q| match &chat {
            Some(c) => c.prompt(shots, q),
            None => Ok(plain_prompt(shots, q)),
        })
        .collect()
}

/// The stop strings of a prompt format (module doc).
pub fn default_stop(format: PromptFormat) -> Vec<String> {
    let s: &[&str] = match format {
        PromptFormat::Plain => &["Question:", "</s>", "<|im_end|>"],
        PromptFormat::Chat => &["<|im_end|>", "</s>", "<|eot_id|>"],
    };
    s.iter().map(|x| x.to_string()).collect()
}

/// A `tokenizer_config.json` token entry: a string or `{"content": ...}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        o => o.get("content").and_then(Value::as_str).map(str::to_string),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = crate::io::read_regular_text(path, "a JSON file")?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// A model's chat template (transformers' `apply_chat_template` semantics).
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    /// The file the template came from, named in rendering errors.
    origin: Option<PathBuf>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// From the `chat_template` of `model_dir/tokenizer_config.json` (a
    /// string, or a list of `{name, template}` of which "default" is used).
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("tokenizer_config.json");
        let cfg = read_json(&path)?;
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .ok_or_else(|| Error::format(&path, "chat_template list has no \"default\" entry"))?
                .to_string(),
            _ => {
                return Err(Error::format(
                    &path,
                    "no chat_template (use the plain prompt format)",
                ))
            }
        };
        let mut template = Self::new(
            &source,
            token_str(cfg.get("bos_token")).unwrap_or_default(),
            token_str(cfg.get("eos_token")).unwrap_or_default(),
        )
        .map_err(|e| Error::format(&path, e.to_string()))?;
        template.origin = Some(path);
        Ok(template)
    }

    /// Compiles a template source.
    pub fn new(source: &str, bos: String, eos: String) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Invalid(format!("chat template: {e}")))?;
        Ok(Self {
            env,
            bos,
            eos,
            origin: None,
        })
    }

    /// Renders `(role, content)` turns, with the assistant header appended.
    pub fn render(&self, turns: &[(&str, &str)]) -> Result<String> {
        let messages: Vec<Message> = turns
            .iter()
            .map(|&(role, content)| Message { role, content })
            .collect();
        let failed = |e: minijinja::Error| match &self.origin {
            Some(path) => Error::format(path, format!("chat template: {e}")),
            None => Error::Invalid(format!("chat template: {e}")),
        };
        let tmpl = self.env.get_template("chat").map_err(failed)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(failed)
    }

    /// The chat prompt for `question`: each shot a user/assistant pair.
    pub fn prompt(&self, shots: &[Problem], question: &str) -> Result<String> {
        let answers: Vec<String> = shots.iter().map(shot_answer).collect();
        let mut turns = Vec::new();
        for (p, a) in shots.iter().zip(&answers) {
            turns.push(("user", p.question.trim()));
            turns.push(("assistant", a.as_str()));
        }
        turns.push(("user", question.trim()));
        self.render(&turns)
    }
}

/// End-of-sequence ids of a model directory: config.json and
/// generation_config.json `eos_token_id`, tokenizer_config.json `eos_token`.
pub fn eos_ids<B: Backend>(model: &Model<B>, tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = model.cfg.eos_token_ids.clone();
    let gen = model.dir.join("generation_config.json");
    if gen.exists() {
        ids.extend(token_ids(&read_json(&gen)?, "eos_token_id", &gen)?);
    }
    let tc = model.dir.join("tokenizer_config.json");
    if tc.exists() {
        if let Some(id) = token_str(read_json(&tc)?.get("eos_token")).and_then(|s| tok.token_id(&s))
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// What to evaluate and how.
#[derive(Clone, Debug)]
pub struct GenArgs {
    /// Problems (jsonl).
    pub data: PathBuf,
    /// Label in the result (e.g. "GSM-symbolic"); default: the data file's stem.
    pub task: Option<String>,
    /// Few-shot examples per prompt.
    pub shots: usize,
    /// Where shots come from (its first `shots` rows); default: the first
    /// `shots` rows of `data`, which are then not evaluated.
    pub shots_file: Option<PathBuf>,
    pub format: PromptFormat,
    /// Skip this many problems first (after the held-out shots): with
    /// `limit`, a later slice of the data whose records keep their rows'
    /// indices, so slices evaluated apart can be joined (`eval paired`).
    pub skip: usize,
    /// Evaluate at most this many problems (after the held-out shots and `skip`).
    pub limit: Option<usize>,
    /// Problems decoded together.
    pub batch: usize,
    pub max_new_tokens: usize,
    /// Stop strings; `None` for the format's defaults (module doc).
    pub stop: Option<Vec<String>>,
    /// Per-problem jsonl output.
    pub out: Option<PathBuf>,
    /// Replace an existing `out`: only an earlier record file of gen
    /// (DESIGN.md §10).
    pub force: bool,
}

impl GenArgs {
    /// METHODS.md defaults: plain 8-shot held out from the data, 256 new tokens, batch 8.
    pub fn new(data: PathBuf) -> Self {
        Self {
            data,
            task: None,
            shots: 8,
            shots_file: None,
            format: PromptFormat::Plain,
            skip: 0,
            limit: None,
            batch: 8,
            max_new_tokens: 256,
            stop: None,
            out: None,
            force: false,
        }
    }
}

/// A per-problem jsonl as an output: every line an object with the
/// fields of [`GenRecord`] (DESIGN.md §10, §15).
pub const GEN_RECORDS: Kind = Kind::Jsonl(&[
    "index",
    "prompt",
    "generation",
    "extracted",
    "gold",
    "correct",
    "finish",
    "new_tokens",
]);

/// One scored problem (a line of the per-problem jsonl).
#[derive(Clone, Debug, Serialize)]
pub struct GenRecord {
    /// Row of the problem in the data file (0-based, non-empty rows).
    pub index: usize,
    pub prompt: String,
    pub generation: String,
    pub extracted: Option<String>,
    pub gold: String,
    pub correct: bool,
    pub finish: Finish,
    pub new_tokens: usize,
}

/// The evaluation's summary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenResult {
    pub task: String,
    /// correct / n.
    pub accuracy: f64,
    pub correct: usize,
    pub n: usize,
    pub shots: usize,
    pub format: PromptFormat,
    pub max_new_tokens: usize,
    pub batch: usize,
    /// Σ generated tokens (EOS excluded).
    pub generated_tokens: usize,
    pub prompt_tokens: usize,
    /// Decode-step throughput over all batches (`DecodeStats`).
    pub decode_tokens_per_s: f64,
    pub prefill_tokens_per_s: f64,
    pub seconds: f64,
}

impl GenResult {
    /// The 95% Wilson score interval of the accuracy (`wilson95`).
    pub fn ci95(&self) -> (f64, f64) {
        wilson95(self.correct, self.n)
    }
}

/// The 95% Wilson score interval of a proportion k/n (z = 1.96):
/// (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n), p = k/n. Unlike
/// p ± z·√(p(1−p)/n) it stays inside [0, 1] and is not empty at k = 0
/// (an accuracy of 0/100 still allows up to 3.7%). (0, 1) when n = 0.
pub fn wilson95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z2, n) = (1.96f64 * 1.96, n as f64);
    let p = k as f64 / n;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = (z2 * (p * (1.0 - p) / n + z2 / (4.0 * n * n))).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Writes `lines` as jsonl to `path`, an output of `kind` (a temporary
/// name renamed into place; `force` as in `output::write_file`).
pub(crate) fn write_jsonl<T: Serialize>(
    path: &Path,
    lines: &[T],
    kind: Kind,
    force: bool,
) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l).map_err(|e| Error::Invalid(e.to_string()))?);
        text.push('\n');
    }
    output::write_file(path, kind, force, text.as_bytes())
}

/// Label of a data file: its stem.
pub(crate) fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs the evaluation; returns the summary and the per-problem records
/// (also written to `args.out` when given).
pub fn evaluate_gen<B: Backend>(
    be: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    args: &GenArgs,
) -> Result<(GenResult, Vec<GenRecord>)> {
    if let Some(out) = &args.out {
        // Before the work; the records never replace what is read.
        for input in [Some(&model.dir), Some(&args.data), args.shots_file.as_ref()] {
            input.into_iter().for_each(|p| output::protect(p));
        }
        output::check(out, GEN_RECORDS, args.force)?;
    }
    let start = Instant::now();
    let mut rows = read_questions(&args.data)?;
    let (shots, first) = take_shots(
        &mut rows,
        &args.data,
        args.shots,
        args.shots_file.as_deref(),
    )?;
    let first = first + args.skip.min(rows.len());
    let mut problems: Vec<Problem> = rows
        .into_iter()
        .skip(args.skip)
        .map(|q| q.into_problem(&args.data))
        .collect::<Result<_>>()?;
    problems.truncate(args.limit.unwrap_or(usize::MAX));
    if problems.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no problems left to evaluate",
            args.data.display()
        )));
    }
    let questions = problems.iter().map(|p| p.question.as_str());
    let prompts = build_prompts(&model.dir, args.format, &shots, questions)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_>>()?;
    let stop = args
        .stop
        .clone()
        .unwrap_or_else(|| default_stop(args.format));
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        eos_ids: eos_ids(model, tok)?,
        stop,
    };
    // Longest prompts first, so each batch holds similar lengths.
    let mut order: Vec<usize> = (0..problems.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
    let mut gens = vec![None; problems.len()];
    let mut stats = DecodeStats::default();
    let progress = Progress::new(problems.len() as u64, "gen");
    for chunk in order.chunks(args.batch.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
        let (out, st) = generate(be, model, tok, &batch, &opts)?;
        stats.add(&st);
        for (&i, g) in chunk.iter().zip(out) {
            gens[i] = Some(g);
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    let records: Vec<GenRecord> = problems
        .iter()
        .zip(prompts)
        .zip(gens)
        .enumerate()
        .map(|(i, ((p, prompt), g))| {
            let g = g.expect("every problem decoded");
            let extracted = extract_answer(&g.text);
            GenRecord {
                index: first + i,
                prompt,
                correct: extracted.as_deref() == Some(p.gold.as_str()),
                generation: g.text,
                extracted,
                gold: p.gold.clone(),
                finish: g.finish,
                new_tokens: g.ids.len(),
            }
        })
        .collect();
    if let Some(out) = &args.out {
        write_jsonl(out, &records, GEN_RECORDS, args.force)?;
    }
    let correct = records.iter().filter(|r| r.correct).count();
    let result = GenResult {
        task: args.task.clone().unwrap_or_else(|| stem(&args.data)),
        accuracy: correct as f64 / records.len() as f64,
        correct,
        n: records.len(),
        shots: args.shots,
        format: args.format,
        max_new_tokens: args.max_new_tokens,
        batch: args.batch.max(1),
        generated_tokens: records.iter().map(|r| r.new_tokens).sum(),
        prompt_tokens: stats.prompt_tokens,
        decode_tokens_per_s: stats.decode_tokens_per_s(),
        prefill_tokens_per_s: if stats.prefill_s > 0.0 {
            stats.prompt_tokens as f64 / stats.prefill_s
        } else {
            0.0
        },
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((result, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the interval's definition solved by bisection in Python
    /// (the p0 with |k/n − p0| = 1.96·√(p0(1 − p0)/n)), to 1e-6.
    #[test]
    fn wilson_interval_matches_its_definition() {
        for (k, n, lo, hi) in [
            (21, 100, 0.141655, 0.299801),
            (0, 100, 0.0, 0.036995),
            (100, 100, 0.963005, 1.0),
            (7, 64, 0.054000, 0.208989),
        ] {
            let (a, b) = wilson95(k, n);
            assert!(
                (a - lo).abs() < 1e-6 && (b - hi).abs() < 1e-6,
                "{k}/{n}: ({a}, {b})"
            );
        }
        assert_eq!(wilson95(0, 0), (0.0, 1.0));
    }

    #[test]
    fn the_record_kind_lists_every_field_of_a_record() {
        let r = GenRecord {
            index: 0,
            prompt: String::new(),
            generation: String::new(),
            extracted: None,
            gold: String::new(),
            correct: false,
            finish: Finish::Eos,
            new_tokens: 0,
        };
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let Kind::Jsonl(fields) = GEN_RECORDS else {
            panic!("a jsonl kind")
        };
        assert_eq!(keys, fields);
    }
}

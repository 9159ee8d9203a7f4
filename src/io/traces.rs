//! The traces file (METHODS.md §11), written by `traces` (src/eval/traces.rs):
//! jsonl, one record per (prompt, sample), fields in this order:
//! `prompt_index` (row of the prompts file, 0-based over non-blank rows,
//! shots counted), `sample` (0..K), `question`, `prompt_ids`,
//! `generated_ids` (EOS excluded; with a stop string, up to the token that
//! completed it), `text` (decoded, cut before the stop string),
//! `prompt_tokens`, `generated_tokens`, `finish` (`eos`, `stop` or
//! `length`), `answer` (extracted, or null), `gold` (or null), `correct`
//! (null without gold), `tokenizer_digest` (sha256 of tokenizer.json),
//! `sampling` (`{temperature, top_p, seed}`, all null for greedy).
//! [`read_traces`] is the one reader of the format: it validates every
//! field and errs, naming file and line, on anything else. A trace read
//! for statistics or perplexity becomes a [`Sequence`].
use crate::io::output::Kind;
use crate::io::text::jsonl_rows;
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// The fields of a record, in the order they are written.
pub const FIELDS: [&str; 14] = [
    "prompt_index",
    "sample",
    "question",
    "prompt_ids",
    "generated_ids",
    "text",
    "prompt_tokens",
    "generated_tokens",
    "finish",
    "answer",
    "gold",
    "correct",
    "tokenizer_digest",
    "sampling",
];

/// The fields of a record's `sampling` object.
const SAMPLING_FIELDS: [&str; 3] = ["temperature", "top_p", "seed"];

/// A traces file as an output (DESIGN.md §10): every line a record.
pub const TRACES: Kind = Kind::Jsonl(&FIELDS);

/// Why a trace ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceFinish {
    /// An EOS id (not in `generated_ids`).
    Eos,
    /// A stop string (cut from `text`).
    Stop,
    /// `--max-new-tokens` reached.
    Length,
}

/// How the traces were decoded: all null for greedy, all set for sampling.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SamplingRecord {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
}

impl SamplingRecord {
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        match (self.temperature, self.top_p, self.seed) {
            (None, None, None) => Ok(()),
            (Some(t), Some(p), Some(_)) if t > 0.0 && t.is_finite() && p > 0.0 && p <= 1.0 => {
                Ok(())
            }
            (Some(_), Some(_), Some(_)) => Err(format!(
                "`sampling` {self}: the temperature must be finite and > 0 and top_p in (0, 1]"
            )),
            _ => Err(
                "`sampling` must have all of temperature, top_p and seed null (greedy) or all set"
                    .into(),
            ),
        }
    }
}

impl fmt::Display for SamplingRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sampling() {
            None => write!(f, "greedy"),
            Some(s) => write!(
                f,
                "temperature {}, top-p {}, seed {}",
                s.temperature, s.top_p, s.seed
            ),
        }
    }
}

/// One trace: a line of a traces file (see the module doc).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceRecord {
    pub prompt_index: usize,
    pub sample: usize,
    pub question: String,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish: TraceFinish,
    pub answer: Option<String>,
    pub gold: Option<String>,
    pub correct: Option<bool>,
    pub tokenizer_digest: String,
    pub sampling: SamplingRecord,
}

/// Errs unless `obj` has exactly the keys `keys`.
fn exact_keys(
    obj: &Map<String, Value>,
    keys: &[&str],
    what: &str,
) -> std::result::Result<(), String> {
    if let Some(k) = keys.iter().find(|k| !obj.contains_key(**k)) {
        return Err(format!("{what} has no field `{k}`"));
    }
    if let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(format!(
            "{what} has an unknown field `{k}` (its fields are {})",
            keys.join(", ")
        ));
    }
    Ok(())
}

/// Field `key` of `obj` as a `T`.
fn field<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    key: &str,
) -> std::result::Result<T, String> {
    let v = obj.get(key).cloned().unwrap_or(Value::Null);
    serde_json::from_value(v).map_err(|e| format!("field `{key}`: {e}"))
}

impl TraceRecord {
    /// A record from one parsed line, every field checked.
    pub(crate) fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("not a JSON object")?;
        exact_keys(obj, &FIELDS, "the record")?;
        let s = obj["sampling"]
            .as_object()
            .ok_or("field `sampling` is not an object")?;
        exact_keys(s, &SAMPLING_FIELDS, "`sampling`")?;
        let r = Self {
            prompt_index: field(obj, "prompt_index")?,
            sample: field(obj, "sample")?,
            question: field(obj, "question")?,
            prompt_ids: field(obj, "prompt_ids")?,
            generated_ids: field(obj, "generated_ids")?,
            text: field(obj, "text")?,
            prompt_tokens: field(obj, "prompt_tokens")?,
            generated_tokens: field(obj, "generated_tokens")?,
            finish: field(obj, "finish")?,
            answer: field(obj, "answer")?,
            gold: field(obj, "gold")?,
            correct: field(obj, "correct")?,
            tokenizer_digest: field(obj, "tokenizer_digest")?,
            sampling: SamplingRecord {
                temperature: field(s, "temperature").map_err(|e| format!("`sampling`: {e}"))?,
                top_p: field(s, "top_p").map_err(|e| format!("`sampling`: {e}"))?,
                seed: field(s, "seed").map_err(|e| format!("`sampling`: {e}"))?,
            },
        };
        r.check()?;
        Ok(r)
    }

    /// The relations between fields.
    fn check(&self) -> std::result::Result<(), String> {
        if self.prompt_ids.is_empty() {
            return Err("`prompt_ids` is empty".into());
        }
        if self.prompt_tokens != self.prompt_ids.len() {
            return Err(format!(
                "`prompt_tokens` is {} but `prompt_ids` holds {}",
                self.prompt_tokens,
                self.prompt_ids.len()
            ));
        }
        if self.generated_tokens != self.generated_ids.len() {
            return Err(format!(
                "`generated_tokens` is {} but `generated_ids` holds {}",
                self.generated_tokens,
                self.generated_ids.len()
            ));
        }
        let d = &self.tokenizer_digest;
        if d.len() != 64
            || !d
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "`tokenizer_digest` {d:?} is not a sha256 in lowercase hex"
            ));
        }
        match (&self.gold, self.correct) {
            (None, None) => {}
            (Some(g), Some(c)) if c == (self.answer.as_deref() == Some(g.as_str())) => {}
            (Some(_), Some(c)) => {
                return Err(format!(
                    "`correct` is {c} for answer {:?} and gold {:?}",
                    self.answer, self.gold
                ))
            }
            (None, Some(_)) => return Err("`correct` is set but `gold` is null".into()),
            (Some(_), None) => return Err("`correct` is null but `gold` is set".into()),
        }
        self.sampling.check()
    }
}

/// Reads a traces file, validating every record (fields, types, their
/// relations), one tokenizer digest and one sampling for the whole file,
/// and no (prompt_index, sample) twice. Errors name the file and line.
pub fn read_traces(path: &Path) -> Result<Vec<TraceRecord>> {
    Ok(read_trace_lines(path)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// [`read_traces`], each record with its 1-based line number (for a
/// caller's own checks to name the line).
pub fn read_trace_lines(path: &Path) -> Result<Vec<(usize, TraceRecord)>> {
    let mut out: Vec<(usize, TraceRecord)> = Vec::new();
    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    for (line, v) in jsonl_rows(path)? {
        let bad = |msg: String| Error::format(path, format!("line {line}: {msg}"));
        let r = TraceRecord::from_json(&v).map_err(bad)?;
        if let Some((first_line, f)) = out.first() {
            if r.tokenizer_digest != f.tokenizer_digest {
                return Err(bad(format!(
                    "`tokenizer_digest` differs from line {first_line}'s (a traces file holds one run)"
                )));
            }
            if r.sampling != f.sampling {
                return Err(bad(format!(
                    "`sampling` ({}) differs from line {first_line}'s ({}) (a traces file holds one run)",
                    r.sampling, f.sampling
                )));
            }
        }
        if let Some(prev) = seen.insert((r.prompt_index, r.sample), line) {
            return Err(bad(format!(
                "prompt_index {} sample {} again (first on line {prev})",
                r.prompt_index, r.sample
            )));
        }
        out.push((line, r));
    }
    if out.is_empty() {
        return Err(Error::format(path, "no trace records"));
    }
    Ok(out)
}

/// The `tokenizer_digest` of a model directory: sha256 of its
/// tokenizer.json bytes, lowercase hex.
pub fn tokenizer_digest(model_dir: &Path) -> Result<String> {
    let path = model_dir.join("tokenizer.json");
    crate::io::file_sha256(&path, "a tokenizer.json")
}

/// One sequence of a statistics pass over sequences of their own lengths
/// (METHODS.md §11): its token ids, and the first position whose token
/// counts (0: every token; a trace's prompt length with `--tokens generated`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub counted_from: usize,
}

impl Sequence {
    /// Tokens the energy objective and the per-token statistics count.
    pub fn counted(&self) -> usize {
        self.ids.len().saturating_sub(self.counted_from)
    }

    /// Positions whose next-token prediction the ce objective counts.
    pub fn predicted(&self) -> usize {
        self.ids.len().saturating_sub(self.counted_from.max(1))
    }
}

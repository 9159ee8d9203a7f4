//! Multiple choice by log-likelihood (METHODS.md section 8, `mc`; lm-eval
//! conventions).
//!
//! For context c and choice a, the continuation is `" " + a`; tokens are
//! split as lm-eval's `_encode_pair`: trailing white space of c moves to
//! the front of the continuation, `whole = enc(c + cont)`, `ctx = enc(c)`,
//! `cont_ids = whole[len(ctx)..]` (an empty context is replaced by the BOS,
//! else EOS, token). Then
//!   ll(a)   = Σ_j log p(cont_j | ctx, cont_<j),
//!   acc     = [argmax_a ll(a) = gold],
//!   acc_norm= [argmax_a ll(a)/len_chars(a) = gold]   (len of the choice itself),
//! argmax taking the first of equal values. Requests are batched with right
//! padding (causal attention: padding never reaches a scored row); each
//! request's continuation rows go through `Backend::cross_entropy`.
//!
//! Data: jsonl with a context under `query`, `question` or `context`, a
//! list `choices` of strings, and the gold answer under `gold`, `label` or
//! `answer`. The one label rule: a JSON number is a 0-based index into
//! `choices`; a JSON string is the text of one of the choices. A string
//! that is not a choice, or that reads as an index pointing at another
//! choice than the one whose text it is, is refused as ambiguous.
use super::gen::{stem, write_jsonl};
use crate::backend::Backend;
use crate::io::output::{self, Kind};
use crate::io::text::jsonl_rows;
use crate::io::text::Tokenizer;
use crate::model::forward::{forward, Keep};
use crate::model::{Geometry, Model};
use crate::progress::Progress;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq)]
pub struct McItem {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

/// Reads multiple-choice items (see the module doc); errors name file and line.
pub fn read_items(path: &Path) -> Result<Vec<McItem>> {
    let mut out = Vec::new();
    for (line, v) in jsonl_rows(path)? {
        let bad = |msg: String| Error::format(path, format!("line {line}: {msg}"));
        let context = ["query", "question", "context"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str))
            .ok_or_else(|| bad("no string field `query`, `question` or `context`".into()))?
            .to_string();
        let choices: Vec<String> = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
            .ok_or_else(|| bad("no field `choices` (a list of strings)".into()))?;
        if choices.len() < 2 {
            return Err(bad(format!("{} choices; at least 2 needed", choices.len())));
        }
        let gold_v = ["gold", "label", "answer"]
            .iter()
            .find_map(|k| v.get(*k))
            .ok_or_else(|| bad("no field `gold`, `label` or `answer`".into()))?;
        if let Value::String(s) = gold_v {
            let as_index = s.trim().parse::<usize>().ok();
            let as_text = choices.iter().position(|c| c == s);
            if as_index.is_some() && as_index != as_text {
                return Err(bad(format!(
                    "gold {gold_v} is a string that reads as an index; a string names a \
                     choice by its text, an index is a JSON number ({s} without quotes)"
                )));
            }
        }
        let gold = match gold_v {
            Value::Number(n) => n.as_u64().map(|g| g as usize),
            Value::String(s) => choices.iter().position(|c| c == s),
            _ => None,
        }
        .filter(|&g| g < choices.len())
        .ok_or_else(|| {
            bad(format!(
                "gold {gold_v} is not an index of, or a string in, the {} choices",
                choices.len()
            ))
        })?;
        out.push(McItem {
            context,
            choices,
            gold,
        });
    }
    if out.is_empty() {
        return Err(Error::format(path, "no items"));
    }
    Ok(out)
}

/// Context and continuation token ids of one (context, choice) pair, as
/// lm-eval's `_encode_pair` with target delimiter " ".
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    choice: &str,
    prefix: u32,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let cont = format!("{} {choice}", &context[trimmed.len()..]);
    let whole = tok.encode(&format!("{trimmed}{cont}"))?;
    let ctx = tok.encode(trimmed)?;
    if ctx.is_empty() {
        return Ok((vec![prefix], whole));
    }
    let cont_ids = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    if cont_ids.is_empty() {
        return Err(Error::Tokenizer(format!(
            "choice {choice:?} encodes to no tokens after its context"
        )));
    }
    Ok((ctx, cont_ids))
}

/// Σ log p(cont | ctx) of each request, `batch` requests per forward pass.
pub fn loglikelihoods<B: Backend>(
    be: &B,
    model: &Model<B>,
    requests: &[(Vec<u32>, Vec<u32>)],
    batch: usize,
    progress: &Progress,
) -> Result<Vec<f64>> {
    let (d, vocab) = (model.cfg.hidden, model.cfg.vocab);
    // Scored sequence: ctx + cont without its last token.
    let len = |r: &(Vec<u32>, Vec<u32>)| r.0.len() + r.1.len() - 1;
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(len(&requests[i])));
    let mut out = vec![0f64; requests.len()];
    for chunk in order.chunks(batch.max(1)) {
        let t = len(&requests[chunk[0]]);
        let mut ids = Vec::with_capacity(chunk.len() * t); // [seqs, t], right-padded
        for &i in chunk {
            let (c, a) = &requests[i];
            let seq: Vec<u32> = c.iter().chain(&a[..a.len() - 1]).copied().collect();
            ids.extend_from_slice(&seq);
            ids.extend(std::iter::repeat_n(seq[seq.len() - 1], t - seq.len()));
        }
        let z = forward(
            be,
            model,
            &ids,
            Geometry {
                seqs: chunk.len(),
                t,
            },
            Keep::OUTPUT,
        )?
        .z;
        let z = be.download(&z)?; // [seqs·t, d]
        for (s, &i) in chunk.iter().enumerate() {
            let (c, a) = &requests[i];
            // Row c.len()−1+j predicts a[j].
            let first = s * t + c.len() - 1;
            let rows = be.upload(&z[first * d..(first + a.len()) * d])?;
            let (nll, _, _) =
                be.cross_entropy(&rows, model.lm_head(be)?, a, a.len(), d, vocab, 1.0, false)?;
            out[i] = -nll;
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(out)
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct McArgs {
    /// Items (jsonl).
    pub data: PathBuf,
    /// Label in the result; default: the data file's stem.
    pub task: Option<String>,
    /// Evaluate at most this many items (the first ones).
    pub limit: Option<usize>,
    /// (context, choice) sequences per forward pass.
    pub batch: usize,
    /// Per-item jsonl output.
    pub out: Option<PathBuf>,
    /// Replace an existing `out`: only an earlier record file of mc
    /// (DESIGN.md §10).
    pub force: bool,
}

impl McArgs {
    pub fn new(data: PathBuf) -> Self {
        Self {
            data,
            task: None,
            limit: None,
            batch: 16,
            out: None,
            force: false,
        }
    }
}

/// A per-item jsonl as an output: every line an object with the fields
/// of [`McRecord`] (DESIGN.md §10, §15).
pub const MC_RECORDS: Kind = Kind::Jsonl(&[
    "index",
    "loglik",
    "chars",
    "pred",
    "pred_norm",
    "gold",
    "correct",
    "correct_norm",
]);

/// One scored item (a line of the per-item jsonl).
#[derive(Clone, Debug, Serialize)]
pub struct McRecord {
    pub index: usize,
    /// Σ log p of each choice's continuation tokens.
    pub loglik: Vec<f64>,
    /// Each choice's length in characters.
    pub chars: Vec<usize>,
    pub pred: usize,
    pub pred_norm: usize,
    pub gold: usize,
    pub correct: bool,
    pub correct_norm: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct McResult {
    pub task: String,
    pub acc: f64,
    pub acc_norm: f64,
    pub n: usize,
    pub choices: usize,
    pub seconds: f64,
}

/// Index of the first largest value.
fn first_argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Runs the evaluation; returns the summary and per-item records (also
/// written to `args.out` when given).
pub fn evaluate_mc<B: Backend>(
    be: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    args: &McArgs,
) -> Result<(McResult, Vec<McRecord>)> {
    if let Some(out) = &args.out {
        // Before the work; the records never replace what is read.
        output::protect(&model.dir);
        output::protect(&args.data);
        output::check(out, MC_RECORDS, args.force)?;
    }
    let start = Instant::now();
    let mut items = read_items(&args.data)?;
    items.truncate(args.limit.unwrap_or(usize::MAX));
    let prefix = model
        .cfg
        .bos_token_id
        .or(model.cfg.eos_token_ids.first().copied())
        .unwrap_or(0);
    let mut requests = Vec::new();
    for (index, it) in items.iter().enumerate() {
        for ch in &it.choices {
            let (ctx, cont) = encode_pair(tok, &it.context, ch, prefix)?;
            // Past the model's positions the scores mean nothing (and one
            // huge item would run for hours): refused, not truncated.
            let len = ctx.len() + cont.len();
            if len > model.cfg.max_positions {
                return Err(Error::format(
                    &args.data,
                    format!(
                        "item {index}: context and choice are {len} tokens, more than the \
                         model's max_position_embeddings ({})",
                        model.cfg.max_positions
                    ),
                ));
            }
            requests.push((ctx, cont));
        }
    }
    let progress = Progress::new(requests.len() as u64, "mc (context, choice) pairs");
    let ll = loglikelihoods(be, model, &requests, args.batch, &progress)?;
    progress.finish();
    let mut at = 0;
    let records: Vec<McRecord> = items
        .iter()
        .enumerate()
        .map(|(index, it)| {
            let loglik = ll[at..at + it.choices.len()].to_vec();
            at += it.choices.len();
            let chars: Vec<usize> = it.choices.iter().map(|c| c.chars().count()).collect();
            let pred = first_argmax(loglik.iter().copied());
            let pred_norm =
                first_argmax(loglik.iter().zip(&chars).map(|(l, &n)| l / n.max(1) as f64));
            McRecord {
                index,
                loglik,
                chars,
                pred,
                pred_norm,
                gold: it.gold,
                correct: pred == it.gold,
                correct_norm: pred_norm == it.gold,
            }
        })
        .collect();
    if let Some(out) = &args.out {
        write_jsonl(out, &records, MC_RECORDS, args.force)?;
    }
    let n = records.len();
    Ok((
        McResult {
            task: args.task.clone().unwrap_or_else(|| stem(&args.data)),
            acc: records.iter().filter(|r| r.correct).count() as f64 / n as f64,
            acc_norm: records.iter().filter(|r| r.correct_norm).count() as f64 / n as f64,
            n,
            choices: requests.len(),
            seconds: start.elapsed().as_secs_f64(),
        },
        records,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gold_of(label: &str, choices: &str) -> Result<usize> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("items.jsonl");
        let row = format!(r#"{{"query": "q", "choices": {choices}, "label": {label}}}"#);
        std::fs::write(&p, row).unwrap();
        read_items(&p).map(|items| items[0].gold)
    }

    #[test]
    fn one_label_rule_numbers_are_indices_strings_are_choice_texts() {
        assert_eq!(gold_of("1", r#"["1", "2"]"#).unwrap(), 1);
        assert_eq!(gold_of(r#""b""#, r#"["a", "b"]"#).unwrap(), 1);
        // The text of the choice at the same index: both readings agree.
        assert_eq!(gold_of(r#""1""#, r#"["0", "1"]"#).unwrap(), 1);
        // "1" is choice 0's text but would be index 1 as a number.
        let e = gold_of(r#""1""#, r#"["1", "2"]"#).unwrap_err().to_string();
        assert!(
            e.contains("reads as an index") && e.contains("line 1"),
            "{e}"
        );
        // "1" names no choice: an index must be a number.
        let e = gold_of(r#""1""#, r#"["a", "b"]"#).unwrap_err().to_string();
        assert!(e.contains("reads as an index"), "{e}");
    }

    #[test]
    fn the_record_kind_lists_every_field_of_a_record() {
        let r = McRecord {
            index: 0,
            loglik: vec![],
            chars: vec![],
            pred: 0,
            pred_norm: 0,
            gold: 0,
            correct: false,
            correct_norm: false,
        };
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let Kind::Jsonl(fields) = MC_RECORDS else {
            panic!("a jsonl kind")
        };
        assert_eq!(keys, fields);
    }
}

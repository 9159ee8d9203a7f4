//! Reading evaluation and calibration text, and tokenizing it
//! (METHODS.md section 2: "Reading text, everywhere").
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The non-blank rows of a jsonl file, each with its 1-based line number;
/// a row that is not JSON is an error naming the file and the line.
pub fn jsonl_rows(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let raw = super::read_regular_text(path, "a jsonl file")?;
    raw.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map(|v| (i + 1, v))
                .map_err(|e| Error::format(path, format!("line {}: not valid JSON: {e}", i + 1)))
        })
        .collect()
}

/// Reads `path` as one string. A `.jsonl` file contributes the string field
/// `field` (default "text") of each row, stripped of surrounding white
/// space, rows joined by a blank line; any other file is taken whole.
pub fn read_text(path: &Path, field: Option<&str>) -> Result<String> {
    let is_jsonl = path
        .extension()
        .map(|e| e == "jsonl" || e == "ndjson")
        .unwrap_or(false);
    if !is_jsonl {
        if let Some(f) = field {
            return Err(Error::Invalid(format!(
                "--field {f} given but {} is not a .jsonl file",
                path.display()
            )));
        }
        return super::read_regular_text(path, "a text file");
    }
    let field = field.unwrap_or("text");
    let mut parts = Vec::new();
    for (line, v) in jsonl_rows(path)? {
        let s = v.get(field).and_then(|x| x.as_str()).ok_or_else(|| {
            Error::format(
                path,
                format!("line {line}: no string field `{field}` (choose one with --field)"),
            )
        })?;
        parts.push(s.trim().to_string());
    }
    if parts.is_empty() {
        return Err(Error::format(path, "no rows"));
    }
    Ok(parts.join("\n\n"))
}

/// A HF `tokenizer.json` loaded with the `tokenizers` crate.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::format(
                model_dir,
                "no tokenizer.json in the model directory",
            ));
        }
        let bytes = crate::io::read_regular(&path, "a tokenizer.json")?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
        // Else every text would read as "0 tokens", blaming the text.
        if inner.get_vocab_size(false) == 0 {
            return Err(Error::format(
                &path,
                "the tokenizer has an empty vocabulary (model.vocab holds no tokens)",
            ));
        }
        // BPE dropout skips merges at random: every run would tokenize the
        // same text differently (a training-time augmentation).
        if let tokenizers::ModelWrapper::BPE(bpe) = inner.get_model() {
            if let Some(p) = bpe.dropout.filter(|&p| p > 0.0) {
                return Err(Error::format(
                    &path,
                    format!(
                        "model.dropout is {p}: BPE dropout tokenizes at random; set it to null"
                    ),
                ));
            }
        }
        Ok(Self { inner })
    }

    /// Token ids of `text`, without special tokens (no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// sha256 of token ids (little-endian u32), hex: the calibration digest.
pub fn token_digest(ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How results say whether windows started with BOS (METHODS.md §2, §8).
pub fn bos_words(bos: bool) -> &'static str {
    if bos {
        "each after BOS"
    } else {
        "without BOS"
    }
}

/// The first `n` consecutive non-overlapping windows of `t` tokens, flattened
/// `[n, t]` (window i is `ids[i·t, (i+1)·t)`), optionally each prefixed by BOS
/// (then each window holds t−1 text tokens).
pub fn windows(ids: &[u32], n: usize, t: usize, bos: Option<u32>) -> Result<Vec<u32>> {
    let per = if bos.is_some() { t - 1 } else { t };
    let have = ids.len() / per.max(1);
    if t < 2 || have < n {
        return Err(Error::Invalid(format!(
            "the text has {} tokens: {have} windows of {t} tokens, {n} requested",
            ids.len()
        )));
    }
    let mut out = Vec::with_capacity(n * t);
    for i in 0..n {
        if let Some(b) = bos {
            out.push(b);
        }
        out.extend_from_slice(&ids[i * per..(i + 1) * per]);
    }
    Ok(out)
}

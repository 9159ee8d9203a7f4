//! Rebuilds HF `tokenizer.json` and `tokenizer_config.json` from a GGUF's
//! tokenizer metadata (llama.cpp key names, `tokenizer.ggml.*`).
//!
//! Only byte-level BPE (`tokenizer.ggml.model` = `gpt2`) is supported. The
//! vocabulary is `tokens` (id = position), merges are `"a b"` strings, and
//! `token_type` marks control tokens (3, added as special tokens) and
//! user-defined ones (4, added as plain added tokens), as transformers'
//! GGUF converter does. A token not spelled in the byte-level alphabet is
//! respelled from its UTF-8 bytes; a control token so spelled is not added
//! (llama.cpp mislabels, see transformers' `add_gguf_special_tokens`).
//!
//! The pre-tokenizer comes from `tokenizer.ggml.pre`, reproducing the
//! `tokenizer.json` of the model family the GGUF was converted from:
//!
//! - `smollm`: `Digits(individual)` then GPT-2's `ByteLevel` regex (SmolLM's
//!   own tokenizer.json; llama.cpp: `\p{N}` then the GPT-2 regex);
//! - `qwen2`, `deepseek-r1-qwen`: NFC, then a `Split` on Qwen2's regex
//!   (single digits), then `ByteLevel` without regex;
//! - `llama-bpe`, `llama3`, `llama-v3`: `Split` on LLaMA-3's regex (digits
//!   in groups of up to 3), then `ByteLevel` without regex.
use crate::io::gguf::{GgufFile, Value};
use crate::{Error, Result};
use serde_json::{json, Map, Value as Json};

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// GPT-2's byte → printable character map (`bytes_to_unicode`): printable
/// Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in order.
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are chars")
        };
    }
    map
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = g.get(key).and_then(Value::as_array).ok_or_else(|| {
        Error::format(g.path(), format!("metadata {key} missing or not an array"))
    })?;
    arr.iter()
        .map(|v| {
            v.as_str().ok_or_else(|| {
                Error::format(g.path(), format!("metadata {key} holds a non-string"))
            })
        })
        .collect()
}

fn str_key<'a>(g: &'a GgufFile, key: &str) -> Option<&'a str> {
    g.get(key).and_then(Value::as_str)
}

/// Token text of the id stored under `key`, if the key is present.
fn special(g: &GgufFile, tokens: &[&str], key: &str) -> Result<Option<(usize, String)>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    match v.as_u64().map(|i| i as usize) {
        Some(id) if id < tokens.len() => Ok(Some((id, tokens[id].to_string()))),
        _ => Err(Error::format(
            g.path(),
            format!("{key} = {v:?} is not a token id below {}", tokens.len()),
        )),
    }
}

fn pre_tokenizer(g: &GgufFile) -> Result<(Json, Json)> {
    let pre = str_key(g, "tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": !use_regex, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "smollm" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        ),
        "llama-bpe" | "llama3" | "llama-v3" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
        ),
        other => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF pre-tokenizer {other:?} (tokenizer.ggml.pre); supported: smollm, qwen2, \
                 deepseek-r1-qwen, llama-bpe, llama3, llama-v3",
                g.path().display()
            )))
        }
    })
}

/// The HF `tokenizer.json` described by the file's metadata.
pub fn tokenizer_json(g: &GgufFile) -> Result<Json> {
    let model = str_key(g, "tokenizer.ggml.model").unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "{}: tokenizer model {model:?} (tokenizer.ggml.model); only gpt2 byte-level BPE is supported",
            g.path().display()
        )));
    }
    let (normalizer, pre) = pre_tokenizer(g)?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .filter(|a| a.len() == tokens.len())
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                Error::format(
                    g.path(),
                    "tokenizer.ggml.token_type is not one integer per token",
                )
            })?,
    };

    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        let spelled_ok = in_alphabet(tok);
        let spelled = if spelled_ok {
            tok.to_string()
        } else {
            tok.bytes().map(|b| alphabet[b as usize]).collect()
        };
        if (ty == TOKEN_CONTROL && spelled_ok) || ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_CONTROL,
            }));
        }
        vocab.insert(spelled, id.into());
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| Error::format(g.path(), format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;

    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        == Some(true);
    let post = match special(g, &tokens, "tokenizer.ggml.bos_token_id")? {
        Some((id, bos)) if add_bos => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}},
        }),
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}

/// The HF `tokenizer_config.json`: special tokens, BOS/EOS flags and the
/// chat template from `tokenizer.chat_template`.
pub fn tokenizer_config_json(g: &GgufFile) -> Result<Json> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    for (name, key) in [
        ("add_bos_token", "tokenizer.ggml.add_bos_token"),
        ("add_eos_token", "tokenizer.ggml.add_eos_token"),
    ] {
        let v = g.get(key).and_then(Value::as_bool).unwrap_or(false);
        cfg.insert(name.into(), v.into());
    }
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some((_, text)) = special(g, &tokens, key)? {
            cfg.insert(name.into(), text.into());
        }
    }
    if let Some(t) = str_key(g, "tokenizer.chat_template") {
        cfg.insert("chat_template".into(), t.into());
    }
    let arch = str_key(g, "general.architecture").unwrap_or_default();
    if let Some(n) = g
        .get(&format!("{arch}.context_length"))
        .and_then(Value::as_u64)
    {
        cfg.insert("model_max_length".into(), n.into());
    }
    cfg.insert("clean_up_tokenization_spaces".into(), false.into());
    Ok(Json::Object(cfg))
}

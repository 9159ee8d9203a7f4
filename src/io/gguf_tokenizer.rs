//! Rebuilds HF `tokenizer.json` and `tokenizer_config.json` from a GGUF's
//! tokenizer metadata (llama.cpp key names, `tokenizer.ggml.*`).
//!
//! Two kinds are supported, by `tokenizer.ggml.model`:
//!
//! - `gpt2`: byte-level BPE. The vocabulary is `tokens` (id = position),
//!   merges are `"a b"` strings, and `token_type` marks control tokens (3,
//!   added as special tokens) and user-defined ones (4, added as plain added
//!   tokens), as transformers' GGUF converter does. A token not spelled in
//!   the byte-level alphabet is respelled from its UTF-8 bytes; a control
//!   token so spelled is not added (llama.cpp mislabels, see transformers'
//!   `add_gguf_special_tokens`).
//! - `llama` (SentencePiece-style BPE with byte fallback), for Gemma 3 only:
//!   see [`sentencepiece_json`].
//!
//! The pre-tokenizer of a `gpt2` vocabulary comes from `tokenizer.ggml.pre`,
//! reproducing the `tokenizer.json` of the model family the GGUF was
//! converted from:
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
use std::collections::HashMap;

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_BYTE: i64 = 6;

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
    match str_key(g, "tokenizer.ggml.model") {
        Some("gpt2") => byte_level_json(g),
        Some("llama") => sentencepiece_json(g),
        other => Err(Error::Unsupported(format!(
            "{}: tokenizer model {:?} (tokenizer.ggml.model); supported: gpt2 (byte-level BPE), \
             llama (SentencePiece-style BPE, Gemma 3 only)",
            g.path().display(),
            other.unwrap_or("(missing)")
        ))),
    }
}

/// `tokenizer.ggml.token_type`, one integer per token (all normal, 1, when
/// the key is absent).
fn token_types(g: &GgufFile, n: usize) -> Result<Vec<i64>> {
    match g.get("tokenizer.ggml.token_type") {
        None => Ok(vec![1; n]),
        Some(v) => v
            .as_array()
            .filter(|a| a.len() == n)
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                Error::format(
                    g.path(),
                    "tokenizer.ggml.token_type is not one integer per token",
                )
            }),
    }
}

/// The post-processor that puts BOS first when `tokenizer.ggml.add_bos_token`
/// is true; `None` otherwise.
fn bos_template(g: &GgufFile, tokens: &[&str]) -> Result<Option<Json>> {
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        == Some(true);
    Ok(match special(g, tokens, "tokenizer.ggml.bos_token_id")? {
        Some((id, bos)) if add_bos => Some(json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}},
        })),
        _ => None,
    })
}

/// An added-token entry of `tokenizer.json`.
fn added_token(id: usize, content: &str, special: bool) -> Json {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": special,
    })
}

fn byte_level_json(g: &GgufFile) -> Result<Json> {
    let (normalizer, pre) = pre_tokenizer(g)?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types = token_types(g, tokens.len())?;

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
            added.push(added_token(id, tok, ty == TOKEN_CONTROL));
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

    let post = bos_template(g, &tokens)?.unwrap_or_else(|| {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    });

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

/// SentencePiece's word-boundary mark, which stands for a space.
const SPACE_MARK: char = '\u{2581}';

/// Python's `str.isspace` for one character: Unicode white space and the
/// four information separators U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The SentencePiece-style BPE vocabulary of a Gemma 3 GGUF
/// (`tokenizer.ggml.model` = `llama`) as the `tokenizer.json` that
/// transformers' GGUF converter builds for it (`GemmaTokenizer`), so the
/// `tokenizers` crate gives the same ids:
///
/// - normalizer `Replace(" " → "▁")`, no prefix space (the file must say
///   `add_space_prefix` false or nothing); pre-tokenizer `Split(" ",
///   MergedWithPrevious)` (a no-op after the normalizer, kept as Gemma's own
///   tokenizer.json has it); decoder `▁` → space, `ByteFallback`, `Fuse`;
/// - model BPE with `byte_fallback` (the 256 byte tokens `<0x00>`..`<0xFF>`,
///   token type 6, must all be there), `fuse_unk`, unk from
///   `tokenizer.ggml.unknown_token_id`;
/// - vocabulary `tokens`, id = position, except that a token of white
///   space containing a space (Gemma stores runs of spaces as real spaces)
///   is spelled with `▁` per character, as the normalizer would make it;
/// - no merges in the file: they are rebuilt from the vocabulary. Every
///   split of a token into two tokens is a merge; merges rank by the token's
///   position (earlier first: Gemma's `scores` are −rank for normal tokens
///   but −1000 for the special ones, so position is the key that orders them
///   all), and a token's splits rank by longer left part first;
/// - added tokens: control tokens (type 3) special, user-defined ones (4)
///   not, each only when its text is its vocabulary spelling (the runs of
///   spaces are not added; the normalizer already makes them `▁` runs);
/// - BOS first when `add_bos_token` is true.
fn sentencepiece_json(g: &GgufFile) -> Result<Json> {
    let arch = str_key(g, "general.architecture").unwrap_or("(missing)");
    if arch != "gemma3" {
        return Err(Error::Unsupported(format!(
            "{}: a SentencePiece-style vocabulary (tokenizer.ggml.model llama) of architecture \
             {arch:?}; only gemma3's is rebuilt",
            g.path().display()
        )));
    }
    for (key, bad) in [
        ("tokenizer.ggml.add_space_prefix", "true (a prefix space)"),
        ("tokenizer.ggml.merges", "present (Gemma's files have none)"),
    ] {
        let refused = match g.get(key) {
            None => false,
            Some(v) if key.ends_with("merges") => v.as_array().is_some_and(|a| !a.is_empty()),
            Some(v) => v.as_bool() != Some(false),
        };
        if refused {
            return Err(Error::Unsupported(format!(
                "{}: {key} is {bad}; not supported for a SentencePiece-style vocabulary",
                g.path().display()
            )));
        }
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let types = token_types(g, tokens.len())?;
    let bytes = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == TOKEN_BYTE)
        .map(|(t, _)| {
            t.strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .filter(|h| h.len() == 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    Error::format(
                        g.path(),
                        format!("tokenizer.ggml.tokens: byte token (type 6) {t:?} is not <0xNN>"),
                    )
                })
        })
        .collect::<Result<std::collections::BTreeSet<u8>>>()?;
    if bytes.len() != 256 {
        return Err(Error::format(
            g.path(),
            format!(
                "tokenizer.ggml.token_type: {} distinct byte tokens (type 6), byte fallback needs \
                 all 256",
                bytes.len()
            ),
        ));
    }
    let (_, unk) = special(g, &tokens, "tokenizer.ggml.unknown_token_id")?.ok_or_else(|| {
        Error::format(
            g.path(),
            "metadata tokenizer.ggml.unknown_token_id is missing",
        )
    })?;

    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| match t.contains(' ') && t.chars().all(py_space) {
            true => SPACE_MARK.to_string().repeat(t.chars().count()),
            false => t.to_string(),
        })
        .collect();
    let mut ids = HashMap::with_capacity(spelled.len());
    let mut vocab = Map::new();
    for (id, t) in spelled.iter().enumerate() {
        if let Some(first) = ids.insert(t.as_str(), id) {
            return Err(Error::format(
                g.path(),
                format!("tokenizer.ggml.tokens: token {t:?} appears twice (ids {first} and {id})"),
            ));
        }
        vocab.insert(t.clone(), id.into());
    }
    let mut merges = Vec::new();
    for t in &spelled {
        for (at, _) in t
            .char_indices()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            let (l, r) = t.split_at(at);
            if ids.contains_key(l) && ids.contains_key(r) {
                merges.push(json!([l, r]));
            }
        }
    }
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|&(_, (t, &ty))| {
            (ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED) && ids.contains_key(t)
        })
        .map(|(id, (t, &ty))| added_token(id, t, ty == TOKEN_CONTROL))
        .collect();
    let space = SPACE_MARK.to_string();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": space},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": bos_template(g, &tokens)?,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": space}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}

/// Gemma's turn format, for a gemma3 GGUF that carries no
/// `tokenizer.chat_template` (base models' files do not): BOS, then per
/// turn `<start_of_turn>ROLE\n` + the trimmed content + `<end_of_turn>\n`,
/// where the assistant's role is `model`; a system message is not a turn
/// of its own but opens the first user turn, followed by a blank line;
/// turns must alternate user/assistant from the user. The generation
/// prompt is `<start_of_turn>model\n`.
const GEMMA_CHAT: &str = r#"{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set prefix = messages[0]['content'] | trim + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set prefix = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Gemma turns must alternate user/assistant, starting with the user') }}
{%- endif -%}
{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}
{{- (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\n' }}
{%- endif -%}
"#;

/// The HF `tokenizer_config.json`: special tokens, BOS/EOS flags and the
/// chat template from `tokenizer.chat_template` (Gemma's own format for a
/// gemma3 file without one).
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
    let arch = str_key(g, "general.architecture").unwrap_or_default();
    let template =
        str_key(g, "tokenizer.chat_template").or((arch == "gemma3").then_some(GEMMA_CHAT));
    if let Some(t) = template {
        cfg.insert("chat_template".into(), t.into());
    }
    if let Some(n) = g
        .get(&format!("{arch}.context_length"))
        .and_then(Value::as_u64)
    {
        cfg.insert("model_max_length".into(), n.into());
    }
    cfg.insert("clean_up_tokenization_spaces".into(), false.into());
    Ok(Json::Object(cfg))
}

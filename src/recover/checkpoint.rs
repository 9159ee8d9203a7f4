//! The recovery's checkpoint (METHODS.md section 10): the adapters and the
//! AdamW moments after a step, bit for bit, with the step number, the
//! losses so far and the settings that must match for `--resume`. One
//! safetensors file, written atomically (docs/DESIGN.md §10).
use crate::backend::Backend;
use crate::io::output::{self, Kind};
use crate::io::safetensors_out::serialize_sorted;
use crate::model::lora::Adapters;
use crate::{Error, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

const FORMAT: &str = "rku-recover-checkpoint";
/// The checkpoint file kind (`output::write_file` replaces only this kind).
pub const CHECKPOINT_FILE: Kind = Kind::Safetensors(FORMAT);

/// The training state after `step` steps.
pub struct TrainState<B: Backend> {
    pub step: u64,
    pub adapters: Adapters<B>,
    pub m: Adapters<B>,
    pub v: Adapters<B>,
    /// Mean loss of each step so far.
    pub losses: Vec<f64>,
}

/// Writes `state` to `path` with `settings` (the JSON the run must match
/// to resume), replacing an earlier checkpoint only.
pub fn save<B: Backend>(
    be: &B,
    state: &TrainState<B>,
    settings: &serde_json::Value,
    path: &Path,
) -> Result<()> {
    let names = state.adapters.tensor_names();
    let mut host = Vec::new();
    for (prefix, set) in [("", &state.adapters), ("m.", &state.m), ("v.", &state.v)] {
        for (name, (buf, _)) in names.iter().zip(set.tensors()) {
            host.push((format!("{prefix}{name}"), be.download(buf)?));
        }
    }
    let views = host
        .iter()
        .map(|(name, v)| {
            let view = TensorView::new(Dtype::F32, vec![v.len()], bytemuck::cast_slice(v))
                .map_err(|e| Error::Invalid(format!("checkpoint tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("step".to_string(), state.step.to_string()),
        ("settings".to_string(), settings.to_string()),
        (
            "losses".to_string(),
            serde_json::json!(state.losses).to_string(),
        ),
    ]);
    output::write_file(
        path,
        CHECKPOINT_FILE,
        true,
        &serialize_sorted(views, &meta)?,
    )
}

/// Reads the checkpoint at `path` into adapters shaped like `like` (rank
/// and shapes must match), refusing one whose settings differ from
/// `settings`: a resumed run continues exactly the interrupted one.
pub fn load<B: Backend>(
    be: &B,
    like: &Adapters<B>,
    settings: &serde_json::Value,
    path: &Path,
) -> Result<TrainState<B>> {
    let buf = crate::io::read_regular(path, "a checkpoint")?;
    let bad = |msg: String| Error::format(path, msg);
    let st = SafeTensors::deserialize(&buf).map_err(|e| {
        bad(format!(
            "not a safetensors file: {}",
            crate::io::safetensors_io::header_error(&buf, &e)
        ))
    })?;
    let (_, header) = SafeTensors::read_metadata(&buf)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let kv = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| {
        kv.get(key).map(String::as_str).ok_or_else(|| {
            bad(format!(
                "not a recovery checkpoint: no metadata key {key:?}"
            ))
        })
    };
    if get("format")? != FORMAT {
        return Err(bad(format!(
            "not a recovery checkpoint (format {:?})",
            get("format")?
        )));
    }
    let saved: serde_json::Value = serde_json::from_str(get("settings")?)
        .map_err(|e| bad(format!("settings are not JSON: {e}")))?;
    if &saved != settings {
        let differ: Vec<String> = match (saved.as_object(), settings.as_object()) {
            (Some(a), Some(b)) => b
                .iter()
                .filter(|(k, v)| a.get(*k) != Some(*v))
                .map(|(k, v)| {
                    format!(
                        "{k}: checkpoint {}, this run {v}",
                        a.get(k).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect(),
            _ => vec!["settings".into()],
        };
        return Err(bad(format!(
            "was written by a run with other settings ({}); rerun with those, or delete it to \
             start over",
            differ.join("; ")
        )));
    }
    let step: u64 = get("step")?
        .parse()
        .map_err(|_| bad("step is not a number".into()))?;
    let losses: Vec<f64> = serde_json::from_str(get("losses")?)
        .map_err(|e| bad(format!("losses are not a JSON list: {e}")))?;
    if losses.len() as u64 != step || losses.iter().any(|l| !l.is_finite()) {
        return Err(bad(format!(
            "{} finite losses recorded for {step} steps",
            losses.len()
        )));
    }
    // A KL or cross-entropy is never negative (rounding of a KL near zero
    // stays far above -1e-3), and the summary sums them.
    if let Some(l) = losses.iter().find(|&&l| l < -1e-3) {
        return Err(bad(format!(
            "a recorded loss is {l}: no KL or cross-entropy is negative"
        )));
    }
    if !losses.iter().sum::<f64>().is_finite() {
        return Err(bad("the recorded losses sum past f64's range".into()));
    }
    let names = like.tensor_names();
    let read = |prefix: &str| -> Result<Adapters<B>> {
        let mut set = like.zeros_like(be)?;
        for (name, (buf, n)) in names.iter().zip(set.tensors_mut()) {
            let full = format!("{prefix}{name}");
            let t = st
                .tensor(&full)
                .map_err(|_| bad(format!("no tensor {full}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != [n] {
                return Err(bad(format!(
                    "{full}: {:?} {:?}, expected F32 [{n}]",
                    t.dtype(),
                    t.shape()
                )));
            }
            let values: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!("{full} holds a non-finite value")));
            }
            // AdamW's second moment is a running mean of squares.
            if prefix == "v." && values.iter().any(|&v| v < 0.0) {
                return Err(bad(format!("{full} holds a negative second moment")));
            }
            *buf = be.upload(&values)?;
        }
        Ok(set)
    };
    Ok(TrainState {
        step,
        adapters: read("")?,
        m: read("m.")?,
        v: read("v.")?,
        losses,
    })
}

//! Overlap of two prunings: per-layer |kept_A ∩ kept_B| / |kept_A ∪ kept_B|
//! and their mean over layers (METHODS.md section 8).
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Iou {
    pub per_layer: Vec<f64>,
    pub mean: f64,
}

/// What `iou` reads of a pruning: the kept channels of every layer and the
/// digest of the model they were pruned from.
#[derive(Clone, Debug, PartialEq)]
pub struct Pruning {
    pub kept: Vec<Vec<usize>>,
    pub source_model_digest: Option<String>,
}

/// Reads the per-layer kept indices of a pruned model directory (or its
/// pruning.json). Each layer's list must be ascending, without repeats,
/// and, where the file records `layer_widths`, as long as that
/// layer's width.
pub fn read_pruning(path: &Path) -> Result<Pruning> {
    let file = if path.is_dir() {
        let file = path.join("pruning.json");
        if !file.exists() {
            return Err(Error::Invalid(format!(
                "{} is not a pruned model (it has no pruning.json)",
                path.display()
            )));
        }
        file
    } else {
        path.to_path_buf()
    };
    let text = crate::io::read_regular_text(&file, "a pruning.json")?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&file, format!("not valid JSON: {e}")))?;
    let kept = v
        .get("kept")
        .and_then(|k| k.as_array())
        .ok_or_else(|| Error::format(&file, "no `kept` array (is this a pruning.json?)"))?;
    let widths: Option<Vec<u64>> = v
        .get("layer_widths")
        .and_then(|w| w.as_array())
        .map(|w| w.iter().filter_map(|x| x.as_u64()).collect());
    if let Some(w) = &widths {
        if w.len() != kept.len() {
            return Err(Error::format(
                &file,
                format!("{} layer_widths for {} kept lists", w.len(), kept.len()),
            ));
        }
    }
    // The widths of the source model (files since the engine recorded
    // them): every index must lie below its layer's.
    let source: Option<Vec<u64>> = match v.get("source_layer_widths") {
        None => None,
        Some(w) => Some(
            w.as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
                .filter(|s| s.len() == kept.len())
                .ok_or_else(|| {
                    Error::format(
                        &file,
                        format!("source_layer_widths is not a list of {} widths", kept.len()),
                    )
                })?,
        ),
    };
    let kept = kept
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            let list: Option<Vec<usize>> = layer
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
            let list = list.filter(|k| is_kept_list(k)).ok_or_else(|| {
                Error::format(
                    &file,
                    format!("kept[{l}] is not an ascending list of distinct channel indices"),
                )
            })?;
            if let Some(&m) = source.as_ref().and_then(|s| s.get(l)) {
                if let Some(&c) = list.iter().find(|&&c| c as u64 >= m) {
                    return Err(Error::format(
                        &file,
                        format!(
                            "kept[{l}] holds channel {c}, past the source layer's {m} channels"
                        ),
                    ));
                }
            }
            if let Some(w) = &widths {
                if list.len() as u64 != w[l] {
                    return Err(Error::format(
                        &file,
                        format!(
                            "kept[{l}] lists {} channels, layer_widths says {}",
                            list.len(),
                            w[l]
                        ),
                    ));
                }
            }
            Ok(list)
        })
        .collect::<Result<_>>()?;
    Ok(Pruning {
        kept,
        source_model_digest: v
            .get("source_model_digest")
            .and_then(|d| d.as_str())
            .map(str::to_string),
    })
}

/// Whether `k` is one layer's kept channels: not empty, ascending, each
/// index once.
pub fn is_kept_list(k: &[usize]) -> bool {
    !k.is_empty() && k.windows(2).all(|w| w[0] < w[1])
}

/// Whether `kept` (one list a layer, in the source numbering) fits a
/// source model whose FFN layers have `widths`: as many layers, every
/// index below its layer's width.
pub fn kept_fits(kept: &[Vec<usize>], widths: &[usize]) -> bool {
    kept.len() == widths.len()
        && kept
            .iter()
            .zip(widths)
            .all(|(k, &w)| k.iter().all(|&i| i < w))
}

/// The kept channels of a pruning (`read_pruning`).
pub fn read_kept(path: &Path) -> Result<Vec<Vec<usize>>> {
    Ok(read_pruning(path)?.kept)
}

/// IoU of two prunings of the same source model; refuses prunings whose
/// pruning.json records different source models.
pub fn iou_of(a: &Pruning, b: &Pruning) -> Result<Iou> {
    if let (Some(da), Some(db)) = (&a.source_model_digest, &b.source_model_digest) {
        if da != db {
            return Err(Error::Invalid(format!(
                "the two models were pruned from different source models (digests {}… and {}…)",
                da.chars().take(12).collect::<String>(),
                db.chars().take(12).collect::<String>()
            )));
        }
    }
    iou(&a.kept, &b.kept)
}

/// IoU of two kept-index lists with the same number of layers.
pub fn iou(a: &[Vec<usize>], b: &[Vec<usize>]) -> Result<Iou> {
    if a.len() != b.len() || a.is_empty() {
        return Err(Error::Invalid(format!(
            "prunings have {} and {} layers",
            a.len(),
            b.len()
        )));
    }
    let per_layer: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(ka, kb)| {
            let sa: BTreeSet<usize> = ka.iter().copied().collect();
            let sb: BTreeSet<usize> = kb.iter().copied().collect();
            let inter = sa.intersection(&sb).count();
            let union = sa.union(&sb).count();
            if union == 0 {
                1.0
            } else {
                inter as f64 / union as f64
            }
        })
        .collect();
    let mean = per_layer.iter().sum::<f64>() / per_layer.len() as f64;
    Ok(Iou { per_layer, mean })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_by_hand() {
        let a = vec![vec![0, 1, 2], vec![5]];
        let b = vec![vec![1, 2, 3], vec![5]];
        let r = iou(&a, &b).unwrap();
        assert_eq!(r.per_layer, vec![0.5, 1.0]);
        assert_eq!(r.mean, 0.75);
        assert!(iou(&a, &b[..1]).is_err());
    }

    fn pruning_file(dir: &Path, body: serde_json::Value) -> std::path::PathBuf {
        let p = dir.join(format!("{}.json", body.to_string().len()));
        std::fs::write(&p, body.to_string()).unwrap();
        p
    }

    #[test]
    fn damaged_or_foreign_prunings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ok = serde_json::json!({"kept": [[0, 2], [1]], "layer_widths": [2, 1],
                                    "source_model_digest": "aaaa"});
        let a = read_pruning(&pruning_file(d, ok.clone())).unwrap();
        assert_eq!(a.kept, vec![vec![0, 2], vec![1]]);
        for (body, needle) in [
            (serde_json::json!({"kept": [[2, 0], [1]]}), "ascending"),
            (serde_json::json!({"kept": [[0, 0], [1]]}), "distinct"),
            (serde_json::json!({"kept": [[], [1]]}), "kept[0]"),
            (
                serde_json::json!({"kept": [[0, 1], [1]], "layer_widths": [3, 1]}),
                "layer_widths says 3",
            ),
            (
                serde_json::json!({"kept": [[0, 1]], "layer_widths": [2, 1]}),
                "2 layer_widths for 1",
            ),
            (serde_json::json!({"kept": [[0, -1]]}), "kept[0]"),
        ] {
            let e = read_pruning(&pruning_file(d, body))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let mut other = ok;
        other["source_model_digest"] = "bbbb".into();
        let b = read_pruning(&pruning_file(d, other)).unwrap();
        let e = iou_of(&a, &b).unwrap_err().to_string();
        assert!(e.contains("different source models"), "{e}");
        assert_eq!(iou_of(&a, &a).unwrap().mean, 1.0);
        let e = read_pruning(d).unwrap_err().to_string();
        assert!(e.contains("not a pruned model"), "{e}");
    }
}

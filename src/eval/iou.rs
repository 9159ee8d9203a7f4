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

/// Reads the per-layer kept indices of a pruned model directory (or its pruning.json).
pub fn read_kept(path: &Path) -> Result<Vec<Vec<usize>>> {
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
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&file, format!("not valid JSON: {e}")))?;
    let kept = v
        .get("kept")
        .and_then(|k| k.as_array())
        .ok_or_else(|| Error::format(&file, "no `kept` array (is this a pruning.json?)"))?;
    kept.iter()
        .enumerate()
        .map(|(l, layer)| {
            layer
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .filter(|k: &Vec<usize>| k.windows(2).all(|w| w[0] < w[1]))
                .ok_or_else(|| {
                    Error::format(
                        &file,
                        format!("kept[{l}] is not an ascending list of distinct channel indices"),
                    )
                })
        })
        .collect()
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
}

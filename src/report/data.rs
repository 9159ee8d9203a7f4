//! The report document (`report.json`) and the values its cells hold.
use crate::eval::gen::GenResult;
use crate::eval::iou::iou;
use crate::eval::mc::McResult;
use crate::eval::ppl::PplResult;
use crate::eval::prefill::PrefillResult;
use crate::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Value of the `stats` cell (the file itself is `stats.safetensors`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsInfo {
    /// Objectives whose backward passes ran: `energy`, `ce` or `energy,ce`.
    pub objectives: String,
    pub samples: usize,
    pub seq_len: usize,
    pub tokens: u64,
}

/// Value of a `<method>-s<sparsity>.prune` cell: the mask and its sizes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrunedInfo {
    pub allocation: String,
    /// Kept FFN width of every layer.
    pub widths: Vec<usize>,
    pub params_before: u64,
    pub params_after: u64,
    /// Kept channel indices of every layer (as in the model's pruning.json).
    pub kept: Vec<Vec<usize>>,
}

/// The evaluations of one model; `None` where not requested or not done yet.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Evals {
    pub ppl: Option<PplResult>,
    /// Perplexity over the generated tokens of the `--trace-ppl` traces.
    pub trace_ppl: Option<PplResult>,
    pub gen: Option<GenResult>,
    pub mc: Option<McResult>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub path: String,
    pub params: u64,
    pub layers: usize,
    pub ffn_widths: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodInfo {
    /// The row's unique label: `rku`, `rku+refit`, `rku@traces+lora`.
    pub name: String,
    /// The label without the calibration: `rku`, `rku+refit`, `rku+lora`.
    pub method: String,
    /// The method alone: `rku`.
    pub base: String,
    /// What the mask was calibrated on: `text` or `traces`.
    pub calibration: String,
    pub allocation: String,
}

/// Sizes of a pruned model (its mask is left out of the report).
#[derive(Clone, Debug, Serialize)]
pub struct Size {
    pub widths: Vec<usize>,
    pub params_after: u64,
    /// 1 − params_after / params of the dense model.
    pub params_removed_fraction: f64,
}

/// One method at one sparsity.
#[derive(Clone, Debug, Serialize)]
pub struct CellReport {
    /// The row's label (`MethodInfo::name`).
    pub method: String,
    /// `text` or `traces`.
    pub calibration: String,
    pub sparsity: f64,
    pub size: Option<Size>,
    #[serde(flatten)]
    pub evals: Evals,
    pub prefill: Option<PrefillResult>,
}

/// IoU of the kept channels between every two methods at one sparsity.
#[derive(Clone, Debug, Serialize)]
pub struct IouMatrix {
    pub sparsity: f64,
    /// Rows and columns (the methods whose masks exist).
    pub methods: Vec<String>,
    /// Mean over layers: `mean[i][j]`.
    pub mean: Vec<Vec<f64>>,
    /// `per_layer[i][j][l]`.
    pub per_layer: Vec<Vec<Vec<f64>>>,
}

impl IouMatrix {
    /// The matrix of the named masks.
    pub fn of(sparsity: f64, masks: &[(String, &[Vec<usize>])]) -> Result<Self> {
        let k = masks.len();
        let (mut mean, mut per_layer) = (vec![vec![0.0; k]; k], vec![vec![Vec::new(); k]; k]);
        for (i, (_, a)) in masks.iter().enumerate() {
            for (j, (_, b)) in masks.iter().enumerate() {
                let r = iou(a, b)?;
                mean[i][j] = r.mean;
                per_layer[i][j] = r.per_layer;
            }
        }
        Ok(Self {
            sparsity,
            methods: masks.iter().map(|(n, _)| n.clone()).collect(),
            mean,
            per_layer,
        })
    }
}

/// One line of a plot, as drawn.
#[derive(Clone, Debug, Serialize)]
pub struct SeriesInfo {
    pub label: String,
    /// Stroke colour, `#rrggbb`.
    pub color: String,
    pub points: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlotInfo {
    /// Path relative to the report directory.
    pub file: String,
    pub title: String,
    pub series: Vec<SeriesInfo>,
}

/// What this invocation did.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    pub computed: usize,
    /// Cells found done and not recomputed.
    pub skipped: usize,
    /// Cells not done when the report was written.
    pub remaining: usize,
    pub seconds: f64,
}

/// `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub format: String,
    pub version: u32,
    /// Every requested cell is done.
    pub complete: bool,
    /// The fingerprint (fingerprint.json): every input that results depend on.
    pub inputs: Value,
    pub model: ModelInfo,
    pub stats: Option<StatsInfo>,
    /// The statistics pass over the traces (with `--traces`).
    pub traces_stats: Option<StatsInfo>,
    pub methods: Vec<MethodInfo>,
    pub sparsities: Vec<f64>,
    /// The evaluations requested: among `ppl`, `trace_ppl`, `gen`, `mc`, `prefill`.
    pub metrics: Vec<String>,
    pub dense: Evals,
    /// Methods × sparsities, sparsity-major in request order.
    pub cells: Vec<CellReport>,
    pub iou: Vec<IouMatrix>,
    pub plots: Vec<PlotInfo>,
    pub run: RunInfo,
}

impl Report {
    pub fn cell(&self, method: &str, sparsity: f64) -> Option<&CellReport> {
        self.cells
            .iter()
            .find(|c| c.method == method && c.sparsity == sparsity)
    }

    pub fn has(&self, metric: &str) -> bool {
        self.metrics.iter().any(|m| m == metric)
    }
}

//! Resume bookkeeping of a report: the fingerprint of its inputs, the key
//! of every cell, and the `cells/` directory of finished cells.
//!
//! A cell is one unit of resumable work (the statistics pass, one metric
//! of the dense model, one pruning, one metric of one pruned model). Its
//! key is a digest of exactly the inputs its value depends on, so a rerun
//! that changes, say, the multiple-choice file invalidates the mc cells
//! and nothing else. Paths are not part of any key (moving a file changes
//! nothing); digests of the contents are.
use crate::io::output::replace_owned;
use crate::io::text::hex;
use crate::prune::job::model_name;
use crate::prune::{Method, Sparsity};
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// An evaluation of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Ppl,
    /// Perplexity over the generated tokens of a traces file (METHODS.md §8).
    TracePpl,
    Gen,
    Mc,
    /// Prefill time against the dense model (pruned models only).
    Prefill,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ppl => "ppl",
            Metric::TracePpl => "trace_ppl",
            Metric::Gen => "gen",
            Metric::Mc => "mc",
            Metric::Prefill => "prefill",
        }
    }
}

/// What a statistics pass (and so a mask) is calibrated on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calibration {
    /// Windows of the calibration text (`--calib`).
    Text,
    /// The selected sequences of a traces file (`--traces`, METHODS.md §11).
    Traces,
}

impl Calibration {
    pub fn name(self) -> &'static str {
        match self {
            Calibration::Text => "text",
            Calibration::Traces => "traces",
        }
    }

    /// What cell and model names append: nothing for text (the names of
    /// reports without traces), `@traces`.
    fn tag(self) -> &'static str {
        match self {
            Calibration::Text => "",
            Calibration::Traces => "@traces",
        }
    }
}

/// Which model of a method at a sparsity a pruned cell is: the mask's
/// calibration, and the mask's model as cut, refitted (METHODS.md §9),
/// recovered by LoRA distillation (§10), or refitted then recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub calib: Calibration,
    pub refit: bool,
    pub recover: bool,
}

impl Variant {
    /// The text-calibrated mask's export as cut.
    pub const PLAIN: Variant = Variant {
        calib: Calibration::Text,
        refit: false,
        recover: false,
    };

    /// What row labels append: `+refit`, `+lora`, `+refit+lora`.
    pub fn suffix(self) -> &'static str {
        match (self.refit, self.recover) {
            (false, false) => "",
            (true, false) => "+refit",
            (false, true) => "+lora",
            (true, true) => "+refit+lora",
        }
    }

    /// The model as cut from the same mask.
    pub fn mask(self) -> Variant {
        Variant {
            refit: false,
            recover: false,
            ..self
        }
    }
}

/// One unit of resumable work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cell {
    /// The statistics pass over one calibration.
    Stats(Calibration),
    Dense(Metric),
    /// A mask and its model: the export as cut, or its `variant`.
    Prune {
        method: Method,
        sparsity: Sparsity,
        variant: Variant,
    },
    Pruned {
        method: Method,
        sparsity: Sparsity,
        variant: Variant,
        metric: Metric,
    },
}

/// The name of a pruned model in a report: `<method>-s<sparsity>`, the
/// calibration's tag and the variant's suffix (`rku-s0.4@traces+refit`).
pub fn variant_name(method: Method, sparsity: Sparsity, variant: Variant) -> String {
    format!(
        "{}{}{}",
        model_name(method, sparsity),
        variant.calib.tag(),
        variant.suffix()
    )
}

impl Cell {
    /// The cell's file stem under `cells/`.
    pub fn name(&self) -> String {
        match *self {
            Cell::Stats(c) => format!("stats{}", c.tag()),
            Cell::Dense(m) => format!("dense.{}", m.name()),
            Cell::Prune {
                method,
                sparsity,
                variant,
            } => format!("{}.prune", variant_name(method, sparsity, variant)),
            Cell::Pruned {
                method,
                sparsity,
                variant,
                metric,
            } => format!(
                "{}.{}",
                variant_name(method, sparsity, variant),
                metric.name()
            ),
        }
    }
}

/// The inputs of a report, as recorded in `fingerprint.json`: sections
/// `backend`, `model`, `calib`, `prune`, and `traces`, `refit`, `recover`,
/// `ppl`, `trace_ppl`, `gen`, `mc`, `prefill` when requested (absent
/// otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct Fingerprint(pub Value);

fn digest(parts: &Value) -> String {
    hex(&Sha256::digest(parts.to_string().as_bytes()))
}

impl Fingerprint {
    /// A section without its `path` (paths do not change results).
    fn part(&self, name: &str) -> Value {
        let mut v = self.0.get(name).cloned().unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.remove("path");
        }
        v
    }

    /// The key of `cell` under these inputs.
    pub fn key(&self, cell: &Cell) -> String {
        let stats = |c: Calibration| match c {
            Calibration::Text => json!([
                "stats",
                self.part("backend"),
                self.part("model"),
                self.part("calib")
            ]),
            Calibration::Traces => json!([
                "stats",
                self.part("backend"),
                self.part("model"),
                self.part("traces")
            ]),
        };
        let prune = |method: Method, sparsity: Sparsity, variant: Variant| {
            let mask = json!([
                "prune",
                digest(&stats(variant.calib)),
                self.part("prune"),
                method.name(),
                sparsity
            ]);
            let model = match variant.refit {
                true => json!([mask, "refit", self.part("refit")]),
                false => mask,
            };
            match variant.recover {
                true => json!([model, "recover", self.part("recover")]),
                false => model,
            }
        };
        digest(&match *cell {
            Cell::Stats(c) => stats(c),
            Cell::Dense(m) => json!([
                "dense",
                self.part("backend"),
                self.part("model"),
                self.part(m.name())
            ]),
            Cell::Prune {
                method,
                sparsity,
                variant,
            } => prune(method, sparsity, variant),
            Cell::Pruned {
                method,
                sparsity,
                variant,
                metric,
            } => json!([
                digest(&prune(method, sparsity, variant)),
                self.part(metric.name())
            ]),
        })
    }

    /// The leaves that differ from an older fingerprint, as
    /// `section.field: old → new` lines.
    pub fn diff(&self, old: &Value) -> Vec<String> {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        flatten("", old, &mut a);
        flatten("", &self.0, &mut b);
        let get = |v: &[(String, String)], k: &str| {
            v.iter()
                .find(|(p, _)| p == k)
                .map(|(_, x)| x.clone())
                .unwrap_or_else(|| "(none)".into())
        };
        let mut keys: Vec<&String> = a.iter().chain(&b).map(|(k, _)| k).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let (x, y) = (get(&a, k), get(&b, k));
                (x != y).then(|| format!("{k}: {x} → {y}"))
            })
            .collect()
    }
}

/// Leaf values of a JSON tree as (dotted path, JSON text).
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, x, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.to_string())),
    }
}

/// What a cell file holds.
#[derive(Serialize, Deserialize)]
struct Record<T> {
    cell: String,
    key: String,
    /// Wall time the cell took.
    seconds: f64,
    value: T,
}

/// Where a cell stands on disk.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Missing,
    Done,
    /// Finished under other inputs (its stored key differs).
    Stale,
}

/// The `cells/` directory: one JSON file per finished cell, written atomically.
pub struct CellStore {
    dir: PathBuf,
}

impl CellStore {
    pub fn open(dir: &Path) -> Result<Self> {
        crate::io::output::inner_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The file of cell `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<Record<T>>> {
        let path = self.path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::format(
                &path,
                format!("not a cell record ({e}); delete it to recompute the cell"),
            )
        })
    }

    pub fn state(&self, name: &str, key: &str) -> Result<State> {
        Ok(match self.load::<Value>(name)? {
            None => State::Missing,
            Some(r) if r.key == key => State::Done,
            Some(_) => State::Stale,
        })
    }

    /// The value and time of a cell finished under `key`.
    pub fn get<T: DeserializeOwned>(&self, name: &str, key: &str) -> Result<Option<(T, f64)>> {
        Ok(self
            .load::<T>(name)?
            .filter(|r| r.key == key)
            .map(|r| (r.value, r.seconds)))
    }

    pub fn put<T: Serialize>(&self, name: &str, key: &str, seconds: f64, value: &T) -> Result<()> {
        let rec = Record {
            cell: name.to_string(),
            key: key.to_string(),
            seconds,
            value,
        };
        let text = serde_json::to_string_pretty(&rec).map_err(|e| Error::Invalid(e.to_string()))?;
        replace_owned(&self.path(name), text.as_bytes())
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(calib_digest: &str, mc: Option<&str>) -> Fingerprint {
        let mut v = json!({
            "backend": "cpu",
            "model": {"path": "/a", "digest": "m1"},
            "calib": {"path": "/c", "digest": calib_digest, "samples": 4},
            "prune": {"min_keep": null, "align": 1},
            "ppl": {"path": "/p", "digest": "p1", "seq_len": 128},
        });
        if let Some(d) = mc {
            v["mc"] = json!({"path": "/m", "digest": d});
        }
        Fingerprint(v)
    }

    #[test]
    fn keys_depend_on_exactly_their_inputs() {
        let pruned = |refit, metric| Cell::Pruned {
            method: Method::Rku,
            sparsity: Sparsity::new(0.3).unwrap(),
            variant: Variant {
                calib: Calibration::Text,
                refit,
                recover: false,
            },
            metric,
        };
        let rku = |metric| pruned(false, metric);
        let (a, b) = (fp("c1", Some("x")), fp("c2", Some("x")));
        // The calibration moves the stats and everything pruned, not the dense evals.
        let text = Cell::Stats(Calibration::Text);
        assert_ne!(a.key(&text), b.key(&text));
        assert_ne!(a.key(&rku(Metric::Ppl)), b.key(&rku(Metric::Ppl)));
        assert_eq!(
            a.key(&Cell::Dense(Metric::Ppl)),
            b.key(&Cell::Dense(Metric::Ppl))
        );
        // Another mc file moves only the mc cells.
        let c = fp("c1", Some("y"));
        assert_ne!(a.key(&rku(Metric::Mc)), c.key(&rku(Metric::Mc)));
        assert_eq!(a.key(&rku(Metric::Ppl)), c.key(&rku(Metric::Ppl)));
        // Paths are not inputs.
        let mut d = fp("c1", Some("x"));
        d.0["model"]["path"] = json!("/elsewhere");
        assert_eq!(a.key(&rku(Metric::Ppl)), d.key(&rku(Metric::Ppl)));
        // Methods and sparsities have their own cells.
        let agf = Cell::Pruned {
            method: Method::Agf,
            sparsity: Sparsity::new(0.3).unwrap(),
            variant: Variant::PLAIN,
            metric: Metric::Ppl,
        };
        assert_ne!(a.key(&rku(Metric::Ppl)), a.key(&agf));
        // The refit settings move only the refitted cells.
        let mut e = fp("c1", Some("x"));
        e.0["refit"] = json!({"target": "layer", "bias": false, "damp": 0.01});
        let mut f = e.clone();
        f.0["refit"]["target"] = json!("residual");
        assert_eq!(e.key(&rku(Metric::Ppl)), a.key(&rku(Metric::Ppl)));
        assert_ne!(e.key(&pruned(true, Metric::Ppl)), e.key(&rku(Metric::Ppl)));
        assert_ne!(
            e.key(&pruned(true, Metric::Ppl)),
            f.key(&pruned(true, Metric::Ppl))
        );
        assert_eq!(e.key(&rku(Metric::Ppl)), f.key(&rku(Metric::Ppl)));
        assert_eq!(pruned(true, Metric::Ppl).name(), "rku-s0.3+refit.ppl");
        // The recovery settings move only the recovered cells.
        let lora = |refit| Cell::Pruned {
            method: Method::Rku,
            sparsity: Sparsity::new(0.3).unwrap(),
            variant: Variant {
                calib: Calibration::Text,
                refit,
                recover: true,
            },
            metric: Metric::Ppl,
        };
        let mut g = e.clone();
        g.0["recover"] = json!({"steps": 10});
        let mut h = g.clone();
        h.0["recover"]["steps"] = json!(20);
        assert_eq!(
            g.key(&pruned(true, Metric::Ppl)),
            e.key(&pruned(true, Metric::Ppl))
        );
        assert_ne!(g.key(&lora(false)), h.key(&lora(false)));
        assert_ne!(g.key(&lora(true)), h.key(&lora(true)));
        assert_ne!(g.key(&lora(true)), g.key(&lora(false)));
        assert_eq!(lora(true).name(), "rku-s0.3+refit+lora.ppl");
        assert_eq!(lora(false).name(), "rku-s0.3+lora.ppl");
        // The traces move only the trace-calibrated cells, and the calibration
        // text only the text-calibrated ones.
        let on_traces = |metric| Cell::Pruned {
            method: Method::Rku,
            sparsity: Sparsity::new(0.3).unwrap(),
            variant: Variant {
                calib: Calibration::Traces,
                ..Variant::PLAIN
            },
            metric,
        };
        let mut t1 = a.clone();
        t1.0["traces"] = json!({"digest": "t1", "selection": "all", "tokens": "generated"});
        let mut t2 = t1.clone();
        t2.0["traces"]["tokens"] = json!("all");
        let mut t3 = t1.clone();
        t3.0["calib"]["digest"] = json!("c9");
        let traces = Cell::Stats(Calibration::Traces);
        assert_ne!(t1.key(&traces), t2.key(&traces));
        assert_ne!(
            t1.key(&on_traces(Metric::Ppl)),
            t2.key(&on_traces(Metric::Ppl))
        );
        assert_eq!(t1.key(&rku(Metric::Ppl)), t2.key(&rku(Metric::Ppl)));
        assert_eq!(
            t1.key(&on_traces(Metric::Ppl)),
            t3.key(&on_traces(Metric::Ppl))
        );
        assert_ne!(t1.key(&on_traces(Metric::Ppl)), t1.key(&rku(Metric::Ppl)));
        assert_eq!(
            on_traces(Metric::TracePpl).name(),
            "rku-s0.3@traces.trace_ppl"
        );
        assert_eq!(traces.name(), "stats@traces");
        assert_eq!(text.name(), "stats");
        assert_eq!(
            b.diff(&a.0),
            vec!["calib.digest: \"c1\" → \"c2\"".to_string()]
        );
        assert_eq!(
            fp("c1", None).diff(&a.0),
            vec!["mc.digest: \"x\" → (none)", "mc.path: \"/m\" → (none)"]
        );
    }

    #[test]
    fn store_round_trip_and_staleness() {
        let tmp = tempfile::tempdir().unwrap();
        let s = CellStore::open(&tmp.path().join("cells")).unwrap();
        assert_eq!(s.state("x", "k1").unwrap(), State::Missing);
        s.put("x", "k1", 1.5, &vec![1, 2, 3]).unwrap();
        assert_eq!(s.state("x", "k1").unwrap(), State::Done);
        assert_eq!(s.state("x", "k2").unwrap(), State::Stale);
        assert_eq!(
            s.get::<Vec<i32>>("x", "k1").unwrap(),
            Some((vec![1, 2, 3], 1.5))
        );
        assert_eq!(s.get::<Vec<i32>>("x", "k2").unwrap(), None);
        s.remove("x").unwrap();
        assert_eq!(s.state("x", "k1").unwrap(), State::Missing);
        std::fs::write(tmp.path().join("cells/bad.json"), "{").unwrap();
        assert!(s
            .state("bad", "k")
            .unwrap_err()
            .to_string()
            .contains("delete it"));
    }
}

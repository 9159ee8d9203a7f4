//! `report.md`: the report as tables in the layout of the RKU paper's
//! Table 1 (rows = methods, columns = sparsity × metric, the dense model
//! first), then sizes and prefill speed, the IoU matrices and the plots.
use super::data::{Evals, Report};
use crate::eval::gen::PromptFormat;
use crate::io::text::bos_words;
use std::fmt::Write;

const MISSING: &str = "—";

/// `1234567` → `1.2M`.
fn count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// Seconds with a unit that suits their size.
pub(crate) fn duration(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2}s")
    } else if s >= 1e-3 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{:.0}µs", s * 1e6)
    }
}

fn pct(s: f64) -> String {
    format!("{}%", (s * 1000.0).round() / 10.0)
}

/// A quality column: its header and the text of its cell for a model.
type Column = (&'static str, fn(&Evals) -> Option<String>);

/// The quality metrics shown, in column order.
fn quality_columns(r: &Report) -> Vec<Column> {
    let mut cols: Vec<Column> = Vec::new();
    if r.has("ppl") {
        cols.push(("ppl ↓", |e| {
            e.ppl.as_ref().map(|p| format!("{:.2}", p.ppl))
        }));
    }
    if r.has("trace_ppl") {
        cols.push(("trace ppl ↓", |e| {
            e.trace_ppl.as_ref().map(|p| format!("{:.3}", p.ppl))
        }));
    }
    if r.has("gen") {
        cols.push(("gen acc ↑ [95%]", |e| {
            e.gen.as_ref().map(|g| {
                let (lo, hi) = g.ci95();
                format!("{:.3} [{lo:.3}, {hi:.3}]", g.accuracy)
            })
        }));
    }
    if r.has("mc") {
        cols.push(("mc acc / norm ↑", |e| {
            e.mc.as_ref()
                .map(|m| format!("{:.3} / {:.3}", m.acc, m.acc_norm))
        }));
    }
    cols
}

fn row(out: &mut String, cells: &[String]) {
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}

fn header(out: &mut String, cells: &[String]) {
    row(out, cells);
    row(out, &vec!["---".to_string(); cells.len()]);
}

pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Pruning report\n");
    if !r.complete {
        let _ = writeln!(
            o,
            "**Partial report**: {} cells still to compute; rerun the same command to finish.\n",
            r.run.remaining
        );
    }
    inputs(&mut o, r);
    quality(&mut o, r);
    size_and_speed(&mut o, r);
    iou(&mut o, r);
    if !r.plots.is_empty() {
        let _ = writeln!(o, "## Plots\n");
        let uniform = r.methods.iter().filter(|m| m.allocation == "uniform");
        if uniform.count() > 1 {
            let _ = writeln!(
                o,
                "Methods with uniform allocation keep the same width in every layer, so their width lines coincide.\n"
            );
        }
        for p in &r.plots {
            let _ = writeln!(o, "![{}]({})\n", p.title, p.file);
        }
    }
    o
}

fn inputs(o: &mut String, r: &Report) {
    let m = &r.model;
    let widths = match (m.ffn_widths.iter().min(), m.ffn_widths.iter().max()) {
        (Some(a), Some(b)) if a != b => format!("{a}–{b}"),
        (Some(a), _) => a.to_string(),
        _ => MISSING.into(),
    };
    let _ = writeln!(
        o,
        "- Model: `{}`, {} parameters, {} layers, FFN width {widths}.",
        m.path,
        count(m.params),
        m.layers
    );
    let calib = &r.inputs["calib"];
    let _ = writeln!(
        o,
        "- Statistics: one pass over N={} × T={} tokens of `{}`{} (objectives {}), backend {}.",
        calib["samples"],
        calib["seq_len"],
        calib["path"].as_str().unwrap_or("?"),
        calib["field"]
            .as_str()
            .map_or(String::new(), |f| format!(" field `{f}`")),
        r.stats.as_ref().map_or(MISSING, |s| s.objectives.as_str()),
        r.inputs["backend"].as_str().unwrap_or("?"),
    );
    if let (Some(s), Some(t)) = (&r.traces_stats, r.inputs.get("traces")) {
        let _ = writeln!(
            o,
            "- Trace calibration (rows `traces`): a second pass over {} traces of `{}` (selection {}, {} tokens counted: {}).",
            s.samples,
            t["path"].as_str().unwrap_or("?"),
            t["selection"].as_str().unwrap_or("?"),
            t["tokens"].as_str().unwrap_or("?"),
            s.tokens
        );
    }
    let _ = writeln!(
        o,
        "- Sparsity: the fraction of FFN channels removed; allocation as each method defines it{}.",
        match (&r.inputs["prune"]["min_keep"], &r.inputs["prune"]["align"]) {
            (serde_json::Value::Null, a) if a == 1 => String::new(),
            (k, a) => format!(" (min-keep {k}, align {a})"),
        }
    );
    if let Some(p) = &r.dense.ppl {
        let _ = writeln!(
            o,
            "- ppl: `{}`, {} windows of {} tokens, {} ({} predicted tokens).",
            r.inputs["ppl"]["path"].as_str().unwrap_or("?"),
            p.windows,
            p.seq_len,
            bos_words(p.bos),
            p.tokens
        );
    }
    if let (Some(p), Some(t)) = (&r.dense.trace_ppl, r.inputs.get("trace_ppl")) {
        let _ = writeln!(
            o,
            "- trace ppl: `{}` (selection {}), {} traces, {} predicted tokens ({}).",
            t["path"].as_str().unwrap_or("?"),
            t["selection"].as_str().unwrap_or("?"),
            p.windows,
            p.tokens,
            match t["tokens"].as_str() {
                Some("generated") => "generated tokens only",
                _ => "every token",
            }
        );
    }
    if let Some(g) = &r.dense.gen {
        let _ = writeln!(
            o,
            "- gen: {}, {} problems, {}-shot {}, greedy, at most {} new tokens, exact match.",
            g.task,
            g.n,
            g.shots,
            match g.format {
                PromptFormat::Plain => "plain prompt",
                PromptFormat::Chat => "chat template",
            },
            g.max_new_tokens
        );
    }
    if let Some(m) = &r.dense.mc {
        let _ = writeln!(
            o,
            "- mc: {}, {} items, log-likelihood (acc / acc_norm).",
            m.task, m.n
        );
    }
    if let Some(p) = &r.inputs.get("prefill").filter(|p| !p.is_null()) {
        let _ = writeln!(
            o,
            "- prefill: {} tokens, batch 1, median of {} after warm-up, dense and pruned timed alternately; speedup = dense / pruned.",
            p["seq_len"], p["repeats"]
        );
    }
    o.push('\n');
}

fn quality(o: &mut String, r: &Report) {
    let cols = quality_columns(r);
    if cols.is_empty() {
        return;
    }
    let _ = writeln!(o, "## Quality\n");
    // The calibration column appears when the report has trace-calibrated rows.
    let calib_col = r.methods.iter().any(|m| m.calibration != "text");
    let mut head = vec!["method".to_string()];
    if calib_col {
        head.push("calibration".into());
    }
    head.push("allocation".into());
    for &s in &r.sparsities {
        head.extend(cols.iter().map(|(name, _)| format!("{} {name}", pct(s))));
    }
    header(o, &head);
    // The dense model's values stand in every sparsity group, as the reference.
    let mut dense = vec!["dense".to_string(), MISSING.to_string()];
    if calib_col {
        dense.push(MISSING.into());
    }
    for _ in &r.sparsities {
        dense.extend(
            cols.iter()
                .map(|(_, f)| f(&r.dense).unwrap_or_else(|| MISSING.into())),
        );
    }
    row(o, &dense);
    for m in &r.methods {
        let mut line = vec![m.method.clone()];
        if calib_col {
            line.push(m.calibration.clone());
        }
        line.push(m.allocation.clone());
        for &s in &r.sparsities {
            let e = r.cell(&m.name, s).map(|c| &c.evals);
            line.extend(
                cols.iter()
                    .map(|(_, f)| e.and_then(f).unwrap_or_else(|| MISSING.into())),
            );
        }
        row(o, &line);
    }
    o.push('\n');
}

fn size_and_speed(o: &mut String, r: &Report) {
    let prefill = r.has("prefill");
    let _ = writeln!(
        o,
        "## Size{}\n",
        if prefill { " and prefill speedup" } else { "" }
    );
    let mut head = vec!["method".to_string()];
    for &s in &r.sparsities {
        head.push(format!("{} params", pct(s)));
        if prefill {
            head.push(format!("{} prefill", pct(s)));
        }
    }
    header(o, &head);
    let mut dense = vec!["dense".to_string()];
    for _ in &r.sparsities {
        dense.push(count(r.model.params));
        if prefill {
            dense.push("1.00×".into());
        }
    }
    row(o, &dense);
    for m in &r.methods {
        let mut line = vec![m.name.clone()];
        for &s in &r.sparsities {
            let c = r.cell(&m.name, s);
            line.push(c.and_then(|c| c.size.as_ref()).map_or(MISSING.into(), |z| {
                format!(
                    "{} (−{:.1}%)",
                    count(z.params_after),
                    100.0 * z.params_removed_fraction
                )
            }));
            if prefill {
                line.push(
                    c.and_then(|c| c.prefill.as_ref())
                        .map_or(MISSING.into(), |p| {
                            format!(
                                "{:.2}× ({} vs {})",
                                p.speedup,
                                duration(p.pruned.median_s),
                                duration(p.dense.median_s)
                            )
                        }),
                );
            }
        }
        row(o, &line);
    }
    o.push('\n');
}

fn iou(o: &mut String, r: &Report) {
    if r.iou.iter().all(|m| m.methods.is_empty()) {
        return;
    }
    let _ = writeln!(
        o,
        "## IoU of kept channels\n\nMean over layers of |kept_A ∩ kept_B| / |kept_A ∪ kept_B|.\n"
    );
    for m in r.iou.iter().filter(|m| !m.methods.is_empty()) {
        let _ = writeln!(o, "### {} sparsity\n", pct(m.sparsity));
        let mut head = vec![String::new()];
        head.extend(m.methods.iter().cloned());
        header(o, &head);
        for (name, values) in m.methods.iter().zip(&m.mean) {
            let mut line = vec![name.clone()];
            line.extend(values.iter().map(|v| format!("{v:.3}")));
            row(o, &line);
        }
        o.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(count(134_515_008), "134.5M");
        assert_eq!(count(7_615_616_512), "7.62B");
        assert_eq!(count(31_000), "31.0K");
        assert_eq!(count(12), "12");
        assert_eq!(pct(0.3), "30%");
        assert_eq!(pct(0.125), "12.5%");
        assert_eq!(duration(4.0571), "4.06s");
        assert_eq!(duration(0.0123), "12.3ms");
        assert_eq!(duration(0.000_042), "42µs");
    }
}

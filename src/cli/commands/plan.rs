//! `rku-engine plan`: the device memory of a scoring run or a refit, from a config.
use crate::cli::args::PlanArgs;
use anyhow::{bail, Result};
use rku_engine::model::ModelConfig;
use rku_engine::plan::{plan, plan_refit, PlanSpec, RefitPlanSpec};
use rku_engine::prune::refit::RefitTarget;

pub fn run(a: &PlanArgs) -> Result<()> {
    let path = match (&a.model, &a.config) {
        (Some(dir), _) => dir.join("config.json"),
        (None, Some(c)) => c.clone(),
        (None, None) => bail!("pass --model DIR or --config config.json"),
    };
    let cfg = ModelConfig::load(&path)?;
    let p = match a.refit {
        None => plan(
            &cfg,
            &PlanSpec {
                activation_memory: a.activation_memory,
                ..PlanSpec::new(a.seq_len, a.batch, a.objective.objectives(), a.stream)
            },
        )?,
        Some(target) => plan_refit(
            &cfg,
            &RefitPlanSpec {
                t: a.seq_len,
                samples: a.refit_samples,
                batch: a.batch,
                residual: target == RefitTarget::Residual,
                bias: a.refit_bias,
                kept: cfg.ffn_widths.clone(),
                stream: a.stream,
            },
        )?,
    };
    println!("{p}");
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
    }
    Ok(())
}

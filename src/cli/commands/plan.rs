//! `rku-engine plan`: the device memory of a scoring run, from a config.
use crate::cli::args::PlanArgs;
use anyhow::{bail, Result};
use rku_engine::model::ModelConfig;
use rku_engine::plan::{plan, PlanSpec};

pub fn run(a: &PlanArgs) -> Result<()> {
    let path = match (&a.model, &a.config) {
        (Some(dir), _) => dir.join("config.json"),
        (None, Some(c)) => c.clone(),
        (None, None) => bail!("pass --model DIR or --config config.json"),
    };
    let cfg = ModelConfig::load(&path)?;
    let spec = PlanSpec::new(a.seq_len, a.batch, a.objective.objectives(), a.stream);
    let p = plan(&cfg, &spec)?;
    println!("{p}");
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
    }
    Ok(())
}

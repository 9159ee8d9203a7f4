//! `rku-engine report`: a whole comparison in one resumable command.
use crate::cli::args::ReportArgs;
use crate::cli::load_options;
use anyhow::Result;
use rku_engine::backend::Backend;
use rku_engine::eval::gen::{GenArgs, PromptFormat};
use rku_engine::eval::mc::McArgs;
use rku_engine::report::{run_report, PplSpec, PrefillSpec, ReportSpec, TracesSpec};

pub fn run<B: Backend>(be: &B, a: &ReportArgs) -> Result<()> {
    let gen = a.gen_data.as_ref().map(|d| {
        let mut g = GenArgs::new(d.clone());
        g.shots = a.gen_shots;
        g.format = PromptFormat::from_chat_flag(a.gen_chat);
        g.max_new_tokens = a.gen_max_new_tokens;
        g.batch = a.gen_batch;
        g.limit = a.limit;
        g
    });
    let mc = a.mc_data.as_ref().map(|d| {
        let mut m = McArgs::new(d.clone());
        m.batch = a.mc_batch;
        m.limit = a.limit;
        m
    });
    let spec = ReportSpec {
        model: a.model.clone(),
        calib: a.windows.source(a.calib.clone()),
        traces: a.traces.as_ref().map(|t| TracesSpec {
            path: t.clone(),
            select: a.traces_select,
            tokens: a.traces_tokens,
            max_seq_len: a.traces_max_seq_len,
        }),
        methods: a.methods.clone(),
        sparsities: a.sparsity.0.clone(),
        min_keep: a.min_keep,
        align: a.align,
        ppl: a.ppl_text.as_ref().map(|t| PplSpec {
            text: t.clone(),
            field: a.ppl_field.clone(),
            seq_len: a.ppl_seq_len,
            max_windows: a.ppl_max_windows,
            bos: a.ppl_bos,
            batch: 8, // `eval ppl`'s default; the batch does not change the result
        }),
        trace_ppl: a.trace_ppl.as_ref().map(|t| TracesSpec {
            path: t.clone(),
            select: a.trace_ppl_select,
            tokens: a.trace_ppl_tokens,
            max_seq_len: None,
        }),
        gen,
        mc,
        prefill: (!a.no_prefill).then_some(PrefillSpec {
            seq_len: a.prefill_seq_len,
            repeats: a.prefill_repeats,
        }),
        refit: a.refit.spec(),
        recover: a.recover_spec(),
        out: a.out.clone(),
        keep_models: a.keep_models,
        force: a.force,
        load: load_options(&a.common, Some(&a.decode_weights)),
    };
    let r = run_report(be, &spec)?;
    println!(
        "report: {} cells computed, {} skipped (already done), {} remaining; wrote {}, report.json and {} plots",
        r.run.computed,
        r.run.skipped,
        r.run.remaining,
        a.out.join("report.md").display(),
        r.plots.len()
    );
    Ok(())
}

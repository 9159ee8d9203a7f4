//! `rku-engine eval ppl|gen|mc|paired`: perplexity, generation accuracy,
//! multiple choice, and two models' generation records compared.
use crate::cli::args::{GenArgs, McArgs, PairedArgs, PplArgs};
use crate::cli::{check_output, load_model};
use anyhow::Result;
use rku_engine::backend::Backend;
use rku_engine::eval::gen::{self, evaluate_gen, PromptFormat, GEN_RECORDS};
use rku_engine::eval::mc::{self, evaluate_mc, MC_RECORDS};
use rku_engine::eval::paired::{compare, pair, read_outcomes};
use rku_engine::eval::ppl::{perplexity, trace_perplexity, PplWindows};
use rku_engine::io::text::{bos_words, read_text, Tokenizer};
use rku_engine::prune::calibrate::bos_id;
use rku_engine::prune::traces::trace_sequences;

pub fn ppl<B: Backend>(be: &B, a: &PplArgs) -> Result<()> {
    let model = load_model(be, &a.model, &a.common, None)?;
    let r = match (&a.traces, &a.text.text) {
        (Some(path), _) => {
            if a.layer_major.layer_major {
                anyhow::bail!("--layer-major applies to text windows, not to --traces");
            }
            let t = trace_sequences(path, &a.model, a.select, a.tokens, None)?;
            if t.seqs.iter().all(|s| s.predicted() == 0) {
                return Err(rku_engine::Error::format(
                    path,
                    format!(
                        "none of the {} selected traces has a token to predict (--tokens {}): nothing to measure",
                        t.seqs.len(),
                        a.tokens
                    ),
                )
                .into());
            }
            let r = trace_perplexity(be, &model, &t.seqs)?;
            println!(
                "trace perplexity {:.4} (mean NLL {:.5}) over {} of {} traces ({} tokens, --tokens {}, --select {}), up to {} tokens each",
                r.ppl, r.nll, r.windows, t.total, r.tokens, a.tokens, a.select, r.seq_len
            );
            r
        }
        (None, Some(text)) => {
            let tok = Tokenizer::load(&a.model)?;
            let ids = tok.encode(&read_text(text, a.text.field.as_deref())?)?;
            let bos = a.bos.unwrap_or(model.cfg.arch.bos_by_default());
            let bos = bos_id(&model.cfg, bos)?;
            let spec = PplWindows {
                seq_len: a.seq_len,
                max_windows: a.max_windows,
                batch: a.batch,
                bos,
                layer_major: a.layer_major.get(),
            };
            let r = perplexity(be, &model, &ids, &spec)?;
            println!(
                "perplexity {:.4} (mean NLL {:.5}) over {} windows of {} tokens ({} predicted tokens), {}",
                r.ppl,
                r.nll,
                r.windows,
                r.seq_len,
                r.tokens,
                bos_words(r.bos)
            );
            r
        }
        (None, None) => anyhow::bail!("eval ppl needs --text FILE or --traces FILE"),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub fn gen<B: Backend>(be: &B, a: &GenArgs) -> Result<()> {
    if let Some(out) = &a.out {
        let inputs = [Some(&a.model), Some(&a.data), a.shots_file.as_ref()];
        let inputs = inputs.into_iter().flatten().map(|p| p.as_path());
        check_output(inputs, out, GEN_RECORDS, a.force)?;
    }
    let model = load_model(be, &a.model, &a.common, Some(&a.decode_weights))?;
    let tok = Tokenizer::load(&a.model)?;
    let mut args = gen::GenArgs::new(a.data.clone());
    args.task = a.task.clone();
    args.shots = a.shots;
    args.shots_file = a.shots_file.clone();
    args.format = PromptFormat::from_chat_flag(a.chat);
    args.skip = a.skip;
    args.limit = a.limit;
    args.batch = a.batch;
    args.max_new_tokens = a.max_new_tokens;
    args.out = a.out.clone();
    args.force = a.force;
    let (r, _) = evaluate_gen(be, &model, &tok, &args)?;
    let (lo, hi) = r.ci95();
    println!(
        "{}: accuracy {:.4} ({}/{}, 95% interval {lo:.3}–{hi:.3}), {}-shot {:?}; decode {:.1} tokens/s, prefill {:.0} tokens/s",
        r.task,
        r.accuracy,
        r.correct,
        r.n,
        r.shots,
        r.format,
        r.decode_tokens_per_s,
        r.prefill_tokens_per_s
    );
    if let Some(o) = &a.out {
        println!("per-problem outputs: {}", o.display());
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub fn mc<B: Backend>(be: &B, a: &McArgs) -> Result<()> {
    if let Some(out) = &a.out {
        let inputs = [a.model.as_path(), a.data.as_path()];
        check_output(inputs, out, MC_RECORDS, a.force)?;
    }
    let model = load_model(be, &a.model, &a.common, None)?;
    let tok = Tokenizer::load(&a.model)?;
    let mut args = mc::McArgs::new(a.data.clone());
    args.task = a.task.clone();
    args.limit = a.limit;
    args.batch = a.batch;
    args.out = a.out.clone();
    args.force = a.force;
    let (r, _) = evaluate_mc(be, &model, &tok, &args)?;
    println!(
        "{}: acc {:.4}, acc_norm {:.4} over {} items ({:.1}s)",
        r.task, r.acc, r.acc_norm, r.n, r.seconds
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub fn paired(a: &PairedArgs) -> Result<()> {
    let (cand, base) = (read_outcomes(&a.candidate)?, read_outcomes(&a.baseline)?);
    let outcomes = pair(&cand, &base, (&a.candidate, &a.baseline))?;
    let r = compare(&outcomes, a.resamples, a.seed)?;
    let side = |name: &str, s: &rku_engine::eval::paired::Side| {
        println!(
            "{name}: {}/{} = {:.4} (95% interval {:.3}–{:.3})",
            s.correct, r.n, s.accuracy, s.ci95.0, s.ci95.1
        )
    };
    println!("{} problems, the same prompts in both files", r.n);
    side("candidate", &r.candidate);
    side("baseline ", &r.baseline);
    println!(
        "both solved {}, only the candidate {}, only the baseline {}, neither {}; McNemar exact p = {:.4}",
        r.both, r.only_candidate, r.only_baseline, r.neither, r.mcnemar_p
    );
    println!(
        "difference {:+.4}, paired bootstrap 95% interval {:+.4} to {:+.4}",
        r.difference, r.difference_ci95.0, r.difference_ci95.1
    );
    match (r.ratio, r.ratio_ci95) {
        (Some(q), Some((lo, hi))) => println!(
            "ratio {q:.4}, paired bootstrap 95% interval {lo:.4}–{hi:.4} ({} resamples, seed {}{})",
            r.resamples,
            r.seed,
            match r.ratio_undefined_resamples {
                0 => String::new(),
                k => format!("; {k} resamples without a baseline success left out"),
            }
        ),
        (Some(q), None) => println!(
            "ratio {q:.4}, no paired bootstrap interval: none of the {} resamples drew a problem the baseline solved",
            r.resamples
        ),
        (None, _) => println!("ratio undefined: the baseline solved none of the problems"),
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

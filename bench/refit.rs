//! Criterion benchmark of the refit's host solve (METHODS.md §9,
//! `prune::refit::solve_layer`: the damped Cholesky solve of a layer's
//! normal equations in f64 and its two reconstruction errors), on one
//! thread (`faer::Par::Seq`) and on all of the rayon pool's threads, in one
//! run, so the ratio of the two is measured on the same machine at the same
//! time. With k kept channels and output width d it costs about
//! k³/3 + 6·k²·d floating-point operations (Cholesky, the solve, and G·X for
//! each of the two errors).
//!
//!     cargo bench --bench refit
//!
//! The normal equations are made up (tests/common
//! `synthetic_normal_equations`): the cost does not depend on the values.
#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use rku_engine::prune::refit::solve_layer;
use std::time::Duration;

/// Kept channels, output width, and the full FFN width: SmolLM2-135M's
/// layer (d 576, FFN 1536) with every channel kept, and half of a wider FFN.
const SHAPES: [(usize, usize, usize); 2] = [(1536, 576, 1536), (2048, 384, 4096)];

fn refit_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("refit/solve_layer");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for (k, d, m) in SHAPES {
        let eqs = common::synthetic_normal_equations(k, d, 1);
        let w_down = common::values(d * m, -1.0, 1.0, 3);
        let keep: Vec<usize> = (0..k).collect();
        let threads = rayon::current_num_threads();
        for (name, par) in [
            ("1 thread".to_string(), faer::Par::Seq),
            (format!("{threads} threads"), faer::Par::rayon(0)),
        ] {
            faer::set_global_parallelism(par);
            g.bench_function(format!("k{k}-d{d}/{name}"), |b| {
                b.iter(|| solve_layer(0, &eqs, &w_down, m, &keep, 0.01).unwrap())
            });
        }
    }
    g.finish();
    faer::set_global_parallelism(faer::Par::rayon(0));
}

criterion_group!(benches, refit_benches);
criterion_main!(benches);

//! `bench prefill`: both models timed, summary consistent, mismatched models refused.
mod common;
use common::fixture;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::eval::prefill::bench_prefill;
use rku_engine::model::Model;

#[test]
fn prefill_summary_is_consistent() {
    let be = CpuBackend::new();
    let dense = Model::load(&be, &fixture("tiny-qwen2")).unwrap();
    let pruned = Model::load(&be, &fixture("exports/qwen2-padded")).unwrap();
    let r = bench_prefill(&be, &dense, &pruned, 48, 3).unwrap();
    for t in [&r.dense, &r.pruned] {
        assert!(t.min_s > 0.0 && t.min_s <= t.median_s && t.median_s <= t.max_s);
    }
    assert!((r.speedup - r.dense.median_s / r.pruned.median_s).abs() < 1e-12);
    let other = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let e = bench_prefill(&be, &dense, &other, 48, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not the same model"), "{e}");
    assert!(bench_prefill(&be, &dense, &pruned, 48, 0).is_err());
}

//! The `[vocab, d]` matrices (src/model/weights.rs): a lookup reads only
//! its rows from the mapped file until the tied output projection is
//! loaded, and the projection is loaded at its first use. Both lookups give
//! the same bits, on the CPU and on the emulated device (bf16 tables), and
//! energy scoring never puts the projection on the device.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{CudaBackend, Device, EmuDevice};
use rku_engine::backend::Backend;
use rku_engine::model::forward::logits;
use rku_engine::model::{Geometry, Model};
use rku_engine::prune::calibrate::{collect_stats, CalibSpec};
use rku_engine::prune::stats::Objectives;

/// Logits twice over the same ids: the first lookup reads rows from the
/// file (nothing loaded yet), the second the head that the first logits
/// loaded (the tied embedding). Bit for bit the same.
fn lookups_agree<B: Backend>(be: &B, name: &str) {
    let model = Model::load(be, &fixture(name)).unwrap();
    assert!(
        model.cfg.tie_embeddings,
        "{name} must be tied for this test"
    );
    let geo = Geometry { seqs: 2, t: 9 };
    let ids = stride_ids(geo.rows(), model.cfg.vocab, 7);
    let first = logits(be, &model, &ids, geo).unwrap();
    let second = logits(be, &model, &ids, geo).unwrap();
    assert!(
        first
            .iter()
            .zip(&second)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{name} on {}: lookups from the file and from the loaded head differ",
        be.name()
    );
}

#[test]
fn lookups_from_the_file_equal_lookups_from_the_loaded_head() {
    for name in ["tiny-llama3", "tiny-gemma3"] {
        lookups_agree(&CpuBackend::new(), name);
        lookups_agree(&CudaBackend::new(EmuDevice::new()), name);
    }
}

/// On the emulated device's allocator: after an energy statistics pass the
/// live bytes are those after the load (nothing of `[vocab, d]` stayed);
/// a ce pass loads the output projection, `vocab·d` bf16 values, once.
#[test]
fn energy_scoring_never_loads_the_output_projection() {
    for name in ["tiny-qwen2", "tiny-gemma3"] {
        let be = CudaBackend::new(EmuDevice::new());
        let model = Model::load(&be, &fixture(name)).unwrap();
        let loaded = be.device().mem_stats().current;
        let (seqs, t) = (2, 8);
        let windows = stride_ids(seqs * t, model.cfg.vocab, 3);
        let run = |energy, ce| {
            let spec = CalibSpec {
                objectives: Objectives { energy, ce },
                ..calib_spec(seqs, t)
            };
            collect_stats(&be, &model, &windows, spec, String::new()).unwrap();
            be.device().mem_stats().current
        };
        assert_eq!(run(true, false), loaded, "{name}: energy pass");
        let head = model.cfg.vocab * model.cfg.hidden * 2;
        assert_eq!(run(true, true), loaded + head, "{name}: ce pass");
        assert_eq!(run(true, true), loaded + head, "{name}: loaded once");
    }
}

//! Stats files: round trip, merging of calibration shards, refusals.
mod common;
use common::values;
use rku_engine::prune::stats::tensors_checksum;
use rku_engine::prune::{merge, EnergyAt, LayerStats, Norms, Objectives, Stats, StatsMeta};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const WIDTHS: [usize; 3] = [6, 9, 4];
const SEQ_LEN: usize = 5;
const BOTH: Objectives = Objectives {
    energy: true,
    ce: true,
};

/// Seeded per-token activation h and gradient g of (seq, t, layer, channel):
/// one seed per tuple, two draws.
fn hg(seq: usize, t: usize, l: usize, c: usize) -> (f64, f64) {
    assert!(t < 16 && l < 4 && c < 16, "the seed below must stay unique");
    let v = values(2, -0.5, 0.5, (((seq * 16 + t) * 4 + l) * 16 + c) as u64);
    (3.0 * v[0] as f64, 0.1 * v[1] as f64)
}

/// Statistics over sequences `seqs`, straight from METHODS.md §4.
fn stats_of(seqs: std::ops::Range<usize>, calib: &str, objectives: Objectives) -> Stats {
    stats_in(seqs.clone(), seqs, calib, objectives)
}

/// The sums over sequences `seqs` of a pass normalised over the set `set`
/// (a partial sum of that pass, or a shard of it).
fn stats_in(
    seqs: std::ops::Range<usize>,
    set: std::ops::Range<usize>,
    calib: &str,
    objectives: Objectives,
) -> Stats {
    let meta = StatsMeta {
        model_digest: "sha256:model".into(),
        calib_digest: calib.into(),
        samples: seqs.len(),
        seq_len: SEQ_LEN,
        tokens: (seqs.len() * SEQ_LEN) as u64,
        objectives,
        energy_at: EnergyAt::FinalNorm,
        engine_version: "0.1.0".into(),
        // One distinct digest per sequence index, as a pass over distinct windows gives.
        window_digests: seqs.clone().map(|s| [s as u8; 32]).collect(),
        traces: None,
        predicted: (seqs.len() * (SEQ_LEN - 1)) as u64,
        norms: Norms {
            energy: (set.len() * SEQ_LEN) as u64,
            ce: (set.len() * (SEQ_LEN - 1)) as u64,
        },
        shard: None,
        bos: false,
    };
    // g = ∂J/∂h of an objective normalised over this set: 1/n_E, 1/n_C.
    let (n_e, n_c) = st_norm(&meta);
    let mut st = Stats::zeros(meta, &WIDTHS);
    for (l, layer) in st.layers.iter_mut().enumerate() {
        for c in 0..WIDTHS[l] {
            for seq in seqs.clone() {
                let mut dot = 0.0;
                for t in 0..SEQ_LEN {
                    let (h, g) = hg(seq, t, l, c);
                    layer.s1[c] += h;
                    layer.s2[c] += h * h;
                    if objectives.energy {
                        layer.f2[c] += (g / n_e) * (g / n_e);
                        layer.k1[c] += (h * g / n_e).abs();
                    }
                    dot += h * g / n_c;
                }
                if objectives.ce {
                    layer.tk[c] += dot.abs();
                }
            }
        }
    }
    st
}

/// The normalisers (n_E, n_C) of `meta` as floats.
fn st_norm(meta: &StatsMeta) -> (f64, f64) {
    (meta.norms.energy as f64, meta.norms.ce as f64)
}

fn assert_close(a: &Stats, b: &Stats) {
    assert_eq!(a.layers.len(), b.layers.len());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        for (p, q) in [
            (&x.s1, &y.s1),
            (&x.s2, &y.s2),
            (&x.f2, &y.f2),
            (&x.k1, &y.k1),
            (&x.tk, &y.tk),
        ] {
            assert_eq!(p.len(), q.len());
            for (u, v) in p.iter().zip(q) {
                assert!((u - v).abs() <= 1e-12 * (1.0 + v.abs()), "{u} vs {v}");
            }
        }
    }
}

fn save(dir: &Path, name: &str, st: &Stats) -> PathBuf {
    let p = dir.join(name);
    st.save(&p).unwrap();
    p
}

/// Rewrites a saved file through `edit` of its F64 tensors (name → values),
/// keeping the other tensors as they are. With `resign`, the checksum is
/// recomputed, as a crafted (not merely damaged) file would have it, so the
/// load gets past it to the checks behind it.
fn rewrite_with(path: &Path, resign: bool, edit: impl FnOnce(&mut Vec<(String, Vec<f64>)>)) {
    let buf = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let (_, header) = SafeTensors::read_metadata(&buf).unwrap();
    let mut meta: HashMap<String, String> = header.metadata().clone().unwrap();
    let (mut tensors, others): (Vec<_>, Vec<_>) = st
        .tensors()
        .into_iter()
        .partition(|(_, t)| t.dtype() == Dtype::F64);
    let mut values: Vec<(String, Vec<f64>)> = tensors
        .drain(..)
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n, v)
        })
        .collect();
    edit(&mut values);
    let bytes: Vec<(String, Vec<u8>)> = values
        .iter()
        .map(|(n, v)| (n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let mut views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F64, vec![b.len() / 8], b).unwrap(),
            )
        })
        .collect();
    views.extend(others);
    if resign {
        let sum = tensors_checksum(views.iter().map(|(n, v)| (n.as_str(), v.data())));
        meta.insert("tensors_sha256".into(), sum);
    }
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<f64>)>)) {
    rewrite_with(path, true, edit)
}

fn load_err(path: &Path) -> String {
    Stats::load(path).unwrap_err().to_string()
}

#[test]
fn save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for objectives in [
        BOTH,
        Objectives {
            energy: true,
            ce: false,
        },
        Objectives {
            energy: false,
            ce: true,
        },
    ] {
        let mut st = stats_of(0..3, "calib-a", objectives);
        st.meta.energy_at = EnergyAt::PreNorm;
        let p = save(dir.path(), "s.safetensors", &st);
        let back = Stats::load(&p).unwrap();
        assert_eq!(back, st, "bit-exact round trip for {objectives}");
    }
    // No temporary file is left beside the result.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

/// Rewrites a saved file's metadata through `edit` (tensors unchanged).
fn rewrite_metadata(path: &Path, edit: impl FnOnce(&mut HashMap<String, String>)) {
    let buf = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let (_, header) = SafeTensors::read_metadata(&buf).unwrap();
    let mut meta: HashMap<String, String> = header.metadata().clone().unwrap();
    edit(&mut meta);
    std::fs::write(
        path,
        safetensors::serialize(st.tensors(), Some(meta)).unwrap(),
    )
    .unwrap();
}

/// Whether the windows started with BOS is saved and read back; a file
/// from before the key reads as without BOS; another value is refused by
/// key; files that differ in it do not merge.
#[test]
fn bos_is_recorded_and_older_files_read_as_without() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = stats_of(0..2, "with-bos", BOTH);
    st.meta.bos = true;
    let p = save(dir.path(), "bos.safetensors", &st);
    assert!(Stats::load(&p).unwrap().meta.bos);
    let plain = save(dir.path(), "plain.safetensors", &stats_of(2..4, "b", BOTH));
    assert!(!Stats::load(&plain).unwrap().meta.bos);
    let e = merge(&[p.clone(), plain.clone()], false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("different --bos") && e.contains("each after BOS"),
        "{e}"
    );
    rewrite_metadata(&p, |m| {
        assert_eq!(m.remove("bos").as_deref(), Some("true"));
    });
    assert!(!Stats::load(&p).unwrap().meta.bos, "absent: no BOS");
    rewrite_metadata(&p, |m| {
        m.insert("bos".into(), "yes".into());
    });
    let e = load_err(&p);
    assert!(
        e.contains("bos.safetensors") && e.contains("\"bos\""),
        "{e}"
    );
}

#[test]
fn add_sums_and_refuses_other_shapes() {
    // Two partial sums of one pass over sequences 0..4 (its normalisers).
    let mut a = stats_in(0..2, 0..4, "a", BOTH);
    a.add(&stats_in(2..4, 0..4, "b", BOTH)).unwrap();
    assert_eq!(a.meta.samples, 4);
    assert_eq!(a.meta.tokens, 20);
    assert_eq!(a.meta.calib_digest, "a");
    assert_close(&a, &stats_of(0..4, "u", BOTH));

    let mut other = stats_of(0..1, "c", BOTH);
    other.layers.pop();
    assert!(a.add(&other).is_err());
}

#[test]
fn merge_of_shards_equals_stats_of_union() {
    let dir = tempfile::tempdir().unwrap();
    let a = save(
        dir.path(),
        "a.safetensors",
        &stats_of(0..2, "digest-a", BOTH),
    );
    let b = save(
        dir.path(),
        "b.safetensors",
        &stats_of(2..3, "digest-b", BOTH),
    );
    let c = save(
        dir.path(),
        "c.safetensors",
        &stats_of(3..6, "digest-c", BOTH),
    );
    let merged = merge(&[b.clone(), a.clone(), c.clone()], false).unwrap();
    let union = stats_of(0..6, "whatever", BOTH);
    assert_close(&merged, &union);
    assert_eq!(merged.meta.samples, 6);
    assert_eq!(merged.meta.tokens, 30);
    let want = Sha256::digest(b"digest-a\ndigest-b\ndigest-c")
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect::<String>();
    assert_eq!(merged.meta.calib_digest, want);
    // Independent of the order the files are given in; saves and reloads.
    let again = merge(&[c, a, b], false).unwrap();
    assert_eq!(again.meta.calib_digest, want);
    let p = save(dir.path(), "m.safetensors", &merged);
    assert_eq!(Stats::load(&p).unwrap(), merged);
}

#[test]
fn merge_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let a = save(dir.path(), "a.safetensors", &stats_of(0..2, "da", BOTH));

    let err = |st: Stats, name: &str| {
        let p = save(dir.path(), name, &st);
        merge(&[a.clone(), p], false).unwrap_err().to_string()
    };
    let mut st = stats_of(2..4, "db", BOTH);
    st.meta.model_digest = "sha256:other".into();
    assert!(err(st, "m.safetensors").contains("different models"));

    let mut st = stats_of(2..4, "db", BOTH);
    st.meta.seq_len = 7;
    // A consistent file of other windows.
    st.meta.tokens = st.meta.samples as u64 * 7;
    st.meta.predicted = st.meta.samples as u64 * 6;
    st.meta.norms = Norms {
        energy: st.meta.tokens,
        ce: st.meta.predicted,
    };
    assert!(err(st, "t.safetensors").contains("sequence length"));

    let energy = Objectives {
        energy: true,
        ce: false,
    };
    let e = err(stats_of(2..4, "db", energy), "o.safetensors");
    assert!(
        e.contains("different objectives (energy,ce vs energy)"),
        "{e}"
    );

    let mut st = stats_of(2..4, "db", BOTH);
    st.layers[2] = LayerStats::zeros(5, BOTH);
    assert!(err(st, "w.safetensors").contains("layer widths"));

    let mut st = stats_of(2..4, "db", BOTH);
    st.meta.energy_at = EnergyAt::PreNorm;
    assert!(err(st, "e.safetensors").contains("energy-at"));

    // The same shard twice, under another name or the same one.
    let e = err(stats_of(2..4, "da", BOTH), "dup.safetensors");
    assert!(e.contains("same calibration digest"), "{e}");
    let e = merge(&[a.clone(), a.clone()], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("same calibration digest"), "{e}");
    assert!(merge(std::slice::from_ref(&a), false).is_err());
}

#[test]
fn nan_and_inf_are_reported_with_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    // Never written: save refuses non-finite statistics.
    let mut st = stats_of(0..2, "a", BOTH);
    st.layers[1].k1[4] = f64::NAN;
    assert!(st.save(&dir.path().join("never.safetensors")).is_err());
    assert!(!dir.path().join("never.safetensors").exists());

    // Crafted into a file (with a matching checksum): load names them.
    let good = stats_of(0..2, "a", BOTH);
    for (name, tensor, at, value, needle) in [
        (
            "nan.safetensors",
            "layers.1.k1",
            4,
            f64::NAN,
            "NaN in layers.1.k1",
        ),
        (
            "inf.safetensors",
            "layers.2.tk",
            0,
            f64::INFINITY,
            "infinity in layers.2.tk",
        ),
        (
            "neg.safetensors",
            "layers.0.s2",
            1,
            -1.0,
            "negative value -1 in layers.0.s2",
        ),
    ] {
        let p = save(dir.path(), name, &good);
        rewrite(&p, |t| {
            t.iter_mut().find(|(n, _)| n == tensor).unwrap().1[at] = value
        });
        let e = load_err(&p);
        assert!(e.contains(needle) && e.contains(name), "{e}");
    }

    // Damaged (checksum not recomputed): refused by the checksum.
    let p = save(dir.path(), "flipped.safetensors", &good);
    rewrite_with(&p, false, |t| t[0].1[0] += 1.0);
    let e = load_err(&p);
    assert!(
        e.contains("checksum") && e.contains("flipped.safetensors"),
        "{e}"
    );
}

#[test]
fn malformed_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let e = load_err(&junk);
    assert!(
        e.contains("junk.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );

    let good = stats_of(0..2, "a", BOTH);
    let p = save(dir.path(), "missing.safetensors", &good);
    rewrite(&p, |t| t.retain(|(n, _)| n != "layers.1.f2"));
    let e = load_err(&p);
    assert!(e.contains("missing tensor layers.1.f2"), "{e}");

    let p = save(dir.path(), "shape.safetensors", &good);
    rewrite(&p, |t| {
        t.iter_mut()
            .find(|(n, _)| n == "layers.2.k1")
            .unwrap()
            .1
            .push(0.0)
    });
    let e = load_err(&p);
    assert!(e.contains("layers.2.k1 has shape [5], expected [4]"), "{e}");

    let p = save(dir.path(), "extra.safetensors", &good);
    rewrite(&p, |t| t.push(("layers.3.s1".into(), vec![0.0; 2])));
    assert!(load_err(&p).contains("unexpected tensor layers.3.s1"));

    // A plain safetensors model file is not a stats file.
    let p = dir.path().join("model.safetensors");
    let data = [0u8; 8];
    let view = TensorView::new(Dtype::F64, vec![1], &data).unwrap();
    std::fs::write(&p, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
    assert!(load_err(&p).contains("not an rku stats file"));
}

#[test]
fn objective_and_energy_at_names() {
    assert_eq!("ce,energy".parse::<Objectives>().unwrap(), BOTH);
    assert_eq!(BOTH.to_string(), "energy,ce");
    assert!("".parse::<Objectives>().is_err());
    assert!("energy,kl".parse::<Objectives>().is_err());
    assert_eq!("pre-norm".parse::<EnergyAt>().unwrap(), EnergyAt::PreNorm);
    assert_eq!(EnergyAt::default().to_string(), "final-norm");
    assert!("post-norm".parse::<EnergyAt>().is_err());
}

#[test]
fn save_refuses_inconsistent_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = stats_of(0..2, "a", BOTH);
    st.layers[0].tk.clear();
    assert!(st.save(&dir.path().join("x.safetensors")).is_err());
    let mut st = stats_of(
        0..2,
        "a",
        Objectives {
            energy: false,
            ce: true,
        },
    );
    st.layers[0].k1 = vec![0.0; 6];
    assert!(st.save(&dir.path().join("y.safetensors")).is_err());
}

#[test]
fn add_objectives_joins_passes_over_the_same_sequences() {
    const ENERGY: Objectives = Objectives {
        energy: true,
        ce: false,
    };
    const CE: Objectives = Objectives {
        energy: false,
        ce: true,
    };
    // An energy pass plus a ce pass over the same sequences is the pass of both.
    let mut joined = stats_of(0..3, "a", ENERGY);
    joined.add_objectives(stats_of(0..3, "a", CE)).unwrap();
    assert_eq!(joined, stats_of(0..3, "a", BOTH));
    let mut joined = stats_of(0..3, "a", CE);
    joined.add_objectives(stats_of(0..3, "a", ENERGY)).unwrap();
    assert_eq!(joined, stats_of(0..3, "a", BOTH));

    let refused = |mut into: Stats, other: Stats, needle: &str| {
        let before = into.clone();
        let e = into.add_objectives(other).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle}: {e}");
        assert_eq!(into, before, "a refused join changed the statistics");
    };
    // An objective counted twice.
    refused(
        stats_of(0..3, "a", ENERGY),
        stats_of(0..3, "a", BOTH),
        "twice",
    );
    // Other sequences, another calibration digest.
    refused(
        stats_of(0..3, "a", ENERGY),
        stats_of(0..2, "a", CE),
        "other sequences",
    );
    refused(
        stats_of(0..3, "a", ENERGY),
        stats_of(0..3, "b", CE),
        "other sequences",
    );
    // The same metadata but activation sums that differ in the last bit.
    let mut off = stats_of(0..3, "a", CE);
    off.layers[2].s2[3] = f64::from_bits(off.layers[2].s2[3].to_bits() + 1);
    refused(stats_of(0..3, "a", ENERGY), off, "layer 2");
}

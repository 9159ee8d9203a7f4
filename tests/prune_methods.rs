//! Scores and allocation against an independent, loop-by-loop reading of
//! METHODS.md §5–6.
mod common;
use clap::ValueEnum;
use common::values;
use rku_engine::prune::{
    allocate, floors, scores, Allocation, ColumnNorms, EnergyAt, LayerStats, Method, Norms,
    Objectives, Stats, StatsMeta,
};

const WIDTHS: [usize; 4] = [16, 30, 50, 12];
/// Per-layer scale of the gradient statistics: layer 3 is small in absolute
/// terms, which is where raw AGF and RKU part ways under global allocation.
const SCALES: [f64; 4] = [1.0, 40.0, 3.0, 0.01];
const SAMPLES: usize = 4;
const SEQ_LEN: usize = 8;

fn meta(objectives: Objectives) -> StatsMeta {
    StatsMeta {
        model_digest: "model".into(),
        calib_digest: "calib".into(),
        samples: SAMPLES,
        seq_len: SEQ_LEN,
        tokens: (SAMPLES * SEQ_LEN) as u64,
        objectives,
        energy_at: EnergyAt::FinalNorm,
        engine_version: "test".into(),
        window_digests: (0..SAMPLES).map(|s| [s as u8; 32]).collect(),
        traces: None,
        predicted: (SAMPLES * (SEQ_LEN - 1)) as u64,
        norms: Norms {
            energy: (SAMPLES * SEQ_LEN) as u64,
            ce: (SAMPLES * (SEQ_LEN - 1)) as u64,
        },
        shard: None,
        bos: false,
    }
}

/// Seeded statistics and column norms: per layer, one draw of `m` values
/// in [0, 1) per field, most of them coarse (a few levels) on purpose, to
/// make ties.
fn fixture(seed: u64) -> (Stats, Vec<ColumnNorms>) {
    let n = (SAMPLES * SEQ_LEN) as f64;
    let mut layers = Vec::new();
    let mut norms = Vec::new();
    for (l, (&m, &scale)) in WIDTHS.iter().zip(&SCALES).enumerate() {
        let draw = |field: u64| -> Vec<f64> {
            values(m, 0.0, 1.0, seed * 1000 + l as u64 * 10 + field)
                .into_iter()
                .map(f64::from)
                .collect()
        };
        // One of `levels` values in [0, 1).
        let coarse = |field: u64, levels: f64| -> Vec<f64> {
            draw(field)
                .into_iter()
                .map(|u| (u * levels).floor() / levels)
                .collect()
        };
        let s1: Vec<f64> = draw(0).into_iter().map(|u| (u - 0.5) * n).collect();
        let s = LayerStats {
            s2: s1
                .iter()
                .zip(coarse(1, 6.0))
                .map(|(s1, c)| s1 * s1 / n + c * n)
                .collect(),
            f2: coarse(2, 5.0)
                .into_iter()
                .map(|c| c * scale * scale + 0.01)
                .collect(),
            k1: coarse(3, 8.0).into_iter().map(|c| c * scale).collect(),
            tk: coarse(4, 7.0).into_iter().map(|c| c * scale).collect(),
            s1,
        };
        let w = ColumnNorms {
            l1: coarse(5, 4.0).into_iter().map(|c| 1.0 + c).collect(),
            l2sq: coarse(6, 4.0).into_iter().map(|c| 0.5 + c).collect(),
        };
        layers.push(s);
        norms.push(w);
    }
    let all = Objectives {
        energy: true,
        ce: true,
    };
    (
        Stats {
            meta: meta(all),
            layers,
        },
        norms,
    )
}

// ---- reference implementation (METHODS.md read literally) ----

// Index loops on purpose: the reference reads like the spec, not like the crate.
#[allow(clippy::needless_range_loop)]
fn ref_scores(method: Method, st: &Stats, norms: &[ColumnNorms]) -> Vec<Vec<f64>> {
    let n = st.meta.tokens as f64;
    let mut out = Vec::new();
    for l in 0..st.layers.len() {
        let s = &st.layers[l];
        let m = s.s1.len();
        let mut v = vec![0.0; m];
        for c in 0..m {
            v[c] = match method {
                Method::WandaStruct => norms[l].l1[c] * s.s2[c].sqrt(),
                Method::Flap => {
                    let var = (s.s2[c] - s.s1[c] * s.s1[c] / n) / (n - 1.0);
                    var.max(0.0) * norms[l].l2sq[c]
                }
                Method::Taylor => s.tk[c],
                Method::Agf | Method::Rku => s.k1[c],
                Method::RkuFisher => (s.s2[c] / n).sqrt() * (s.f2[c] / n).sqrt(),
            };
        }
        if method == Method::Rku {
            let mut sum = 0.0;
            for c in 0..m {
                sum += s.k1[c];
            }
            for x in v.iter_mut() {
                *x = if sum > 0.0 { *x / sum } else { 0.0 };
            }
        }
        if method == Method::RkuFisher {
            let mut sum = 0.0;
            for c in 0..m {
                sum += (s.f2[c] / n).sqrt();
            }
            for x in v.iter_mut() {
                *x = if sum > 0.0 { *x / sum } else { 0.0 };
            }
        }
        if method == Method::Flap {
            let mut mean = 0.0;
            for x in &v {
                mean += x;
            }
            mean /= m as f64;
            let mut ss = 0.0;
            for x in &v {
                ss += (x - mean) * (x - mean);
            }
            let std = if m > 1 {
                (ss / (m as f64 - 1.0)).sqrt()
            } else {
                0.0
            };
            for x in v.iter_mut() {
                *x = if std > 0.0 { (*x - mean) / std } else { 0.0 };
            }
        }
        out.push(v);
    }
    out
}

fn ref_floor(m: usize, min_keep: Option<usize>) -> usize {
    match min_keep {
        Some(k) => k,
        None => ((0.05 * m as f64).round_ties_even() as usize).max(1),
    }
}

/// Kept indices, or None where the target is unreachable.
#[allow(clippy::needless_range_loop)]
fn ref_allocate(
    sc: &[Vec<f64>],
    alloc: Allocation,
    s: f64,
    min_keep: Option<usize>,
    align: usize,
) -> Option<Vec<Vec<usize>>> {
    let nl = sc.len();
    // (score, layer, channel) sorted ascending.
    let mut all: Vec<(f64, usize, usize)> = Vec::new();
    for l in 0..nl {
        for c in 0..sc[l].len() {
            all.push((sc[l][c], l, c));
        }
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut dropped = vec![vec![false; 0]; nl];
    for l in 0..nl {
        dropped[l] = vec![false; sc[l].len()];
    }
    let mut count = vec![0usize; nl];
    let total: usize = sc.iter().map(|v| v.len()).sum();
    let target_keep;
    match alloc {
        Allocation::Uniform => {
            let mut tk = 0;
            for l in 0..nl {
                let m = sc[l].len();
                let d = (s * m as f64).round_ties_even() as usize;
                if m - d < ref_floor(m, min_keep) {
                    return None;
                }
                tk += m - d;
                for &(_, ll, c) in &all {
                    if ll == l && count[l] < d {
                        dropped[l][c] = true;
                        count[l] += 1;
                    }
                }
            }
            target_keep = tk;
        }
        Allocation::Global => {
            let d = (s * total as f64).round_ties_even() as usize;
            let mut done = 0;
            for &(_, l, c) in &all {
                if done == d {
                    break;
                }
                let m = sc[l].len();
                if m - count[l] > ref_floor(m, min_keep) {
                    dropped[l][c] = true;
                    count[l] += 1;
                    done += 1;
                }
            }
            if done < d {
                return None;
            }
            target_keep = total - d;
        }
    }
    if align > 1 {
        // Rank of every channel from the top of its layer, by the same order.
        let mut down = vec![0; nl];
        let mut cands: Vec<(f64, usize)> = Vec::new();
        for l in 0..nl {
            let m = sc[l].len();
            let k = m - count[l];
            let lo = ref_floor(m, min_keep).div_ceil(align) * align;
            let hi = (m / align) * align;
            assert!(lo <= hi, "fixture must be alignable");
            let d = (k / align * align).max(lo).min(hi);
            let u = (k.div_ceil(align) * align).max(lo).min(hi);
            down[l] = d;
            if u > d {
                // Channels of layer l in descending order; the block is ranks d..u.
                let mut layer: Vec<(f64, usize, usize)> =
                    all.iter().copied().filter(|t| t.1 == l).collect();
                layer.reverse();
                let block: f64 = layer[d..u].iter().map(|t| t.0).sum();
                cands.push((block, l));
            }
        }
        let base: usize = down.iter().sum();
        let mut best_j = 0;
        for j in 0..=cands.len() {
            let dj = (base + j * align).abs_diff(target_keep);
            let db = (base + best_j * align).abs_diff(target_keep);
            if dj <= db {
                best_j = j;
            }
        }
        cands.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        for &(_, l) in &cands[..best_j] {
            down[l] += align;
        }
        for l in 0..nl {
            let m = sc[l].len();
            let mut layer: Vec<(f64, usize, usize)> =
                all.iter().copied().filter(|t| t.1 == l).collect();
            layer.reverse();
            dropped[l] = vec![true; m];
            for t in &layer[..down[l]] {
                dropped[l][t.2] = false;
            }
        }
    }
    Some(
        dropped
            .iter()
            .map(|d| (0..d.len()).filter(|&c| !d[c]).collect())
            .collect(),
    )
}

fn close(a: &[Vec<f64>], b: &[Vec<f64>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|(p, q)| (p - q).abs() <= 1e-12 * (1.0 + q.abs()))
        })
}

// ---- tests ----

#[test]
fn scores_of_every_method_match_reference() {
    for seed in [1, 2, 3] {
        let (st, norms) = fixture(seed);
        for method in Method::ALL {
            let got = scores(method, &st, &norms).unwrap();
            let want = ref_scores(method, &st, &norms);
            assert!(close(&got, &want), "{method} seed {seed}");
        }
    }
}

#[test]
fn masks_of_every_method_and_allocation_match_reference() {
    let mut checked = 0;
    let mut refused = 0;
    for seed in [7, 11] {
        let (st, norms) = fixture(seed);
        for method in Method::ALL {
            // The reference ranks the crate's scores (checked equal above):
            // this isolates allocation from float noise in the scores.
            let sc = scores(method, &st, &norms).unwrap();
            for alloc in [Allocation::Uniform, Allocation::Global] {
                for s in [0.1, 0.3, 0.5, 0.77, 0.9] {
                    for min_keep in [None, Some(3), Some(5)] {
                        for align in [1, 4] {
                            let got = allocate(&sc, alloc, s, min_keep, align);
                            match ref_allocate(&sc, alloc, s, min_keep, align) {
                                Some(want) => {
                                    assert_eq!(
                                        got.unwrap(),
                                        want,
                                        "{method} {alloc} s={s} min_keep={min_keep:?} align={align}"
                                    );
                                    checked += 1;
                                }
                                None => {
                                    let e = got.unwrap_err().to_string();
                                    assert!(e.contains("short by"), "{e}");
                                    refused += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 400 && refused > 0, "{checked} {refused}");
}

#[test]
fn ties_break_by_layer_then_channel() {
    let sc = vec![vec![1.0; 10], vec![1.0; 10]];
    // Global: 8 drops; layer 0 goes to its floor (3) first, then layer 1.
    let kept = allocate(&sc, Allocation::Global, 0.4, Some(3), 1).unwrap();
    assert_eq!(kept[0], (7..10).collect::<Vec<_>>());
    assert_eq!(kept[1], (1..10).collect::<Vec<_>>());
    // Uniform: each layer drops its first round(0.25·10) = 2 (2.5 → 2).
    let kept = allocate(&sc, Allocation::Uniform, 0.25, None, 1).unwrap();
    assert_eq!(kept[0], (2..10).collect::<Vec<_>>());
    assert_eq!(kept[1], (2..10).collect::<Vec<_>>());
    // −0.0 and +0.0 tie: the channel order decides.
    let kept = allocate(&[vec![0.0, -0.0, 1.0]], Allocation::Global, 0.3, None, 1).unwrap();
    assert_eq!(kept[0], vec![1, 2]);
}

#[test]
fn floor_bites_under_global_allocation() {
    // Layer 1's scores are all below layer 0's: it is pruned down to its floor.
    let sc = vec![
        (0..40).map(|c| 10.0 + c as f64).collect::<Vec<_>>(),
        (0..40).map(|c| c as f64 * 0.01).collect(),
    ];
    let kept = allocate(&sc, Allocation::Global, 0.5, None, 1).unwrap();
    // Default floor: round(40/20) = 2, the two best channels of layer 1.
    assert_eq!(kept[1], vec![38, 39]);
    assert_eq!(kept[0].len() + kept[1].len(), 40);
    assert_eq!(kept[0], (2..40).collect::<Vec<_>>());
    let kept = allocate(&sc, Allocation::Global, 0.5, Some(7), 1).unwrap();
    assert_eq!(kept[1].len(), 7);
    assert_eq!(kept[0].len(), 33);
}

#[test]
fn default_floor_rounds_half_to_even() {
    let f = floors(&[10, 11, 30, 50, 70, 11008, 18944], None).unwrap();
    assert_eq!(f, vec![1, 1, 2, 2, 4, 550, 947]);
    assert!(floors(&[10], Some(0)).is_err());
    assert!(floors(&[10], Some(11)).is_err());
}

#[test]
fn unreachable_target_says_by_how_much() {
    let sc = vec![vec![1.0; 20], vec![2.0; 20]];
    // 0.95·40 = 38 drops, floors 1+1 allow 38: fine; with min_keep 3: 34, short by 4.
    assert!(allocate(&sc, Allocation::Global, 0.95, None, 1).is_ok());
    let e = allocate(&sc, Allocation::Global, 0.95, Some(3), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("short by 4"), "{e}");
    let e = allocate(&sc, Allocation::Uniform, 0.95, Some(3), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("short by 2"), "{e}");
}

#[test]
fn align_gives_multiples_closest_to_target() {
    let (st, norms) = fixture(5);
    for method in Method::ALL {
        let sc = scores(method, &st, &norms).unwrap();
        for alloc in [Allocation::Uniform, Allocation::Global] {
            let s = 0.4;
            let plain = allocate(&sc, alloc, s, None, 1).unwrap();
            let kept = allocate(&sc, alloc, s, None, 4).unwrap();
            let target: usize = plain.iter().map(Vec::len).sum();
            let total: usize = kept.iter().map(Vec::len).sum();
            for (l, k) in kept.iter().enumerate() {
                assert_eq!(k.len() % 4, 0, "{method} {alloc} layer {l}");
                assert!(k.len() >= 4 && k.len() <= WIDTHS[l]);
                // The kept channels are the layer's best: none dropped scores higher.
                let min_kept = k.iter().map(|&c| sc[l][c]).fold(f64::INFINITY, f64::min);
                assert!((0..WIDTHS[l])
                    .filter(|c| !k.contains(c))
                    .all(|c| sc[l][c] <= min_kept));
            }
            // Within a/2 of the target, plus what the aligned bounds force:
            // a layer below its floor rounded up (4) or above m_l rounded down.
            let forced: usize = plain
                .iter()
                .zip(WIDTHS)
                .map(|(k, m)| 4usize.saturating_sub(k.len()) + k.len().saturating_sub(m / 4 * 4))
                .sum();
            assert!(
                total.abs_diff(target) <= 2 + forced,
                "{method} {alloc}: {total} vs {target} (forced {forced})"
            );
        }
    }
}

#[test]
fn align_refuses_a_layer_narrower_than_the_multiple() {
    let sc = vec![vec![1.0; 100], vec![1.0; 3]];
    let e = allocate(&sc, Allocation::Global, 0.3, None, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 1"), "{e}");
}

#[test]
fn rku_and_agf_agree_per_layer_but_not_globally() {
    let (st, norms) = fixture(9);
    let agf = scores(Method::Agf, &st, &norms).unwrap();
    let rku = scores(Method::Rku, &st, &norms).unwrap();
    for s in [0.3, 0.5] {
        assert_eq!(
            allocate(&agf, Allocation::Uniform, s, None, 1).unwrap(),
            allocate(&rku, Allocation::Uniform, s, None, 1).unwrap()
        );
        let ga = allocate(&agf, Allocation::Global, s, None, 1).unwrap();
        let gr = allocate(&rku, Allocation::Global, s, None, 1).unwrap();
        assert_ne!(ga, gr);
        // Raw AGF over-prunes the layer whose utilities are small (layer 3).
        assert!(
            ga[3].len() < gr[3].len(),
            "{} vs {}",
            ga[3].len(),
            gr[3].len()
        );
    }
    // Each layer's rku scores sum to 1.
    for layer in &rku {
        assert!((layer.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

#[test]
fn sparsity_outside_open_interval_is_an_error() {
    let sc = vec![vec![1.0, 2.0, 3.0, 4.0]];
    for s in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
        for alloc in [Allocation::Uniform, Allocation::Global] {
            let e = allocate(&sc, alloc, s, None, 1).unwrap_err().to_string();
            assert!(e.contains("sparsity"), "{e}");
        }
    }
    assert!(allocate(&sc, Allocation::Global, 0.5, None, 0).is_err());
    assert!(allocate(&[vec![1.0, f64::NAN]], Allocation::Global, 0.5, None, 1).is_err());
}

#[test]
fn missing_objective_is_named() {
    let (mut st, norms) = fixture(3);
    st.meta.objectives = Objectives {
        energy: true,
        ce: false,
    };
    for l in &mut st.layers {
        l.tk.clear();
    }
    let e = scores(Method::Taylor, &st, &norms).unwrap_err().to_string();
    assert!(
        e.contains("taylor needs the ce objective; this stats file was scored with: energy"),
        "{e}"
    );
    assert!(scores(Method::Rku, &st, &norms).is_ok());
    assert!(scores(Method::Flap, &st, &norms).is_ok());

    let (mut st, _) = fixture(3);
    st.meta.objectives = Objectives {
        energy: false,
        ce: true,
    };
    for l in &mut st.layers {
        l.f2.clear();
        l.k1.clear();
    }
    for m in [Method::Rku, Method::Agf, Method::RkuFisher] {
        let e = scores(m, &st, &[]).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{m} needs the energy objective")),
            "{e}"
        );
    }
    // Column norms are required where the method reads them.
    assert!(scores(Method::WandaStruct, &st, &[]).is_err());
}

#[test]
fn degenerate_layers_score_zero_not_nan() {
    let (mut st, norms) = fixture(4);
    st.layers[1].k1.iter_mut().for_each(|x| *x = 0.0);
    st.layers[1].f2.iter_mut().for_each(|x| *x = 0.0);
    for m in [Method::Rku, Method::RkuFisher] {
        let sc = scores(m, &st, &norms).unwrap();
        assert!(sc[1].iter().all(|&x| x == 0.0), "{m}");
        assert!(sc.iter().flatten().all(|x| x.is_finite()));
    }
    // flap: constant variance·norm in a layer → std 0 → zeros.
    let n = st.meta.tokens as f64;
    let l = &mut st.layers[2];
    for c in 0..l.s1.len() {
        l.s1[c] = 0.0;
        l.s2[c] = n - 1.0;
    }
    let mut norms = norms;
    norms[2].l2sq.iter_mut().for_each(|x| *x = 2.0);
    let sc = scores(Method::Flap, &st, &norms).unwrap();
    assert!(sc[2].iter().all(|&x| x == 0.0));
    // Other layers are standardised: mean 0, unbiased std 1.
    let m = sc[0].len() as f64;
    let mean = sc[0].iter().sum::<f64>() / m;
    let var = sc[0].iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1.0);
    assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12);
}

#[test]
fn method_names_round_trip() {
    let names = ["rku", "agf", "wanda-struct", "flap", "taylor", "rku-fisher"];
    for (m, name) in Method::ALL.iter().zip(names) {
        assert_eq!(m.to_string(), name);
        assert_eq!(Method::from_str(name, false).unwrap(), *m);
    }
    assert!(Method::from_str("wanda", false).is_err());
    assert_eq!(Method::Rku.default_allocation(), Allocation::Global);
    assert_eq!(Method::Taylor.default_allocation(), Allocation::Uniform);
    assert_eq!(
        Method::WandaStruct.default_allocation(),
        Allocation::Uniform
    );
    assert_eq!(
        Allocation::from_str("global", false).unwrap(),
        Allocation::Global
    );
    assert_eq!(Allocation::Uniform.to_string(), "uniform");
    assert!(Allocation::from_str("local", false).is_err());
}

//! LoRA adapters on the seven projections of every layer (METHODS.md
//! section 10): `y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ` with `A [r, inp]`,
//! `B [out, r]` and `s = α / r`. The base weights stay frozen; only the
//! adapters' gradients are ever formed, each as two small products.
use super::config::ModelConfig;
use crate::backend::{Backend, MatMul};
use crate::{Error, Result};

/// The adapted projections of a layer, in the order every adapter list
/// (and the checkpoint's tensor names) follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The HF module name (`q_proj`, …, `down_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The HF tensor name of this projection's weight in layer `l`.
    pub fn weight_tensor(self, l: usize) -> String {
        let block = match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        };
        format!("model.layers.{l}.{block}.{}.weight", self.name())
    }

    /// `(inp, out)` of this projection in a layer of FFN width `ffn`.
    pub fn dims(self, cfg: &ModelConfig, ffn: usize) -> (usize, usize) {
        let d = cfg.hidden;
        match self {
            Proj::Q => (d, cfg.q_dim()),
            Proj::K | Proj::V => (d, cfg.kv_dim()),
            Proj::O => (cfg.q_dim(), d),
            Proj::Gate | Proj::Up => (d, ffn),
            Proj::Down => (ffn, d),
        }
    }
}

/// One projection's adapter (or a tensor of the same shapes: its gradient,
/// or an AdamW moment).
pub struct Adapter<B: Backend> {
    /// `[r, inp]`.
    pub a: B::Buf,
    /// `[out, r]`.
    pub b: B::Buf,
    pub inp: usize,
    pub out: usize,
}

/// Adapters (or gradients, or moments) for every projection of every
/// layer: `layers[l][i]` belongs to `Proj::ALL[i]`.
pub struct Adapters<B: Backend> {
    pub rank: usize,
    pub layers: Vec<Vec<Adapter<B>>>,
}

impl<B: Backend> Adapters<B> {
    /// Adapters shaped for `cfg` with rank `rank`, A and B from `init(l,
    /// proj, inp, out) -> (a, b)` (host values, `[r·inp]` and `[out·r]`).
    pub fn build(
        be: &B,
        cfg: &ModelConfig,
        rank: usize,
        mut init: impl FnMut(usize, Proj, usize, usize) -> Result<(Vec<f32>, Vec<f32>)>,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.layers);
        for (l, &ffn) in cfg.ffn_widths.iter().enumerate() {
            let mut row = Vec::with_capacity(Proj::ALL.len());
            for p in Proj::ALL {
                let (inp, out) = p.dims(cfg, ffn);
                if rank == 0 || rank > inp.min(out) {
                    return Err(Error::Invalid(format!(
                        "LoRA rank {rank} must be between 1 and the smaller side of every \
                         adapted matrix (layer {l} {} is {out}×{inp})",
                        p.name()
                    )));
                }
                let (a, b) = init(l, p, inp, out)?;
                if a.len() != rank * inp || b.len() != out * rank {
                    return Err(Error::Invalid(format!(
                        "adapter of layer {l} {}: A has {} and B {} values, need {}×{inp} and {out}×{}",
                        p.name(),
                        a.len(),
                        b.len(),
                        rank,
                        rank
                    )));
                }
                row.push(Adapter {
                    a: be.upload(&a)?,
                    b: be.upload(&b)?,
                    inp,
                    out,
                });
            }
            layers.push(row);
        }
        Ok(Self { rank, layers })
    }

    /// Zeros of the same shapes (gradients, moments).
    pub fn zeros_like(&self, be: &B) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|row| {
                row.iter()
                    .map(|ad| {
                        Ok(Adapter {
                            a: be.zeros(self.rank * ad.inp)?,
                            b: be.zeros(ad.out * self.rank)?,
                            inp: ad.inp,
                            out: ad.out,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            rank: self.rank,
            layers,
        })
    }

    /// Every buffer with its element count, in a fixed order (layer, then
    /// `Proj::ALL`, A before B): what the optimiser and checkpoints walk.
    pub fn tensors(&self) -> impl Iterator<Item = (&B::Buf, usize)> {
        let r = self.rank;
        self.layers
            .iter()
            .flatten()
            .flat_map(move |ad| [(&ad.a, r * ad.inp), (&ad.b, ad.out * r)])
    }

    /// Σ of every value squared, over all the buffers (in f64).
    pub fn sum_squares(&self, be: &B) -> Result<f64> {
        let mut sq = 0f64;
        for (t, n) in self.tensors() {
            sq += be.sum_squares(t, n)?;
        }
        Ok(sq)
    }

    /// `tensors`, mutably.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = (&mut B::Buf, usize)> {
        let r = self.rank;
        self.layers
            .iter_mut()
            .flatten()
            .flat_map(move |ad| [(&mut ad.a, r * ad.inp), (&mut ad.b, ad.out * r)])
    }

    /// Names matching `tensors`: `lora_a.<l>.<proj>` and `lora_b.<l>.<proj>`.
    pub fn tensor_names(&self) -> Vec<String> {
        (0..self.layers.len())
            .flat_map(|l| {
                Proj::ALL.iter().flat_map(move |p| {
                    [
                        format!("lora_a.{l}.{}", p.name()),
                        format!("lora_b.{l}.{}", p.name()),
                    ]
                })
            })
            .collect()
    }

    /// Layer `l`'s adapters with scale `s = α / r`.
    pub fn layer(&self, l: usize, scale: f32) -> Result<LayerLora<'_, B>> {
        let adapters = self
            .layers
            .get(l)
            .ok_or_else(|| Error::Invalid(format!("no adapters for layer {l}")))?;
        Ok(LayerLora {
            adapters,
            rank: self.rank,
            scale,
        })
    }

    /// Sets every value to zero (a fresh gradient accumulation).
    pub fn zero(&mut self, be: &B) -> Result<()> {
        for (buf, n) in self.tensors_mut() {
            *buf = be.zeros(n)?;
        }
        Ok(())
    }
}

/// One layer's adapters and, in the backward pass, where their gradients go.
pub struct LayerLora<'a, B: Backend> {
    pub adapters: &'a [Adapter<B>],
    pub rank: usize,
    /// s = α / r.
    pub scale: f32,
}

impl<B: Backend> LayerLora<'_, B> {
    fn get(&self, p: Proj) -> Result<&Adapter<B>> {
        self.adapters
            .get(p as usize)
            .ok_or_else(|| Error::Invalid(format!("no adapter for {}", p.name())))
    }

    /// `y += s·(x·Aᵀ)·Bᵀ` for projection `p` (`x [rows, inp]`, `y [rows, out]`).
    pub fn apply(&self, be: &B, p: Proj, x: &B::Buf, y: &mut B::Buf, rows: usize) -> Result<()> {
        let ad = self.get(p)?;
        let r = self.rank;
        let mut xa = be.zeros(rows * r)?; // [rows, r] = x·Aᵀ
        be.matmul(
            x,
            &ad.a,
            &mut xa,
            mm(rows, r, ad.inp, false, true, 1.0, 0.0),
        )?;
        be.matmul(
            &xa,
            &ad.b,
            y,
            mm(rows, ad.out, r, false, true, self.scale, 1.0),
        )
    }

    /// The backward pass of `apply` for projection `p`, given its input `x`
    /// `[rows, inp]` and output gradient `dy` `[rows, out]`; with `xa = x·Aᵀ`
    /// and `dxa = s·dy·B` `[rows, r]`:
    ///   `∂B += s·dyᵀ·xa` `[out, r]`, `∂A += dxaᵀ·x` `[r, inp]`,
    ///   `dx += dxa·A` `[rows, inp]` (the input gradient through the adapter).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &B,
        p: Proj,
        grad: &mut Adapter<B>,
        x: &B::Buf,
        dy: &B::Buf,
        dx: &mut B::Buf,
        rows: usize,
    ) -> Result<()> {
        let ad = self.get(p)?;
        let (r, s) = (self.rank, self.scale);
        let mut xa = be.zeros(rows * r)?;
        be.matmul(
            x,
            &ad.a,
            &mut xa,
            mm(rows, r, ad.inp, false, true, 1.0, 0.0),
        )?;
        be.matmul(
            dy,
            &xa,
            &mut grad.b,
            mm(ad.out, r, rows, true, false, s, 1.0),
        )?;
        drop(xa);
        let mut dxa = be.zeros(rows * r)?;
        be.matmul(
            dy,
            &ad.b,
            &mut dxa,
            mm(rows, r, ad.out, false, false, s, 0.0),
        )?;
        be.matmul(
            &dxa,
            x,
            &mut grad.a,
            mm(r, ad.inp, rows, true, false, 1.0, 1.0),
        )?;
        be.matmul(&dxa, &ad.a, dx, mm(rows, ad.inp, r, false, false, 1.0, 1.0))
    }
}

#[allow(clippy::too_many_arguments)]
fn mm(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, alpha: f32, beta: f32) -> MatMul {
    MatMul {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha,
        beta,
    }
}

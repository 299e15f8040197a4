//! The self-attention sublayer shared by every forward pass: projections, optional qk-norm,
//! RoPE, then `kv::attention` on the cache the engine owns.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::arch::ModelArchitecture;
use super::layers::{Linear, RmsNorm, Rope, Source};
use crate::kv::{self, LayerCache};

pub struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    rope: Rope,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    scale: f32,
}

impl SelfAttention {
    pub fn load(
        src: &Source,
        arch: &ModelArchitecture,
        il: usize,
        device: &Device,
    ) -> Result<Self> {
        let g = &arch.layers[il];
        let p = format!("blk.{il}");
        let norm = |n: &str| -> Result<Option<RmsNorm>> {
            let name = format!("{p}.{n}");
            if src.has(&format!("{name}.weight")) {
                Ok(Some(RmsNorm::load(src, &name, arch.rms_eps, device)?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q: src.linear(&format!("{p}.attn_q"), device)?,
            k: src.linear(&format!("{p}.attn_k"), device)?,
            v: src.linear(&format!("{p}.attn_v"), device)?,
            o: src.linear(&format!("{p}.attn_output"), device)?,
            q_norm: norm("attn_q_norm")?,
            k_norm: norm("attn_k_norm")?,
            rope: Rope::new(g.rope_theta, g.head_dim, arch.rope_style, arch.bf16_buffers),
            n_head: g.n_head,
            n_kv_head: g.n_kv_head,
            head_dim: g.head_dim,
            scale: arch.attn_scale,
        })
    }

    /// `x` [t, hidden] at positions `pos..pos+t` → [t, hidden]; appends this chunk's K/V to `cache`.
    pub fn forward(&self, x: &Tensor, cache: &mut LayerCache, pos: usize) -> Result<Tensor> {
        let t = x.dim(0)?;
        let hd = self.head_dim;
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Vec<f32>> {
            let y = y.reshape((t * n, hd))?;
            let y = match norm {
                Some(nm) => nm.forward(&y)?,
                None => y,
            };
            Ok(y.flatten_all()?.to_vec1::<f32>()?)
        };
        let mut q = heads(self.q.forward(x)?, self.n_head, &self.q_norm)?;
        let mut k = heads(self.k.forward(x)?, self.n_kv_head, &self.k_norm)?;
        let v = heads(self.v.forward(x)?, self.n_kv_head, &None)?;
        self.rope.apply(&mut q, pos, self.n_head);
        self.rope.apply(&mut k, pos, self.n_kv_head);
        let out = kv::attention(cache, &q, &k, &v, pos, self.n_head, self.scale)?;
        let out = Tensor::from_vec(out, (t, self.n_head * hd), x.device())?;
        self.o.forward(&out)
    }
}

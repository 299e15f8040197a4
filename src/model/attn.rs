//! The self-attention sublayer shared by every forward pass: projections, optional qk-norm,
//! RoPE, then `kv::attention` on the cache the engine owns.

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use super::layers::{Linear, Projections, RmsNorm, Source};
use crate::arch::Rope;
use crate::arch::{ArchKind, ModelArchitecture};
use crate::kv::{self, LayerCache};

/// How a layer reaches the KV cache for one chunk.
pub enum KvAccess<'a> {
    /// Its own cache: attend, then store the chunk's K/V.
    Own(&'a mut LayerCache),
    /// Its own cache, read by shared-KV layers later in the pass: attend and hand the chunk's
    /// K/V back; the caller stores them once the readers are done.
    Source(&'a LayerCache, &'a mut Option<ChunkKv>),
    /// Another layer's cache and chunk K/V (a shared-KV layer computes no K/V).
    Shared(&'a LayerCache, &'a ChunkKv),
}

#[cfg(feature = "cuda")]
impl KvAccess<'_> {
    fn cache(&self) -> &LayerCache {
        match self {
            KvAccess::Own(c) => c,
            KvAccess::Source(c, _) | KvAccess::Shared(c, _) => c,
        }
    }
}

/// A chunk's roped K and V [t · n_kv, hd], kept for the shared-KV layers that read them and
/// stored after the pass: on the host, or on the GPU where the store is.
pub enum ChunkKv {
    Host(Vec<f32>, Vec<f32>),
    #[cfg(feature = "cuda")]
    Device(Tensor, Tensor),
}

impl ChunkKv {
    /// Stores the chunk at positions `pos..`.
    pub fn store(self, cache: &mut LayerCache, pos: usize) -> Result<()> {
        match self {
            ChunkKv::Host(k, v) => kv::append(cache, &k, &v, pos),
            #[cfg(feature = "cuda")]
            ChunkKv::Device(k, v) => kv::attention::device::append_chunk(cache, &k, &v, pos)?,
        }
        Ok(())
    }
}

pub struct SelfAttention {
    /// Q, K and V; Q alone in shared-KV layers.
    qkv: Projections,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    v_norm: Option<RmsNorm>,
    rope: Rope,
    /// `rope`'s frequencies in GPU memory, when the layer runs there.
    #[cfg(feature = "cuda")]
    rope_freqs: Option<Tensor>,
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
        let names = ["attn_q", "attn_k", "attn_v"].map(|n| format!("{p}.{n}"));
        let names = names.iter().map(String::as_str).collect::<Vec<_>>();
        let own = if arch.stores_kv(il) { 3 } else { 1 };
        let rope = Rope::for_layer(arch, il);
        Ok(Self {
            #[cfg(feature = "cuda")]
            rope_freqs: device
                .is_cuda()
                .then(|| Tensor::new(rope.inv_freq(), device))
                .transpose()?,
            qkv: Projections::load(src, &names[..own], device)?,
            o: src.linear(&format!("{p}.attn_output"), device)?,
            q_norm: norm("attn_q_norm")?,
            k_norm: norm("attn_k_norm")?,
            v_norm: matches!(arch.kind, ArchKind::Gemma4 | ArchKind::Gemma3n)
                .then(|| RmsNorm::unit(g.head_dim, arch.rms_eps, device))
                .transpose()?,
            rope,
            n_head: g.n_head,
            n_kv_head: g.n_kv_head,
            head_dim: g.head_dim,
            scale: arch.attn_scale,
        })
    }

    /// `x` [t, hidden] at positions `pos..pos+t` → [t, hidden]; appends this chunk's K/V to `cache`.
    pub fn forward(&self, x: &Tensor, cache: &mut LayerCache, pos: usize) -> Result<Tensor> {
        self.forward_kv(x, KvAccess::Own(cache), pos)
    }

    /// As `forward`, reaching the cache as `kv` says.
    pub fn forward_kv(&self, x: &Tensor, kv: KvAccess, pos: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if kv.cache().k.on_device() {
            return self.forward_gpu(x, kv, pos);
        }
        self.forward_host(x, kv, pos)
    }

    /// The layer on the GPU with its cache there: nothing leaves the device.
    #[cfg(feature = "cuda")]
    fn forward_gpu(&self, x: &Tensor, kv: KvAccess, pos: usize) -> Result<Tensor> {
        let t = x.dim(0)?;
        let hd = self.head_dim;
        let freqs = self
            .rope_freqs
            .as_ref()
            .context("rope frequencies not on the GPU")?;
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = y.reshape((t * n, hd))?;
            Ok(match norm {
                Some(nm) => nm.forward(&y)?,
                None => y,
            })
        };
        let mut qkv = self.qkv.forward(x)?.into_iter();
        let q = heads(
            qkv.next().context("no Q projection")?,
            self.n_head,
            &self.q_norm,
        )?;
        let mut own_kv = || -> Result<(Tensor, Tensor)> {
            let (Some(k), Some(v)) = (qkv.next(), qkv.next()) else {
                bail!("a shared-KV layer was asked for its own K/V");
            };
            let k = heads(k, self.n_kv_head, &self.k_norm)?;
            Ok((k, heads(v, self.n_kv_head, &self.v_norm)?))
        };
        let neox = self.rope.neox();
        let rope = |y: &Tensor, n: usize| kv::device::rope(y, freqs, n, pos, neox);
        let (n_head, scale) = (self.n_head, self.scale);
        let out = match kv {
            KvAccess::Own(cache) => {
                let (k, v) = own_kv()?;
                let rotary = kv::device::Rotary {
                    inv_freq: freqs,
                    neox,
                };
                kv::attention::device::attention(
                    cache,
                    &q,
                    &k,
                    &v,
                    Some(&rotary),
                    pos,
                    n_head,
                    scale,
                    None,
                )?
            }
            KvAccess::Source(cache, stash) => {
                let (k, v) = own_kv()?;
                let k = rope(&k, self.n_kv_head)?;
                let out = kv::attention::device::attend(
                    cache,
                    &rope(&q, n_head)?,
                    &k,
                    &v,
                    pos,
                    n_head,
                    scale,
                )?;
                *stash = Some(ChunkKv::Device(k, v));
                out
            }
            KvAccess::Shared(cache, ChunkKv::Device(k, v)) => {
                kv::attention::device::attend(cache, &rope(&q, n_head)?, k, v, pos, n_head, scale)?
            }
            KvAccess::Shared(_, ChunkKv::Host(..)) => {
                bail!("a shared-KV layer on the GPU was handed its source's K/V on the host")
            }
        };
        self.o.forward(&out)
    }

    /// The layer with its cache in host memory: Q/K/V come to the host for attention (the
    /// weights may still be on a GPU).
    fn forward_host(&self, x: &Tensor, kv: KvAccess, pos: usize) -> Result<Tensor> {
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
        let mut qkv = self.qkv.forward(x)?.into_iter();
        let q = qkv.next().context("no Q projection")?;
        let mut q = heads(q, self.n_head, &self.q_norm)?;
        self.rope.apply(&mut q, pos, self.n_head);
        let mut own_kv = || -> Result<(Vec<f32>, Vec<f32>)> {
            let (Some(k), Some(v)) = (qkv.next(), qkv.next()) else {
                bail!("a shared-KV layer was asked for its own K/V");
            };
            let mut k = heads(k, self.n_kv_head, &self.k_norm)?;
            let v = heads(v, self.n_kv_head, &self.v_norm)?;
            self.rope.apply(&mut k, pos, self.n_kv_head);
            Ok((k, v))
        };
        let out = match kv {
            KvAccess::Own(cache) => {
                let (k, v) = own_kv()?;
                kv::attention(cache, &q, &k, &v, pos, self.n_head, self.scale)?
            }
            KvAccess::Source(cache, stash) => {
                let (k, v) = own_kv()?;
                let out = kv::attend(cache, &q, &k, &v, pos, self.n_head, self.scale)?;
                *stash = Some(ChunkKv::Host(k, v));
                out
            }
            KvAccess::Shared(cache, ChunkKv::Host(k, v)) => {
                kv::attend(cache, &q, k, v, pos, self.n_head, self.scale)?
            }
            #[cfg(feature = "cuda")]
            KvAccess::Shared(_, ChunkKv::Device(..)) => {
                bail!("a shared-KV layer on the host was handed its source's K/V on the GPU")
            }
        };
        let out = Tensor::from_vec(out, (t, self.n_head * hd), x.device())?;
        self.o.forward(&out)
    }
}

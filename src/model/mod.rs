//! Models: geometry (`arch`), loaders (`gguf`, `safetensors`) and forward passes (`llama`, `gemma`).

pub mod activation;
pub mod attn;
pub mod convert;
pub mod embedding;
#[cfg(feature = "cuda")]
pub mod fused;
pub mod gemma;
pub mod gemma3n;
pub mod gemma4;
pub mod gguf;
pub mod layers;
pub mod llama;
pub mod quant;
pub mod safetensors;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use crate::arch::{ArchKind, ModelArchitecture};
use crate::kv::KvCache;
use attn::{ChunkKv, KvAccess};
use gemma::GemmaBlock;
use gemma3n::{AltUpEnds, Gemma3nBlock};
use gemma4::Gemma4Block;
use layers::{Embedding, Linear, RmsNorm, Source};
use llama::LlamaBlock;

enum Block {
    Llama(LlamaBlock),
    Gemma(GemmaBlock),
    Gemma4(Gemma4Block),
    Gemma3n(Box<Gemma3nBlock>),
}

/// Per-layer embeddings (Gemma 4): a token-identity table read row by row from the map, and a
/// projection of the token embedding, mixed into one `ple_dim` input per layer.
struct PerLayerInputs {
    table: Embedding,
    table_scale: f64,
    /// `1/sqrt(hidden)` on the projection and `1/sqrt(2)` on the sum (Gemma 3n keeps both in
    /// the checkpoint's dtype, Gemma 4 in f32).
    proj_scale: f64,
    mix_scale: f64,
    model_proj: Linear,
    proj_norm: RmsNorm,
    n_layer: usize,
    dim: usize,
}

impl PerLayerInputs {
    fn load(
        src: &Source,
        arch: &ModelArchitecture,
        device: &Device,
        resident: bool,
    ) -> Result<Option<Self>> {
        let Some(ple) = &arch.extras.ple else {
            return Ok(None);
        };
        let scale = (ple.dim as f32).sqrt();
        let table = src.embedding("per_layer_token_embd.weight", device)?;
        let table = if resident {
            table.into_resident()
        } else {
            table.advise_random();
            table
        };
        let buffer = |x: f32| {
            if arch.bf16_buffers {
                crate::arch::rope::round_bf16(x)
            } else {
                x
            }
        };
        let buffer_3n = |x: f32| {
            if arch.kind == ArchKind::Gemma3n {
                buffer(x)
            } else {
                x
            }
        };
        Ok(Some(Self {
            table,
            table_scale: buffer(scale) as f64,
            proj_scale: buffer_3n((arch.hidden as f32).powf(-0.5)) as f64,
            mix_scale: buffer_3n(std::f32::consts::FRAC_1_SQRT_2) as f64,
            model_proj: src.linear("per_layer_model_proj", device)?,
            proj_norm: RmsNorm::load(src, "per_layer_proj_norm", arch.rms_eps, device)?,
            n_layer: arch.n_layer,
            dim: ple.dim,
        }))
    }

    /// `(norm(proj(x) / sqrt(hidden)) + table[ids] * sqrt(dim)) / sqrt(2)` → [t, n_layer, dim]
    fn inputs(&self, ids: &[u32], x: &Tensor) -> Result<Tensor> {
        let t = ids.len();
        let shape = (t, self.n_layer, self.dim);
        let proj = (self.model_proj.forward(x)? * self.proj_scale)?.reshape(shape)?;
        let proj = self.proj_norm.forward(&proj)?;
        let table = (self.table.rows(ids)? * self.table_scale)?.reshape(shape)?;
        Ok(((proj + table)? * self.mix_scale)?)
    }
}

pub struct Model {
    pub arch: ModelArchitecture,
    pub source: Arc<Source>,
    pub device: Device,
    embed: Embedding,
    embed_scale: Option<f64>,
    blocks: Vec<Block>,
    per_layer: Option<PerLayerInputs>,
    altup: Option<AltUpEnds>,
    norm: RmsNorm,
    head: Linear,
    /// Layers whose cache shared-KV layers read (their chunk K/V are stored after the pass).
    kv_sources: Vec<bool>,
    /// Bytes of weights as stored in the file.
    pub weight_bytes: u64,
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
    /// Positions `i..` of the chunk (perplexity scores only the second half).
    From(usize),
}

impl Model {
    /// Bytes of the per-layer embedding table present in memory now, and its size.
    pub fn ple_resident_bytes(&self) -> Option<(usize, usize)> {
        self.per_layer.as_ref()?.table.resident_bytes()
    }

    /// Bytes of the per-layer embedding table, and whether they were copied into memory.
    pub fn ple_table(&self) -> Option<(usize, bool)> {
        self.per_layer.as_ref().map(|p| {
            let resident = matches!(
                p.table,
                Embedding::Rows {
                    bytes: layers::RowBytes::Owned(_),
                    ..
                }
            );
            (p.table.table_bytes(), resident)
        })
    }

    /// Opens a GGUF file or an HF directory (config.json + *.safetensors).
    /// With `ple_resident` the per-layer embedding table is copied into memory; otherwise its
    /// rows are read from the mapped file as tokens need them.
    pub fn load(path: &Path, device: &Device, ple_resident: bool) -> Result<Self> {
        let (source, arch) = if path.is_dir() {
            let hf = safetensors::HfDir::open(path)?;
            let arch = hf.architecture_geometry()?;
            (Source::Hf(hf), arch)
        } else if path.exists() {
            let g = gguf::GgufFile::open(path)?;
            let arch = g.architecture_geometry()?;
            (Source::Gguf(Arc::new(g)), arch)
        } else {
            bail!("model not found: {}", path.display());
        };
        let weight_bytes = match &source {
            Source::Gguf(g) => g.mmap.len() as u64,
            Source::Hf(h) => dir_bytes(&h.dir),
        };
        let blocks = (0..arch.n_layer)
            .map(|il| -> Result<Block> {
                Ok(match arch.kind {
                    ArchKind::Llama => Block::Llama(LlamaBlock::load(&source, &arch, il, device)?),
                    ArchKind::Gemma3 => Block::Gemma(GemmaBlock::load(&source, &arch, il, device)?),
                    ArchKind::Gemma4 => {
                        Block::Gemma4(Gemma4Block::load(&source, &arch, il, device)?)
                    }
                    ArchKind::Gemma3n => {
                        Block::Gemma3n(Box::new(Gemma3nBlock::load(&source, &arch, il, device)?))
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = source.embedding("token_embd.weight", device)?;
        let head = if arch.tied_embeddings {
            source.linear("token_embd", device)?
        } else {
            source.linear("output", device)?
        };
        let norm = RmsNorm::load(&source, "output_norm", arch.rms_eps, device)?;
        let per_layer = PerLayerInputs::load(&source, &arch, device, ple_resident)?;
        let altup = (arch.extras.altup_streams > 1)
            .then(|| AltUpEnds::load(&source, &arch, device))
            .transpose()?;
        let embed_scale = matches!(
            arch.kind,
            ArchKind::Gemma3 | ArchKind::Gemma4 | ArchKind::Gemma3n
        )
        .then(|| {
            let s = (arch.hidden as f32).sqrt();
            (if arch.bf16_buffers {
                crate::arch::rope::round_bf16(s)
            } else {
                s
            }) as f64
        });
        let kv_sources = (0..arch.n_layer)
            .map(|il| (0..arch.n_layer).any(|j| arch.kv_source(j) == Some(il)))
            .collect();
        Ok(Self {
            kv_sources,
            arch,
            source: Arc::new(source),
            device: device.clone(),
            embed,
            embed_scale,
            blocks,
            per_layer,
            altup,
            norm,
            head,
            weight_bytes,
        })
    }

    /// Parameter count (values in every weight tensor), as llama-bench's `params` column.
    pub fn n_params(&self) -> u64 {
        match self.source.as_ref() {
            Source::Gguf(g) => g
                .content
                .tensor_infos
                .values()
                .map(|t| t.shape.elem_count() as u64)
                .sum(),
            Source::Hf(h) => h.n_params(),
        }
    }

    /// Runs `tokens` at positions `cache.len..`, appends their K/V, returns logits [1|t, vocab].
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        let pos = cache.len;
        if tokens.is_empty() {
            bail!("forward: no tokens");
        }
        if pos + tokens.len() > cache.n_ctx {
            bail!(
                "context overflow: {} tokens do not fit in a context of {}",
                pos + tokens.len(),
                cache.n_ctx
            );
        }
        let mut x = self.embed.rows(tokens)?;
        if let Some(s) = self.embed_scale {
            x = (x * s)?;
        }
        let ple = match &self.per_layer {
            Some(p) => Some(p.inputs(tokens, &x)?),
            None => None,
        };
        // Chunk K/V of layers that shared-KV layers read, stored after the whole pass.
        let mut stash: Vec<Option<ChunkKv>> = (0..self.blocks.len()).map(|_| None).collect();
        let mut streams = match &self.altup {
            Some(a) => a.spread(&x)?,
            None => Vec::new(),
        };
        for (il, block) in self.blocks.iter().enumerate() {
            let input = match &ple {
                Some(p) => Some(p.narrow(1, il, 1)?.squeeze(1)?),
                None => None,
            };
            let (before, after) = stash.split_at_mut(il);
            let kv = match self.arch.kv_source(il) {
                Some(src) => KvAccess::Shared(
                    &cache.layers[src],
                    before[src]
                        .as_ref()
                        .context("shared-KV layer before its source")?,
                ),
                None if self.kv_sources[il] => KvAccess::Source(&cache.layers[il], &mut after[0]),
                None => KvAccess::Own(&mut cache.layers[il]),
            };
            let step = || -> Result<()> {
                match block {
                    Block::Llama(b) => x = b.forward(&x, own_cache(kv)?, pos)?,
                    Block::Gemma(b) => x = b.forward(&x, own_cache(kv)?, pos)?,
                    Block::Gemma4(b) => x = b.forward(&x, input.as_ref(), kv, pos)?,
                    Block::Gemma3n(b) => {
                        let input = input.context("gemma3n needs per-layer inputs")?;
                        streams = b.forward(&streams, &input, kv, pos)?;
                    }
                }
                Ok(())
            };
            step().with_context(|| format!("forward pass, layer {il}"))?;
        }
        if let Some(a) = &self.altup {
            x = a.merge(&streams)?;
        }
        for (il, kv) in stash.into_iter().enumerate() {
            if let Some(chunk) = kv {
                chunk.store(&mut cache.layers[il], pos)?;
            }
        }
        cache.len = pos + tokens.len();
        let first = match which {
            Logits::Last => tokens.len() - 1,
            Logits::All => 0,
            Logits::From(i) => i.min(tokens.len() - 1),
        };
        if first > 0 {
            x = x.narrow(0, first, tokens.len() - first)?;
        }
        let mut logits = self.head.forward(&self.norm.forward(&x)?)?;
        if let Some(cap) = self.arch.final_logit_softcap {
            logits = ((logits / cap as f64)?.tanh()? * cap as f64)?;
        }
        Ok(logits)
    }
}

/// The cache of a layer that owns one (architectures without shared KV).
fn own_cache(kv: KvAccess<'_>) -> Result<&mut crate::kv::LayerCache> {
    match kv {
        KvAccess::Own(c) => Ok(c),
        _ => bail!("this architecture has no shared-KV layers"),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

//! Models: geometry (`arch`), loaders (`gguf`, `safetensors`) and forward passes (`llama`, `gemma`).

pub mod arch;
pub mod attn;
pub mod gemma;
pub mod gguf;
pub mod layers;
pub mod llama;
pub mod quant;
pub mod safetensors;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use crate::kv::KvCache;
use arch::{ArchKind, ModelArchitecture};
use gemma::GemmaBlock;
use layers::{Embedding, Linear, RmsNorm, Source};
use llama::LlamaBlock;

enum Block {
    Llama(LlamaBlock),
    Gemma(GemmaBlock),
}

pub struct Model {
    pub arch: ModelArchitecture,
    pub source: Arc<Source>,
    pub device: Device,
    embed: Embedding,
    embed_scale: Option<f64>,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
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
    /// Opens a GGUF file or an HF directory (config.json + *.safetensors).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
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
        let embed_scale = (arch.kind == ArchKind::Gemma3).then(|| {
            let s = (arch.hidden as f32).sqrt();
            (if arch.bf16_buffers {
                layers::round_bf16(s)
            } else {
                s
            }) as f64
        });
        Ok(Self {
            arch,
            source: Arc::new(source),
            device: device.clone(),
            embed,
            embed_scale,
            blocks,
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
        for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = match block {
                Block::Llama(b) => b.forward(&x, layer, pos),
                Block::Gemma(b) => b.forward(&x, layer, pos),
            }
            .context("forward pass")?;
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

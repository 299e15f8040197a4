//! GGUF files: memory-mapped, metadata parsed by candle, tensors read straight from the map.

use std::fs::File;
use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use memmap2::Mmap;

use crate::arch::{ArchKind, LayerGeometry, ModelArchitecture, RopeStyle};

pub struct GgufFile {
    pub mmap: Mmap,
    pub content: Content,
}

/// A tensor's bytes inside the map, with its type and shape (candle order: rows first).
pub struct RawTensor<'a> {
    pub data: &'a [u8],
    pub dtype: GgmlDType,
    /// `[rows, cols]` for matrices, `[n]` for vectors.
    pub dims: Vec<usize>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is opened read-only; a model file changing under a running server is unsupported.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        if mmap.len() < 4 || &mmap[..4] != b"GGUF" {
            bail!("{} is not a GGUF file (bad magic)", path.display());
        }
        let content = Content::read(&mut Cursor::new(&mmap[..]))
            .map_err(|e| anyhow::anyhow!("{}: malformed GGUF header: {e}", path.display()))?;
        let gguf = Self { mmap, content };
        for (name, info) in &gguf.content.tensor_infos {
            let end = gguf.tensor_range(name, info)?.end;
            if end > gguf.mmap.len() {
                bail!(
                    "{}: truncated file: tensor `{name}` ends at byte {end} but the file has {} bytes",
                    path.display(),
                    gguf.mmap.len()
                );
            }
        }
        Ok(gguf)
    }

    fn tensor_range(
        &self,
        name: &str,
        info: &candle_core::quantized::gguf_file::TensorInfo,
    ) -> Result<std::ops::Range<usize>> {
        let n = info.shape.elem_count();
        let bs = info.ggml_dtype.block_size();
        if !n.is_multiple_of(bs) {
            bail!("tensor `{name}`: {n} values is not a multiple of the block size {bs}");
        }
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        Ok(start..start + n / bs * info.ggml_dtype.type_size())
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    pub fn meta_u32(&self, key: &str) -> Option<u32> {
        self.meta(key).and_then(|v| match v {
            Value::U8(x) => Some(*x as u32),
            Value::U16(x) => Some(*x as u32),
            Value::U32(x) => Some(*x),
            Value::I32(x) => Some(*x as u32),
            Value::U64(x) => Some(*x as u32),
            Value::I64(x) => Some(*x as u32),
            _ => None,
        })
    }

    pub fn meta_f32(&self, key: &str) -> Option<f32> {
        self.meta(key).and_then(|v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }

    /// An array value's items through `f` (empty when absent or not an array).
    pub fn meta_array<T>(&self, key: &str, f: impl Fn(&Value) -> Option<T>) -> Vec<T> {
        self.meta(key)
            .and_then(|v| v.to_vec().ok())
            .map(|items| items.iter().filter_map(f).collect())
            .unwrap_or_default()
    }

    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        self.meta(key).and_then(|v| v.to_bool().ok())
    }

    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")
            .context("GGUF has no `general.architecture`")
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .with_context(|| format!("missing tensor `{name}` in GGUF"))?;
        let range = self.tensor_range(name, info)?;
        Ok(RawTensor {
            data: &self.mmap[range],
            dtype: info.ggml_dtype,
            dims: info.shape.dims().to_vec(),
        })
    }

    /// The tensor as a candle `QTensor` (rows first, as candle expects for matmul weights).
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let raw = self.raw(name)?;
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(raw.data), device, raw.dtype)?;
        Ok(QTensor::new(storage, raw.dims.as_slice())?)
    }

    /// Builds the geometry from `<arch>.*` metadata, llama.cpp's keys.
    pub fn architecture_geometry(&self) -> Result<ModelArchitecture> {
        let name = self.architecture()?.to_string();
        let (kind, rope_style) = match name.as_str() {
            "llama" | "mistral" | "granite" => (ArchKind::Llama, RopeStyle::Interleaved),
            "qwen2" | "qwen3" => (ArchKind::Llama, RopeStyle::Neox),
            "gemma3" => (ArchKind::Gemma3, RopeStyle::Neox),
            "gemma3n" => (ArchKind::Gemma3n, RopeStyle::Neox),
            "gemma4" => (ArchKind::Gemma4, RopeStyle::Neox),
            other => bail!(
                "unsupported architecture `{other}` (supported: llama, mistral, granite, qwen2, qwen3, gemma3, gemma3n, gemma4)"
            ),
        };
        let key = |k: &str| format!("{name}.{k}");
        let req = |k: &str| {
            self.meta_u32(&key(k))
                .map(|v| v as usize)
                .with_context(|| format!("GGUF metadata `{}` missing", key(k)))
        };
        let n_layer = req("block_count")?;
        let hidden = req("embedding_length")?;
        // Gemma 3n / 4 store one feed-forward width per layer.
        let ffn_widths: Vec<usize> = self.meta_array(&key("feed_forward_length"), |v| {
            v.to_u32().ok().map(|x| x as usize)
        });
        let intermediate = match ffn_widths.iter().max() {
            Some(&w) => w,
            None => req("feed_forward_length")?,
        };
        let n_head = req("attention.head_count")?;
        let n_kv_head = self
            .meta_u32(&key("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_head);
        let head_dim = self
            .meta_u32(&key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(hidden / n_head.max(1));
        let vocab = match self.meta_u32(&key("vocab_size")) {
            Some(v) => v as usize,
            None => self
                .meta("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .context("GGUF has neither a vocab size nor a token list")?,
        };
        let rope_theta = self.meta_f32(&key("rope.freq_base")).unwrap_or(10000.0);
        let rms_eps = self
            .meta_f32(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6) as f64;
        let max_context = req("context_length").unwrap_or(4096);
        let mut attn_scale = 1.0 / (head_dim as f32).sqrt();
        // Gemma 3n / 4: which layers slide, as one bool per layer.
        let swa_layers: Vec<bool> = self
            .meta_array(&key("attention.sliding_window_pattern"), |v| {
                v.to_bool().ok()
            });
        let windows = if swa_layers.len() == n_layer {
            let w = req("attention.sliding_window")?;
            swa_layers.iter().map(|&s| s.then_some(w)).collect()
        } else if kind == ArchKind::Gemma3 {
            match self.meta_u32(&key("attention.sliding_window")) {
                Some(w) if w > 0 => {
                    let period = self
                        .meta_u32(&key("attention.sliding_window_pattern"))
                        .unwrap_or(6) as usize;
                    ModelArchitecture::sliding_pattern(n_layer, period, w as usize)
                }
                _ => vec![None; n_layer],
            }
        } else {
            vec![None; n_layer]
        };
        // llama.cpp: gemma3 sliding layers use 10k unless the file says otherwise; 27B scales by hidden/heads.
        let swa_theta = self.meta_f32(&key("rope.freq_base_swa")).unwrap_or(10000.0);
        if kind == ArchKind::Gemma3 && n_layer == 62 {
            attn_scale = 1.0 / ((hidden / n_head) as f32).sqrt();
        }
        let swa_head_dim = self
            .meta_u32(&key("attention.key_length_swa"))
            .map_or(head_dim, |v| v as usize);
        let rotated = self
            .meta_u32(&key("rope.dimension_count"))
            .map_or(head_dim, |v| v as usize);
        let gemma_n = matches!(kind, ArchKind::Gemma3n | ArchKind::Gemma4);
        if gemma_n {
            attn_scale = 1.0;
        }
        let layers = windows
            .into_iter()
            .map(|w| LayerGeometry {
                n_head,
                n_kv_head,
                head_dim: if w.is_some() { swa_head_dim } else { head_dim },
                sliding_window: w,
                rope_theta: if w.is_some() { swa_theta } else { rope_theta },
                rope_partial: if w.is_some() {
                    1.0
                } else {
                    rotated as f32 / head_dim as f32
                },
            })
            .collect();
        let shared = self
            .meta_u32(&key("attention.shared_kv_layers"))
            .unwrap_or(0) as usize;
        let ple_dim = self
            .meta_u32(&key("embedding_length_per_layer_input"))
            .unwrap_or(0) as usize;
        let ple_vocab = self
            .content
            .tensor_infos
            .get("per_layer_token_embd.weight")
            .map_or(0, |t| t.shape.dims()[0]);
        // llama.cpp stores the normal quantile k of each layer's target sparsity.
        let sparsity = self
            .meta_array(&key("activation_sparsity_scale"), |v| v.to_f32().ok())
            .into_iter()
            .map(|k| {
                if k > 0.0 {
                    (0.5 * (1.0 + libm::erf(k as f64 / std::f64::consts::SQRT_2))) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let extras = crate::arch::ArchExtras {
            kv_shared_from: (shared > 0).then(|| n_layer.saturating_sub(shared)),
            ple: (ple_dim > 0).then_some(crate::arch::PleDims {
                dim: ple_dim,
                vocab: ple_vocab,
            }),
            double_wide_mlp: ffn_widths.iter().any(|&w| w > ffn_widths[0]),
            altup_streams: self.meta_u32(&key("altup.num_inputs")).unwrap_or(0) as usize,
            activation_sparsity: sparsity,
            ..Default::default()
        };
        let arch = ModelArchitecture {
            kind,
            rope_style,
            n_layer,
            hidden,
            intermediate,
            vocab,
            rms_eps,
            max_context,
            attn_scale,
            qkv_bias: self.has_tensor("blk.0.attn_q.bias"),
            qk_norm: self.has_tensor("blk.0.attn_q_norm.weight"),
            tied_embeddings: !self.has_tensor("output.weight"),
            final_logit_softcap: self
                .meta_f32(&key("final_logit_softcapping"))
                .filter(|c| *c > 0.0),
            // Files we converted from a bf16 HF checkpoint say so: transformers runs that
            // checkpoint with its computed buffers rounded to bf16.
            bf16_buffers: self.meta_str("dhurandhar.hf_dtype") == Some("bfloat16"),
            layers,
            name,
            extras,
        };
        arch.validate()?;
        Ok(arch)
    }
}

//! Hugging Face model directories: config.json + *.safetensors (mmap'd) + tokenizer.json.
//!
//! Tensors are looked up by their llama.cpp (GGUF) names so one forward pass serves both sources;
//! the HF → GGUF renaming and gemma's `1 + w` norm convention live here, as in llama.cpp's converter.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::embedding::{Embedding, RowBytes, RowFormat};
use crate::arch::{
    ArchExtras, ArchKind, LayerGeometry, ModelArchitecture, PleDims, RopeStyle, cfg_usize,
};

pub struct HfDir {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    maps: Vec<Arc<Mmap>>,
    /// tensor name → index into `maps`
    index: HashMap<String, usize>,
    kind: ArchKind,
}

impl HfDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("cannot read {}", cfg_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                // HF shards are `model.safetensors` or `model-0000i-of-0000n.safetensors`.
                p.extension().is_some_and(|e| e == "safetensors")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("model"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{}: no *.safetensors files", dir.display());
        }
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path)?;
            // SAFETY: read-only map of a model file that is not modified while loaded.
            let mmap = unsafe { Mmap::map(&file) }?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: malformed safetensors: {e}", path.display()))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            maps.push(Arc::new(mmap));
        }
        let kind = match model_type(&config)? {
            "llama" | "mistral" | "qwen2" | "qwen3" | "granite" => ArchKind::Llama,
            "gemma3" | "gemma3_text" => ArchKind::Gemma3,
            "gemma4_text" => ArchKind::Gemma4,
            "gemma3n_text" => ArchKind::Gemma3n,
            other => bail!(
                "unsupported architecture `{other}` (supported: llama, mistral, qwen2, qwen3, gemma3, gemma4_text)"
            ),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            maps,
            index,
            kind,
        })
    }

    /// Values in every tensor of the checkpoint.
    pub fn n_params(&self) -> u64 {
        self.maps
            .iter()
            .filter_map(|m| SafeTensors::deserialize(m).ok())
            .map(|st| {
                st.tensors()
                    .iter()
                    .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
                    .sum::<u64>()
            })
            .sum()
    }

    pub fn has_tensor(&self, gguf_name: &str) -> bool {
        self.index.contains_key(&self.hf_name(gguf_name))
    }

    /// The tensor as f32 on `device`, looked up by its GGUF name.
    pub fn tensor(&self, gguf_name: &str, device: &Device) -> Result<Tensor> {
        let hf = self.hf_name(gguf_name);
        let i = *self
            .index
            .get(&hf)
            .with_context(|| format!("missing tensor `{hf}` in {}", self.dir.display()))?;
        let st = SafeTensors::deserialize(&self.maps[i])?;
        let view = st.tensor(&hf)?;
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => bail!("tensor `{hf}`: unsupported dtype {other:?} (f32, f16, bf16)"),
        };
        let mut t = Tensor::from_vec(values, view.shape(), device)?;
        if self.kind == ArchKind::Gemma3 && gguf_name.ends_with("norm.weight") {
            t = (t + 1.0)?;
        }
        Ok(t)
    }

    /// The checkpoint's tensor names (HF spelling).
    pub fn hf_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// A tensor's shape, by its HF name.
    pub fn shape(&self, hf: &str) -> Option<Vec<usize>> {
        let i = *self.index.get(hf)?;
        let st = SafeTensors::deserialize(&self.maps[i]).ok()?;
        Some(st.tensor(hf).ok()?.shape().to_vec())
    }

    pub fn kind(&self) -> ArchKind {
        self.kind
    }

    /// A 2-D table whose rows are read from the map on demand (f32, f16 or bf16).
    pub fn embedding(&self, gguf_name: &str, device: &Device) -> Result<Embedding> {
        let hf = self.hf_name(gguf_name);
        let i = *self
            .index
            .get(&hf)
            .with_context(|| format!("missing tensor `{hf}` in {}", self.dir.display()))?;
        let map = &self.maps[i];
        let st = SafeTensors::deserialize(map)?;
        let view = st.tensor(&hf)?;
        let &[rows, cols] = view.shape() else {
            bail!("`{hf}` is not a matrix");
        };
        let format = match view.dtype() {
            Dtype::F32 => RowFormat::F32,
            Dtype::F16 => RowFormat::F16,
            Dtype::BF16 => RowFormat::Bf16,
            other => bail!("tensor `{hf}`: unsupported dtype {other:?} (f32, f16, bf16)"),
        };
        let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
        Ok(Embedding::Rows {
            bytes: RowBytes::Map(map.clone()),
            offset,
            rows,
            cols,
            format,
            device: device.clone(),
        })
    }

    fn hf_name(&self, gguf_name: &str) -> String {
        hf_name(self.kind, gguf_name)
    }

    pub fn tokenizer_json(&self) -> Option<PathBuf> {
        let p = self.dir.join("tokenizer.json");
        p.exists().then_some(p)
    }

    pub fn architecture_geometry(&self) -> Result<ModelArchitecture> {
        let c = &self.config;
        let name = model_type(c)?.to_string();
        let n_layer = cfg_usize(c, "num_hidden_layers")?;
        let hidden = cfg_usize(c, "hidden_size")?;
        let n_head = cfg_usize(c, "num_attention_heads")?;
        let n_kv_head = cfg_usize(c, "num_key_value_heads").unwrap_or(n_head);
        let head_dim = cfg_usize(c, "head_dim").unwrap_or(hidden / n_head.max(1));
        let f = |k: &str| c.get(k).and_then(|v| v.as_f64());
        let theta_of = |layer_type: &str| -> f32 {
            let rp = c.get("rope_parameters");
            rp.and_then(|r| r.get(layer_type))
                .and_then(|r| r.get("rope_theta"))
                .or_else(|| rp.and_then(|r| r.get("rope_theta")))
                .and_then(|v| v.as_f64())
                .or_else(|| f("rope_theta"))
                .unwrap_or(10000.0) as f32
        };
        let window = cfg_usize(c, "sliding_window").ok();
        let layer_types: Option<Vec<String>> = c.get("layer_types").and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .map(|s| s.as_str().unwrap_or_default().to_string())
                    .collect()
            })
        });
        // Gemma 4: per-layer overrides (`per_layer_config` keyed by layer index, or
        // `global_head_dim` for full-attention layers) and proportional RoPE.
        let override_of = |il: usize, key: &str| {
            c.get("per_layer_config")
                .and_then(|p| p.get(il.to_string()))
                .and_then(|l| l.get(key))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        };
        let layers = (0..n_layer)
            .map(|il| {
                let sliding = layer_types
                    .as_ref()
                    .and_then(|t| t.get(il))
                    .is_some_and(|t| t == "sliding_attention");
                let sliding_window = if sliding { window } else { None };
                let layer_type = if sliding {
                    "sliding_attention"
                } else {
                    "full_attention"
                };
                let global_dim = (!sliding && self.kind == ArchKind::Gemma4)
                    .then(|| cfg_usize(c, "global_head_dim").ok())
                    .flatten();
                let rope = c.get("rope_parameters").and_then(|r| r.get(layer_type));
                let proportional = rope
                    .and_then(|r| r.get("rope_type"))
                    .and_then(|v| v.as_str())
                    == Some("proportional");
                LayerGeometry {
                    n_head,
                    n_kv_head: override_of(il, "num_key_value_heads").unwrap_or(n_kv_head),
                    head_dim: override_of(il, "head_dim")
                        .or(global_dim)
                        .unwrap_or(head_dim),
                    sliding_window,
                    rope_theta: theta_of(layer_type),
                    rope_partial: if proportional {
                        rope.and_then(|r| r.get("partial_rotary_factor"))
                            .and_then(|v| v.as_f64())
                            .unwrap_or(1.0) as f32
                    } else {
                        1.0
                    },
                }
            })
            .collect();
        let attn_scale = match f("query_pre_attn_scalar") {
            // Gemma 3n / 4 normalize q and k and do not scale the scores.
            _ if matches!(self.kind, ArchKind::Gemma4 | ArchKind::Gemma3n) => 1.0,
            Some(s) => 1.0 / (s as f32).sqrt(),
            None => 1.0 / (head_dim as f32).sqrt(),
        };
        let shared = cfg_usize(c, "num_kv_shared_layers").unwrap_or(0);
        let ple_dim = cfg_usize(c, "hidden_size_per_layer_input").unwrap_or(0);
        let extras = ArchExtras {
            kv_shared_from: (shared > 0).then(|| n_layer.saturating_sub(shared)),
            ple: (ple_dim > 0).then(|| PleDims {
                dim: ple_dim,
                vocab: cfg_usize(c, "vocab_size_per_layer_input").unwrap_or(0),
            }),
            double_wide_mlp: c.get("use_double_wide_mlp").and_then(|v| v.as_bool()) == Some(true),
            altup_streams: cfg_usize(c, "altup_num_inputs").unwrap_or(0),
            activation_sparsity: c
                .get("activation_sparsity_pattern")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
                .unwrap_or_default(),
            ..ArchExtras::default()
        };
        let arch = ModelArchitecture {
            kind: self.kind,
            rope_style: RopeStyle::Neox,
            n_layer,
            hidden,
            // Gemma 3n lists one width per layer.
            intermediate: match c.get("intermediate_size").and_then(|v| v.as_array()) {
                Some(widths) => {
                    widths.iter().filter_map(|w| w.as_u64()).max().unwrap_or(0) as usize
                }
                None => cfg_usize(c, "intermediate_size")?,
            },
            vocab: cfg_usize(c, "vocab_size")?,
            rms_eps: f("rms_norm_eps").unwrap_or(1e-6),
            max_context: cfg_usize(c, "max_position_embeddings").unwrap_or(4096),
            attn_scale,
            qkv_bias: self.has_tensor("blk.0.attn_q.bias"),
            qk_norm: self.has_tensor("blk.0.attn_q_norm.weight"),
            tied_embeddings: !self.has_tensor("output.weight"),
            final_logit_softcap: f("final_logit_softcapping").map(|v| v as f32),
            bf16_buffers: ["dtype", "torch_dtype"]
                .iter()
                .any(|k| c.get(*k).and_then(|v| v.as_str()) == Some("bfloat16")),
            layers,
            name,
            extras,
        };
        arch.validate()?;
        Ok(arch)
    }
}

fn model_type(cfg: &serde_json::Value) -> Result<&str> {
    cfg.get("model_type")
        .and_then(|v| v.as_str())
        .context("config.json: missing `model_type`")
}

/// Top-level tensors: GGUF (llama.cpp) stem ↔ HF module path.
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("per_layer_token_embd", "model.embed_tokens_per_layer"),
    ("per_layer_model_proj", "model.per_layer_model_projection"),
    ("per_layer_proj_norm", "model.per_layer_projection_norm"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
    ("altup_proj", "model.altup_projections"),
    ("altup_unembd_proj", "model.altup_unembed_projections"),
];

/// Per-block tensors: GGUF part ↔ HF module under `model.layers.N`.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("inp_gate", "per_layer_input_gate"),
    ("proj", "per_layer_projection"),
    ("post_norm", "post_per_layer_input_norm"),
    ("altup_correct_coef", "altup.correction_coefs"),
    ("altup_predict_coef", "altup.prediction_coefs"),
    ("altup_router", "altup.modality_router"),
    ("altup_router_norm", "altup.router_norm"),
    ("laurel_l", "laurel.linear_left"),
    ("laurel_r", "laurel.linear_right"),
    ("laurel_post_norm", "laurel.post_laurel_norm"),
];

/// Bare parameters (no `.weight` in HF): Gemma 4's per-layer output scale, Gemma 3n's AltUp
/// output scale.
const BARE_BLOCK_NAMES: &[(&str, &str)] = &[
    ("layer_output_scale", "layer_scalar"),
    ("altup_correct_scale", "altup.correct_output_scale"),
];

/// The FFN norm: gemma's pre-feed-forward norm, llama's post-attention norm.
fn ffn_norm_hf(kind: ArchKind) -> &'static str {
    match kind {
        ArchKind::Llama => "post_attention_layernorm",
        _ => "pre_feedforward_layernorm",
    }
}

/// The HF name of a tensor we ask for by its GGUF name (`blk.3.attn_q.weight`).
pub fn hf_name(kind: ArchKind, gguf_name: &str) -> String {
    let (stem, suffix) = gguf_name.rsplit_once('.').unwrap_or((gguf_name, "weight"));
    if let Some((il, part)) = stem.strip_prefix("blk.").and_then(|s| s.split_once('.')) {
        if let Some((_, hf)) = BARE_BLOCK_NAMES.iter().find(|(g, _)| *g == part) {
            return format!("model.layers.{il}.{hf}");
        }
        let hf = match part {
            "ffn_norm" => ffn_norm_hf(kind),
            _ => BLOCK_NAMES
                .iter()
                .find(|(g, _)| *g == part)
                .map_or(part, |(_, h)| h),
        };
        return format!("model.layers.{il}.{hf}.{suffix}");
    }
    // Stacked AltUp projections are asked for one by one: `altup_proj.2.weight`.
    let (base, index) = match stem.rsplit_once('.') {
        Some((b, i)) if i.parse::<usize>().is_ok() => (b, Some(i)),
        _ => (stem, None),
    };
    let hf = GLOBAL_NAMES
        .iter()
        .find(|(g, _)| *g == base)
        .map_or(base, |(_, h)| h);
    match index {
        Some(i) => format!("{hf}.{i}.{suffix}"),
        None => format!("{hf}.{suffix}"),
    }
}

/// The GGUF name of an HF tensor, for the converter; None for tensors GGUF leaves out.
pub fn gguf_name(kind: ArchKind, hf: &str) -> Option<String> {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (il, module) = rest.split_once('.')?;
        if let Some((g, _)) = BARE_BLOCK_NAMES.iter().find(|(_, h)| *h == module) {
            return Some(format!("blk.{il}.{g}.weight"));
        }
        let (path, suffix) = module.rsplit_once('.')?;
        let part = if path == ffn_norm_hf(kind) {
            "ffn_norm"
        } else {
            BLOCK_NAMES.iter().find(|(_, h)| *h == path)?.0
        };
        return Some(format!("blk.{il}.{part}.{suffix}"));
    }
    let (path, suffix) = hf.rsplit_once('.')?;
    if let Some((base, i)) = path.rsplit_once('.')
        && i.parse::<usize>().is_ok()
    {
        let g = GLOBAL_NAMES.iter().find(|(_, h)| *h == base)?.0;
        return Some(format!("{g}.{i}.{suffix}"));
    }
    let g = GLOBAL_NAMES.iter().find(|(_, h)| *h == path)?.0;
    Some(format!("{g}.{suffix}"))
}

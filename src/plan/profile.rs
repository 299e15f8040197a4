//! Model profiles: `profiles/*.yaml` (built in) or any YAML file with the same fields, turned
//! into the `ModelArchitecture` the engine uses; GGUF files and HF directories are read for
//! their geometry without loading weights.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::arch::{
    ArchExtras, ArchKind, LayerGeometry, ModelArchitecture, MoeDims, PleDims, RopeStyle, SsmDims,
};

/// The built-in profiles, by slug.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "smollm2-135m",
        include_str!("../../profiles/smollm2-135m.yaml"),
    ),
    (
        "gemma3-270m",
        include_str!("../../profiles/gemma3-270m.yaml"),
    ),
    (
        "qwen2.5-0.5b",
        include_str!("../../profiles/qwen2.5-0.5b.yaml"),
    ),
    (
        "qwen2.5-1.5b",
        include_str!("../../profiles/qwen2.5-1.5b.yaml"),
    ),
    ("qwen2.5-3b", include_str!("../../profiles/qwen2.5-3b.yaml")),
    (
        "granite-3.3-2b",
        include_str!("../../profiles/granite-3.3-2b.yaml"),
    ),
    (
        "llama-3.2-1b",
        include_str!("../../profiles/llama-3.2-1b.yaml"),
    ),
    (
        "llama-3.2-3b",
        include_str!("../../profiles/llama-3.2-3b.yaml"),
    ),
    ("gemma4-e2b", include_str!("../../profiles/gemma4-e2b.yaml")),
    ("gemma4-e4b", include_str!("../../profiles/gemma4-e4b.yaml")),
    ("zaya1-8b", include_str!("../../profiles/zaya1-8b.yaml")),
];

/// A profile as written in YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Head dim (and KV heads) of global layers when they differ from sliding ones (Gemma 4).
    pub global_head_dim: Option<usize>,
    pub global_kv_heads: Option<usize>,
    pub sliding_window: Option<usize>,
    /// Every n-th layer (1-based) is global, the others slide; absent: all global (or, with a
    /// sliding window and no pattern, all sliding).
    pub global_every: Option<usize>,
    #[serde(default)]
    pub kv_shared_layers: usize,
    #[serde(default)]
    pub double_wide_mlp: bool,
    pub ple: Option<PleYaml>,
    pub moe: Option<MoeYaml>,
    pub ssm: Option<SsmYaml>,
    #[serde(default)]
    pub qkv_bias: bool,
    #[serde(default = "yes")]
    pub tied_embeddings: bool,
    pub max_context: usize,
    /// Bits per weight of the checkpoint being planned (4.5 ≈ Q4_0/Q4_K with scales).
    pub weight_bits: f64,
    #[serde(default)]
    pub vision_params: u64,
    #[serde(default)]
    pub audio_params: u64,
    pub runtime_overhead_mb: f64,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PleYaml {
    pub dim: usize,
    pub vocab: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeYaml {
    pub experts: usize,
    pub experts_used: usize,
    pub expert_intermediate: usize,
    #[serde(default)]
    pub shared_experts: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsmYaml {
    pub layers: Vec<usize>,
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub n_heads: usize,
    #[serde(default = "one")]
    pub n_groups: usize,
}

fn one() -> usize {
    1
}

/// What `plan` knows about a model: its geometry plus how it is stored.
#[derive(Debug, Clone)]
pub struct PlanModel {
    pub name: String,
    pub arch: ModelArchitecture,
    /// Bits per weight (from the profile, or the file's bytes over its parameters).
    pub weight_bits: f64,
    /// Actual file bytes when planning a file (weights as stored).
    pub file_bytes: Option<u64>,
    pub runtime_overhead_mb: f64,
}

impl ProfileFile {
    pub fn parse(yaml: &str) -> Result<Self> {
        serde_yaml::from_str(yaml).context("profile YAML")
    }

    pub fn into_model(self) -> Result<PlanModel> {
        if self.layers == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!("profile {}: bad layer/head counts", self.name);
        }
        let layers = (0..self.layers)
            .map(|il| {
                let global = match (self.sliding_window, self.global_every) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(_), Some(n)) => n > 0 && (il + 1) % n == 0,
                };
                LayerGeometry {
                    n_head: self.heads,
                    n_kv_head: if global {
                        self.global_kv_heads.unwrap_or(self.kv_heads)
                    } else {
                        self.kv_heads
                    },
                    head_dim: if global {
                        self.global_head_dim.unwrap_or(self.head_dim)
                    } else {
                        self.head_dim
                    },
                    sliding_window: if global { None } else { self.sliding_window },
                    rope_theta: 10_000.0,
                    rope_partial: 1.0,
                }
            })
            .collect();
        let arch = ModelArchitecture {
            name: self.name.clone(),
            kind: ArchKind::Llama,
            n_layer: self.layers,
            hidden: self.hidden,
            intermediate: self.intermediate,
            vocab: self.vocab,
            rms_eps: 1e-6,
            rope_style: RopeStyle::Neox,
            max_context: self.max_context,
            attn_scale: 1.0 / (self.head_dim as f32).sqrt(),
            qkv_bias: self.qkv_bias,
            qk_norm: false,
            tied_embeddings: self.tied_embeddings,
            final_logit_softcap: None,
            bf16_buffers: false,
            layers,
            extras: ArchExtras {
                kv_shared_from: (self.kv_shared_layers > 0)
                    .then(|| self.layers.saturating_sub(self.kv_shared_layers)),
                ple: self.ple.map(|p| PleDims {
                    dim: p.dim,
                    vocab: p.vocab,
                }),
                moe: self.moe.map(|m| MoeDims {
                    experts: m.experts,
                    experts_used: m.experts_used,
                    expert_intermediate: m.expert_intermediate,
                    shared_experts: m.shared_experts,
                }),
                ssm: self.ssm.map(|s| SsmDims {
                    layers: s.layers,
                    d_inner: s.d_inner,
                    d_state: s.d_state,
                    d_conv: s.d_conv,
                    n_heads: s.n_heads,
                    n_groups: s.n_groups,
                }),
                double_wide_mlp: self.double_wide_mlp,
                vision_params: self.vision_params,
                audio_params: self.audio_params,
                ..ArchExtras::default()
            },
        };
        arch.validate()?;
        Ok(PlanModel {
            name: self.name,
            arch,
            weight_bits: self.weight_bits,
            file_bytes: None,
            runtime_overhead_mb: self.runtime_overhead_mb,
        })
    }
}

/// A built-in slug, a YAML profile, a GGUF file or an HF directory.
pub fn resolve(model: &str) -> Result<PlanModel> {
    if let Some((_, yaml)) = BUILTIN.iter().find(|(slug, _)| *slug == model) {
        return ProfileFile::parse(yaml)?.into_model();
    }
    let path = Path::new(model);
    if !path.exists() {
        let slugs: Vec<&str> = BUILTIN.iter().map(|(s, _)| *s).collect();
        bail!(
            "`{model}` is neither a file nor a built-in profile ({})",
            slugs.join(", ")
        );
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "yaml" | "yml") {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return ProfileFile::parse(&text)
            .with_context(|| path.display().to_string())?
            .into_model();
    }
    from_model_file(path)
}

/// Geometry and stored size of a GGUF file or HF directory, weights left unread.
fn from_model_file(path: &Path) -> Result<PlanModel> {
    use crate::model::{gguf::GgufFile, safetensors::HfDir};
    let (arch, params, bytes) = if path.is_dir() {
        let hf = HfDir::open(path)?;
        let bytes = std::fs::read_dir(path)?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        (hf.architecture_geometry()?, hf.n_params(), bytes)
    } else {
        let g = GgufFile::open(path)?;
        let params = g
            .content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum();
        (g.architecture_geometry()?, params, g.mmap.len() as u64)
    };
    Ok(PlanModel {
        name: path.file_name().map_or_else(
            || path.display().to_string(),
            |f| f.to_string_lossy().into(),
        ),
        arch,
        weight_bits: bytes as f64 * 8.0 / params.max(1) as f64,
        file_bytes: Some(bytes),
        runtime_overhead_mb: 150.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_parses_and_validates() {
        for (slug, yaml) in BUILTIN {
            let m = ProfileFile::parse(yaml)
                .and_then(ProfileFile::into_model)
                .unwrap_or_else(|e| panic!("{slug}: {e:#}"));
            assert_eq!(&m.name, slug);
        }
    }

    #[test]
    fn gemma4_e2b_layers_follow_the_published_config() {
        let m = resolve("gemma4-e2b").unwrap();
        let a = &m.arch;
        let globals: Vec<usize> = (0..a.n_layer)
            .filter(|&il| a.layers[il].sliding_window.is_none())
            .collect();
        assert_eq!(globals, vec![4, 9, 14, 19, 24, 29, 34]);
        assert_eq!(a.layers[4].head_dim, 512);
        assert_eq!((0..35).filter(|&il| a.stores_kv(il)).count(), 15);
    }

    #[test]
    fn published_parameter_totals() {
        // Gemma 4 E2B: "2.3B effective, 5.1B with embeddings" (encoders included); ZAYA1-8B:
        // 8.4B in all.
        let e2b = resolve("gemma4-e2b").unwrap().arch.param_counts();
        assert!((e2b.decoder as f64 / 2.3e9 - 1.0).abs() < 0.03, "{e2b:?}");
        let total = (e2b.decoder + e2b.ple + e2b.vision + e2b.audio) as f64;
        assert!((total / 5.1e9 - 1.0).abs() < 0.03, "{total}");
        let zaya = resolve("zaya1-8b").unwrap().arch.param_counts();
        assert!((zaya.decoder as f64 / 8.4e9 - 1.0).abs() < 0.03, "{zaya:?}");
    }
}

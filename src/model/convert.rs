//! HF safetensors → GGUF with llama.cpp's tensor names and metadata keys (f32 tensors), so a
//! checkpoint can be checked through the GGUF loader. Gemma 3n keys follow llama.cpp's
//! converter; Gemma 4's per-layer head dims and partial RoPE use `attention.key_length_swa` and
//! `rope.dimension_count` in the same scheme.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::safetensors::{HfDir, gguf_name};
use crate::arch::ArchKind;

/// Writes `dir` (config.json + *.safetensors) as one GGUF file at `out`.
pub fn hf_to_gguf(dir: &Path, out: &Path) -> Result<()> {
    let hf = HfDir::open(dir)?;
    let a = hf.architecture_geometry()?;
    let arch = match a.kind {
        ArchKind::Gemma3n => "gemma3n".to_string(),
        ArchKind::Gemma4 => "gemma4".to_string(),
        ArchKind::Gemma3 => "gemma3".to_string(),
        ArchKind::Llama => a.name.clone(),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let global = a.layers.iter().find(|l| l.sliding_window.is_none());
    let sliding = a.layers.iter().find(|l| l.sliding_window.is_some());
    let u32v = |x: usize| Value::U32(x as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.clone())),
        (
            "dhurandhar.hf_dtype".into(),
            Value::String(hf_dtype(&hf.config)),
        ),
        (key("block_count"), u32v(a.n_layer)),
        (key("context_length"), u32v(a.max_context)),
        (key("embedding_length"), u32v(a.hidden)),
        (key("vocab_size"), u32v(a.vocab)),
        (key("attention.head_count"), u32v(a.layers[0].n_head)),
        (key("attention.head_count_kv"), u32v(a.layers[0].n_kv_head)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(a.rms_eps as f32),
        ),
    ];
    let mut ffn = Vec::new();
    for il in 0..a.n_layer {
        let name = super::safetensors::hf_name(a.kind, &format!("blk.{il}.ffn_gate.weight"));
        let shape = hf.shape(&name).with_context(|| format!("{name} missing"))?;
        ffn.push(u32v(shape[0]));
    }
    meta.push((key("feed_forward_length"), Value::Array(ffn)));
    if let Some(g) = global {
        meta.push((key("attention.key_length"), u32v(g.head_dim)));
        meta.push((key("attention.value_length"), u32v(g.head_dim)));
        meta.push((key("rope.freq_base"), Value::F32(g.rope_theta)));
        let rotated = (g.rope_partial * g.head_dim as f32).round() as usize;
        meta.push((key("rope.dimension_count"), u32v(rotated)));
    }
    if let Some(s) = sliding {
        meta.push((key("attention.key_length_swa"), u32v(s.head_dim)));
        meta.push((key("attention.value_length_swa"), u32v(s.head_dim)));
        meta.push((key("rope.freq_base_swa"), Value::F32(s.rope_theta)));
        meta.push((
            key("attention.sliding_window"),
            u32v(s.sliding_window.unwrap_or(0)),
        ));
        let pattern = a
            .layers
            .iter()
            .map(|l| Value::Bool(l.sliding_window.is_some()))
            .collect();
        meta.push((
            key("attention.sliding_window_pattern"),
            Value::Array(pattern),
        ));
    }
    if let Some(cap) = a.final_logit_softcap {
        meta.push((key("final_logit_softcapping"), Value::F32(cap)));
    }
    let x = &a.extras;
    if let Some(from) = x.kv_shared_from {
        meta.push((key("attention.shared_kv_layers"), u32v(a.n_layer - from)));
    }
    if let Some(p) = &x.ple {
        meta.push((key("embedding_length_per_layer_input"), u32v(p.dim)));
    }
    if x.altup_streams > 0 {
        meta.push((key("altup.num_inputs"), u32v(x.altup_streams)));
        meta.push((key("altup.active_idx"), u32v(0)));
        let ks = x
            .activation_sparsity
            .iter()
            .map(|&p| {
                let k = if p > 0.0 {
                    super::layers::normal_quantile(p as f64) as f32
                } else {
                    0.0
                };
                Value::F32(k)
            })
            .collect();
        meta.push((key("activation_sparsity_scale"), Value::Array(ks)));
    }

    let cpu = Device::Cpu;
    let mut tensors: BTreeMap<String, QTensor> = BTreeMap::new();
    let mut stacks: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    for name in hf.hf_names() {
        let Some(g) = gguf_name(a.kind, name) else {
            continue;
        };
        let mut t = hf.tensor(&g, &cpu)?;
        // llama.cpp's llama files pair RoPE dimensions as neighbours: its converter permutes
        // the rows of q and k from HF's half-split order, and so do we.
        let interleaved = matches!(arch.as_str(), "llama" | "mistral" | "granite");
        if interleaved && (g.ends_with("attn_q.weight") || g.ends_with("attn_k.weight")) {
            let heads = if g.ends_with("attn_q.weight") {
                a.layers[0].n_head
            } else {
                a.layers[0].n_kv_head
            };
            let (rows, cols) = t.dims2()?;
            t = t
                .reshape((heads, 2, rows / heads / 2, cols))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((rows, cols))?;
        }
        // llama.cpp stacks the AltUp projections: `altup_proj.{i}.weight` → `altup_proj.weight`.
        let parts: Vec<&str> = g.split('.').collect();
        if let [base, i, "weight"] = parts[..]
            && let Ok(i) = i.parse::<usize>()
        {
            stacks
                .entry(format!("{base}.weight"))
                .or_default()
                .push((i, t));
            continue;
        }
        tensors.insert(g, QTensor::quantize(&t, GgmlDType::F32)?);
    }
    for (name, mut parts) in stacks {
        parts.sort_by_key(|(i, _)| *i);
        let ts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
        tensors.insert(
            name,
            QTensor::quantize(&Tensor::stack(&ts, 0)?, GgmlDType::F32)?,
        );
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f =
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

fn hf_dtype(cfg: &serde_json::Value) -> String {
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(|v| v.as_str()))
        .unwrap_or("float32")
        .to_string()
}

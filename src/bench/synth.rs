//! `dh-server synth`: random-weight llama GGUFs with real models' shapes, for speed runs where
//! the real file cannot travel (the GPU machine takes 64 MiB per call). Weights are N(0, 0.02²),
//! quantized with candle's quantizer the way llama-quantize lays out Q4_K_M or Q8_0, and
//! written with candle's GGUF writer; the vocabulary is placeholder tokens, so llama.cpp loads
//! the same file. Text from such a model is noise: it measures speed and memory only.

use std::io::BufWriter;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Llama shapes (hidden, FFN, heads, KV heads, layers, vocab, context, RoPE base).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_layer: usize,
    pub vocab: usize,
    pub ctx: u32,
    pub rope_base: f32,
}

pub const SHAPES: &[Shape] = &[
    // Llama 3.1 8B
    Shape {
        name: "llama-8b",
        hidden: 4096,
        ffn: 14336,
        n_head: 32,
        n_kv_head: 8,
        n_layer: 32,
        vocab: 128256,
        ctx: 131072,
        rope_base: 500000.0,
    },
    // Llama 3.2 1B
    Shape {
        name: "llama-1b",
        hidden: 2048,
        ffn: 8192,
        n_head: 32,
        n_kv_head: 8,
        n_layer: 16,
        vocab: 128256,
        ctx: 131072,
        rope_base: 500000.0,
    },
];

/// Weight formats, as llama-quantize names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightType {
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q8_0")]
    Q8_0,
    F16,
}

impl WeightType {
    /// `general.file_type` (llama.cpp's LLAMA_FTYPE_*).
    fn file_type(self) -> u32 {
        match self {
            Self::Q4KM => 15,
            Self::Q8_0 => 7,
            Self::F16 => 1,
        }
    }

    /// The type of one weight: Q4_K_M keeps attn_v and ffn_down at Q6_K in the layers
    /// llama.cpp's `use_more_bits` picks, and the output at Q6_K.
    fn dtype(self, name: &str, layer: Option<usize>, n_layer: usize) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::F16 => GgmlDType::F16,
            Self::Q4KM => {
                let more_bits = |i: usize| {
                    i < n_layer / 8 || i >= 7 * n_layer / 8 || (i - n_layer / 8) % 3 == 2
                };
                match (name, layer) {
                    ("output", _) => GgmlDType::Q6K,
                    ("attn_v" | "ffn_down", Some(i)) if more_bits(i) => GgmlDType::Q6K,
                    _ => GgmlDType::Q4K,
                }
            }
        }
    }
}

pub fn shape(name: &str) -> Result<Shape> {
    match SHAPES.iter().find(|s| s.name == name) {
        Some(s) => Ok(*s),
        None => {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            bail!("unknown shape `{name}` (known: {})", names.join(", "))
        }
    }
}

/// Writes `shape` (with `n_layer` layers if given) at `ty` to `out`. Every layer holds the same
/// random matrices, so only one layer's worth is drawn and quantized: speed does not depend on
/// the values, and the file is written in about the time it takes to write it.
pub fn write(out: &Path, shape: Shape, n_layer: Option<usize>, ty: WeightType) -> Result<()> {
    let t0 = Instant::now();
    let n_layer = n_layer.unwrap_or(shape.n_layer);
    if n_layer == 0 {
        bail!("--layers must be at least 1");
    }
    let (e, ff, v) = (shape.hidden, shape.ffn, shape.vocab);
    let hd = e / shape.n_head;
    let kv = shape.n_kv_head * hd;
    let dev = Device::Cpu;
    let random = |rows: usize, cols: usize| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02, (rows, cols), &dev)?)
    };
    let quant = |t: &Tensor, dt: GgmlDType, what: &str| -> Result<QTensor> {
        tracing::info!("synth: quantizing {what} {:?} to {dt:?}", t.dims());
        QTensor::quantize(t, dt).with_context(|| format!("quantizing {what}"))
    };
    let ones = QTensor::quantize(
        &Tensor::ones(e, candle_core::DType::F32, &dev)?,
        GgmlDType::F32,
    )?;
    let embd = random(v, e)?;
    let token_embd = quant(&embd, ty.dtype("token_embd", None, n_layer), "token_embd")?;
    let output = quant(&embd, ty.dtype("output", None, n_layer), "output")?;
    drop(embd);
    // One draw per matrix; a second quantization where Q4_K_M mixes two types across layers.
    let mats = [
        ("attn_q", e, e),
        ("attn_k", kv, e),
        ("attn_v", kv, e),
        ("attn_output", e, e),
        ("ffn_gate", ff, e),
        ("ffn_up", ff, e),
        ("ffn_down", e, ff),
    ];
    let mut layer_q: Vec<(&str, Vec<(GgmlDType, QTensor)>)> = Vec::new();
    for (name, rows, cols) in mats {
        let w = random(rows, cols)?;
        let mut variants: Vec<(GgmlDType, QTensor)> = Vec::new();
        for il in 0..n_layer {
            let dt = ty.dtype(name, Some(il), n_layer);
            if !variants.iter().any(|(d, _)| *d == dt) {
                variants.push((dt, quant(&w, dt, name)?));
            }
        }
        layer_q.push((name, variants));
    }
    let mut names: Vec<String> = vec!["token_embd.weight".into(), "output_norm.weight".into()];
    let mut tensors: Vec<&QTensor> = vec![&token_embd, &ones];
    names.push("output.weight".into());
    tensors.push(&output);
    for il in 0..n_layer {
        for norm in ["attn_norm", "ffn_norm"] {
            names.push(format!("blk.{il}.{norm}.weight"));
            tensors.push(&ones);
        }
        for (name, variants) in &layer_q {
            let dt = ty.dtype(name, Some(il), n_layer);
            let q = &variants
                .iter()
                .find(|(d, _)| *d == dt)
                .expect("quantized above")
                .1;
            names.push(format!("blk.{il}.{name}.weight"));
            tensors.push(q);
        }
    }
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    // SentencePiece layout: control tokens, the 256 byte tokens llama.cpp looks up (`<0x0A>`),
    // then placeholders.
    let mut tokens = vec![s("<unk>"), s("<s>"), s("</s>")];
    tokens.extend((0..256).map(|b| s(&format!("<0x{b:02X}>"))));
    tokens.extend((tokens.len()..v).map(|i| s(&format!("t{i}"))));
    let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    types.extend((0..256).map(|_| Value::I32(6)));
    types.extend((types.len()..v).map(|_| Value::I32(1)));
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s(&format!("synthetic-{}", shape.name))),
        ("general.file_type", Value::U32(ty.file_type())),
        ("llama.context_length", Value::U32(shape.ctx)),
        ("llama.embedding_length", u(e)),
        ("llama.block_count", u(n_layer)),
        ("llama.feed_forward_length", u(ff)),
        ("llama.attention.head_count", u(shape.n_head)),
        ("llama.attention.head_count_kv", u(shape.n_kv_head)),
        ("llama.rope.freq_base", Value::F32(shape.rope_base)),
        ("llama.rope.dimension_count", u(hd)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        (
            "tokenizer.ggml.scores",
            Value::Array(vec![Value::F32(0.0); v]),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = names
        .iter()
        .map(String::as_str)
        .zip(tensors.iter().copied())
        .collect();
    tracing::info!(
        "synth: writing {} tensors to {}",
        tensor_refs.len(),
        out.display()
    );
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    gguf_file::write(&mut w, &meta_refs, &tensor_refs)
        .with_context(|| format!("writing {}", out.display()))?;
    let bytes = std::fs::metadata(out)?.len();
    tracing::info!(
        "synth: {} ({} layers, {ty:?}): {:.2} GiB in {:.1} s",
        shape.name,
        n_layer,
        bytes as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

//! Building blocks shared by the forward passes: weights from either source, linear layers,
//! the gated MLP, RMS norm and rotary embeddings (embeddings read row by row: `embedding.rs`).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{D, Device, Module, Tensor};

use super::gguf::GgufFile;
use super::quant::{Kind, QuantMatrix};
use super::safetensors::HfDir;

pub use super::activation::Activation;
pub use super::embedding::{Embedding, RowBytes, RowFormat};

/// Where the weights come from; tensors are named as llama.cpp names them.
pub enum Source {
    Gguf(Arc<GgufFile>),
    Hf(HfDir),
}

impl Source {
    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Gguf(g) => g.has_tensor(name),
            Source::Hf(h) => h.has_tensor(name),
        }
    }

    pub fn linear(&self, name: &str, device: &Device) -> Result<Linear> {
        let wname = format!("{name}.weight");
        let w = match self {
            Source::Gguf(g) => {
                let raw = g.raw(&wname)?;
                let own = Kind::of(raw.dtype).filter(|_| device.is_cpu() && raw.dims.len() == 2);
                if let Some(kind) = own {
                    let offset = raw.data.as_ptr() as usize - g.mmap.as_ptr() as usize;
                    let (rows, cols) = (raw.dims[0], raw.dims[1]);
                    Weight::Own(QuantMatrix::new(g.clone(), offset, kind, rows, cols)?)
                } else {
                    Weight::Candle(QMatMul::from_qtensor(g.qtensor(&wname, device)?)?)
                }
            }
            Source::Hf(h) => Weight::Candle(QMatMul::Tensor(h.tensor(&wname, device)?)),
        };
        let bias_name = format!("{name}.bias");
        let b = if self.has(&bias_name) {
            Some(self.vector(&bias_name, device)?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }

    /// `names`' weights joined by rows into one matrix on `device` (a GPU), with each one's
    /// rows, when they are GGUF matrices of one type and width and all or none have a bias.
    fn linear_joined(
        &self,
        names: &[&str],
        device: &Device,
    ) -> Result<Option<(Linear, Vec<usize>)>> {
        let Source::Gguf(g) = self else {
            return Ok(None);
        };
        if !device.is_cuda() || names.len() < 2 {
            return Ok(None);
        }
        let raws = names
            .iter()
            .map(|n| g.raw(&format!("{n}.weight")))
            .collect::<Result<Vec<_>>>()?;
        let biased = names
            .iter()
            .filter(|n| self.has(&format!("{n}.bias")))
            .count();
        let first = &raws[0];
        let agree = raws
            .iter()
            .all(|r| r.dims.len() == 2 && r.dtype == first.dtype && r.dims[1] == first.dims[1]);
        if !agree || (biased != 0 && biased != names.len()) {
            return Ok(None);
        }
        // Rows are whole blocks, so joining matrices by rows is joining their bytes.
        let bytes: Vec<u8> = raws.iter().flat_map(|r| r.data.iter().copied()).collect();
        let rows = raws.iter().map(|r| r.dims[0]).sum::<usize>();
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), device, first.dtype)?;
        let w = QMatMul::from_qtensor(QTensor::new(storage, (rows, first.dims[1]))?)?;
        let b = if biased > 0 {
            let bs = names
                .iter()
                .map(|n| self.vector(&format!("{n}.bias"), device))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        let widths = raws.iter().map(|r| r.dims[0]).collect();
        Ok(Some((
            Linear {
                w: Weight::Candle(w),
                b,
            },
            widths,
        )))
    }

    /// A 1-D f32 tensor (norm weights, biases).
    pub fn vector(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self {
            Source::Gguf(g) => Ok(g.qtensor(name, device)?.dequantize(device)?),
            Source::Hf(h) => h.tensor(name, device),
        }
    }

    pub fn embedding(&self, name: &str, device: &Device) -> Result<Embedding> {
        match self {
            Source::Gguf(g) => {
                let raw = g.raw(name)?;
                if raw.dims.len() != 2 {
                    bail!("`{name}` is not a matrix");
                }
                let (rows, cols) = (raw.dims[0], raw.dims[1]);
                let offset = raw.data.as_ptr() as usize - g.mmap.as_ptr() as usize;
                Ok(Embedding::Rows {
                    bytes: RowBytes::Gguf(g.clone()),
                    offset,
                    rows,
                    cols,
                    format: RowFormat::Ggml(raw.dtype),
                    device: device.clone(),
                })
            }
            Source::Hf(h) => h.embedding(name, device),
        }
    }
}

pub enum Weight {
    Candle(QMatMul),
    /// Types with our own kernels, read from the map.
    Own(QuantMatrix),
}

pub struct Linear {
    pub w: Weight,
    pub b: Option<Tensor>,
}

impl Linear {
    /// `x` [t, in] → [t, out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.w {
            #[cfg(feature = "cuda")]
            Weight::Candle(w) => match super::quant::device::forward(w, x)? {
                Some(y) => y,
                None => w.forward(x)?,
            },
            #[cfg(not(feature = "cuda"))]
            Weight::Candle(w) => w.forward(x)?,
            Weight::Own(w) => w.forward(x)?,
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Projections of one input. On a GPU, runs of consecutive weights of one GGUF type are joined
/// by rows (Q|K|V, gate|up): the input is quantized once and one matmul launched per run, where
/// a decode step is bound by launches.
pub struct Projections {
    runs: Vec<Run>,
}

enum Run {
    One(Linear),
    /// A joined matmul and the widths of the outputs it yields, in order.
    Joined(Linear, Vec<usize>),
}

impl Projections {
    pub fn load(src: &Source, names: &[&str], device: &Device) -> Result<Self> {
        let mut runs = Vec::new();
        let mut i = 0;
        'runs: while i < names.len() {
            // the longest run from i that joins, else i alone
            for j in (i + 2..=names.len()).rev() {
                if let Some((lin, widths)) = src.linear_joined(&names[i..j], device)? {
                    runs.push(Run::Joined(lin, widths));
                    i = j;
                    continue 'runs;
                }
            }
            runs.push(Run::One(src.linear(names[i], device)?));
            i += 1;
        }
        Ok(Self { runs })
    }

    /// `x` [t, in] → one [t, out_i] per name.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for run in &self.runs {
            match run {
                Run::One(lin) => out.push(lin.forward(x)?),
                Run::Joined(lin, widths) => {
                    let y = lin.forward(x)?;
                    let mut off = 0;
                    for &w in widths {
                        out.push(y.narrow(D::Minus1, off, w)?);
                        off += w;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The one matmul, when every weight joined.
    pub fn joined(&self) -> Option<&Linear> {
        match self.runs.as_slice() {
            [Run::Joined(lin, _)] => Some(lin),
            _ => None,
        }
    }
}

/// The gated feed-forward every supported architecture uses: `down(act(gate(x)) * up(x))`.
pub struct GatedMlp {
    /// gate and up
    gate_up: Projections,
    down: Linear,
    act: Activation,
    /// Gemma 3n's activation sparsity: gate values below mean + k·std (per token) are cut to
    /// zero before the activation, k the normal quantile of the target sparsity.
    sparsity_k: Option<f32>,
}

impl GatedMlp {
    pub fn load(src: &Source, il: usize, act: Activation, device: &Device) -> Result<Self> {
        let p = format!("blk.{il}");
        let (gate, up) = (format!("{p}.ffn_gate"), format!("{p}.ffn_up"));
        Ok(Self {
            gate_up: Projections::load(src, &[&gate, &up], device)?,
            down: src.linear(&format!("{p}.ffn_down"), device)?,
            act,
            sparsity_k: None,
        })
    }

    /// Keeps only gate values above the `sparsity` quantile of a normal fit per token.
    pub fn with_sparsity(mut self, sparsity: f32) -> Self {
        self.sparsity_k = (sparsity > 0.0).then(|| normal_quantile(sparsity as f64) as f32);
        self
    }

    /// `x` [t, hidden] → [t, hidden]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some(gate_up), None) = (self.gate_up.joined(), self.sparsity_k) {
            let gu = gate_up.forward(x)?;
            return self.down.forward(&super::fused::glu(&gu, self.act)?);
        }
        let [g, up]: [Tensor; 2] = self
            .gate_up
            .forward(x)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("gate and up projections expected"))?;
        let mut g = g;
        if let Some(k) = self.sparsity_k {
            let mean = g.mean_keepdim(1)?;
            let std = g.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?.sqrt()?;
            let cutoff = (mean + (std * k as f64)?)?;
            g = g.broadcast_sub(&cutoff)?.relu()?;
        }
        let g = match self.act {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::GeluTanh => g.gelu()?,
        };
        self.down.forward(&(g * up)?)
    }
}

/// The standard normal's quantile function (Newton on erf, to f64 precision).
pub fn normal_quantile(p: f64) -> f64 {
    let mut x = 0.0;
    for _ in 0..100 {
        let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let step = (cdf - p) / pdf;
        x -= step;
        if step.abs() < 1e-15 {
            break;
        }
    }
    x
}

pub struct RmsNorm {
    pub w: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    /// A norm without a learned scale (Gemma 4's v-norm).
    pub fn unit(dim: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(Self {
            w: Tensor::ones(dim, candle_core::DType::F32, device)?,
            eps: eps as f32,
        })
    }

    pub fn load(src: &Source, name: &str, eps: f64, device: &Device) -> Result<Self> {
        Ok(Self {
            w: src
                .vector(&format!("{name}.weight"), device)
                .with_context(|| format!("loading norm `{name}`"))?,
            eps: eps as f32,
        })
    }

    /// Normalizes the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.w, self.eps)?)
    }

    /// The residual sum `x + h` and its norm (one launch on a GPU).
    pub fn add_forward(&self, x: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return super::fused::add_rms_norm(x, h, &self.w, self.eps);
        }
        let s = (x + h)?;
        let n = self.forward(&s)?;
        Ok((s, n))
    }
}

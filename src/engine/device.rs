//! Where the forward pass runs: `--device cpu|cuda[:N]`, or llama.cpp's `-ngl N`.
//!
//! Offload is whole-model: weights and activations live on one device. llama.cpp users pass
//! `-ngl 99` for that; a partial count (some layers on the CPU) is refused at load rather than
//! silently running everything on the GPU.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        // llama.cpp spells CUDA devices CUDA0, CUDA1…
        let cuda = lower
            .strip_prefix("cuda:")
            .or_else(|| lower.strip_prefix("cuda"));
        match (lower.as_str(), cuda) {
            ("cpu", _) => Ok(Self::Cpu),
            (_, Some("")) => Ok(Self::Cuda(0)),
            (_, Some(n)) => {
                Ok(Self::Cuda(n.parse().with_context(|| {
                    format!("--device {s}: expected cpu, cuda or cuda:N")
                })?))
            }
            _ => bail!("--device {s}: expected cpu, cuda or cuda:N"),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// `--device` wins; else `-ngl N` with N > 0 means the first GPU.
    pub fn resolve(device: Option<Self>, n_gpu_layers: Option<usize>) -> Self {
        match (device, n_gpu_layers) {
            (Some(d), _) => d,
            (None, Some(n)) if n > 0 => Self::Cuda(0),
            _ => Self::Cpu,
        }
    }

    /// The candle device, with a clear error where this build or machine has none.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(n) => {
                let dev = Device::new_cuda(n)
                    .with_context(|| format!("opening cuda:{n} (is an NVIDIA driver loaded?)"))?;
                if let Device::Cuda(d) = &dev {
                    // cudarc records an event per buffer argument of every launch so buffers
                    // can cross streams; everything here runs on candle's one stream.
                    // SAFETY: no tensor or buffer of this device is used from another stream.
                    unsafe { d.disable_event_tracking() };
                }
                // Diagnosis knob: quantized matmuls with f32 activations (dequantize-mul-mat-vec)
                // instead of 8-bit-quantized ones (docs/CUDA.md).
                if std::env::var_os("DH_CUDA_FORCE_DMMV").is_some() {
                    candle_core::quantized::cuda::set_force_dmmv(true);
                }
                Ok(dev)
            }
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => bail!(
                "this dh-server was built without CUDA: rebuild with `--features cuda` (docs/CUDA.md)"
            ),
        }
    }

    /// llama-bench's `backend` column.
    pub fn backend(self) -> &'static str {
        match self {
            Self::Cpu => "CPU",
            Self::Cuda(_) => "CUDA",
        }
    }
}

/// Refuses `-ngl N` that would split the model between CPU and GPU.
pub fn check_gpu_layers(n_gpu_layers: Option<usize>, n_layer: usize) -> Result<()> {
    match n_gpu_layers {
        Some(n) if n > 0 && n < n_layer => bail!(
            "-ngl {n}: partial offload is not supported (this model has {n_layer} layers); \
             use -ngl 99 to run every layer on the GPU, or -ngl 0 for the CPU"
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_cpp_and_candle_spellings() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "CUDA1".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(1)
        );
        assert_eq!(
            "cuda:2".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(2)
        );
        assert!("metal".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn ngl_selects_the_gpu_and_refuses_partial_offload() {
        assert_eq!(DeviceChoice::resolve(None, Some(99)), DeviceChoice::Cuda(0));
        assert_eq!(DeviceChoice::resolve(None, Some(0)), DeviceChoice::Cpu);
        assert_eq!(
            DeviceChoice::resolve(Some(DeviceChoice::Cpu), Some(99)),
            DeviceChoice::Cpu
        );
        assert!(check_gpu_layers(Some(10), 30).is_err());
        assert!(check_gpu_layers(Some(30), 30).is_ok());
        assert!(check_gpu_layers(Some(99), 30).is_ok());
        assert!(check_gpu_layers(Some(0), 30).is_ok());
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceChoice::Cuda(0).open().is_err());
    }
}

//! Measuring: perplexity / KL-divergence (llama-perplexity's method) and benchmarks.

pub mod codecs;
#[cfg(feature = "cuda")]
pub mod gpu_parity;
pub mod kld;
pub mod needle;
pub mod perplexity;
pub mod speed;
pub mod synth;

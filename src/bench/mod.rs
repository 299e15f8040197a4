//! Measuring: perplexity / KL-divergence (llama-perplexity's method) and benchmarks.

pub mod codecs;
pub mod kld;
pub mod needle;
pub mod perplexity;
pub mod speed;
pub mod synth;

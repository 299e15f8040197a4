//! Measuring: perplexity / KL-divergence (llama-perplexity's method) and benchmarks.

pub mod kld;
pub mod perplexity;

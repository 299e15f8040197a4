//! Subcommands that write model files: `convert` (HF → GGUF) and `synth` (random weights with a
//! real model's shapes).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use dhurandhar::bench::synth;

#[derive(Args)]
pub struct ConvertArgs {
    /// HF directory (config.json + *.safetensors).
    pub input: PathBuf,
    /// GGUF file to write.
    pub output: PathBuf,
}

pub fn convert_main(a: &ConvertArgs) -> Result<()> {
    dhurandhar::model::convert::hf_to_gguf(&a.input, &a.output)?;
    tracing::info!("wrote {}", a.output.display());
    Ok(())
}

#[derive(Args)]
pub struct SynthArgs {
    /// GGUF file to write.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Model shape: llama-8b (Llama 3.1 8B) or llama-1b (Llama 3.2 1B).
    #[arg(long, default_value = "llama-8b")]
    pub shape: String,
    /// Weight format, as llama-quantize names it.
    #[arg(long = "type", value_enum, default_value = "q4_k_m")]
    pub weight_type: synth::WeightType,
    /// Fewer layers than the shape has (quick runs).
    #[arg(long)]
    pub layers: Option<usize>,
}

pub fn synth_main(a: &SynthArgs) -> Result<()> {
    synth::write(&a.output, synth::shape(&a.shape)?, a.layers, a.weight_type)
}

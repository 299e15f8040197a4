//! `dh-server serve` (the default subcommand): the OpenAI-compatible HTTP server.

use anyhow::Result;
use clap::Args;

use dhurandhar::kv::KvPolicy;
use dhurandhar::server::{ServeConfig, serve};

use super::args::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Parallel sequences (slots); -c is divided among them.
    #[arg(long = "parallel", default_value_t = 1)]
    pub parallel: usize,
    /// Requests that may wait for a free slot; beyond that the server answers 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "LLAMA_API_KEY")]
    pub api_key: Option<String>,
    /// Allow cross-origin requests from any origin.
    #[arg(long)]
    pub cors: bool,
    /// Largest request body accepted (bytes); larger gets 413.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Default max_tokens for requests that give none (-1: until the slot's context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// Model id reported by /v1/models (default: the model's file name).
    #[arg(short = 'a', long)]
    pub alias: Option<String>,
}

pub fn main(a: &ServeArgs) -> Result<()> {
    let engine = a.model.engine()?;
    let alias = a.alias.clone().unwrap_or_else(|| {
        let p = a.model.model.as_path();
        p.file_name().map_or_else(
            || p.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        )
    });
    let cfg = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        n_slots: a.parallel,
        queue: a.queue,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        cors: a.cors,
        max_body_bytes: a.max_body_bytes,
        sampling: a.sampling.params(),
        n_predict: usize::try_from(a.n_predict).ok(),
        alias,
        model_path: a.model.model.display().to_string(),
        chat_template_src: engine.tok.as_ref().and_then(|t| t.chat_template.clone()),
        cache_k: KvPolicy::summary(engine.policy.layers.iter().map(|l| l.0)),
        cache_v: KvPolicy::summary(engine.policy.layers.iter().map(|l| l.1)),
    };
    serve(engine, cfg)
}

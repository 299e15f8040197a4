//! dhurandhar: `dh-server`, a llama.cpp-style inference server whose KV cache is compressed.
//!
//! The library does the work; `main.rs` only parses flags. Modules follow the architecture:
//! `model` (geometry, loaders, forward passes), `kv` (the pluggable cache and attention),
//! `tokenizer`, `chat`, `engine` (generation), `bench` (perplexity, benchmarks).

pub mod arch;
pub mod bench;
pub mod chat;
pub mod engine;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kv;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod server;
pub mod tokenizer;

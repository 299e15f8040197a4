//! Shared test helpers: where the fixtures, data and models are.
#![allow(dead_code)]

use std::path::PathBuf;

use dhurandhar::engine::{Engine, EngineConfig};
use dhurandhar::kv::CacheType;

/// The project's shared folder (`../shared` beside the checkout, or `$DH_SHARED`).
pub fn shared_dir() -> PathBuf {
    let candidates = [
        std::env::var("DH_SHARED").ok().map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")),
        Some(PathBuf::from("/work/shared")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("fixtures/hf-tiny").is_dir())
        .expect(
            "shared fixtures not found: set DH_SHARED to the folder holding fixtures/ and data/",
        )
}

pub fn fixture(arch: &str) -> PathBuf {
    shared_dir().join("fixtures/hf-tiny").join(arch)
}

/// A model fetched by scripts/fetch-models.sh.
pub fn model(file: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn gemma3_270m() -> PathBuf {
    model("gemma-3-270m-q4_k_m.gguf")
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dh-server"))
}

/// Loads `model` for `n_ctx` tokens with one cache type for every layer's K and V.
pub fn engine(model: PathBuf, n_ctx: usize, ty: CacheType) -> Engine {
    Engine::load(&EngineConfig {
        model,
        n_ctx,
        cache_k: ty,
        cache_v: ty,
        chat_template: None,
        kv_layer_policy: Some("uniform".into()),
        kv_centering: true,
    })
    .unwrap()
}

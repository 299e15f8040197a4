//! Bad input through the binary: each case is one clear `error:` line and a non-zero exit.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::quantized::gguf_file::{Value, write};

fn run_fails(args: &[&str], expect: &str) {
    let out = Command::new(common::bin()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "want one error line, got:\n{stderr}");
    assert!(
        errors[0].contains(expect),
        "error line `{}` should mention `{expect}`",
        errors[0]
    );
    assert!(
        !stderr.contains("panicked"),
        "panic reached the user:\n{stderr}"
    );
}

fn gguf_with(path: &Path, arch: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    let arch_v = Value::String(arch.to_string());
    let layers = Value::U32(2);
    let dims = Value::U32(64);
    let heads = Value::U32(4);
    let meta: Vec<(&str, &Value)> = vec![
        ("general.architecture", &arch_v),
        ("llama.block_count", &layers),
        ("llama.embedding_length", &dims),
        ("llama.feed_forward_length", &dims),
        ("llama.attention.head_count", &heads),
        ("llama.context_length", &dims),
        ("llama.vocab_size", &dims),
    ];
    write(&mut f, &meta, &[]).unwrap();
}

#[test]
fn not_a_gguf_file() {
    let dir = tempdir("notgguf");
    let p = dir.join("x.gguf");
    std::fs::write(&p, b"this is not a model").unwrap();
    run_fails(
        &["run", "-m", p.to_str().unwrap(), "-p", "hi"],
        "not a GGUF file",
    );
}

#[test]
fn truncated_gguf() {
    let dir = tempdir("trunc");
    let p = dir.join("t.gguf");
    let bytes = std::fs::read(common::smollm2()).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    run_fails(&["run", "-m", p.to_str().unwrap(), "-p", "hi"], "truncated");
}

#[test]
fn unknown_architecture() {
    let dir = tempdir("arch");
    let p = dir.join("m.gguf");
    gguf_with(&p, "mamba");
    run_fails(
        &["run", "-m", p.to_str().unwrap(), "-p", "hi"],
        "unsupported architecture `mamba`",
    );
}

#[test]
fn missing_tensor() {
    let dir = tempdir("missing");
    let p = dir.join("m.gguf");
    gguf_with(&p, "llama");
    run_fails(
        &["run", "-m", p.to_str().unwrap(), "-p", "hi"],
        "missing tensor",
    );
}

#[test]
fn missing_model_file() {
    run_fails(
        &["run", "-m", "/nonexistent/model.gguf", "-p", "hi"],
        "not found",
    );
}

#[test]
fn prompt_longer_than_context() {
    let m = common::smollm2();
    let long = "word ".repeat(64);
    run_fails(
        &[
            "run",
            "-m",
            m.to_str().unwrap(),
            "-c",
            "16",
            "-p",
            &long,
            "-n",
            "4",
        ],
        "context holds 16",
    );
}

#[test]
fn unknown_cache_type() {
    let m = common::smollm2();
    let out = Command::new(common::bin())
        .args(["run", "-m", m.to_str().unwrap(), "-ctk", "q9_9", "-p", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown cache type `q9_9`"));
}

/// A CPU build asked for the GPU says how to get one; a partial `-ngl` (some layers on the
/// CPU) is refused rather than silently ignored.
#[test]
fn gpu_requests_get_clear_errors() {
    let m = common::smollm2();
    let m = m.to_str().unwrap();
    if !cfg!(feature = "cuda") {
        run_fails(
            &["run", "-m", m, "--device", "cuda", "-p", "hi"],
            "built without CUDA",
        );
        run_fails(
            &["run", "-m", m, "-ngl", "99", "-p", "hi"],
            "built without CUDA",
        );
    }
    run_fails(
        &["run", "-m", m, "--device", "metal", "-p", "hi"],
        "expected cpu, cuda or cuda:N",
    );
    run_fails(
        &["run", "-m", m, "--device", "cpu", "-ngl", "10", "-p", "hi"],
        "partial offload is not supported",
    );
    run_fails(
        &["plan", "-m", m, "-ngl", "10"],
        "partial offload is not supported",
    );
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dh-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn serving_on_a_port_in_use_says_so() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let model = common::smollm2();
    run_fails(
        &["-m", model.to_str().unwrap(), "--port", &port],
        "cannot listen on",
    );
}

#[test]
fn serve_is_the_default_subcommand() {
    run_fails(
        &["-m", "/no/such/model.gguf", "-c", "512"],
        "model not found",
    );
}

//! Per-layer embeddings stay in the mapped file: a synthetic Gemma 4 whose PLE table is 1 GiB
//! generates 64 tokens with under 5% of the table resident (`--ple mmap`), and all of it with
//! `--ple resident`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

const LAYERS: usize = 4;
const HIDDEN: usize = 64;
const PLE_DIM: usize = 512;
const VOCAB: usize = 262_144;

/// bf16 bytes of `n` small pseudo-random values (or `fill` everywhere).
fn bf16(n: usize, seed: u64, fill: Option<f32>) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let v = fill.unwrap_or_else(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.08
        });
        out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    out
}

fn write_shard(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(n, shape, data)| {
            (
                n.clone(),
                TensorView::new(Dtype::BF16, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A gemma4_text checkpoint: 4 layers of hidden 64 and a 262144 x (4 x 512) bf16 PLE table
/// (1 GiB) in a shard of its own.
fn synthetic_gemma4(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text",
        "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "global_head_dim": 64,
        "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
        "hidden_size_per_layer_input": PLE_DIM, "num_kv_shared_layers": 2,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "sliding_window": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
        "tie_word_embeddings": true, "use_double_wide_mlp": false, "dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut seed = 1;
    let mut t = |name: &str, shape: Vec<usize>, fill: Option<f32>| {
        seed += 1;
        let n = shape.iter().product();
        (name.to_string(), shape, bf16(n, seed, fill))
    };
    let mut main = vec![
        t("model.embed_tokens.weight", vec![VOCAB, HIDDEN], None),
        t("model.norm.weight", vec![HIDDEN], Some(1.0)),
        t(
            "model.per_layer_model_projection.weight",
            vec![LAYERS * PLE_DIM, HIDDEN],
            None,
        ),
        t(
            "model.per_layer_projection_norm.weight",
            vec![PLE_DIM],
            Some(1.0),
        ),
    ];
    for il in 0..LAYERS {
        let hd = if il % 2 == 1 { 64 } else { 32 };
        let p = format!("model.layers.{il}");
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_per_layer_input_norm",
        ] {
            main.push(t(&format!("{p}.{n}.weight"), vec![HIDDEN], Some(1.0)));
        }
        main.push(t(&format!("{p}.layer_scalar"), vec![1], Some(1.0)));
        main.push(t(
            &format!("{p}.self_attn.q_proj.weight"),
            vec![2 * hd, HIDDEN],
            None,
        ));
        main.push(t(
            &format!("{p}.self_attn.q_norm.weight"),
            vec![hd],
            Some(1.0),
        ));
        main.push(t(
            &format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, 2 * hd],
            None,
        ));
        if il < 2 {
            main.push(t(
                &format!("{p}.self_attn.k_proj.weight"),
                vec![hd, HIDDEN],
                None,
            ));
            main.push(t(
                &format!("{p}.self_attn.v_proj.weight"),
                vec![hd, HIDDEN],
                None,
            ));
            main.push(t(
                &format!("{p}.self_attn.k_norm.weight"),
                vec![hd],
                Some(1.0),
            ));
        }
        main.push(t(
            &format!("{p}.mlp.gate_proj.weight"),
            vec![128, HIDDEN],
            None,
        ));
        main.push(t(
            &format!("{p}.mlp.up_proj.weight"),
            vec![128, HIDDEN],
            None,
        ));
        main.push(t(
            &format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, 128],
            None,
        ));
        main.push(t(
            &format!("{p}.per_layer_input_gate.weight"),
            vec![PLE_DIM, HIDDEN],
            None,
        ));
        main.push(t(
            &format!("{p}.per_layer_projection.weight"),
            vec![HIDDEN, PLE_DIM],
            None,
        ));
    }
    write_shard(&dir.join("model-00001-of-00002.safetensors"), &main);
    let ple = vec![t(
        "model.embed_tokens_per_layer.weight",
        vec![VOCAB, LAYERS * PLE_DIM],
        None,
    )];
    write_shard(&dir.join("model-00002-of-00002.safetensors"), &ple);
}

fn model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("synthetic-gemma4-ple-1gib");
    if !dir.join("model-00002-of-00002.safetensors").exists() {
        synthetic_gemma4(&dir);
    }
    dir
}

/// Drops the table's pages from the page cache, as after a reboot or memory pressure. Pages
/// the test just wrote sit in large folios, which a fault maps whole (2 MiB for one 4 KiB row).
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// Generates 64 tokens after a 64-token prompt spread over the vocabulary; returns the
/// resident share of the PLE table the run reports.
fn generate(dir: &Path, ple: &str) -> f64 {
    let prompt: Vec<String> = (0..64)
        .map(|i| ((i * 40_961 + 7) % VOCAB).to_string())
        .collect();
    let out = Command::new(common::bin())
        .args([
            "run",
            "-m",
            dir.to_str().unwrap(),
            "-c",
            "256",
            "-n",
            "64",
            "--temp",
            "0",
        ])
        .args([
            "--ignore-eos",
            "--print-ids",
            "--ple",
            ple,
            "--prompt-ids",
            &prompt.join(","),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ids = String::from_utf8_lossy(&out.stdout);
    assert_eq!(ids.trim().split(',').count(), 64, "{ids}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("ple: ") && l.contains("resident in this process"))
        .unwrap_or_else(|| panic!("{stderr}"));
    eprintln!("--ple {ple}: {line}");
    let pct = line.rsplit('(').next().unwrap().trim_end_matches("%)");
    pct.parse().unwrap()
}

#[test]
fn ple_rows_are_read_from_the_map_not_held() {
    let dir = model_dir();
    let table = std::fs::metadata(dir.join("model-00002-of-00002.safetensors"))
        .unwrap()
        .len();
    assert!(table >= 1 << 30, "PLE table is {table} bytes");
    evict(&dir.join("model-00002-of-00002.safetensors"));
    let mapped = generate(&dir, "mmap");
    assert!(
        mapped < 5.0,
        "{mapped}% of the PLE table resident with --ple mmap"
    );
    let resident = generate(&dir, "resident");
    assert!(resident > 99.0, "{resident}% resident with --ple resident");
}

//! `dh-server synth` writes a llama GGUF that llama-quantize could have written (Q4_K_M's type
//! mix) and that the engine loads and runs.

mod common;

use std::process::Command;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;

#[test]
fn synthetic_q4_k_m_llama_has_llamas_type_mix_and_runs() {
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("synth-1b-2l.gguf");
    let status = Command::new(common::bin())
        .args([
            "synth", "--shape", "llama-1b", "--layers", "2", "--type", "q4_k_m", "-o",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let mut f = std::fs::File::open(&out).unwrap();
    let c = Content::read(&mut f).unwrap();
    let ty = |n: &str| c.tensor_infos[n].ggml_dtype;
    assert_eq!(ty("token_embd.weight"), GgmlDType::Q4K);
    assert_eq!(ty("output.weight"), GgmlDType::Q6K);
    assert_eq!(ty("output_norm.weight"), GgmlDType::F32);
    // use_more_bits(i, 2): only the last layer (i >= 7·2/8) gets Q6_K attn_v / ffn_down
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlDType::Q4K);
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlDType::Q6K);
    assert_eq!(ty("blk.1.ffn_down.weight"), GgmlDType::Q6K);
    assert_eq!(ty("blk.1.ffn_gate.weight"), GgmlDType::Q4K);
    assert_eq!(
        c.tensor_infos["blk.0.ffn_down.weight"].shape.dims(),
        [2048, 8192]
    );
    assert_eq!(c.metadata["general.file_type"].to_u32().unwrap(), 15);
    assert_eq!(c.metadata["llama.block_count"].to_u32().unwrap(), 2);

    let run = Command::new(common::bin())
        .args([
            "run",
            "--prompt-ids",
            "1,5,9",
            "-n",
            "4",
            "--temp",
            "0",
            "--print-ids",
            "-m",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let ids = String::from_utf8_lossy(&run.stdout);
    assert_eq!(
        ids.trim().split(',').count(),
        4,
        "four generated ids: {ids}"
    );
    std::fs::remove_file(&out).unwrap();
}

//! With the `cuda` feature, the binaries record the CUDA driver and the libraries candle loads
//! as needed, so a binary built here (against a link-time stand-in for the driver, see
//! docs/CUDA.md) finds the real ones on the GPU machine.

use std::path::PathBuf;
use std::process::Command;

/// Our kernels, compiled to PTX with nvcc and embedded; the driver JIT-compiles them at load.
const KERNELS: &[&str] = &["kv", "matmul", "ops", "prefill"];
/// The decode partials (`decode.cu`), one module per K codec (its name and kernel id, in the
/// order of `kv::store::GPU_TYPES`), so a run JIT-compiles only its K type's kernels.
const DECODE_K: &[(&str, &str)] = &[
    ("f16", "C_F16"),
    ("turbo4", "C_TURBO4"),
    ("turbo3", "C_TURBO3"),
    ("turbo2", "C_TURBO2"),
    ("q8_0", "C_Q8_0"),
    ("q4_0", "C_Q4_0"),
    ("spectral4", "C_SPECTRAL"),
];

fn nvcc(src: &str, out: PathBuf, cap: &str, defines: &[String]) {
    let status = Command::new("nvcc")
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), src])
        .args(defines)
        .arg("-o")
        .arg(out)
        .status()
        .expect("running nvcc (see docs/CUDA.md for the toolchain)");
    assert!(status.success(), "nvcc failed on {src}");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/cuda/mma.cuh");
    println!("cargo:rerun-if-changed=kernels/cuda/codec.cuh");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
        for k in KERNELS {
            let src = format!("kernels/cuda/{k}.cu");
            println!("cargo:rerun-if-changed={src}");
            nvcc(&src, out.join(format!("{k}.ptx")), &cap, &[]);
        }
        println!("cargo:rerun-if-changed=kernels/cuda/decode.cu");
        for (name, id) in DECODE_K {
            let defines = [format!("-DDEC_KC={id}"), format!("-DDEC_KN={name}")];
            let ptx = out.join(format!("decode_{name}.ptx"));
            nvcc("kernels/cuda/decode.cu", ptx, &cap, &defines);
        }
        for arg in [
            "-Wl,--no-as-needed",
            "-lcuda",
            "-lnvrtc",
            "-lcublasLt",
            "-Wl,--as-needed",
        ] {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
}

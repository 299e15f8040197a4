//! With the `cuda` feature, the binaries record the CUDA driver and the libraries candle loads
//! as needed, so a binary built here (against a link-time stand-in for the driver, see
//! docs/CUDA.md) finds the real ones on the GPU machine.

use std::path::PathBuf;
use std::process::Command;

/// Our kernels, compiled to PTX with nvcc and embedded; the driver JIT-compiles them at load.
const KERNELS: &[&str] = &["kv", "ops", "prefill"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/cuda/mma.cuh");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
        for k in KERNELS {
            let src = format!("kernels/cuda/{k}.cu");
            println!("cargo:rerun-if-changed={src}");
            let status = Command::new("nvcc")
                .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), &src, "-o"])
                .arg(out.join(format!("{k}.ptx")))
                .status()
                .expect("running nvcc (see docs/CUDA.md for the toolchain)");
            assert!(status.success(), "nvcc failed on {src}");
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

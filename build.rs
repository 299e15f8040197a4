//! With the `cuda` feature, the binaries record the CUDA driver and the libraries candle loads
//! as needed, so a binary built here (against a link-time stand-in for the driver, see
//! docs/CUDA.md) finds the real ones on the GPU machine.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
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

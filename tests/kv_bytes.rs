//! The KV bytes a cache reports equal bits per value × values, per cache type, on both real
//! models (head_dim 64 with 64-wide turbo groups; head_dim 256 with sliding-window layers).

mod common;

use dhurandhar::kv::CacheType;
use dhurandhar::kv::store::SINK_ROWS;

/// Bits per stored value, written out from the block layouts (not from the codecs).
fn bits_per_value(ty: CacheType, head_dim: usize) -> f64 {
    let g = if head_dim.is_multiple_of(128) {
        128.0
    } else {
        64.0
    };
    match ty {
        CacheType::F32 => 32.0,
        CacheType::F16 | CacheType::Bf16 => 16.0,
        CacheType::Q8_0 => 8.5,
        CacheType::Q4_0 => 4.5,
        // norm (+ reserved rnorm at 128) and 4-bit indices
        // (the RotorQuant family keeps turbo's packing)
        CacheType::Turbo4 | CacheType::Planar4 | CacheType::Iso4 | CacheType::Rotor4 => {
            4.0 + if g == 128.0 { 32.0 } else { 16.0 } / g
        }
        CacheType::Turbo3 | CacheType::Planar3 | CacheType::Iso3 | CacheType::Rotor3 => {
            3.0 + 16.0 / g
        }
        CacheType::Turbo2 => 2.0 + 16.0 / g,
        // one f16 per row (group norms come out of the code bits)
        CacheType::Spectral4 => 4.0 + 16.0 / head_dim as f64,
        CacheType::Spectral3 => 3.0 + 16.0 / head_dim as f64,
    }
}

fn check(model: std::path::PathBuf, n_ctx: usize) {
    let mut f16_bytes = 0;
    for &ty in CacheType::ALL {
        let e = common::engine(model.clone(), n_ctx, ty);
        let cache = e.new_cache(n_ctx).unwrap();
        let arch = &e.model.arch;
        let mut want = 0f64;
        for (il, l) in arch.layers.iter().enumerate() {
            let rows = arch.kv_rows(il, n_ctx);
            let values = (l.n_kv_head * rows * l.head_dim) as f64;
            want += 2.0 * values * bits_per_value(ty, l.head_dim) / 8.0;
            if ty.codec().rotates() {
                // f16 sink rows
                want += 2.0 * (l.n_kv_head * SINK_ROWS.min(rows) * l.head_dim * 2) as f64;
            }
        }
        let got = cache.k_bytes() + cache.v_bytes();
        assert_eq!(
            got as f64, want,
            "{ty}: reported {got} bytes, layouts give {want}"
        );
        if ty == CacheType::F16 {
            f16_bytes = got;
        }
        if ty == CacheType::Turbo4 {
            let ratio = got as f64 / f16_bytes as f64;
            assert!(ratio <= 0.27, "turbo4 is {ratio:.4} of f16");
            eprintln!("{}: turbo4 / f16 = {ratio:.4}", model.display());
        }
    }
}

#[test]
fn smollm2_kv_bytes_at_8192() {
    check(common::smollm2(), 8192);
}

#[test]
fn gemma3_kv_bytes_at_8192() {
    check(common::gemma3_270m(), 8192);
}

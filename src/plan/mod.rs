//! Offline analysis: will a model fit a device (`plan`), which KV cache type fits this machine
//! (`select`, `-ctk auto`), and how fast PLE rows come off flash (`mmap-profile`).

pub mod devices;
pub mod memory;
pub mod mmap_profile;
pub mod profile;
pub mod select;

use serde::Serialize;

use devices::Verdict;
use memory::Breakdown;

#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub breakdown: Breakdown,
    pub devices: Vec<Verdict>,
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

/// The report as Markdown tables, as `plan` prints it.
pub fn render(r: &PlanReport) -> String {
    let b = &r.breakdown;
    let mut s = format!(
        "## {} at {} tokens, {:.2} bits/weight, KV K {} / V {}\n\n| component | MiB |\n|---|---:|\n",
        b.model, b.context_tokens, b.weight_bits, b.type_k, b.type_v
    );
    for (name, bytes) in [
        ("decoder weights", b.decoder_bytes),
        ("PLE table", b.ple_bytes),
        ("KV cache", b.kv_bytes),
        ("KV bases (SpectralQuant)", b.kv_basis_bytes),
        ("SSM state (f32)", b.ssm_state_bytes),
        ("vision encoder", b.vision_bytes),
        ("audio encoder", b.audio_bytes),
        ("activations (peak)", b.activation_bytes),
        ("runtime overhead", b.runtime_overhead_bytes),
    ] {
        if bytes > 0 {
            s += &format!("| {name} | {} |\n", mb(bytes));
        }
    }
    s += &format!(
        "| **total, PLE resident** | **{}** |\n| **total, PLE mmap'd** | **{}** |\n\n",
        mb(b.total_ple_resident),
        mb(b.total_ple_mmap)
    );
    if b.ple_bytes > 0 {
        s += &format!(
            "PLE / decoder: {:.2}; each token reads {} B of PLE.\n\n",
            b.ple_to_decoder, b.ple_bytes_per_token
        );
    }
    s += "| device | verdict | headroom MiB | PLE flash-bound tok/s |\n|---|---|---:|---:|\n";
    for v in &r.devices {
        s += &format!(
            "| {} | {} | {:.0} | {} |\n",
            v.device,
            v.verdict,
            v.headroom_mb,
            v.ple_flash_tps.map_or("-".into(), |t| format!("{t:.0}"))
        );
    }
    s
}

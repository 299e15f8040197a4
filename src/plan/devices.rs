//! Device profiles (`configs/devices.yaml`, plus the machine we run on) and the verdict for a
//! model on each: fits with the PLE table resident, fits with it memory-mapped, or not at all.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::memory::Breakdown;

const DEVICES_YAML: &str = include_str!("../../configs/devices.yaml");
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Device {
    pub name: String,
    pub ram_mb: f64,
    /// What one app may hold.
    pub app_budget_mb: f64,
    pub flash_seq_mbps: Option<f64>,
    /// Queue-depth-1 random 4 KiB read latency.
    pub flash_rand4k_us: Option<f64>,
}

pub fn builtin() -> Result<Vec<Device>> {
    serde_yaml::from_str(DEVICES_YAML).context("configs/devices.yaml")
}

/// This machine: total RAM, and what is available now (or the cgroup limit, if lower) as the
/// budget. Storage speed is unknown (`mmap-profile` measures it).
pub fn host() -> Result<Device> {
    let mut sys =
        sysinfo::System::new().map_err(|e| anyhow::anyhow!("reading system memory: {e}"))?;
    sys.refresh_memory();
    let mut avail = sys.available_memory();
    if let Some(limit) = sys.cgroup_limits() {
        avail = avail.min(limit.free_memory);
    }
    Ok(Device {
        name: "host".into(),
        ram_mb: sys.total_memory() as f64 / MIB,
        app_budget_mb: avail as f64 / MIB,
        flash_seq_mbps: None,
        flash_rand4k_us: None,
    })
}

/// The first CUDA GPU, through the driver: total memory and what is free now as the budget.
/// `None` without a GPU or driver, and in builds without the `cuda` feature.
pub fn cuda() -> Option<Device> {
    #[cfg(feature = "cuda")]
    {
        let ctx = cudarc::driver::CudaContext::new(0).ok()?;
        let (free, total) = ctx.mem_get_info().ok()?;
        let name = ctx.name().unwrap_or_default();
        Some(Device {
            name: format!("cuda:0 {name}").trim_end().to_string(),
            ram_mb: total as f64 / MIB,
            app_budget_mb: free as f64 / MIB,
            flash_seq_mbps: None,
            flash_rand4k_us: None,
        })
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// Where a model would be served: the CUDA GPU when this build has one to use, else this
/// machine's RAM. (Metal's working-set size needs a macOS build; not detected here.)
pub fn detected() -> Result<Device> {
    match cuda() {
        Some(gpu) => Ok(gpu),
        None => host(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub device: String,
    /// `resident`, `mmap` or `infeasible`.
    pub verdict: &'static str,
    /// Budget left (positive) or missing (negative), MiB.
    pub headroom_mb: f64,
    /// Decode tokens/s if every token's PLE row comes from flash (cold pages), None without
    /// PLE or without a storage figure.
    pub ple_flash_tps: Option<f64>,
}

pub fn verdict(d: &Device, b: &Breakdown) -> Verdict {
    let resident = b.total_ple_resident as f64 / MIB;
    let mmap = b.total_ple_mmap as f64 / MIB;
    let (verdict, headroom_mb) = if resident <= d.app_budget_mb {
        ("resident", d.app_budget_mb - resident)
    } else if b.ple_bytes > 0 && mmap <= d.app_budget_mb {
        ("mmap", d.app_budget_mb - mmap)
    } else {
        ("infeasible", d.app_budget_mb - mmap)
    };
    // A token's PLE row is contiguous; it touches this many 4 KiB pages on average.
    let pages = b.ple_bytes_per_token as f64 / 4096.0 + 1.0;
    let ple_flash_tps = match (b.ple_bytes_per_token, d.flash_rand4k_us) {
        (0, _) | (_, None) => None,
        (_, Some(us)) => Some(1e6 / (pages * us)),
    };
    Verdict {
        device: d.name.clone(),
        verdict,
        headroom_mb,
        ple_flash_tps,
    }
}

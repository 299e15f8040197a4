//! `mmap-profile`: how fast per-layer embedding rows come out of a memory-mapped file on this
//! machine's storage, cold (pages evicted from the page cache) and warm.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use memmap2::Mmap;
use serde::Serialize;

/// The table's shape: `vocab` rows of `n_layer × dim` values at `bits` each.
#[derive(Debug, Clone, Copy)]
pub struct PleShape {
    pub vocab: usize,
    pub n_layer: usize,
    pub dim: usize,
    pub bits: f64,
}

impl PleShape {
    /// Bytes of one layer's slice of one token's row.
    fn slice_bytes(&self) -> usize {
        (self.dim as f64 * self.bits / 8.0).ceil() as usize
    }

    fn row_bytes(&self) -> usize {
        self.n_layer * self.slice_bytes()
    }

    pub fn file_bytes(&self) -> usize {
        self.vocab * self.row_bytes()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Prompt tokens: runs of consecutive ids, whole rows.
    SequentialPrefill,
    /// One random token per step, its whole row (token-major layout).
    RandomDecode,
    /// One random token per step read layer by layer from a layer-major layout: `n_layer`
    /// small reads far apart.
    RandomScatter,
}

#[derive(Debug, Clone, Serialize)]
pub struct PassResult {
    pub pattern: Pattern,
    pub cache: &'static str,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub peak_rss_mb: f64,
    pub status: &'static str,
}

/// Writes a table of `shape` (pseudo-random bytes) to `path`, flushed to storage.
pub fn write_table(path: &Path, shape: PleShape) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, &f);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = shape.file_bytes();
    while left > 0 {
        for b in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len());
        w.write_all(&block[..n])?;
        left -= n;
    }
    w.flush()?;
    drop(w);
    f.sync_all()?;
    Ok(())
}

/// Drops the file's pages from the page cache (they are clean: the file was synced).
fn evict(file: &File) -> Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(rc == 0, "posix_fadvise failed ({rc})");
    Ok(())
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Token ids a pass reads, reproducible per pattern.
fn token_ids(pattern: Pattern, n: usize, vocab: usize) -> Vec<usize> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as usize % vocab
    };
    match pattern {
        Pattern::SequentialPrefill => {
            let start = next();
            (0..n).map(|i| (start + i) % vocab).collect()
        }
        _ => (0..n).map(|_| next()).collect(),
    }
}

/// One pass: maps the file, reads every token's row, times each token.
pub fn run_pass(
    path: &Path,
    shape: PleShape,
    pattern: Pattern,
    cold: bool,
    tokens: usize,
    target_tps: f64,
) -> Result<PassResult> {
    let file = File::open(path)?;
    if cold {
        evict(&file)?;
    }
    // SAFETY: the file is ours and not modified while mapped.
    let map = unsafe { Mmap::map(&file)? };
    #[cfg(unix)]
    map.advise(memmap2::Advice::Random)?;
    if !cold {
        let mut sum = 0u64;
        for page in map.chunks(4096) {
            sum = sum.wrapping_add(page[0] as u64);
        }
        std::hint::black_box(sum);
    }
    let ids = token_ids(pattern, tokens, shape.vocab);
    let (row, slice) = (shape.row_bytes(), shape.slice_bytes());
    let mut buf = vec![0u8; row];
    let mut times = Vec::with_capacity(tokens);
    let t0 = Instant::now();
    for &id in &ids {
        let t = Instant::now();
        match pattern {
            Pattern::SequentialPrefill | Pattern::RandomDecode => {
                buf.copy_from_slice(&map[id * row..(id + 1) * row]);
            }
            Pattern::RandomScatter => {
                let plane = shape.vocab * slice;
                for l in 0..shape.n_layer {
                    let at = l * plane + id * slice;
                    buf[l * slice..(l + 1) * slice].copy_from_slice(&map[at..at + slice]);
                }
            }
        }
        std::hint::black_box(&buf);
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    let tps = tokens as f64 / secs;
    Ok(PassResult {
        pattern,
        cache: if cold { "cold" } else { "warm" },
        tokens,
        tokens_per_s: tps,
        mb_per_s: (tokens * row) as f64 / secs / 1e6,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        peak_rss_mb: peak_rss_mb(),
        status: if tps >= target_tps {
            "PASS"
        } else if tps >= target_tps / 2.0 {
            "WARN"
        } else {
            "FAIL"
        },
    })
}

/// Every pattern cold then warm on a fresh table at `dir`; the file is removed afterwards.
pub fn profile(
    dir: &Path,
    shape: PleShape,
    tokens: usize,
    target_tps: f64,
) -> Result<Vec<PassResult>> {
    let path: PathBuf = dir.join(format!("dh-mmap-profile-{}.bin", std::process::id()));
    tracing::info!(
        "mmap-profile: writing a {:.1} MiB PLE-shaped table ({} rows x {} B) to {}",
        shape.file_bytes() as f64 / 1048576.0,
        shape.vocab,
        shape.row_bytes(),
        path.display()
    );
    write_table(&path, shape)?;
    let mut out = Vec::new();
    let result = (|| {
        for pattern in [
            Pattern::SequentialPrefill,
            Pattern::RandomDecode,
            Pattern::RandomScatter,
        ] {
            for cold in [true, false] {
                tracing::info!(
                    "mmap-profile: {pattern:?} {}",
                    if cold { "cold" } else { "warm" }
                );
                out.push(run_pass(&path, shape, pattern, cold, tokens, target_tps)?);
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result.map(|()| out)
}

pub fn table(results: &[PassResult], target_tps: f64) -> String {
    let mut s = format!(
        "| pattern | cache | tokens | tok/s | MB/s | p50 us | p99 us | peak RSS MiB | vs {target_tps} tok/s |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n"
    );
    for r in results {
        s += &format!(
            "| {:?} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            r.pattern,
            r.cache,
            r.tokens,
            r.tokens_per_s,
            r.mb_per_s,
            r.p50_us,
            r.p99_us,
            r.peak_rss_mb,
            r.status
        );
    }
    s
}

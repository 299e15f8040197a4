//! Which cache type each layer's K and V use: uniform from `-ctk/-ctv`, or reshaped by
//! `--kv-layer-policy` (env `TURBO_LAYER_ADAPTIVE` when the flag is absent). The numbered modes
//! mean what they mean in the TurboQuant fork (`llama-kv-cache.cpp`); an explicit list such as
//! `0-3:q8_0/q8_0,28-29:f16/f16` overrides single layers.

use anyhow::{Context, Result, bail};

use super::CacheType;
use crate::arch::ModelArchitecture;

/// The K and V type of every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPolicy {
    pub layers: Vec<(CacheType, CacheType)>,
}

/// Named presets and the fork mode each stands for.
pub const PRESETS: &[(&str, u32, &str)] = &[
    ("uniform", 0, "every layer uses -ctk/-ctv"),
    (
        "q8-boundary",
        1,
        "q8_0 K and V on the first and last 4 layers (turbo K)",
    ),
    ("q8-last8", 2, "q8_0 K and V on the last 8 layers (turbo K)"),
    (
        "boundary-v-turbo4",
        5,
        "V turbo4 on the first and last 2 layers, turbo2 elsewhere (turbo V)",
    ),
    (
        "v-last8",
        6,
        "V turbo4 on the last 8 layers, turbo2 elsewhere (turbo V)",
    ),
    (
        "boundary-v",
        7,
        "V q8_0 on the first and last 2 layers, turbo2 elsewhere (turbo V)",
    ),
];

impl KvPolicy {
    pub fn uniform(n_layer: usize, k: CacheType, v: CacheType) -> Self {
        Self {
            layers: vec![(k, v); n_layer],
        }
    }

    /// The policy for `-ctk k -ctv v` and an optional `--kv-layer-policy` spec. Without a spec,
    /// turbo2 V on a model of 8 or more layers gets the fork's boundary-V mode 7, as in the fork
    /// (opt out with `--kv-layer-policy uniform`).
    pub fn resolve(n_layer: usize, k: CacheType, v: CacheType, spec: Option<&str>) -> Result<Self> {
        let mut p = Self::uniform(n_layer, k, v);
        let spec = match spec.map(str::trim) {
            Some(s) if !s.is_empty() => s,
            _ if v == CacheType::Turbo2 && n_layer >= 8 => {
                tracing::info!(
                    "kv cache: boundary-V (mode 7) enabled for turbo2 V: first and last 2 layers' V in q8_0 (--kv-layer-policy uniform to opt out)"
                );
                "7"
            }
            _ => return Ok(p),
        };
        if let Some(mode) = mode_of(spec) {
            p.apply_mode(mode, k, v)?;
            return Ok(p);
        }
        for entry in spec.split(',') {
            let (range, types) = entry.split_once(':').with_context(|| {
                format!("--kv-layer-policy entry `{entry}`: expected LAYERS:K/V, a mode number or a preset ({})", preset_names())
            })?;
            let (lo, hi) = match range.split_once('-') {
                Some((a, b)) => (parse_layer(a)?, parse_layer(b)?),
                None => (parse_layer(range)?, parse_layer(range)?),
            };
            if lo > hi || hi >= n_layer {
                bail!(
                    "--kv-layer-policy: layers {range} are outside 0-{}",
                    n_layer - 1
                );
            }
            let (tk, tv) = match types.split_once('/') {
                Some((a, b)) => (a.parse()?, b.parse()?),
                None => {
                    let t: CacheType = types.parse()?;
                    (t, t)
                }
            };
            for l in &mut p.layers[lo..=hi] {
                *l = (tk, tv);
            }
        }
        Ok(p)
    }

    /// The fork's `TURBO_LAYER_ADAPTIVE` modes; each applies only where the fork applies it.
    fn apply_mode(&mut self, mode: u32, k: CacheType, v: CacheType) -> Result<()> {
        let n = self.layers.len();
        let (k_turbo, v_turbo) = (k.is_turbo(), v.is_turbo());
        let boundary = |il: usize, m: usize| il < m || il + m >= n;
        if n < 8 && mode != 0 {
            return Ok(());
        }
        for (il, l) in self.layers.iter_mut().enumerate() {
            match mode {
                0 => {}
                1 if k_turbo && boundary(il, 4) => *l = (CacheType::Q8_0, CacheType::Q8_0),
                2 if k_turbo && il + 8 >= n => *l = (CacheType::Q8_0, CacheType::Q8_0),
                5 if v_turbo => {
                    l.1 = if boundary(il, 2) {
                        CacheType::Turbo4
                    } else {
                        CacheType::Turbo2
                    }
                }
                6 if v_turbo => {
                    l.1 = if il + 8 >= n {
                        CacheType::Turbo4
                    } else {
                        CacheType::Turbo2
                    }
                }
                7 if v_turbo => {
                    l.1 = if boundary(il, 2) {
                        CacheType::Q8_0
                    } else {
                        CacheType::Turbo2
                    }
                }
                1 | 2 | 5 | 6 | 7 => {}
                _ => bail!(
                    "layer-adaptive mode {mode} is not one of 0, 1, 2, 5, 6, 7 (presets: {})",
                    preset_names()
                ),
            }
        }
        Ok(())
    }

    /// Whether turbo2 K gets [`promote_k`](Self::promote_k) on top of the resolved policy: with
    /// no `--kv-layer-policy`, K turbo2 on a model of 8 or more layers, rows centered (the
    /// calibration that ranks the layers runs only then; `--no-kv-centering` is the fork's
    /// plain cache).
    pub fn promotes_k(spec: Option<&str>, k: CacheType, n_layer: usize, centered: bool) -> bool {
        spec.is_none_or(|s| s.trim().is_empty())
            && k == CacheType::Turbo2
            && n_layer >= 8
            && centered
    }

    /// Moves K from turbo2 to turbo3 on a quarter (rounded up) of the layers that store KV, and
    /// returns them, ascending. Two bits of K lose distant facts (docs/QUALITY.md, "turbo2's K
    /// where keys move scores most"): the loss sits in the layers whose keys move scores most,
    /// and a codec's score noise there is `√D · noise`. Layers holding the most K values come
    /// first — the full-context ones, which read distant positions, where sliding-window layers
    /// hold a recent window — then the largest `noise` (per layer, 0 where unknown). The bytes
    /// thus depend only on `arch` and `n_ctx`, so `plan` counts them exactly without `noise`.
    pub fn promote_k(
        &mut self,
        arch: &ModelArchitecture,
        n_ctx: usize,
        noise: &[f32],
    ) -> Vec<usize> {
        // K values, then the shape: layers equal in all three take equal bytes in any type.
        let size = |il: usize| {
            let l = &arch.layers[il];
            let rows = arch.kv_rows(il, n_ctx);
            (rows * l.n_kv_head * l.head_dim, l.head_dim, rows)
        };
        let mut order: Vec<usize> = (0..self.layers.len())
            .filter(|&il| arch.stores_kv(il))
            .collect();
        let count = order.len().div_ceil(4);
        order.retain(|&il| self.layers[il].0 == CacheType::Turbo2);
        let noise = |il: usize| noise.get(il).copied().unwrap_or(0.0);
        order.sort_by(|&a, &b| {
            (size(b).cmp(&size(a)))
                .then(noise(b).total_cmp(&noise(a)))
                .then(a.cmp(&b))
        });
        order.truncate(count);
        order.sort_unstable();
        for &il in &order {
            self.layers[il].0 = CacheType::Turbo3;
        }
        order
    }

    /// Distinct types with how many layers use each, e.g. `q8_0 x4, turbo2 x26`.
    pub fn summary(types: impl Iterator<Item = CacheType>) -> String {
        let mut counts: Vec<(CacheType, usize)> = Vec::new();
        for t in types {
            match counts.iter_mut().find(|(c, _)| *c == t) {
                Some((_, n)) => *n += 1,
                None => counts.push((t, 1)),
            }
        }
        if counts.len() == 1 {
            return counts[0].0.name().to_string();
        }
        counts
            .iter()
            .map(|(t, n)| format!("{t} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn mode_of(spec: &str) -> Option<u32> {
    spec.parse().ok().or_else(|| {
        PRESETS
            .iter()
            .find(|(name, _, _)| *name == spec)
            .map(|p| p.1)
    })
}

fn preset_names() -> String {
    PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

fn parse_layer(s: &str) -> Result<usize> {
    s.trim()
        .parse()
        .with_context(|| format!("--kv-layer-policy: `{s}` is not a layer number"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use CacheType::*;

    #[test]
    fn fork_modes() {
        let p = KvPolicy::resolve(30, Turbo3, Turbo3, Some("1")).unwrap();
        assert_eq!(p.layers[3], (Q8_0, Q8_0));
        assert_eq!(p.layers[4], (Turbo3, Turbo3));
        assert_eq!(p.layers[26], (Q8_0, Q8_0));
        let p = KvPolicy::resolve(30, Turbo4, Turbo4, Some("boundary-v")).unwrap();
        assert_eq!(p.layers[1], (Turbo4, Q8_0));
        assert_eq!(p.layers[2], (Turbo4, Turbo2));
        assert_eq!(p.layers[28], (Turbo4, Q8_0));
        // modes only touch what the fork touches: mode 1 needs turbo K
        let p = KvPolicy::resolve(30, F16, Turbo4, Some("1")).unwrap();
        assert_eq!(p, KvPolicy::uniform(30, F16, Turbo4));
        assert!(KvPolicy::resolve(30, F16, F16, Some("3")).is_err());
    }

    #[test]
    fn turbo2_v_gets_boundary_v_unless_uniform() {
        let p = KvPolicy::resolve(18, Turbo2, Turbo2, None).unwrap();
        assert_eq!(p.layers[0].1, Q8_0);
        assert_eq!(p.layers[5].1, Turbo2);
        let p = KvPolicy::resolve(18, Turbo2, Turbo2, Some("uniform")).unwrap();
        assert_eq!(p, KvPolicy::uniform(18, Turbo2, Turbo2));
    }

    #[test]
    fn turbo2_k_moves_to_turbo3_where_ranked_highest() {
        assert!(KvPolicy::promotes_k(None, Turbo2, 30, true));
        assert!(!KvPolicy::promotes_k(Some("uniform"), Turbo2, 30, true));
        assert!(!KvPolicy::promotes_k(None, Turbo2, 30, false));
        assert!(!KvPolicy::promotes_k(None, Turbo3, 30, true));
        assert!(!KvPolicy::promotes_k(None, Turbo2, 6, true));
        // gemma-3-270m: 18 layers, full context on 5, 11 and 17, a 512 window elsewhere.
        let arch = crate::plan::profile::resolve("gemma3-270m").unwrap().arch;
        let mut noise = vec![1.0; 18];
        (noise[2], noise[9], noise[11]) = (3.0, 2.0, 0.5);
        let mut p = KvPolicy::resolve(18, Turbo2, Turbo2, None).unwrap();
        assert_eq!(p.promote_k(&arch, 8192, &noise), vec![2, 5, 9, 11, 17]);
        assert_eq!(p.layers[2], (Turbo3, Turbo2));
        assert_eq!(p.layers[3], (Turbo2, Turbo2));
        assert_eq!(p.layers[0], (Turbo2, Q8_0));
        // Without a measured noise the same bytes move: ties go to the earlier layers.
        let mut p = KvPolicy::resolve(18, Turbo2, Turbo2, None).unwrap();
        assert_eq!(p.promote_k(&arch, 8192, &[]), vec![0, 1, 5, 11, 17]);
    }

    #[test]
    fn explicit_layers() {
        let p = KvPolicy::resolve(10, Turbo3, Turbo3, Some("0-1:q8_0/f16,9:turbo4")).unwrap();
        assert_eq!(p.layers[0], (Q8_0, F16));
        assert_eq!(p.layers[1], (Q8_0, F16));
        assert_eq!(p.layers[2], (Turbo3, Turbo3));
        assert_eq!(p.layers[9], (Turbo4, Turbo4));
        assert!(KvPolicy::resolve(10, F16, F16, Some("5-12:q8_0")).is_err());
        assert!(KvPolicy::resolve(10, F16, F16, Some("a:q8_0")).is_err());
        assert!(KvPolicy::resolve(10, F16, F16, Some("nonsense")).is_err());
    }
}

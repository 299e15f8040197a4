//! `dh-server cuda-check --model M`: the same tokens through a model on the CPU and on the GPU,
//! prefill (two chunks, so the second attends over a stored past) then greedy decode steps,
//! comparing logits at every position; plain TurboQuant rows on both (`--no-kv-centering`), or
//! with `--centered` both stores centered on the CPU engine's calibration.

use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::sampling::argmax;
use crate::engine::{DeviceChoice, Engine, EngineConfig};
use crate::kv::CacheType;
use crate::kv::calibration::{KvCalibration, Spectrum};
use crate::model::Logits;

#[derive(Debug, serde::Serialize)]
pub struct ParityReport {
    pub model: String,
    pub cache_type: String,
    pub cache_type_v: String,
    pub centered: bool,
    /// Centered: max |gpu − cpu| of the two engines' own calibrations (K means, V means, K
    /// channel weights, K centres); the GPU then runs on the CPU's.
    pub calibration_max_abs: Option<[f32; 4]>,
    pub gpu_layers: usize,
    pub prompt: usize,
    pub steps: usize,
    /// max |gpu − cpu| over the second prefill chunk's logits, and over the decode steps.
    pub prefill_max_abs: f32,
    pub decode_max_abs: f32,
    /// max |cpu logit|, for scale.
    pub logit_max: f32,
    /// Decode steps where both picked the same token.
    pub greedy_agree: usize,
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// `model` with `k`/`v` cache types, rotation-codec rows centered or plain.
fn engine(
    model: &Path,
    n_ctx: usize,
    (k, v): (CacheType, CacheType),
    centered: bool,
    device: DeviceChoice,
) -> Result<Engine> {
    Engine::load(&EngineConfig {
        model: model.to_path_buf(),
        n_ctx,
        cache_k: k,
        cache_v: v,
        chat_template: None,
        kv_layer_policy: None,
        kv_centering: centered,
        ple_resident: false,
        kv_calibration: None,
        device,
        n_gpu_layers: None,
    })
}

/// With `centered`, both stores center on the CPU engine's calibration and take its layer types
/// (the GPU engine's own would differ by its weights' rounding).
pub fn check(
    model: &Path,
    types: (CacheType, CacheType),
    centered: bool,
    prompt: usize,
    steps: usize,
) -> Result<ParityReport> {
    let n_ctx = prompt + steps;
    let cpu = engine(model, n_ctx, types, centered, DeviceChoice::Cpu)?;
    let mut gpu = engine(model, n_ctx, types, centered, DeviceChoice::Cuda(0))?;
    let calibration_max_abs = match (&cpu.calibration, &gpu.calibration) {
        (Some(c), Some(g)) => {
            let most = |a: &[Vec<f32>], b: &[Vec<f32>]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| max_abs_diff(x, y))
                    .fold(0f32, f32::max)
            };
            Some([
                most(&c.k_mean, &g.k_mean),
                most(&c.v_mean, &g.v_mean),
                most(&c.k_scale, &g.k_scale),
                most(&c.k_center, &g.k_center),
            ])
        }
        _ => None,
    };
    // The layer types too: turbo2 K's layers are ranked by the calibration.
    gpu.calibration = cpu.calibration.clone();
    gpu.policy = cpu.policy.clone();
    let (mut cc, mut gc) = (cpu.alloc_cache(n_ctx)?, gpu.alloc_cache(n_ctx)?);
    let mut rng = StdRng::seed_from_u64(7);
    let vocab = cpu.model.arch.vocab as u32;
    let ids: Vec<u32> = (0..prompt).map(|_| rng.random_range(0..vocab)).collect();
    let split = prompt / 2;
    let run = |e: &Engine, c: &mut crate::kv::KvCache, ids: &[u32], which| -> Result<Vec<f32>> {
        Ok(e.model
            .forward(ids, c, which)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    run(&cpu, &mut cc, &ids[..split], Logits::Last)?;
    run(&gpu, &mut gc, &ids[..split], Logits::Last)?;
    let want = run(&cpu, &mut cc, &ids[split..], Logits::All)?;
    let got = run(&gpu, &mut gc, &ids[split..], Logits::All)?;
    let prefill_max_abs = max_abs_diff(&want, &got);
    let mut logit_max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let v = vocab as usize;
    let mut next = argmax(&want[want.len() - v..]);
    let (mut decode_max_abs, mut greedy_agree) = (0f32, 0);
    for _ in 0..steps {
        let want = run(&cpu, &mut cc, &[next], Logits::Last)?;
        let got = run(&gpu, &mut gc, &[next], Logits::Last)?;
        decode_max_abs = decode_max_abs.max(max_abs_diff(&want, &got));
        logit_max = want.iter().fold(logit_max, |m, v| m.max(v.abs()));
        next = argmax(&want);
        greedy_agree += usize::from(next == argmax(&got));
    }
    Ok(ParityReport {
        model: model.display().to_string(),
        cache_type: types.0.name().into(),
        cache_type_v: types.1.name().into(),
        centered,
        calibration_max_abs,
        gpu_layers: gc.layers.iter().filter(|l| l.k.on_device()).count(),
        prompt,
        steps,
        prefill_max_abs,
        decode_max_abs,
        logit_max,
        greedy_agree,
    })
}

/// One layer's pieces on random data, GPU against CPU: RoPE, then attention over a cache of
/// `ty` (a prefill chunk onto an empty cache, a second chunk over it, then decode steps).
#[derive(Debug, serde::Serialize)]
pub struct LayerReport {
    pub cache_type: String,
    /// KV heads, GQA group, head dim.
    pub shape: (usize, usize, usize),
    pub centered: bool,
    pub rope_max_abs: f32,
    /// max |gpu − cpu| per step: chunks of 12 and 9 tokens, then three decode steps.
    pub step_max_abs: Vec<f32>,
    /// The same steps with prefill keys in tiles of 8 (the online-softmax merge).
    pub tiled_step_max_abs: Vec<f32>,
    pub out_max: f32,
    /// Per stored position of K head 0: bytes that differ between the two stores.
    pub k_bytes_differing: Vec<usize>,
}

/// Layer 0 of `engine_model`, or with `shape` = (KV heads, GQA group, head dim) the same
/// layer reshaped (the kernels' other head dims and groups on one model). With `centered`,
/// every store centers on one random calibration (means, K channel weights, the channel
/// variances that RotorQuant types even their K and V weights over, and per-head spectra —
/// a random basis, eigenvalues decaying so that SpectralQuant makes groups of three widths;
/// sink rows).
pub fn check_layer(
    engine_model: &Path,
    ty: CacheType,
    shape: Option<(usize, usize, usize)>,
    centered: bool,
) -> Result<LayerReport> {
    use crate::arch::Rope;
    use crate::arch::RopeStyle;
    use crate::kv::{KvCache, KvPolicy};
    use candle_core::{Device, Tensor};
    let gpu_dev = DeviceChoice::Cuda(0).open()?;
    let cpu = engine(engine_model, 64, (ty, ty), false, DeviceChoice::Cpu)?;
    let mut arch = cpu.model.arch.clone();
    if let Some((n_kv, group, hd)) = shape {
        for l in &mut arch.layers {
            (l.n_kv_head, l.n_head, l.head_dim) = (n_kv, n_kv * group, hd);
        }
    }
    let arch = &arch;
    let g = &arch.layers[0];
    let (n_head, n_kv, hd) = (g.n_head, g.n_kv_head, g.head_dim);
    let policy = KvPolicy::uniform(arch.n_layer, ty, ty);
    let mut rng = StdRng::seed_from_u64(3);
    let mut rand =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
    let mut spectrum_rng = StdRng::seed_from_u64(5);
    let mut spectra = || -> Vec<Vec<Spectrum>> {
        let mut head = || {
            let q =
                nalgebra::DMatrix::from_fn(hd, hd, |_, _| spectrum_rng.random_range(-1.0f64..1.0))
                    .qr()
                    .q();
            Spectrum {
                eigenvalues: (0..hd).map(|i| 0.9f32.powi(i as i32)).collect(),
                vt: std::sync::Arc::new((0..hd * hd).map(|x| q[(x / hd, x % hd)] as f32).collect()),
            }
        };
        (0..arch.n_layer)
            .map(|_| (0..n_kv).map(|_| head()).collect())
            .collect()
    };
    let calib = centered.then(|| {
        let per_layer = |x: &mut dyn FnMut() -> Vec<f32>| (0..arch.n_layer).map(|_| x()).collect();
        let n = n_kv * hd;
        KvCalibration {
            tokens: 0,
            k_mean: per_layer(&mut || rand(n)),
            v_mean: per_layer(&mut || rand(n)),
            k_spectra: spectra(),
            v_spectra: spectra(),
            center: true,
            k_scale: per_layer(&mut || rand(n).iter().map(|x| 2f32.powf(x / 2.0)).collect()),
            k_center: Vec::new(),
            k_var: per_layer(&mut || rand(n).iter().map(|x| 2f32.powf(*x)).collect()),
            v_var: per_layer(&mut || rand(n).iter().map(|x| 2f32.powf(*x)).collect()),
            k_noise: Vec::new(),
            moments: Vec::new(),
        }
    });
    let calib = calib.as_ref();
    let mut hc = KvCache::new(arch, &policy, 64, calib, &Device::Cpu)?;
    let mut dc = KvCache::new(arch, &policy, 64, calib, &gpu_dev)?;
    let mut tc = KvCache::new(arch, &policy, 64, calib, &gpu_dev)?;
    let rope = Rope::new(10000.0, hd, 1.0, RopeStyle::Neox, false);
    let freqs = Tensor::new(rope.inv_freq(), &gpu_dev)?;
    let x = rand(5 * n_head * hd);
    let mut want = x.clone();
    rope.apply(&mut want, 7, n_head);
    let got = crate::kv::device::rope(
        &Tensor::from_vec(x, (5 * n_head, hd), &gpu_dev)?,
        &freqs,
        n_head,
        7,
        true,
    )?
    .flatten_all()?
    .to_vec1::<f32>()?;
    let rope_max_abs = max_abs_diff(&want, &got);
    let scale = 1.0 / (hd as f32).sqrt();
    let (mut step_max_abs, mut tiled_step_max_abs, mut out_max) = (Vec::new(), Vec::new(), 0f32);
    let mut pos = 0;
    for t in [12, 9, 1, 1, 1] {
        let (q, k, v) = (
            rand(t * n_head * hd),
            rand(t * n_kv * hd),
            rand(t * n_kv * hd),
        );
        // The CPU attends over roped copies; the GPU ropes inside (fused into the decode step).
        let (mut qr, mut kr) = (q.clone(), k.clone());
        rope.apply(&mut qr, pos, n_head);
        rope.apply(&mut kr, pos, n_kv);
        let want = crate::kv::attention(&mut hc.layers[0], &qr, &kr, &v, pos, n_head, scale)?;
        let up = |x: &[f32], n: usize| Tensor::from_vec(x.to_vec(), (t * n, hd), &gpu_dev);
        let (qd, kd, vd) = (up(&q, n_head)?, up(&k, n_kv)?, up(&v, n_kv)?);
        let rotary = crate::kv::device::Rotary {
            inv_freq: &freqs,
            neox: true,
        };
        let run = |cache: &mut KvCache, tile: Option<usize>| -> Result<Vec<f32>> {
            let l0 = &mut cache.layers[0];
            let out = crate::kv::attention::device::attention(
                l0,
                &qd,
                &kd,
                &vd,
                Some(&rotary),
                pos,
                n_head,
                scale,
                tile,
            )?;
            Ok(out.flatten_all()?.to_vec1::<f32>()?)
        };
        let got = run(&mut dc, None)?;
        step_max_abs.push(max_abs_diff(&want, &got));
        tiled_step_max_abs.push(max_abs_diff(&want, &run(&mut tc, Some(8))?));
        out_max = want.iter().fold(out_max, |m, v| m.max(v.abs()));
        pos += t;
    }
    let Device::Cuda(cd) = &gpu_dev else {
        anyhow::bail!("cuda-check needs a GPU");
    };
    let gpu_rows = dc.layers[0]
        .k
        .gpu
        .as_ref()
        .context("layer 0 is not on the GPU")?
        .to_host(cd)?;
    let [(host_rows, n), _] = hc.layers[0].k.segments(0, 0..pos);
    let rb = hc.layers[0].k.row_bytes;
    let k_bytes_differing = host_rows[..n * rb]
        .chunks(rb)
        .zip(gpu_rows.chunks(rb))
        .map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count())
        .collect();
    Ok(LayerReport {
        k_bytes_differing,
        cache_type: ty.name().into(),
        shape: (n_kv, n_head / n_kv, hd),
        centered,
        rope_max_abs,
        step_max_abs,
        tiled_step_max_abs,
        out_max,
    })
}

/// Decode attention speed on the GPU: one layer of `n_kv` heads × `group` queries, `ctx`
/// random rows of `ty` stored (prefill in 512-token chunks), then `reps` decode steps timed.
#[derive(Debug, serde::Serialize)]
pub struct DecodeTiming {
    pub cache_type: String,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub context: usize,
    /// Per decode step (RoPE, append, attention, output), microseconds.
    pub us: f64,
    /// K and V bytes read per second.
    pub gbps: f64,
}

pub fn time_decode(
    ty: CacheType,
    (n_kv, group, hd): (usize, usize, usize),
    ctx: usize,
    reps: usize,
) -> Result<DecodeTiming> {
    use crate::arch::Rope;
    use crate::arch::RopeStyle;
    use crate::kv::LayerCache;
    use crate::kv::store::RowStore;
    use candle_core::{Device, Tensor};
    let dev = DeviceChoice::Cuda(0).open()?;
    let Device::Cuda(cd) = &dev else {
        anyhow::bail!("cuda-check needs a GPU");
    };
    let store = || RowStore::on_gpu(cd, ty, (n_kv, hd, ctx + reps), (None, None), None);
    let mut cache = LayerCache {
        k: store()?,
        v: store()?,
        head_dim: hd,
        sliding_window: None,
        query_moments: None,
    };
    let n_head = n_kv * group;
    let scale = 1.0 / (hd as f32).sqrt();
    let rand = |rows: usize| Tensor::randn(0f32, 1f32, (rows, hd), &dev);
    let mut pos = 0;
    while pos < ctx {
        let t = (ctx - pos).min(512);
        let (q, k, v) = (rand(t * n_head)?, rand(t * n_kv)?, rand(t * n_kv)?);
        crate::kv::attention::device::attention(
            &mut cache, &q, &k, &v, None, pos, n_head, scale, None,
        )?;
        pos += t;
    }
    let (q, k, v) = (rand(n_head)?, rand(n_kv)?, rand(n_kv)?);
    let rope = Rope::new(500000.0, hd, 1.0, RopeStyle::Interleaved, false);
    let inv_freq = Tensor::new(rope.inv_freq(), &dev)?;
    let rotary = crate::kv::device::Rotary {
        inv_freq: &inv_freq,
        neox: false,
    };
    dev.synchronize()?;
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        crate::kv::attention::device::attention(
            &mut cache,
            &q,
            &k,
            &v,
            Some(&rotary),
            pos,
            n_head,
            scale,
            None,
        )?;
        pos += 1;
    }
    dev.synchronize()?;
    let us = t0.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let bytes = (cache.k.row_bytes + cache.v.row_bytes) * n_kv * ctx;
    Ok(DecodeTiming {
        cache_type: ty.name().into(),
        kv_heads: n_kv,
        group,
        head_dim: hd,
        context: ctx,
        us,
        gbps: bytes as f64 / (us * 1e-6) / 1e9,
    })
}

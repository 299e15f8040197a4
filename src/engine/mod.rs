//! The engine: a loaded model, its tokenizer and chat template, KV caches made to order,
//! and the generation loop every front-end (CLI, server, bench) drives.

pub mod constraint;
pub mod device;
pub mod run;
pub mod sampling;
pub mod scheduler;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::arch::Rope;
use crate::chat::ChatTemplate;
use crate::kv::calibration::{self, CALIBRATION_TEXT, KvCalibration, QueryMoments};
use crate::kv::{CacheType, KvCache, KvPolicy};
use crate::model::layers::Source;
use crate::model::{Logits, Model};
use crate::tokenizer::Tok;
pub use device::DeviceChoice;
use sampling::Sampler;

/// Prompt tokens per forward pass during prefill (llama.cpp's default ubatch).
pub const UBATCH: usize = 512;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model: PathBuf,
    pub n_ctx: usize,
    pub cache_k: CacheType,
    pub cache_v: CacheType,
    /// Overrides the model's own template (`--chat-template`).
    pub chat_template: Option<String>,
    /// `--kv-layer-policy`: a fork mode, preset or per-layer list (see `kv::policy`).
    pub kv_layer_policy: Option<String>,
    /// Center rotation-codec rows on calibrated K/V means (`kv::calibration`); off reproduces
    /// the fork's plain TurboQuant.
    pub kv_centering: bool,
    /// Copy the per-layer embedding table into memory instead of reading it from the map.
    pub ple_resident: bool,
    /// Where SpectralQuant's calibration is read from and saved to (`--kv-calibration`);
    /// `None`: beside the model ([`KvCalibration::path_for`]).
    pub kv_calibration: Option<PathBuf>,
    /// Where weights, activations and the forward pass live (`--device`, `-ngl`).
    pub device: DeviceChoice,
    /// `-ngl N` as given, refused when it would split the model.
    pub n_gpu_layers: Option<usize>,
}

pub struct Engine {
    pub model: Model,
    pub tok: Option<Tok>,
    pub template: Option<ChatTemplate>,
    pub policy: KvPolicy,
    pub calibration: Option<KvCalibration>,
    pub n_ctx: usize,
}

/// Why generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_ms: f64,
    pub gen_ms: f64,
}

impl Engine {
    pub fn load(cfg: &EngineConfig) -> Result<Self> {
        let t0 = Instant::now();
        let device = cfg.device.open()?;
        let model = Model::load(&cfg.model, &device, cfg.ple_resident)
            .with_context(|| format!("loading {}", cfg.model.display()))?;
        device::check_gpu_layers(cfg.n_gpu_layers, model.arch.n_layer)?;
        let tok = match model.source.as_ref() {
            // Converted test checkpoints carry no vocabulary: token ids only, as with HF dirs.
            Source::Gguf(g) if g.meta("tokenizer.ggml.model").is_none() => None,
            Source::Gguf(g) => Some(Tok::from_gguf(g)?),
            Source::Hf(h) => match h.tokenizer_json() {
                Some(_) => Some(Tok::from_hf_dir(&h.dir)?),
                None => None,
            },
        };
        let n_ctx = if cfg.n_ctx == 0 {
            model.arch.max_context
        } else {
            cfg.n_ctx
        };
        if n_ctx > model.arch.max_context {
            tracing::warn!(
                "-c {n_ctx} exceeds the model's training context ({}); quality past it is not guaranteed",
                model.arch.max_context
            );
        }
        let template_src = cfg
            .chat_template
            .clone()
            .or_else(|| tok.as_ref().and_then(|t| t.chat_template.clone()));
        let template = match (template_src, &tok) {
            (Some(src), Some(tok)) => {
                let name = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).unwrap_or_default();
                Some(ChatTemplate::new(&src, name(tok.bos), name(tok.eos))?)
            }
            _ => None,
        };
        let policy = KvPolicy::resolve(
            model.arch.n_layer,
            cfg.cache_k,
            cfg.cache_v,
            cfg.kv_layer_policy.as_deref(),
        )?;
        let a = &model.arch;
        tracing::info!(
            "model: {} ({}), {} layers, hidden {}, {} heads / {} kv heads, head_dim {}, vocab {}, {:.2} MiB on {}; loaded in {:.0} ms",
            cfg.model.display(),
            a.name,
            a.n_layer,
            a.hidden,
            a.layers[0].n_head,
            a.layers[0].n_kv_head,
            a.head_dim_max(),
            a.vocab,
            model.weight_bytes as f64 / 1048576.0,
            cfg.device,
            t0.elapsed().as_secs_f64() * 1e3
        );
        if let Some((bytes, resident)) = model.ple_table() {
            tracing::info!(
                "ple: per-layer embedding table {:.2} MiB {}",
                bytes as f64 / 1048576.0,
                if resident {
                    "copied into memory (--ple resident)"
                } else {
                    "mapped from the file, not resident: rows are read per token"
                }
            );
        }
        let mut engine = Self {
            model,
            tok,
            template,
            policy,
            calibration: None,
            n_ctx,
        };
        let types = || engine.policy.layers.iter().flat_map(|&(k, v)| [k, v]);
        let uses_rotation = types().any(|t| t.codec().rotates());
        let uses_spectrum = types().any(|t| t.codec().needs_spectrum());
        if (cfg.kv_centering && uses_rotation) || uses_spectrum {
            // SpectralQuant's bases are kept beside the model by default; centering alone is
            // quick to measure and uses a file only where `--kv-calibration` names one.
            let path = cfg
                .kv_calibration
                .clone()
                .or_else(|| uses_spectrum.then(|| KvCalibration::path_for(&cfg.model)));
            let mut calib = match path {
                Some(path) => engine.stored_calibration(&cfg.model, &path, uses_spectrum)?,
                None => engine.calibrate(false)?,
            };
            calib.serve(&engine.model.arch, n_ctx);
            // `DH_KV_CHANNEL_SCALE=0`: rows centered but no channel weighted, to compare.
            if std::env::var("DH_KV_CHANNEL_SCALE").as_deref() == Ok("0") {
                calib.k_scale.clear();
                calib.k_var.clear();
                calib.v_var.clear();
            }
            calib.center = cfg.kv_centering;
            let spec = cfg.kv_layer_policy.as_deref();
            if KvPolicy::promotes_k(
                spec,
                cfg.cache_k,
                engine.model.arch.n_layer,
                cfg.kv_centering,
            ) {
                let arch = &engine.model.arch;
                let moved = engine.policy.promote_k(arch, n_ctx, &calib.k_noise);
                tracing::info!(
                    "kv cache: turbo2 K moved to turbo3 on layers {moved:?}, where keys move scores most (--kv-layer-policy uniform to opt out)"
                );
            }
            engine.calibration = Some(calib);
        }
        Ok(engine)
    }

    /// The calibration kept in `path`: read when it was written for these weights (and holds
    /// the bases when `spectra` asks for them), otherwise measured and written there (a
    /// read-only location only warns). Read on any device, it makes the cache store the same
    /// rows as where it was measured.
    fn stored_calibration(
        &self,
        model: &Path,
        path: &Path,
        spectra: bool,
    ) -> Result<KvCalibration> {
        let fp = calibration::fingerprint(model);
        if path.exists() {
            match KvCalibration::load(path, &fp) {
                Ok(Some(c))
                    if c.fits(&self.model.arch)
                        && c.has_moments()
                        && (c.has_spectra() || !spectra) =>
                {
                    tracing::info!("kv calibration: read from {}", path.display());
                    return Ok(c);
                }
                Ok(_) => tracing::info!(
                    "kv calibration: {} was written for other weights or lacks what this cache \
                     needs; measuring again",
                    path.display()
                ),
                Err(e) => tracing::warn!("{e:#}; measuring the calibration again"),
            }
        }
        let calib = self.calibrate(spectra)?;
        match calib.save(path, &fp) {
            Ok(()) => tracing::info!("kv calibration: saved to {}", path.display()),
            Err(e) => tracing::warn!("could not save the kv calibration: {e:#}"),
        }
        Ok(calib)
    }

    /// Reads the built-in calibration text with an f32 cache (f16 on a GPU, whose stores and
    /// flash attention take it: the f32 cache would attend on the host) and keeps its K/V means
    /// (and with `spectra`, each head's covariance spectrum for SpectralQuant).
    fn calibrate(&self, spectra: bool) -> Result<KvCalibration> {
        let t0 = Instant::now();
        let tokens = match &self.tok {
            Some(t) => t.encode(CALIBRATION_TEXT, true)?,
            // Models without a tokenizer (test fixtures) read a fixed pseudo-random sequence.
            None => (0..256u32)
                .map(|i| i.wrapping_mul(2_654_435_761) % self.model.arch.vocab as u32)
                .collect(),
        };
        let arch = &self.model.arch;
        let ty = if self.model.device.is_cuda() {
            CacheType::F16
        } else {
            CacheType::F32
        };
        let policy = KvPolicy::uniform(arch.n_layer, ty, ty);
        let mut cache = KvCache::new(arch, &policy, tokens.len(), None, &self.model.device)?;
        for (il, l) in cache.layers.iter_mut().enumerate() {
            l.query_moments = Some(QueryMoments::new(Rope::for_layer(arch, il), l.k.n_kv_head));
        }
        self.prefill(&mut cache, &tokens)?;
        let calib = cache.calibration(spectra)?;
        tracing::info!(
            "kv calibration: K/V means{} over {} tokens in {:.0} ms (rotation codecs store rows centered on them)",
            if spectra { " and per-head spectra" } else { "" },
            tokens.len(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(calib)
    }

    pub fn tokenizer(&self) -> Result<&Tok> {
        self.tok
            .as_ref()
            .context("this model has no tokenizer: pass token ids (--prompt-ids)")
    }

    /// Tokens of a rendered chat template: BOS added unless the template wrote it already.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        let tok = self.tokenizer()?;
        let has_bos = tok
            .bos
            .and_then(|b| tok.token_str(b))
            .is_some_and(|b| text.starts_with(&b));
        tok.encode(text, !has_bos)
    }

    /// A fresh cache for `n_ctx` tokens, with the KV bytes printed like llama.cpp does.
    pub fn new_cache(&self, n_ctx: usize) -> Result<KvCache> {
        let cache = self.alloc_cache(n_ctx)?;
        tracing::info!("{}", cache.describe());
        Ok(cache)
    }

    /// A fresh cache for `n_ctx` tokens, silently.
    pub fn alloc_cache(&self, n_ctx: usize) -> Result<KvCache> {
        KvCache::new(
            &self.model.arch,
            &self.policy,
            n_ctx,
            self.calibration.as_ref(),
            &self.model.device,
        )
    }

    /// Feeds `tokens` in ubatches; returns the logits of the last one.
    pub fn prefill(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut last = None;
        for chunk in tokens.chunks(UBATCH) {
            last = Some(self.model.forward(chunk, cache, Logits::Last)?);
        }
        let logits = last.context("empty prompt")?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Generates up to `max_tokens` after `prompt`; `on_token` sees each token's text piece and may
    /// return false to stop. Stops at end-of-generation tokens and at any of `stop`.
    pub fn generate(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop: &[String],
        mut on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if prompt.len() + cache.len > cache.n_ctx {
            bail!(
                "the prompt is {} tokens but the context holds {} (-c)",
                prompt.len() + cache.len,
                cache.n_ctx
            );
        }
        let t0 = Instant::now();
        let mut logits = self.prefill(cache, prompt)?;
        let prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let mut history = prompt.to_vec();
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        while tokens.len() < max_tokens && cache.len < cache.n_ctx {
            let next = sampler.sample(&logits, &history);
            if !sampler.params.ignore_eos && self.tok.as_ref().is_some_and(|t| t.is_eog(next)) {
                finish = FinishReason::Stop;
                break;
            }
            tokens.push(next);
            history.push(next);
            let piece = match &self.tok {
                Some(t) => self.piece(t, &tokens)?,
                None => String::new(),
            };
            text.push_str(&piece);
            if let Some(at) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(at);
                finish = FinishReason::Stop;
                break;
            }
            if !on_token(next, &piece) {
                finish = FinishReason::Stop;
                break;
            }
            if tokens.len() == max_tokens {
                break;
            }
            let l = self.model.forward(&[next], cache, Logits::Last)?;
            logits = l.flatten_all()?.to_vec1::<f32>()?;
        }
        Ok(Generation {
            tokens,
            text,
            finish,
            prompt_ms,
            gen_ms: t1.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Text the last token adds: decode the tail and diff, so multi-byte characters split over
    /// tokens come out whole.
    pub(crate) fn piece(&self, tok: &Tok, tokens: &[u32]) -> Result<String> {
        let n = tokens.len();
        let ctx = &tokens[n.saturating_sub(8)..];
        let before = tok.decode(&ctx[..ctx.len() - 1])?;
        let after = tok.decode(ctx)?;
        if after.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(after
            .strip_prefix(before.trim_end_matches('\u{FFFD}'))
            .unwrap_or(&after)
            .to_string())
    }
}

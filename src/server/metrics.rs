//! Prometheus metrics for `/metrics`: request and token counters, TTFT and per-token latency
//! histograms, KV bytes and busy slots (read from the scheduler at scrape time).

use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::engine::scheduler::Scheduler;

pub struct Metrics {
    registry: Registry,
    /// Finished HTTP requests on the generation routes, by status class.
    pub requests: IntCounterVec,
    pub ttft: Histogram,
    pub token_latency: Histogram,
    prompt_tokens: IntCounter,
    cached_tokens: IntCounter,
    generated_tokens: IntCounter,
    cancelled: IntCounter,
    kv_used: IntGauge,
    kv_total: IntGauge,
    slots_busy: IntGauge,
    slots_total: IntGauge,
    queued: IntGauge,
}

fn buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 16).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("dh".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Generation requests by outcome"),
            &["status"],
        )?;
        let ttft = Histogram::with_opts(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "Request received to first token",
            )
            .buckets(buckets()),
        )?;
        let token_latency = Histogram::with_opts(
            HistogramOpts::new(
                "time_per_output_token_seconds",
                "Gap between generated tokens",
            )
            .buckets(buckets()),
        )?;
        let counter = |n: &str, h: &str| IntCounter::new(n, h);
        let gauge = |n: &str, h: &str| IntGauge::new(n, h);
        let m = Self {
            requests,
            ttft,
            token_latency,
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens received")?,
            cached_tokens: counter(
                "prompt_tokens_cached_total",
                "Prompt tokens reused from a slot's cache",
            )?,
            generated_tokens: counter("generated_tokens_total", "Tokens generated")?,
            cancelled: counter(
                "requests_cancelled_total",
                "Requests dropped because the client left",
            )?,
            kv_used: gauge("kv_cache_used_bytes", "KV bytes holding cached tokens")?,
            kv_total: gauge("kv_cache_total_bytes", "KV bytes allocated")?,
            slots_busy: gauge("slots_busy", "Slots serving a request")?,
            slots_total: gauge("slots_total", "Slots (-np)")?,
            queued: gauge("requests_queued", "Requests waiting for a slot")?,
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.ttft.clone()))?;
        m.registry.register(Box::new(m.token_latency.clone()))?;
        for c in [
            &m.prompt_tokens,
            &m.cached_tokens,
            &m.generated_tokens,
            &m.cancelled,
        ] {
            m.registry.register(Box::new(c.clone()))?;
        }
        for g in [
            &m.kv_used,
            &m.kv_total,
            &m.slots_busy,
            &m.slots_total,
            &m.queued,
        ] {
            m.registry.register(Box::new(g.clone()))?;
        }
        Ok(m)
    }

    /// The exposition text, with the scheduler's counters and slot state copied in first.
    pub fn render(&self, sched: &Scheduler) -> String {
        let s = &sched.stats;
        let sync = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        sync(&self.prompt_tokens, s.prompt_tokens.load(Ordering::Relaxed));
        sync(
            &self.cached_tokens,
            s.cached_prompt_tokens.load(Ordering::Relaxed),
        );
        sync(
            &self.generated_tokens,
            s.generated_tokens.load(Ordering::Relaxed),
        );
        sync(&self.cancelled, s.cancelled.load(Ordering::Relaxed));
        self.queued.set(s.queued.load(Ordering::Relaxed) as i64);
        if let Ok(slots) = sched.slots.lock() {
            let used: usize = slots
                .iter()
                .map(|s| s.kv_bytes * s.n_cached / s.n_ctx.max(1))
                .sum();
            self.kv_used.set(used as i64);
            self.kv_total
                .set(slots.iter().map(|s| s.kv_bytes).sum::<usize>() as i64);
            self.slots_busy
                .set(slots.iter().filter(|s| s.is_processing).count() as i64);
            self.slots_total.set(slots.len() as i64);
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

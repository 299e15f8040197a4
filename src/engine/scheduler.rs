//! Slots and the scheduler: `-np` sequences served by one thread with continuous batching.
//!
//! Each slot owns a KV cache of `n_ctx / n_slots` tokens and remembers the tokens in it. A new
//! request takes the free slot sharing the longest token prefix with its prompt and only
//! prefills the rest. Every step, each busy slot advances: a prompt chunk for slots still
//! reading, one token for slots generating, so requests join and leave between decode steps.
//! A request whose receiver is gone (client disconnected) is dropped at the next step.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use tokio::sync::mpsc;

use super::constraint::Constraint;
use super::sampling::{Sampler, SamplingParams};
use super::{Engine, FinishReason, UBATCH};
use crate::kv::KvCache;
use crate::model::Logits;

/// One completion request, tokenized.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub constraint: Option<Constraint>,
    /// Log-probabilities of each chosen token plus this many alternatives.
    pub logprobs: Option<usize>,
    pub events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top: Vec<(String, f32, Vec<u8>)>,
}

#[derive(Debug)]
pub enum Event {
    /// The request holds a slot; `cached` prompt tokens were already in its cache.
    Started {
        slot: usize,
        cached: usize,
    },
    /// Text to show (stop strings held back until they can no longer match) and the token(s)
    /// it came from.
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done(Summary),
    Error(String),
}

#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_ms: f64,
    pub gen_ms: f64,
}

/// What `/slots` and `/metrics` show about one slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub id: usize,
    pub n_ctx: usize,
    pub is_processing: bool,
    /// Tokens held in the slot's cache.
    pub n_cached: usize,
    pub kv_bytes: usize,
}

/// Counters the scheduler keeps for `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    pub queued: AtomicUsize,
}

/// The front-ends' end of the scheduler.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Request>,
    pub slots: Arc<Mutex<Vec<SlotStatus>>>,
    pub stats: Arc<Stats>,
    pub slot_ctx: usize,
}

#[derive(Debug)]
pub enum SubmitError {
    /// Every slot is busy and the queue is full.
    Busy,
    /// The scheduler has stopped.
    Closed,
}

impl Scheduler {
    /// Allocates `n_slots` caches of `n_ctx / n_slots` tokens and starts the scheduling thread;
    /// up to `queue` requests wait for a slot beyond those being served.
    pub fn start(engine: Arc<Engine>, n_slots: usize, queue: usize) -> Result<Self> {
        let n_slots = n_slots.max(1);
        let slot_ctx = engine.n_ctx / n_slots;
        anyhow::ensure!(
            slot_ctx > 0,
            "-c {} is too small for {n_slots} slots",
            engine.n_ctx
        );
        let mut slots = Vec::with_capacity(n_slots);
        for id in 0..n_slots {
            let cache = engine.alloc_cache(slot_ctx)?;
            slots.push(Slot {
                id,
                cache,
                tokens: Vec::new(),
                job: None,
                last_used: 0,
            });
        }
        let kv_total: usize = slots.iter().map(|s| s.kv_bytes()).sum();
        tracing::info!(
            "slots: {n_slots} x {slot_ctx} tokens; {}; kv cache total {:.2} MiB",
            slots[0].cache.describe(),
            kv_total as f64 / 1048576.0
        );
        let status = Arc::new(Mutex::new(slots.iter().map(Slot::status).collect()));
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(queue.max(1));
        let mut worker = Worker {
            engine,
            slots,
            rx,
            status: status.clone(),
            stats: stats.clone(),
            clock: 0,
        };
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            tx,
            slots: status,
            stats,
            slot_ctx,
        })
    }

    /// Queues a request, or says why not without waiting.
    pub fn submit(&self, req: Request) -> std::result::Result<(), SubmitError> {
        match self.tx.try_send(req) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(SubmitError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::Closed),
        }
    }
}

struct Slot {
    id: usize,
    cache: KvCache,
    /// The tokens whose K/V the cache holds, in order.
    tokens: Vec<u32>,
    job: Option<Job>,
    /// When the slot last took a request (least recently used slots are reused first).
    last_used: u64,
}

struct Job {
    req: Request,
    /// Prompt tokens not yet in the cache.
    pending: Vec<u32>,
    cached: usize,
    /// Logits for the next token, once the prompt is read.
    logits: Option<Vec<f32>>,
    sampler: Sampler,
    history: Vec<u32>,
    generated: Vec<u32>,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    logprobs: Vec<TokenLogprob>,
    started: Instant,
    first_token: Option<Instant>,
}

struct Worker {
    engine: Arc<Engine>,
    slots: Vec<Slot>,
    rx: mpsc::Receiver<Request>,
    status: Arc<Mutex<Vec<SlotStatus>>>,
    stats: Arc<Stats>,
    clock: u64,
}

impl Slot {
    fn kv_bytes(&self) -> usize {
        self.cache.k_bytes() + self.cache.v_bytes()
    }

    fn status(&self) -> SlotStatus {
        SlotStatus {
            id: self.id,
            n_ctx: self.cache.n_ctx,
            is_processing: self.job.is_some(),
            n_cached: self.cache.len,
            kv_bytes: self.kv_bytes(),
        }
    }
}

impl Worker {
    fn run(&mut self) {
        loop {
            if !self.admit() {
                return;
            }
            self.step();
            self.publish();
        }
    }

    /// Moves queued requests into free slots. Blocks while there is nothing at all to do;
    /// returns false once the front-ends are gone and the slots are idle.
    fn admit(&mut self) -> bool {
        loop {
            let busy = self.slots.iter().any(|s| s.job.is_some());
            let free = self.slots.iter().any(|s| s.job.is_none());
            if !free {
                return true;
            }
            let req = if busy {
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => return true,
                }
            } else {
                match self.rx.blocking_recv() {
                    Some(r) => r,
                    None => return false,
                }
            };
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            if req.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.assign(req);
        }
    }

    fn assign(&mut self, req: Request) {
        let max_rewind = self.slots[0].cache.max_rewind();
        let reusable = |s: &Slot| {
            let common = s
                .tokens
                .iter()
                .zip(&req.prompt)
                .take_while(|(a, b)| a == b)
                .count()
                // At least one prompt token is read again, for its logits.
                .min(req.prompt.len().saturating_sub(1));
            if s.tokens.len() - common <= max_rewind {
                common
            } else {
                0
            }
        };
        let Some(slot) = self
            .slots
            .iter_mut()
            .filter(|s| s.job.is_none())
            .max_by_key(|s| (reusable(s), u64::MAX - s.last_used))
        else {
            return;
        };
        let cached = reusable(slot);
        slot.cache.truncate(cached);
        slot.tokens.truncate(cached);
        self.clock += 1;
        slot.last_used = self.clock;
        let _ = req.events.send(Event::Started {
            slot: slot.id,
            cached,
        });
        self.stats
            .prompt_tokens
            .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
        self.stats
            .cached_prompt_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        slot.job = Some(Job {
            pending: req.prompt[cached..].to_vec(),
            cached,
            logits: None,
            sampler: Sampler::new(req.sampling.clone()),
            history: req.prompt.clone(),
            generated: Vec::new(),
            text: String::new(),
            sent: 0,
            logprobs: Vec::new(),
            started: Instant::now(),
            first_token: None,
            req,
        });
    }

    /// One step for every busy slot: a prompt chunk or one generated token.
    fn step(&mut self) {
        let engine = self.engine.clone();
        for slot in &mut self.slots {
            let Some(job) = slot.job.as_mut() else {
                continue;
            };
            if job.req.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                slot.job = None;
                continue;
            }
            // A bug in one request's step must not take the scheduler down with it.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                advance(&engine, slot, &self.stats)
            }))
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "internal error while generating (see the server log)"
                ))
            });
            match stepped {
                Ok(None) => {}
                Ok(Some(summary)) => {
                    if let Some(job) = slot.job.take() {
                        let _ = job.req.events.send(Event::Done(summary));
                    }
                }
                Err(e) => {
                    // The cache may hold a half-written chunk: forget it all.
                    slot.cache.truncate(0);
                    slot.tokens.clear();
                    if let Some(job) = slot.job.take() {
                        let _ = job.req.events.send(Event::Error(format!("{e:#}")));
                    }
                }
            }
        }
    }

    fn publish(&self) {
        if let Ok(mut s) = self.status.lock() {
            *s = self.slots.iter().map(Slot::status).collect();
        }
    }
}

/// Advances one slot; returns its summary when the request is finished.
fn advance(engine: &Engine, slot: &mut Slot, stats: &Stats) -> Result<Option<Summary>> {
    let Slot {
        cache, tokens, job, ..
    } = slot;
    let job = job.as_mut().expect("advance is called on busy slots");
    let Some(mut logits) = job.logits.take() else {
        let n = job.pending.len().min(UBATCH);
        let chunk: Vec<u32> = job.pending.drain(..n).collect();
        let out = engine.model.forward(&chunk, cache, Logits::Last)?;
        tokens.extend_from_slice(&chunk);
        if job.pending.is_empty() {
            job.logits = Some(out.flatten_all()?.to_vec1::<f32>()?);
        }
        return Ok(None);
    };
    if job.first_token.is_none() {
        job.first_token = Some(Instant::now());
    }
    let logprob_of = job.req.logprobs.map(|top| (log_softmax(&logits), top));
    if let Some(c) = job.req.constraint.as_mut() {
        c.mask(&mut logits)?;
    }
    let next = job.sampler.sample(&logits, &job.history);
    let tok = engine.tokenizer()?;
    let eog = tok.is_eog(next) && !job.sampler.params.ignore_eos;
    let mut finish = None;
    if eog {
        finish = Some(FinishReason::Stop);
    } else {
        if let Some(c) = job.req.constraint.as_mut() {
            c.accept(next)?;
        }
        job.generated.push(next);
        job.history.push(next);
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some((lp, top)) = logprob_of {
            job.logprobs.push(token_logprob(engine, &lp, next, top));
        }
        job.text.push_str(&engine.piece(tok, &job.generated)?);
        if let Some(at) = job
            .req
            .stop
            .iter()
            .filter_map(|s| job.text.find(s.as_str()))
            .min()
        {
            job.text.truncate(at);
            finish = Some(FinishReason::Stop);
        } else if job.req.constraint.as_ref().is_some_and(Constraint::is_done) {
            finish = Some(FinishReason::Stop);
        } else if job.generated.len() >= job.req.max_tokens || cache.len + 1 >= cache.n_ctx {
            finish = Some(FinishReason::Length);
        }
    }
    // Text that no stop string can still claim goes out now; the rest waits.
    let safe = if finish.is_some() {
        job.text.len()
    } else {
        held_back(&job.text, &job.req.stop)
    };
    if safe > job.sent || !job.logprobs.is_empty() {
        let text = job.text[job.sent..safe.max(job.sent)].to_string();
        job.sent = safe.max(job.sent);
        let _ = job.req.events.send(Event::Text {
            text,
            logprobs: std::mem::take(&mut job.logprobs),
        });
    }
    if let Some(finish) = finish {
        let first = job.first_token.unwrap_or(job.started);
        return Ok(Some(Summary {
            finish,
            prompt_tokens: job.history.len() - job.generated.len(),
            cached_tokens: job.cached,
            completion_tokens: job.generated.len(),
            prompt_ms: (first - job.started).as_secs_f64() * 1e3,
            gen_ms: first.elapsed().as_secs_f64() * 1e3,
        }));
    }
    let l = engine.model.forward(&[next], cache, Logits::Last)?;
    tokens.push(next);
    job.logits = Some(l.flatten_all()?.to_vec1::<f32>()?);
    Ok(None)
}

/// End of the text that is safe to send: short of any tail that begins a stop string.
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut safe = text.len();
    for s in stop {
        for k in (1..s.len()).rev() {
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                safe = safe.min(text.len() - k);
                break;
            }
        }
    }
    while !text.is_char_boundary(safe) {
        safe -= 1;
    }
    safe
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    logits.iter().map(|&l| l - lse).collect()
}

fn token_logprob(engine: &Engine, lp: &[f32], token: u32, top: usize) -> TokenLogprob {
    let text = |id: u32| {
        engine
            .tok
            .as_ref()
            .and_then(|t| t.decode(&[id]).ok())
            .unwrap_or_default()
    };
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let k = top.min(order.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
    }
    order.truncate(k);
    order.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
    let t = text(token);
    TokenLogprob {
        bytes: t.as_bytes().to_vec(),
        token: t,
        logprob: lp[token as usize],
        top: order
            .into_iter()
            .map(|id| {
                let s = text(id);
                let b = s.as_bytes().to_vec();
                (s, lp[id as usize], b)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prefixes_are_held_back() {
        let stop = vec!["\n\nUser:".to_string()];
        assert_eq!(held_back("Hello\n\nUs", &stop), 5);
        assert_eq!(held_back("Hello", &stop), 5);
        assert_eq!(held_back("Hello\n", &stop), 5);
    }

    #[test]
    fn log_softmax_normalizes() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let sum: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
}

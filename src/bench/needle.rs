//! Needle in a haystack: a fact placed early in a long filler text, asked for at the end. The
//! filler is real prose (a text file, e.g. wikitext), the needle a made-up passphrase the model
//! cannot guess; a run passes when greedy decoding reproduces it.

use anyhow::{Result, bail};

use crate::chat::Message;
use crate::engine::Engine;
use crate::engine::sampling::{Sampler, SamplingParams};

pub const NEEDLE_ANSWER: &str = "violet-harbor-7291";

#[derive(Debug, Clone, serde::Serialize)]
pub struct NeedleResult {
    pub context_tokens: usize,
    pub depth: f64,
    pub answer: String,
    pub pass: bool,
}

/// Builds a prompt of about `n_tokens` tokens: filler with the needle at fraction `depth`, then
/// the question, wrapped in the model's chat template when it has one and `raw` is off.
pub fn build_prompt(
    engine: &Engine,
    filler: &str,
    n_tokens: usize,
    depth: f64,
    raw: bool,
) -> Result<Vec<u32>> {
    let tok = engine.tokenizer()?;
    let needle = format!(" The secret passphrase is {NEEDLE_ANSWER}. Remember it. ");
    let question = "What is the secret passphrase? Answer with the passphrase only.";
    let filler_ids = tok.encode(filler, false)?;
    // Room for the needle, the question and the template's own tokens.
    let budget = n_tokens.saturating_sub(96);
    if filler_ids.len() < budget {
        bail!(
            "the filler text has {} tokens, {} are needed",
            filler_ids.len(),
            budget
        );
    }
    let cut = (budget as f64 * depth) as usize;
    let before = tok.decode(&filler_ids[..cut])?;
    let after = tok.decode(&filler_ids[cut..budget])?;
    let body = format!("{before}{needle}{after}\n\n{question}");
    let template = engine.template.as_ref().filter(|_| !raw);
    let ids = match template {
        Some(t) => {
            let msgs = [Message {
                role: "user".into(),
                content: body,
            }];
            // The answer's first words are given, as a cue small models need to start copying.
            let text = t.render(&msgs, None, true)? + "The secret passphrase is";
            // A rendered template carries its own BOS where the model uses one.
            let has_bos = tok
                .bos
                .and_then(|b| tok.token_str(b))
                .is_some_and(|b| text.starts_with(&b));
            tok.encode(&text, !has_bos)?
        }
        None => tok.encode(&format!("{body}\nThe secret passphrase is"), true)?,
    };
    Ok(ids)
}

/// Runs one needle test with greedy decoding.
pub fn run_one(
    engine: &Engine,
    filler: &str,
    n_tokens: usize,
    depth: f64,
    raw: bool,
) -> Result<NeedleResult> {
    let prompt = build_prompt(engine, filler, n_tokens, depth, raw)?;
    let mut cache = engine.new_cache(prompt.len() + 32)?;
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let g = engine.generate(&mut cache, &prompt, 24, &mut sampler, &[], |_, _| true)?;
    Ok(NeedleResult {
        context_tokens: prompt.len(),
        depth,
        pass: g.text.contains(NEEDLE_ANSWER),
        answer: g.text.trim().to_string(),
    })
}

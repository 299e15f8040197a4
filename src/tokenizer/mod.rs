//! Tokenizers: GGUF vocabularies (BPE as in SmolLM2/Qwen, SentencePiece as in Gemma/Llama-2) built
//! into a `tokenizers::Tokenizer`, or an HF `tokenizer.json`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::model::gguf::GgufFile;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;
const TYPE_BYTE: i32 = 6;

pub struct Tok {
    pub inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end a turn besides EOS (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`...).
    pub eog: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

impl Tok {
    /// `text` → ids, with BOS when the model wants it (`add_special`) and special tokens parsed.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("detokenize: {e}"))
    }

    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn is_eog(&self, id: u32) -> bool {
        Some(id) == self.eos || self.eog.contains(&id)
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g
            .meta_str("tokenizer.ggml.model")
            .context("GGUF has no tokenizer (tokenizer.ggml.model)")?;
        let tokens = strings(g.meta("tokenizer.ggml.tokens"))
            .context("GGUF has no tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match g.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let mut inner = match model {
            "gpt2" => gpt2_tokenizer(g, &tokens)?,
            "llama" => spm_tokenizer(g, &tokens, &types)?,
            other => bail!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
        };
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TYPE_CONTROL || **t == TYPE_USER_DEFINED)
            .map(|(s, t)| AddedToken::from(s.clone(), *t == TYPE_CONTROL))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
        let id = |k: &str| g.meta_u32(k);
        let eog = eog_tokens(&tokens);
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            eog,
            add_bos: g
                .meta_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(model == "llama"),
            chat_template: g.meta_str("tokenizer.chat_template").map(str::to_string),
        })
    }

    /// An HF `tokenizer.json` plus `tokenizer_config.json` (BOS, EOS, chat template) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner =
            Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let tok_id = |k: &str| {
            let v = cfg.get(k)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let vocab: Vec<String> = (0..inner.get_vocab_size(true) as u32)
            .map(|i| inner.id_to_token(i).unwrap_or_default())
            .collect();
        Ok(Self {
            bos: tok_id("bos_token"),
            eos: tok_id("eos_token"),
            eog: eog_tokens(&vocab),
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: cfg
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            inner,
        })
    }
}

fn strings(v: Option<&Value>) -> Option<Vec<String>> {
    match v? {
        Value::Array(a) => a.iter().map(|x| x.to_string().ok().cloned()).collect(),
        _ => None,
    }
}

fn eog_tokens(vocab: &[String]) -> Vec<u32> {
    const EOG: &[&str] = &[
        "<|im_end|>",
        "<end_of_turn>",
        "<|eot_id|>",
        "<|end|>",
        "<|endoftext|>",
        "<|eom_id|>",
    ];
    vocab
        .iter()
        .enumerate()
        .filter(|(_, s)| EOG.contains(&s.as_str()))
        .map(|(i, _)| i as u32)
        .collect()
}

/// Byte-level BPE with the pre-tokenizer regex llama.cpp uses for `tokenizer.ggml.pre`.
fn gpt2_tokenizer(g: &GgufFile, tokens: &[String]) -> Result<Tokenizer> {
    let merges: Vec<(String, String)> = strings(g.meta("tokenizer.ggml.merges"))
        .context("BPE tokenizer without tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("building BPE: {e}"))?;
    let mut tk = Tokenizer::new(bpe);
    let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        // llama.cpp splits digits one by one before the GPT-2 regex for these.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            let digits = Split::new(
                SplitPattern::Regex(r"\p{N}".into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            tk.with_pre_tokenizer(Some(PreSequence::new(vec![
                digits.into(),
                byte_level.into(),
            ])));
        }
        "gpt2" | "default" | "mpt" | "olmo" | "jais" => {
            tk.with_pre_tokenizer(Some(byte_level));
        }
        other => bail!("unsupported BPE pre-tokenizer `{other}`"),
    }
    tk.with_decoder(Some(ByteLevel::default()));
    Ok(tk)
}

/// SentencePiece-style BPE: llama.cpp merges the adjacent pair whose joined token scores highest,
/// which is BPE with every (left, right) split of a vocabulary token ranked by that token's score.
fn spm_tokenizer(g: &GgufFile, tokens: &[String], types: &[i32]) -> Result<Tokenizer> {
    let scores: Vec<f32> = match g.meta("tokenizer.ggml.scores") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
        _ => bail!("SentencePiece tokenizer without tokenizer.ggml.scores"),
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mergeable = |i: usize| !matches!(types[i], TYPE_CONTROL | TYPE_UNUSED | TYPE_BYTE);
    let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
    for (i, tok) in tokens.iter().enumerate() {
        if !mergeable(i) || tok.chars().nth(1).is_none() {
            continue;
        }
        for (cut, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(cut);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r))
                && mergeable(li as usize)
                && mergeable(ri as usize)
            {
                ranked.push((scores[i], i as u32, l.to_string(), r.to_string()));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges = ranked.into_iter().map(|(_, _, l, r)| (l, r)).collect();
    let unk = g
        .meta_u32("tokenizer.ggml.unknown_token_id")
        .and_then(|i| tokens.get(i as usize).cloned());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow::anyhow!("building SentencePiece BPE: {e}"))?;
    let mut tk = Tokenizer::new(bpe);
    let replace = Replace::new(" ", "▁").map_err(|e| anyhow::anyhow!("{e}"))?;
    if g.meta_bool("tokenizer.ggml.add_space_prefix")
        .unwrap_or(true)
    {
        tk.with_normalizer(Some(NormalizerSequence::new(vec![
            Prepend::new("▁".into()).into(),
            replace.into(),
        ])))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    } else {
        tk.with_normalizer(Some(replace))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let space = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new("▁", " ").map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    tk.with_decoder(Some(DecoderSequence::new(vec![
        space,
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    Ok(tk)
}

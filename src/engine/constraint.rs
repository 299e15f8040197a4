//! Constrained decoding with llguidance: a JSON schema or a tool-call grammar becomes a mask over
//! the vocabulary at every step, so even a 135M model emits JSON that parses and validates.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::tokenizer::Tok;

/// What the output must match.
#[derive(Debug, Clone)]
pub enum Grammar {
    /// A JSON value valid against this schema (`response_format` json_schema / json_object).
    JsonSchema(Value),
    /// One Hermes-format call `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` to
    /// one of these OpenAI `tools[].function` objects.
    ToolCall(Vec<Value>),
}

/// Compiles grammars against one tokenizer; built once per model.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

/// The live state of one constrained sequence.
pub struct Constraint {
    matcher: Matcher,
}

/// llguidance's view of our tokenizer: token bytes for the trie, our encoder for fast-forwarding.
struct TokAdapter {
    trie: TokTrie,
    tok: tokenizers::Tokenizer,
}

impl TokenizerEnv for TokAdapter {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        self.tok
            .encode_fast(text.as_ref(), false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }
}

impl GrammarCompiler {
    pub fn new(tok: &Tok, vocab: usize) -> Result<Self> {
        let json: Value = serde_json::from_str(
            &tok.inner
                .to_string(false)
                .map_err(|e| anyhow!("serializing the tokenizer: {e}"))?,
        )?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .context("reading token bytes for constrained decoding")?;
        words.resize(vocab.max(words.len()), Vec::new());
        let eos = tok
            .eog
            .first()
            .copied()
            .or(tok.eos)
            .context("constrained decoding needs an end-of-turn token")?;
        let mut info = TokRxInfo::new(words.len() as u32, eos);
        info.tok_bos = tok.bos;
        let env: TokEnv = Arc::new(TokAdapter {
            trie: TokTrie::from(&info, &words),
            tok: tok.inner.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.set_stderr_log_level(0);
        Ok(Self { factory })
    }

    /// Checks and compiles `grammar`; errors name what is wrong with the schema.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let top = match grammar {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)?),
            Grammar::ToolCall(functions) => {
                let calls = functions
                    .iter()
                    .map(|f| {
                        let name = f
                            .get("name")
                            .and_then(Value::as_str)
                            .context("a tool has no function name")?;
                        let params = f
                            .get("parameters")
                            .cloned()
                            .unwrap_or_else(|| json!({"type": "object"}));
                        Ok(json!({
                            "type": "object",
                            "properties": {"name": {"const": name}, "arguments": params},
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        }))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let schema = compact(&json!({"anyOf": calls}))?;
                TopLevelGrammar::from_lark(format!(
                    "start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {schema}"
                ))
            }
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| anyhow!("invalid schema: {e}"))?;
        Ok(Constraint {
            matcher: Matcher::new(Ok(parser)),
        })
    }
}

/// Single-line JSON with `", "` and `": "` separators, which small models follow most easily,
/// and objects closed to properties they do not list.
fn compact(schema: &Value) -> Result<Value> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(anyhow!(
            "invalid schema: a JSON Schema is an object, got {schema}"
        ));
    }
    let mut schema = schema.clone();
    close_objects(&mut schema);
    if let Some(obj) = schema.as_object_mut() {
        let opts = JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..JsonCompileOptions::default()
        };
        obj.insert("x-guidance".into(), serde_json::to_value(opts)?);
    }
    Ok(schema)
}

/// Objects that list `properties` but say nothing of `additionalProperties` take no others, as
/// llama.cpp's grammar converter reads them: a small model given an open object keeps inventing
/// keys until it runs out of tokens.
fn close_objects(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

impl Constraint {
    /// Sets the logits of tokens the grammar forbids to -inf. Once the grammar is complete only
    /// the end-of-turn token remains.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask()
            .map_err(|e| anyhow!("constraint: {e}"))?;
        for (i, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("constraint: {e}"))
    }

    /// The grammar can take no more tokens: generation ends here.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_without_additional_properties_are_closed() {
        let mut s = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {}}},
            "items": [{"properties": {}, "additionalProperties": true}]});
        close_objects(&mut s);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(s["items"][0]["additionalProperties"], true);
    }

    #[test]
    fn a_schema_must_be_an_object() {
        assert!(compact(&json!("a string")).is_err());
        assert_eq!(
            compact(&json!({})).unwrap()["x-guidance"]["whitespace_flexible"],
            false
        );
    }
}

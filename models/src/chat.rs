//! Chat data: `{"messages": [{"role", "content"}, ...]}` conversations rendered by the model's
//! own chat template (the Jinja `chat_template` of its `tokenizer_config.json`), as transformers'
//! `apply_chat_template` renders them, and the tokens the loss counts: every assistant turn's.
//!
//! The template runs in [minijinja] with the settings transformers gives Jinja (blocks trimmed,
//! `raise_exception`, Python's string methods), and the special tokens (`bos_token`,
//! `eos_token`, ...) as variables. An assistant turn's text is found by rendering the
//! conversation turn by turn: what rendering the turns up to it adds to the turns before it
//! with the generation prompt (so the prompt's `<|im_start|>assistant\n` is not learnt, while
//! the end-of-turn token the model must learn to emit is).
//!
//! ```
//! use candle_parallel_models::chat::{ChatTemplate, Message};
//! let t = ChatTemplate::new(
//!     "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}\
//!      {% if add_generation_prompt %}<|assistant|>{% endif %}",
//!     "<s>",
//!     "</s>",
//! )?;
//! let chat = [Message::new("user", "2 + 2?"), Message::new("assistant", "4")];
//! let (text, spans) = t.render_with_assistant_spans(&chat)?;
//! assert_eq!(text, "<|user|>2 + 2?</s><|assistant|>4</s>");
//! assert_eq!(&text[spans[0].clone()], "4</s>");
//! # Ok::<(), candle_core::Error>(())
//! ```
use candle_core::{bail, Result};
use std::ops::Range;
use std::path::Path;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The roles a conversation row may hold.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// The turns of a `{"messages": [...]}` row, or why it is not one: a missing or empty list, a
/// turn without a string `role` and `content`, an unknown role, no assistant turn.
pub fn parse_messages(row: &serde_json::Value) -> std::result::Result<Vec<Message>, String> {
    let Some(list) = row.get("messages").and_then(|m| m.as_array()) else {
        return Err("no list field \"messages\"".into());
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = |k: &str| {
            m.get(k)
                .and_then(|v| v.as_str())
                .ok_or(format!("messages[{i}] has no string \"{k}\""))
        };
        let (role, content) = (field("role")?, field("content")?);
        if !ROLES.contains(&role) {
            return Err(format!(
                "messages[{i}] has the unknown role \"{role}\" (roles: {})",
                ROLES.join(", ")
            ));
        }
        out.push(Message::new(role, content));
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("no assistant turn (nothing to learn)".into());
    }
    Ok(out)
}

/// A model's chat template, ready to render conversations.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// The special tokens the template sees as variables (`bos_token`, `eos_token`, ...).
    tokens: Vec<(String, String)>,
}

/// A special token of `tokenizer_config.json`: a string, or an added token's `{"content"}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

const SPECIAL_TOKENS: [&str; 6] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
];

fn template_err(e: minijinja::Error) -> candle_core::Error {
    // minijinja's `{:#}` carries the template line that failed.
    candle_core::Error::msg(format!("chat template: {e:#}"))
}

impl ChatTemplate {
    /// The template `source` (Jinja, as in `tokenizer_config.json`) with `bos` and `eos` as its
    /// `bos_token` and `eos_token`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        Self::with_tokens(
            source,
            vec![
                ("bos_token".into(), bos.into()),
                ("eos_token".into(), eos.into()),
            ],
        )
    }

    fn with_tokens(source: &str, tokens: Vec<(String, String)>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // transformers' Jinja settings: blocks trimmed, the final newline dropped.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // transformers' `{% generation %}` markers only tag text; the turn-by-turn rendering
        // finds the assistant's text without them.
        let mut source = source.to_string();
        for tag in ["generation", "endgeneration"] {
            for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
                source = source.replace(&format!("{open} {tag} {close}"), "");
            }
        }
        env.add_template_owned("chat", source)
            .map_err(template_err)?;
        Ok(Self { env, tokens })
    }

    /// The template of the model in `dir`: `tokenizer_config.json`'s `chat_template` (a
    /// string, or the one named `default` of a list), with its special tokens; or the template
    /// file `override_file` (Jinja text, or a `tokenizer_config.json` holding one), taking the
    /// special tokens from `dir`'s config where it has one.
    pub fn from_model(dir: &Path, override_file: Option<&Path>) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = if config_path.exists() {
            Some(crate::read_json(&config_path, "tokenizer config")?)
        } else {
            None
        };
        let from_config = |c: &serde_json::Value| -> Option<String> {
            match c.get("chat_template")? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            }
        };
        let source = match override_file {
            Some(file) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    candle_core::Error::msg(format!(
                        "cannot read --chat-template {}: {e}",
                        file.display()
                    ))
                })?;
                match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(v) if v.is_object() => from_config(&v).ok_or_else(|| {
                        candle_core::Error::msg(format!(
                            "--chat-template {}: a JSON file without a \"chat_template\"",
                            file.display()
                        ))
                    })?,
                    _ => text,
                }
            }
            None => match config.as_ref().and_then(from_config) {
                Some(s) => s,
                None => bail!(
                    "{} has no chat template (no \"chat_template\" in tokenizer_config.json): \
                     give one with --chat-template FILE (a Jinja file, e.g. the instruct model's), \
                     or use prompt/completion or text data",
                    dir.display()
                ),
            },
        };
        let tokens = SPECIAL_TOKENS
            .iter()
            .map(|k| {
                let v = config.as_ref().and_then(|c| c.get(*k)).and_then(token_text);
                (k.to_string(), v.unwrap_or_default())
            })
            .collect();
        Self::with_tokens(&source, tokens)
    }

    /// `messages` rendered, with the generation prompt (the start of an assistant turn) after
    /// them when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: std::collections::BTreeMap<String, minijinja::Value> = self
            .tokens
            .iter()
            .map(|(k, v)| (k.clone(), minijinja::Value::from(v.as_str())))
            .collect();
        ctx.insert(
            "messages".into(),
            minijinja::Value::from_serialize(messages),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            minijinja::Value::from(add_generation_prompt),
        );
        let t = self.env.get_template("chat").map_err(template_err)?;
        t.render(ctx).map_err(template_err)
    }

    /// The whole conversation rendered and each assistant turn's byte range in it: what
    /// rendering the turns up to it adds to the turns before it with the generation prompt.
    /// An error where the template renders a turn differently once later turns follow (the
    /// turns cannot be found in the whole text then).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                bail!(
                    "chat template: assistant turn {i} renders differently depending on the \
                     turns around it, so its tokens cannot be found turn by turn (templates that \
                     rewrite earlier turns are not supported: give a --chat-template that renders \
                     each turn the same way)"
                )
            }
            spans.push(before.len()..upto.len());
        }
        Ok((full, spans))
    }

    /// The conversation's tokens (`tokenizer` on the rendered text, special tokens as they
    /// appear in it and none added, as `apply_chat_template(tokenize=True)`) and which of them
    /// the loss counts: those overlapping an assistant turn.
    pub fn tokenize(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        messages: &[Message],
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        let (text, spans) = self.render_with_assistant_spans(messages)?;
        let enc = untruncated(tokenizer)
            .encode(text.as_str(), false)
            .map_err(|e| candle_core::Error::msg(format!("tokenizer: {e}")))?;
        let learn = enc
            .get_offsets()
            .iter()
            .map(|&(a, b)| spans.iter().any(|s| a < s.end && b > s.start))
            .collect();
        Ok((enc.get_ids().to_vec(), learn))
    }
}

/// `tokenizer` without the truncation or padding its `tokenizer.json` may carry (as
/// transformers tokenizes a chat or a data row: whole, unpadded), borrowed where it has none.
pub fn untruncated(
    tokenizer: &tokenizers::Tokenizer,
) -> std::borrow::Cow<'_, tokenizers::Tokenizer> {
    if tokenizer.get_truncation().is_none() && tokenizer.get_padding().is_none() {
        return std::borrow::Cow::Borrowed(tokenizer);
    }
    let mut t = tokenizer.clone();
    t.with_padding(None);
    // Turning truncation off cannot fail.
    let _ = t.with_truncation(None);
    std::borrow::Cow::Owned(t)
}

//! Chat templates against transformers' `apply_chat_template`: the rendered text, the tokens,
//! the generation prompt and the assistant mask (every assistant turn), on Mixtral-Instruct's
//! template and Qwen2's ChatML one. The fixtures come from `scripts/chat_template_reference.py`;
//! the `*-markers` ones take the mask from transformers' own `return_assistant_tokens_mask`.
use candle_parallel_models::chat::{parse_messages, ChatTemplate, Message};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat")
        .join(name)
}

fn tokenizer(dir: &Path) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
}

#[test]
fn renders_and_masks_as_transformers() {
    for name in ["mixtral", "mixtral-markers", "qwen", "qwen-markers"] {
        let dir = fixture(name);
        let template = ChatTemplate::from_model(&dir, None).unwrap();
        let tok = tokenizer(&dir);
        let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert!(cases.len() >= 3, "{name}");
        for (i, case) in cases.iter().enumerate() {
            let messages = parse_messages(case).unwrap();
            let rendered = template.render(&messages, false).unwrap();
            assert_eq!(rendered, case["text"].as_str().unwrap(), "{name} case {i}");
            let prompt = template
                .render(&messages[..messages.len() - 1], true)
                .unwrap();
            assert_eq!(
                prompt,
                case["generation_prompt"].as_str().unwrap(),
                "{name} case {i}"
            );
            let (ids, learn) = template.tokenize(&tok, &messages).unwrap();
            let want_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let want_mask: Vec<u8> = serde_json::from_value(case["mask"].clone()).unwrap();
            assert_eq!(ids, want_ids, "{name} case {i}");
            let mask: Vec<u8> = learn.iter().map(|&b| u8::from(b)).collect();
            assert_eq!(mask, want_mask, "{name} case {i}");
            // Every assistant turn counts, not only the last.
            let turns = messages.iter().filter(|m| m.role == "assistant").count();
            let runs = mask.windows(2).filter(|w| w == &[0, 1]).count();
            assert_eq!(runs, turns, "{name} case {i}");
        }
    }
}

#[test]
fn template_errors_are_clear() {
    // Mixtral's template refuses a system turn with its own message.
    let dir = fixture("mixtral");
    let t = ChatTemplate::from_model(&dir, None).unwrap();
    let chat = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello"),
    ];
    let e = t.render(&chat, false).unwrap_err().to_string();
    assert!(e.contains("Conversation roles must alternate"), "{e}");

    // A model without a template names the fix.
    let tmp = std::env::temp_dir().join(format!("chat-none-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(
        tmp.join("tokenizer_config.json"),
        r#"{"eos_token": "</s>"}"#,
    )
    .unwrap();
    let e = ChatTemplate::from_model(&tmp, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no chat template") && e.contains("--chat-template"),
        "{e}"
    );

    // --chat-template: a Jinja file, with the model's special tokens.
    let file = tmp.join("template.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}{{ m.role }}: {{ m.content | trim }}{{ eos_token }}\n{% endfor %}",
    )
    .unwrap();
    let t = ChatTemplate::from_model(&tmp, Some(&file)).unwrap();
    let chat = [Message::new("user", " a "), Message::new("assistant", "b")];
    assert_eq!(
        t.render(&chat, false).unwrap(),
        "user: a</s>\nassistant: b</s>\n"
    );
    let (text, spans) = t.render_with_assistant_spans(&chat).unwrap();
    assert_eq!(&text[spans[0].clone()], "assistant: b</s>\n");

    // Python's string methods, as transformers' Jinja has them.
    let t = ChatTemplate::new(
        "{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(t.render(&chat, false).unwrap(), "AB");

    // A template that rewrites earlier turns cannot be split turn by turn.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m.content }}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let e = t
        .render_with_assistant_spans(&chat)
        .unwrap_err()
        .to_string();
    assert!(e.contains("renders differently"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);

    // Bad rows say what is wrong.
    let row = |s: &str| parse_messages(&serde_json::from_str(s).unwrap()).unwrap_err();
    assert!(row(r#"{"text": "x"}"#).contains("\"messages\""));
    assert!(row(r#"{"messages": [{"role": "robot", "content": "x"}]}"#).contains("unknown role"));
    assert!(row(r#"{"messages": [{"role": "user", "content": "x"}]}"#).contains("no assistant"));
    assert!(row(r#"{"messages": [{"role": "user"}]}"#).contains("\"content\""));
}

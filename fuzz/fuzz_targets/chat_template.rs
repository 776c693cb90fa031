//! A chat template (Jinja, from a model's files) compiled and rendered. The input is the
//! template source, a NUL byte, then the conversation as JSON (OpenAI messages); without a
//! valid conversation a fixed one is rendered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nstream_backend::chat::ChatMessage;
use nstream_llm::template::ChatTemplate;

fuzz_target!(|data: &[u8]| {
    let (source, rest) = match data.iter().position(|byte| *byte == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(source) = std::str::from_utf8(source) else { return };
    let Ok(template) = ChatTemplate::new(source, "<s>", "</s>") else { return };
    let messages: Vec<ChatMessage> = serde_json::from_slice(rest).unwrap_or_else(|_| {
        serde_json::from_str(
            r#"[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},
                {"role":"assistant","content":"Hello"},{"role":"user","content":"Again"}]"#,
        )
        .expect("the fixed conversation parses")
    });
    let tools = [serde_json::json!({"type": "function", "function": {"name": "f", "parameters": {}}})];
    let _ = template.render(&messages, true, Some(&tools));
    let _ = template.render(&messages, false, None);
});

//! A Hugging Face `tokenizer.json` loaded as nstream loads one, then used on a sample text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nstream_llm::tokenizer::{HfTokenizerConfig, LlmTokenizer};

fuzz_target!(|data: &[u8]| {
    // nstream catches the tokenizers crate's panics on malformed files (nstream_backend::catch_panic)
    // and reports them as errors; libFuzzer's panic hook would abort on those caught panics too.
    // The default hook instead: a panic that escapes nstream still aborts (libfuzzer-sys aborts
    // when the target unwinds), so it is still found.
    static DEFAULT_HOOK: std::sync::Once = std::sync::Once::new();
    DEFAULT_HOOK.call_once(|| drop(std::panic::take_hook()));
    let Ok(mut file) = tempfile::NamedTempFile::new() else { return };
    if std::io::Write::write_all(&mut file, data).is_err() {
        return;
    }
    let config = HfTokenizerConfig {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        add_bos_token: None,
        chat_template: None,
    };
    let Ok(tokenizer) = LlmTokenizer::from_hf(file.path(), &config, &[0, 2], Some(1)) else { return };
    if let Ok(ids) = tokenizer.encode("Hello <s> wörld 🤗\n\t  x", true) {
        let _ = tokenizer.decode(&ids, true);
    }
    let _ = tokenizer.decode(&[u32::MAX, 0], false);
});

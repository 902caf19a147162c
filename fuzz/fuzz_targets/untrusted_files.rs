//! Fuzz the parsers of files mote reads from disk that someone else may have written: a
//! store's journal lines, index and manifests, `.npy` tensors, chat templates (rendered
//! under fuel), audit policies, and a GGUF model's configuration and vocabulary beyond
//! the header. The first byte picks the parser; the rest is its input. Any input must give
//! a value or an error: never a panic, never unbounded memory or time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mote_engine::llm::{ChatMessage, LlamaConfig, Tokenizer};
use mote_store::formats::gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 7 {
        0 => {
            if let Ok(line) = std::str::from_utf8(rest) {
                let _ = mote_store::journal::parse_untrusted_journal_line(line);
            }
        }
        1 => {
            let _ = serde_json::from_slice::<mote_store::oci::Index>(rest);
        }
        2 => {
            let _ = serde_json::from_slice::<mote_store::oci::Manifest>(rest);
        }
        3 => {
            if let Ok(t) = mote_engine::npy::read(rest) {
                assert_eq!(t.data().len(), t.shape().iter().product::<usize>());
            }
        }
        4 => {
            // A template, then a NUL, then a message's content.
            let text = String::from_utf8_lossy(rest);
            let (template, content) = text.split_once('\0').unwrap_or((&text, "hi"));
            let messages = [ChatMessage::new("user", content)];
            let _ = mote_engine::llm::chat::render(template, &messages, true, "<s>", "</s>");
        }
        5 => {
            let _ = mote_audit::Policy::parse_untrusted(rest);
        }
        _ => {
            if let Ok(g) = Gguf::read(rest, rest.len() as u64) {
                let _ = LlamaConfig::from_gguf(&g);
                if let Ok(t) = Tokenizer::from_gguf(&g) {
                    let _ = t.encode_prompt("Hello, world! ünïcödé");
                }
            }
        }
    }
});

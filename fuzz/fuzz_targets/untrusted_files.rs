//! Fuzz the parsers of files mote reads from disk that someone else may have written: a
//! store's journal lines, index and manifests, `.npy` tensors, chat templates (rendered
//! under fuel), audit policies, a GGUF model's configuration and vocabulary beyond the
//! header, `tokenizer.json`, a batch job's inputs, journal and output front matter, and
//! encoded images. The first byte picks the parser; the rest is its input. Any input must give
//! a value or an error: never a panic, never unbounded memory or time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mote_engine::llm::{ChatMessage, LlamaConfig, Tokenizer};
use mote_engine::pipeline::image::preprocess;
use mote_engine::pipeline::text::load_tokenizer;
use mote_store::formats::gguf::Gguf;
use mote_store::{ImageSettings, TextSettings};

fuzz_target!(init: mote_fuzz_hook(), |data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 10 {
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
        7 => {
            let settings = TextSettings {
                tokenizer: "tokenizer.json".into(),
                max_length: None,
                pooling: None,
                normalize: false,
            };
            if let Ok((t, _)) = load_tokenizer(rest, &settings) {
                let _ = t.encode("Hello, world! ünïcödé 123", true);
            }
        }
        8 => {
            // A batch job's untrusted files: the input JSONL, note texts, its journal and
            // the front matter of the outputs it finds when resuming.
            if let Ok(items) = mote_batch::items::jsonl_items(rest) {
                for it in items.iter().take(64) {
                    if let mote_batch::items::Source::Line(_, line) = &it.source {
                        let _ = mote_batch::items::line_text(line, "text");
                    }
                }
            }
            let _ = mote_batch::items::text_of(rest);
            let _ = mote_batch::journal::parse(rest);
            let _ = mote_batch::front_matter(rest);
        }
        9 => {
            if let Ok(chw) = preprocess(&ImageSettings::default(), 0, rest) {
                assert_eq!(chw.len(), 3 * 224 * 224);
            }
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

/// A panic that mote catches (third-party parsers run under `catch_unwind`, e.g. the
/// `tokenizers` crate's) is an error to the user, not a crash: say it without aborting.
/// A panic that escapes still reaches libfuzzer-sys, which aborts and reports it.
fn mote_fuzz_hook() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic (caught?): {info}")));
}

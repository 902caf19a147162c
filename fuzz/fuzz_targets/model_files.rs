//! Fuzz loading whole models from untrusted bytes, beyond their headers: the native BERT
//! encoder from `config.json` + `model.safetensors` (selector 0: the config, a NUL, the
//! weights), a GGUF language model with its vocabulary (selector 1), and a fastText `.bin`
//! or `.ftz` classifier, which then classifies a few texts (selector 2). Any input must
//! give a model or an error: never a panic, never memory or time beyond the file's size.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mote_engine::ThreadPool;
use mote_engine::fasttext::FastText;
use mote_engine::llm::Llm;
use mote_engine::native::bert::Bert;
use mote_store::Mapped;

fuzz_target!(init: mote_fuzz_hook(), |data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(pool) = ThreadPool::new(1) else {
        return;
    };
    if which % 3 == 2 {
        let loaded = FastText::load(rest);
        debug("fasttext", loaded.as_ref().map(|_| ()));
        if let Ok(ft) = loaded {
            for text in ["", "hello world", "__label__x </s> été\u{0}\ttab", "a b c d e f g"] {
                let _ = ft.predict(text, 3, 0.0);
            }
        }
    } else if which % 3 == 0 {
        let (config, weights) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let loaded = Bert::load(config, weights, pool);
        debug("bert", loaded.as_ref().map(|_| ()));
    } else {
        let loaded = Llm::load(Arc::new(Mapped::from_bytes(rest.to_vec())), pool);
        debug("llm", loaded.as_ref().map(|_| ()));
        if let Ok(llm) = loaded {
            let _ = llm.tokenizer().encode_prompt("Hello, world!");
        }
    }
});

/// With `MOTE_FUZZ_DEBUG` set, say what each input gave (to check that seeds load).
fn debug(what: &str, r: Result<(), &mote_engine::EngineError>) {
    if std::env::var_os("MOTE_FUZZ_DEBUG").is_some() {
        eprintln!("{what}: {r:?}");
    }
}

/// A panic that mote catches (third-party parsers run under `catch_unwind`, e.g. the
/// `tokenizers` crate's) is an error to the user, not a crash: say it without aborting.
/// A panic that escapes still reaches libfuzzer-sys, which aborts and reports it.
fn mote_fuzz_hook() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic (caught?): {info}")));
}

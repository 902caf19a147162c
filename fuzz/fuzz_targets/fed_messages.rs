//! Fuzz what a federated coordinator or client parses from the other side: compressed
//! updates (coordinator), run configurations, fastText-format labelled texts, and the
//! secure-aggregation tasks a client acts on (a malicious coordinator's JSON). Any bytes must
//! give a value or an error, never a panic; a decoded update has exactly the model's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mote_engine::train::data::parse_labelled_texts;
use mote_fed::RunConfig;
use mote_fed::compress;
use mote_fed::secagg::{ClientRound, MaskedInputTask, ShareKeysTask, UnmaskTask};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 => {
            let params = usize::from(rest.first().copied().unwrap_or(0)) * 37;
            if let Ok(v) = compress::decode(rest, params) {
                assert_eq!(v.len(), params);
            }
        }
        1 => {
            if let Ok(t) = std::str::from_utf8(rest) {
                let _ = RunConfig::parse(t);
            }
        }
        2 => {
            if let Ok(t) = std::str::from_utf8(rest) {
                let _ = parse_labelled_texts(t);
            }
        }
        _ => {
            let Ok((mut round, _)) = ClientRound::new("a", 1, vec![7; 4]) else {
                return;
            };
            // The same bytes offered as each step's task, in protocol order.
            if let Ok(t) = serde_json::from_slice::<ShareKeysTask>(rest) {
                let _ = round.share_keys(&t);
            }
            if let Ok(t) = serde_json::from_slice::<MaskedInputTask>(rest) {
                let _ = round.masked_input(&t);
            }
            if let Ok(t) = serde_json::from_slice::<UnmaskTask>(rest) {
                let _ = round.unmask(&t);
            }
        }
    }
});

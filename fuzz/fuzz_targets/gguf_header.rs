//! Fuzz the GGUF header reader: any bytes must give a header or an error, never a panic,
//! and never an allocation beyond the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mote_store::formats::gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::read(data, data.len() as u64) {
        for t in &g.tensors {
            assert!(g.data_offset + t.offset + t.size <= data.len() as u64);
        }
    }
});

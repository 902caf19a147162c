//! Fuzz the safetensors header reader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mote_store::formats::safetensors::Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::read(data, data.len() as u64) {
        let data_len = data.len() as u64 - 8 - h.header_len;
        for t in h.tensors.values() {
            assert!(t.data_offsets[1] <= data_len);
        }
    }
});

//! Fuzz the server's request-body parsers (OpenAI embeddings and generation requests, KServe
//! v2 infer requests in JSON and Triton's binary-data form): any bytes give a clean result,
//! never a panic or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mote_serve::parse_untrusted_request(data);
});

//! Fuzz reference and digest parsing: a parsed tag never escapes the store, a parsed
//! digest is always 64 lowercase hex digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mote_store::{Digest, Reference};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(Reference::Tag(t)) = s.parse::<Reference>() {
        assert!(!t.name().contains("..") && !t.name().starts_with('/'));
    }
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
    }
});

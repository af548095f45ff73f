//! Fuzz target `domain_text`: see `fuzz/bodies.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::domain_text(data));

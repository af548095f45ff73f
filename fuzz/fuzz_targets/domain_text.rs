//! Fuzz target `domain_text`: see `fuzz/bodies.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(init: bodies::under_libfuzzer(), |data: &[u8]| bodies::domain_text(data));

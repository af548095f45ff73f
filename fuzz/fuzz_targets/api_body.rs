//! Fuzz target `api_body`: see `fuzz/bodies.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::api_body(data));

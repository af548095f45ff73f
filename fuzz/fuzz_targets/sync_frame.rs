//! Fuzz target `sync_frame`: see `fuzz/bodies.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::sync_frame(data));

//! Fuzz target `automerge_doc`: see `fuzz/bodies.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::automerge_doc(data));

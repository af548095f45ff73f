//! Fuzz target `automerge_doc`: see `fuzz/bodies.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(init: bodies::under_libfuzzer(), |data: &[u8]| bodies::automerge_doc(data));

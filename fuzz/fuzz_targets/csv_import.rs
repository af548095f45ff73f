//! Fuzz target `csv_import`: see `fuzz/bodies.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(init: bodies::under_libfuzzer(), |data: &[u8]| bodies::csv_import(data));

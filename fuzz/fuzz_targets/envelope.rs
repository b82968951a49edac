#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stripe_pipeline_fuzz::envelope(data));

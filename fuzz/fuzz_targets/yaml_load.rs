//! A YAML file of nstream resources (`MegaModel`, `BaseModel`, knowledge bases, distillations)
//! as `nstream apply`/`validate` load it, then validated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for document in nstream_core::document::parse_bytes(data, "fuzz.yaml") {
        let _ = format!("{document:?}");
    }
});

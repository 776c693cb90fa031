//! A safetensors file (an 8-byte header length, a JSON header, the tensor bytes) as the adapter
//! and checkpoint reader of nstream-peft reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = tempfile::NamedTempFile::new() else { return };
    if std::io::Write::write_all(&mut file, data).is_err() {
        return;
    }
    let _ = nstream_peft::tensors::read(file.path());
});

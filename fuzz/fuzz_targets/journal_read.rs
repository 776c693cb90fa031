//! A `nstream generate` journal as a resumed run reads it: recovery of the whole file, then each
//! recorded `done`/`failed` line read back at its offset.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nstream_pipeline::OpenMode;
use nstream_pipeline::journal::{Journal, JournalReader};

fuzz_target!(|data: &[u8]| {
    let Ok(folder) = tempfile::tempdir() else { return };
    let path = folder.path().join("journal.jsonl");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok((journal, state)) = Journal::open(&path, OpenMode::Resume) else { return };
    drop(journal);
    let Ok(mut reader) = JournalReader::open(&path) else { return };
    for key in state.keys.values() {
        for offset in [key.done, key.failed].into_iter().flatten() {
            reader.read_at(offset).expect("an offset the journal recorded reads back");
        }
    }
});

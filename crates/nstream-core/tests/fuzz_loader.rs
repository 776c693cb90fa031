//! Property-based fuzzing of the YAML loader: no input makes it panic.
//!
//! CI runs a few hundred cases. For a long run (the foundation issue asks for minutes):
//! `NSTREAM_FUZZ_CASES=200000 cargo test --release -p nstream-core --test fuzz_loader`.

use nstream_core::parse_bytes;
use proptest::prelude::*;
use proptest::test_runner::Config;

fn cases() -> u32 {
    std::env::var("NSTREAM_FUZZ_CASES").ok().and_then(|value| value.parse().ok()).unwrap_or(256)
}

const SEED_DOCUMENTS: [&str; 3] = [
    include_str!("../../../examples/llama3-8b-instruct.yaml"),
    include_str!("../../../examples/gpt-4-mega.yaml"),
    include_str!("../../../examples/all-minilm-l6-v2.yaml"),
];

/// Tokens that steer mutations towards the interesting parts of the grammar.
const FRAGMENTS: [&str; 24] = [
    "---\n",
    "...\n",
    ": ",
    "- ",
    "\n  ",
    "\"",
    "'",
    "{",
    "}",
    "[",
    "]",
    "&anchor ",
    "*anchor",
    "!!binary ",
    "? ",
    "|\n",
    ">-\n",
    "1e400",
    "-1",
    "0.5",
    "99999999999999999999Ei",
    "\u{feff}",
    "\t",
    "~",
];

fn mutation() -> impl Strategy<Value = (usize, usize, Vec<u8>)> {
    (
        0_usize..3,
        0_usize..4000,
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..16),
            (0_usize..FRAGMENTS.len()).prop_map(|index| FRAGMENTS[index].as_bytes().to_vec()),
        ],
    )
}

proptest! {
    #![proptest_config(Config { cases: cases(), failure_persistence: None, ..Config::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_bytes(&bytes, "fuzz");
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = parse_bytes(text.as_bytes(), "fuzz");
    }

    #[test]
    fn mutated_examples_never_panic(mutations in proptest::collection::vec(mutation(), 1..6)) {
        let mut bytes = SEED_DOCUMENTS[mutations[0].0].as_bytes().to_vec();
        for (_, position, insertion) in &mutations {
            let position = position % (bytes.len() + 1);
            let removed = (position + insertion.len() / 2).min(bytes.len());
            bytes.splice(position..removed, insertion.iter().copied());
        }
        let documents = parse_bytes(&bytes, "fuzz");
        for document in &documents {
            for diagnostic in &document.diagnostics {
                prop_assert!(!diagnostic.message.is_empty());
                let _ = diagnostic.to_string();
            }
            let _ = document.label();
        }
    }
}

//! Validating nstream resources inside another Rust program (a CI check, an admission webhook, a
//! service that accepts model specs).
//!
//! `cargo run -p nstream-core --example validate_file -- path/to/models.yaml` prints every
//! problem of every document with its line and field path, and exits 1 when one is invalid.
//! Without an argument it validates a built-in spec that quotes `replicas` (the API server
//! refuses a string there), to show a report.

use std::process::ExitCode;

use nstream_core::{LoadedDocument, ModelResource};

/// A spec the way the specification's template writes it: `replicas` quoted.
const SAMPLE: &str = r#"apiVersion: llm.nstream.ai/v1
kind: EmbeddingModel
metadata:
  name: all-minilm-l6-v2
spec:
  embeddingModelName: all-MiniLM-L6-v2
  embeddingModelServingInfo:
    hfModelId: sentence-transformers/all-MiniLM-L6-v2
    modelProvider: HUGGINGFACE
  embeddingModelServingTemplate:
    replicas: "1"
"#;

/// One line per valid resource and per problem, and the valid resources.
fn report(documents: &[LoadedDocument]) -> (Vec<String>, Vec<&ModelResource>) {
    let mut lines = Vec::new();
    for document in documents {
        let origin = &document.origin;
        if document.valid_resource().is_some() {
            lines.push(format!("{}:{}: {}: valid", origin.file, origin.line, document.label()));
        }
        for diagnostic in &document.diagnostics {
            let line = diagnostic.line.unwrap_or(origin.line);
            lines.push(format!("{}:{line}: {}: {diagnostic}", origin.file, document.label()));
        }
    }
    let valid = documents.iter().filter_map(LoadedDocument::valid_resource).collect();
    (lines, valid)
}

fn main() -> ExitCode {
    let documents = match std::env::args_os().nth(1) {
        Some(path) => match nstream_core::load_path(path.as_ref()) {
            Ok(documents) => documents,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(2);
            }
        },
        None => nstream_core::parse_str(SAMPLE, "sample.yaml"),
    };
    let (lines, valid) = report(&documents);
    for line in &lines {
        println!("{line}");
    }
    if valid.len() == documents.len() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_is_reported_with_its_fix_and_the_fixed_sample_is_valid() {
        let documents = nstream_core::parse_str(SAMPLE, "sample.yaml");
        let (lines, valid) = report(&documents);
        assert!(valid.is_empty(), "{lines:?}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("sample.yaml:11: "), "{lines:?}");
        assert!(lines[0].contains("embeddingModelServingTemplate.replicas") && lines[0].contains("`replicas: 1`"));

        let fixed = SAMPLE.replace("replicas: \"1\"", "replicas: 1");
        let documents = nstream_core::parse_str(&fixed, "sample.yaml");
        let (lines, valid) = report(&documents);
        assert_eq!(valid.len(), 1, "{lines:?}");
        assert_eq!(valid[0].kind(), "EmbeddingModel");
    }
}

//! The examples folder is the contract: valid examples round-trip, invalid ones fail with the
//! message written at their top, and the specification's own examples parse once filled in.

use std::path::{Path, PathBuf};

use nstream_core::{ModelResource, Outcome, parse_str};

fn examples_folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn yaml_files(folder: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "yaml"))
        .collect();
    files.sort();
    files
}

fn load_valid(path: &Path) -> Vec<ModelResource> {
    let text = std::fs::read_to_string(path).unwrap();
    parse_str(&text, &path.display().to_string())
        .into_iter()
        .map(|document| {
            assert!(document.diagnostics.is_empty(), "{}: {:?}", path.display(), document.diagnostics);
            match document.outcome {
                Outcome::Resource(resource) => *resource,
                other => panic!("{}: not a resource: {other:?}", path.display()),
            }
        })
        .collect()
}

#[test]
fn every_valid_example_round_trips() {
    let files = yaml_files(&examples_folder());
    assert!(files.len() >= 6, "expected the spec's examples and the offline ones");
    for path in files {
        for resource in load_valid(&path) {
            let yaml = resource.to_yaml().unwrap();
            let again = parse_str(&yaml, "round-trip");
            assert_eq!(again.len(), 1);
            assert!(again[0].diagnostics.is_empty(), "{}: {:?}\n{yaml}", path.display(), again[0].diagnostics);
            let Outcome::Resource(reparsed) = &again[0].outcome else { panic!("{yaml}") };
            assert_eq!(**reparsed, resource, "{} changed in a round trip", path.display());
            assert_eq!(reparsed.to_yaml().unwrap(), yaml, "serialisation is stable");
        }
    }
}

#[test]
fn every_invalid_example_fails_with_its_message() {
    let files = yaml_files(&examples_folder().join("invalid"));
    assert!(files.len() >= 30, "the invalid corpus holds at least 30 documents, found {}", files.len());
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<&str> = text.lines().filter_map(|line| line.strip_prefix("# expect: ")).collect();
        assert!(!expected.is_empty(), "{} has no `# expect:` line", path.display());
        let file_name = path.file_name().unwrap().to_string_lossy();
        let documents = parse_str(&text, &file_name);
        // As `nstream validate` prints them, so an expectation can name the line and column.
        let rendered: Vec<String> = documents
            .iter()
            .flat_map(|document| document.diagnostics.iter())
            .map(|diagnostic| {
                let line = diagnostic.line.map_or_else(|| "?".to_string(), |line| line.to_string());
                let column = diagnostic.column.map_or_else(|| "?".to_string(), |column| column.to_string());
                format!("{file_name}:{line}:{column}: {diagnostic}")
            })
            .collect();
        assert!(!rendered.is_empty(), "{} was accepted", path.display());
        for needle in expected {
            assert!(
                rendered.iter().any(|message| message.contains(needle)),
                "{}: no message contains {needle:?}; got {rendered:#?}",
                path.display()
            );
        }
        for document in &documents {
            for diagnostic in &document.diagnostics {
                assert!(diagnostic.line.is_some(), "{}: {diagnostic:?} has no line", path.display());
            }
        }
    }
}

/// The three examples of shared/spec/models.md, verbatim, with their placeholders filled from
/// the spec's tables.
const SPEC_EXAMPLES: &str = r#"
apiVersion: llm.nstream.ai/v1
kind: MegaModel
metadata:
  name: "NAME"
  namespace: "NAMESPACE"
spec:
  modelProvider: "MODEL_PROVIDER"
  modelTemplate:
    azureOpenAI:
      apiVersion: "PREVIEW"
      apikey: "APIKEY"
      deployment: "DEPLOYMENT"
      endpoint: "ENDPOINT"
---
apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata:
  name: "NAME"
  namespace: "NAMESPACE"
spec:
  baseModelName: "NAME"
  baseModelServingInfo:
    hfModelId: "HF_MODEL_ID"
    modelProvider: "HUGGINGFACE"
    modelProviderToken: "HF_TOKEN"
  baseModelServingTemplate:
    replicas: "REPLICATION"
    resourceLimit:
      cpu: "CPU"
      memory: "MEMORY"
      gpu: "GPU"
    resourceRequest:
      cpu: "CPU"
      memory: "MEMORY"
      gpu: "GPU"
---
apiVersion: llm.nstream.ai/v1
kind: EmbeddingModel
metadata:
  name: "NAME"
  namespace: "NAMESPACE"
spec:
  embeddingModelName: "EMBEDDING_MODEL"
  embeddingModelServingInfo:
    hfModelId: "HF_MODEL_ID"
    modelProvider: "HUGGINGFACE"
    modelProviderToken: "HF_TOKEN"
  embeddingModelServingTemplate:
    replicas: "REPLICATION"
    resourceLimit:
      cpu: "CPU"
      memory: "MEMORY"
    resourceRequest:
      cpu: "CPU"
      memory: "MEMORY"
"#;

#[test]
fn the_specification_examples_parse_once_filled_in() {
    let documents: Vec<&str> = SPEC_EXAMPLES.split("---\n").collect();
    let mega = documents[0]
        .replace("\"NAME\"", "\"gpt-4-mega\"")
        .replace("NAMESPACE", "nstream")
        .replace("MODEL_PROVIDER", "AzureOpenAI")
        .replace("PREVIEW", "2023-10-01-preview")
        .replace("\"APIKEY\"", "\"SECRET_KEY\"")
        .replace("DEPLOYMENT", "gpt-4-deployment")
        .replace("ENDPOINT", "https://api.openai.com/v1");
    let base = documents[1]
        .replace("\"NAME\"", "\"llama3-8b-instruct\"")
        .replace("NAMESPACE", "nstream")
        .replace("HF_MODEL_ID", "meta-llama/Llama-3-8B")
        .replace("HF_TOKEN", "HF_SECRET_TOKEN")
        .replace("\"REPLICATION\"", "1")
        .replace("\"CPU\"", "\"8\"")
        .replace("\"MEMORY\"", "\"24Gi\"")
        .replace("\"GPU\"", "\"1\"");
    let embedding = documents[2]
        .replace("\"NAME\"", "\"all-minilm-l6-v2\"")
        .replace("NAMESPACE", "nstream")
        .replace("EMBEDDING_MODEL", "all-MiniLM-L6-v2")
        .replace("HF_MODEL_ID", "sentence-transformers/all-MiniLM-L6-v2")
        .replace("HF_TOKEN", "HF_SECRET_TOKEN")
        .replace("\"REPLICATION\"", "1")
        .replacen("\"CPU\"", "\"10\"", 1)
        .replacen("\"MEMORY\"", "\"24Gi\"", 1)
        .replacen("\"CPU\"", "\"2\"", 1)
        .replacen("\"MEMORY\"", "\"8Gi\"", 1);
    for text in [&mega, &base, &embedding] {
        let parsed = parse_str(text, "spec");
        assert_eq!(parsed.len(), 1);
        assert!(parsed[0].diagnostics.is_empty(), "{text}\n{:?}", parsed[0].diagnostics);
        assert!(parsed[0].valid_resource().is_some());
    }
    // Filled in as the specification writes it, `replicas: "1"` quoted: the API server refuses a
    // string there (the CRD says integer), so validation reports that one field with its fix.
    for text in [base, embedding] {
        let quoted = text.replace("replicas: 1", "replicas: \"1\"");
        let parsed = parse_str(&quoted, "spec");
        let rendered: Vec<String> = parsed[0].diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(rendered.len(), 1, "{rendered:?}");
        assert!(rendered[0].contains("ServingTemplate.replicas: found the string \"1\""), "{rendered:?}");
        assert!(rendered[0].contains("`replicas: 1`"), "{rendered:?}");
        assert_eq!(parsed[0].diagnostics[0].line, Some(13), "{:?}", parsed[0].diagnostics);
    }
}

#[test]
fn inline_secrets_never_show_in_debug_or_diagnostics() {
    let key = "sk-very-secret-value-0042";
    let text = format!(
        "apiVersion: llm.nstream.ai/v1\nkind: MegaModel\nmetadata:\n  name: m\nspec:\n  modelProvider: OpenAI\n  modelTemplate:\n    openAI:\n      model: gpt-4o\n      apikey: \"{key} \"\n      bogus: 1\n"
    );
    let documents = parse_str(&text, "secret.yaml");
    let debug = format!("{documents:?}");
    assert!(!debug.contains(key), "{debug}");
    let valid = text.replace(" \"\n      bogus: 1", "\"");
    let documents = parse_str(&valid, "secret.yaml");
    assert!(documents[0].valid_resource().is_some(), "{:?}", documents[0].diagnostics);
    assert!(!format!("{documents:?}").contains(key));
    let with_whitespace = valid.replace(&format!("{key}\""), &format!("{key}\\n\""));
    let documents = parse_str(&with_whitespace, "secret.yaml");
    let rendered: Vec<String> = documents[0].diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(rendered.len(), 1, "{rendered:?}");
    assert!(!rendered[0].contains(key) && !format!("{documents:?}").contains(key));
}

#[test]
fn multi_document_files_report_each_document_with_its_line() {
    let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: nstream\n---\napiVersion: llm.nstream.ai/v1\nkind: EmbeddingModel\nmetadata:\n  name: e\nspec:\n  embeddingModelName: e\n  embeddingModelServingInfo:\n    hfModelID: a/b\n    modelProvider: HUGGINGFACE\n";
    let documents = parse_str(text, "many.yaml");
    assert_eq!(documents.len(), 2);
    assert!(matches!(documents[0].outcome, Outcome::Foreign { .. }));
    assert_eq!(documents[1].origin.document, 2);
    assert_eq!(documents[1].origin.line, 6);
    let diagnostic = &documents[1].diagnostics[0];
    assert_eq!(diagnostic.line, Some(13));
    assert!(diagnostic.message.contains("did you mean `hfModelId`?"), "{diagnostic:?}");
}

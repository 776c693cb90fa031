//! Turning a models YAML file into running backends, the way `nstream-server` and `nstream up` do.
//!
//! Parses and validates the file (nstream-core), loads every model it declares (`load_models`:
//! candle embeddings and LLMs, hosted MegaModels, secrets from the environment) and embeds one
//! text with each embedding model. With `--serve`, hands the same file to `serve_file`, which is
//! all the server binary does: the OpenAI API on 127.0.0.1:8080 until Ctrl-C. Without a file it
//! uses all-MiniLM-L6-v2 (`examples/all-minilm-l6-v2.yaml`), read from the offline Hugging Face
//! cache that `scripts/offline-models.sh` fills (set `HF_HUB_OFFLINE=1` to stay offline).
//!
//! `cargo run -p nstream-providers --example serve_yaml -- [models.yaml] [--serve]`

use std::path::PathBuf;

use nstream_backend::{EmbeddingRequest, Input, ModelKind};
use nstream_providers::{LoadOptions, SecretLookup, ServeSettings, load_models, serve_file};
use nstream_server::Metrics;

/// The model file used when none is given.
const SAMPLE: &str = r#"apiVersion: llm.nstream.ai/v1
kind: EmbeddingModel
metadata:
  name: all-minilm-l6-v2
spec:
  embeddingModelName: all-MiniLM-L6-v2
  embeddingModelServingInfo:
    hfModelId: sentence-transformers/all-MiniLM-L6-v2
    modelProvider: HUGGINGFACE
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let serve = arguments.iter().any(|argument| argument == "--serve");
    let scratch = tempfile::tempdir()?;
    let path = match arguments.iter().find(|argument| !argument.starts_with("--")) {
        Some(path) => PathBuf::from(path),
        None => {
            let path = scratch.path().join("models.yaml");
            std::fs::write(&path, SAMPLE)?;
            path
        }
    };
    if serve {
        // The server binary's whole job, with its default flags.
        serve_file(&path, &ServeSettings::default()).await?;
        return Ok(());
    }

    // An invalid file comes back as an error listing every problem with its line.
    let documents = nstream_core::load_path(&path)?;
    // Loading reads weights and starts worker threads: off the async threads.
    let models = tokio::task::spawn_blocking(move || {
        load_models(&documents, &LoadOptions::default(), &SecretLookup::from_env(), &Metrics::new())
    })
    .await??;
    for model in &models {
        let description = model.backend.describe();
        println!("{}: {:?}, capabilities {:?}", model.name, description.kind, description.capabilities);
        if description.kind == ModelKind::Embedding {
            let request = EmbeddingRequest::new(&model.name, Input::Text("nstream serves models".to_owned()));
            request.validate()?;
            let response = model.backend.embed(request).await?;
            let vector = &response.data[0].embedding;
            println!("  embedded one text: {} floats, first {:.4}", vector.len(), vector[0]);
        }
    }
    Ok(())
}

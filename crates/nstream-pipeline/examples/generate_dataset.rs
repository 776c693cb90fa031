//! Ground-truth generation inside another Rust program: a JSONL of questions in, an OpenAI
//! fine-tuning file with provenance out, exactly once and resumable.
//!
//! The model here is the crate's local test provider (an OpenAI-compatible server on localhost
//! that answers deterministically) behind a MegaModel's hosted backend, so it runs offline; any
//! `Arc<dyn ModelBackend>` works the same (a hosted provider, a local `LlmBackend`). Running it a
//! second time over the same folder would skip the answered rows (`OpenMode::Resume`).
//!
//! `cargo run -p nstream-pipeline --example generate_dataset`

use std::time::Duration;

use nstream_core::{ModelResource, SecretString};
use nstream_hosted::{HostedBackend, HostedOptions};
use nstream_pipeline::testing::{TestProvider, TestProviderConfig};
use nstream_pipeline::{ModelInfo, ProgressMode, Settings, generate};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let provider = TestProvider::start(TestProviderConfig::default()).await?;
    let documents = nstream_core::parse_str(&provider.megamodel_yaml("teacher"), "teacher.yaml");
    let resource = documents[0].valid_resource().ok_or("the test provider's MegaModel is invalid")?.clone();
    let ModelResource::MegaModel(model) = &resource else { return Err("not a MegaModel".into()) };
    // The pipeline owns retries and limits, so the backend makes one call per attempt.
    let options = HostedOptions::default().with_max_retries(0).with_timeout(Duration::from_secs(10));
    let backend = HostedBackend::new("teacher", &model.spec, SecretString::new("sk-example-0123456789"), options)?;

    let folder = tempfile::tempdir()?;
    let input = folder.path().join("questions.jsonl");
    let questions = ["Why is the sky blue?", "What is a river delta?", "Why is the sky blue?"];
    let lines: Vec<String> =
        questions.iter().map(|question| serde_json::json!({ "question": question }).to_string()).collect();
    std::fs::write(&input, lines.join("\n") + "\n")?;

    let mut settings = Settings::new(&input, folder.path().join("train.jsonl"));
    settings.template = Some(("question".to_owned(), "Answer briefly: {{ question }}".to_owned()));
    settings.parameters.max_tokens = Some(64);
    settings.progress = ProgressMode::Quiet;
    let summary = generate(backend, ModelInfo::from_resource(&resource), settings).await?;
    println!(
        "{} inputs, {} unique, {} answered, {} failed, {} requests",
        summary.inputs, summary.unique_items, summary.answered, summary.failed, summary.requests
    );
    let first = std::fs::read_to_string(folder.path().join("train.jsonl"))?;
    println!("{}", first.lines().next().unwrap_or("(no output)"));
    Ok(())
}

//! Calling a hosted model from another Rust program through nstream's provider client (retries,
//! rate limits, timeouts, secrets kept out of logs).
//!
//! The MegaModel is described as in a spec file; here an OpenAI-compatible endpoint whose URL
//! comes from the environment, such as a local `nstream up -f examples/quickstart.yaml`:
//!
//! ```text
//! NSTREAM_EXAMPLE_URL=http://127.0.0.1:8080/v1 NSTREAM_EXAMPLE_MODEL=smollm2-135m-instruct \
//!   cargo run -p nstream-hosted --example call_provider -- "Say hello."
//! ```
//!
//! `OPENAI_API_KEY` is sent as the bearer key when set (OpenAI itself needs one; a local
//! nstream does not unless started with `--api-key`).

use nstream_backend::{ChatCompletionRequest, ModelBackend};
use nstream_core::{MegaModelSpec, SecretString};
use nstream_hosted::{HostedBackend, HostedOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NSTREAM_EXAMPLE_URL")
        .map_err(|_| "set NSTREAM_EXAMPLE_URL to an OpenAI-compatible base URL, such as http://127.0.0.1:8080/v1")?;
    let model = std::env::var("NSTREAM_EXAMPLE_MODEL").unwrap_or_else(|_| "smollm2-135m-instruct".to_string());
    let key = SecretString::new(std::env::var("OPENAI_API_KEY").unwrap_or_else(|_| "not-needed".to_string()));
    let prompt = std::env::args().nth(1).unwrap_or_else(|| "Say hello.".to_string());

    // The same fields as a MegaModel's `spec` in YAML; the key is passed apart so it never sits
    // in a spec.
    let spec: MegaModelSpec = serde_json::from_value(serde_json::json!({
        "modelProvider": "OpenAI",
        "modelTemplate": {"openAI": {"model": model, "endpoint": url}}
    }))?;
    let options = HostedOptions::default().with_max_retries(2).with_rate_limits(Some(60), None);
    let backend = HostedBackend::new("example", &spec, key, options)?;

    let request: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
        "model": "example",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32
    }))?;
    let response = backend.chat(request).await?;
    let answer = response.choices.first().and_then(|choice| choice.message.content.clone()).unwrap_or_default();
    println!("{answer}");
    Ok(())
}

//! Mounting nstream's OpenAI-compatible API inside an existing axum application.
//!
//! A service that already has its own routes nests [`nstream_server::app`] under a prefix: the
//! OpenAI routes answer under `/ai/v1/...`, the service's own routes are untouched. The model
//! here is all-MiniLM-L6-v2 from the offline Hugging Face cache (`scripts/offline-models.sh`), a
//! real embedding backend; any `Arc<dyn ModelBackend>` registers the same way.
//!
//! `cargo run -p nstream-server --example mount_in_axum` sends one embeddings request through
//! the combined router in-process and prints the answer's shape; add `-- --serve` to listen on
//! 127.0.0.1:8080 until Ctrl-C (then `curl localhost:8080/ai/v1/models`).

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use http_body_util::BodyExt;
use nstream_embed::{EmbedOptions, EmbeddingBackend};
use nstream_hub::{Hub, ModelSource};
use nstream_server::{AppState, Metrics, ModelRegistry, ServerConfig};
use tower::ServiceExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The model: loading reads the weights, so it runs off the async threads.
    let backend = tokio::task::spawn_blocking(|| {
        let source = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
        EmbeddingBackend::load_with(
            "minilm",
            &Hub::from_env().with_offline(true),
            &source,
            EmbedOptions::default(),
            None,
        )
    })
    .await??;
    let mut models = ModelRegistry::new();
    models.register_as("minilm", backend)?;
    let state = AppState::new(models, ServerConfig::default().with_max_embedding_inputs(64), Metrics::new());

    // The host application: its own routes, and nstream's under /ai.
    let app: Router = Router::new().route("/", get(|| async { "my service" })).nest("/ai", nstream_server::app(state));

    if std::env::args().any(|argument| argument == "--serve") {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
        println!("serving on http://{}/ai/v1", listener.local_addr()?);
        nstream_server::serve(listener, app, nstream_server::shutdown_signal()).await?;
        return Ok(());
    }

    let request = Request::post("/ai/v1/embeddings")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"model":"minilm","input":["a service that embeds nstream","another sentence"]}"#))?;
    let response = app.clone().oneshot(request).await?;
    let status = response.status();
    let body: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    let vectors = body["data"].as_array().ok_or("no data in the answer")?;
    let dimension = vectors[0]["embedding"].as_array().map_or(0, Vec::len);
    println!("POST /ai/v1/embeddings: {status}, {} vectors of {dimension} floats", vectors.len());

    let own = app.oneshot(Request::get("/").body(Body::empty())?).await?;
    println!("GET /: {}", own.status());
    Ok(())
}

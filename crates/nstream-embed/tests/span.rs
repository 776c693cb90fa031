//! The caller's tracing span follows an embedding job onto the model's worker thread: what the
//! worker logs about the job carries the request's fields (a request id set by the server's trace
//! layer, for instance). Needs the offline all-MiniLM-L6-v2 (scripts/offline-models.sh).

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use nstream_embed::{EmbedInput, EmbedOptions, EmbeddingBackend};
use nstream_hub::{Hub, ModelSource};
use tracing::Instrument;

const REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// Every log line written, shared by all threads.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_events_carry_the_request_span() {
    let captured = Captured::default();
    let writer = captured.clone();
    // Global, not per thread: the worker thread must log into it too.
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_thread_names(true)
        .with_max_level(tracing::Level::DEBUG)
        .init();
    let hub = Hub::from_env().with_offline(true).with_progress(false);
    let backend = EmbeddingBackend::load_with("minilm", &hub, &ModelSource::new(REPO), EmbedOptions::default(), None)
        .expect("run scripts/offline-models.sh first");

    let span = tracing::info_span!("request", request_id = "req-embed-7");
    let output = backend.embed(vec![EmbedInput::Text("hello world".into())], true).instrument(span).await;
    assert_eq!(output.expect("embeds").embeddings.len(), 1);
    // A request outside any span: its line must not borrow the other request's span.
    backend.embed(vec![EmbedInput::Text("no span".into())], true).await.expect("embeds");

    let text = captured.text();
    let answered: Vec<&str> = text.lines().filter(|line| line.contains("embedding job answered")).collect();
    assert_eq!(answered.len(), 2, "{text}");
    assert!(answered[0].contains(r#"request{request_id="req-embed-7"}"#), "{}", answered[0]);
    assert!(answered[0].contains("embed-minilm"), "logged on the worker thread: {}", answered[0]);
    assert!(!answered[1].contains("req-embed-7"), "{}", answered[1]);
}

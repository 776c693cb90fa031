//! With the worker's queue full, a request is refused before its inputs are tokenised, so that
//! refusals stay cheap under overload. Needs the offline all-MiniLM-L6-v2
//! (scripts/offline-models.sh).

use std::time::{Duration, Instant};

use nstream_embed::{EmbedInput, EmbedOptions, EmbeddingBackend, Error};
use nstream_hub::{Hub, ModelSource};

const REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_before_tokenising() {
    let hub = Hub::from_env().with_offline(true).with_progress(false);
    let options = EmbedOptions::default().with_queue_capacity(1);
    let backend = EmbeddingBackend::load_with("minilm", &hub, &ModelSource::new(REPO), options, None)
        .expect("run scripts/offline-models.sh first");
    // Half a megabyte of text: its tokenisation takes a good fraction of a second.
    let huge = || vec![EmbedInput::Text("lorem ipsum dolor sit amet ".repeat(20_000))];
    let started = Instant::now();
    backend.embed(huge(), true).await.expect("embeds when there is room");
    let with_tokenising = started.elapsed();

    // Keep the worker busy with a large job, then fill the queue of one behind it (the queue
    // depth counts jobs sent and not yet answered).
    let depth = || backend.metrics().snapshot().queue_depth;
    let wait_for_depth = |target: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while depth() < target {
            assert!(Instant::now() < deadline, "the queue never reached {target}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let busy = {
        let backend = std::sync::Arc::clone(&backend);
        let inputs = (0..256).map(|index| EmbedInput::Text(format!("sentence {index} ").repeat(40))).collect();
        tokio::spawn(async move { backend.embed(inputs, true).await })
    };
    wait_for_depth(1).await;
    let waiting = {
        let backend = std::sync::Arc::clone(&backend);
        tokio::spawn(async move { backend.embed(vec![EmbedInput::Text("filler".into())], true).await })
    };
    wait_for_depth(2).await;
    let overloaded_before = backend.metrics().snapshot().overloaded_total;
    let started = Instant::now();
    let result = backend.embed(huge(), true).await;
    let refusal = started.elapsed();
    // Had it been tokenised first, the worker would have had time to drain the queue meanwhile.
    let Err(refused) = result else { panic!("not refused: answered after {refusal:?}") };
    assert!(matches!(refused, Error::Overloaded { .. }), "{refused:?}");
    assert_eq!(backend.metrics().snapshot().overloaded_total, overloaded_before + 1);
    assert!(
        refusal * 10 < with_tokenising,
        "refused in {refusal:?}, tokenising and embedding took {with_tokenising:?}: the inputs were tokenised first"
    );
    assert_eq!(busy.await.expect("joins").expect("the busy job is answered").embeddings.len(), 256);
    waiting.await.expect("joins").expect("the queued request is answered");
}

//! all-MiniLM-L6-v2 from the offline model cache against sentence-transformers' embeddings
//! (tests/fixtures/embeddings, made by scripts/reference-embeddings.py), and layout variants made
//! from the same files. Run scripts/offline-models.sh first; without the cache these tests print
//! SKIPPED and pass (CI runs the script, so there they run).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use nstream_embed::{
    EmbedInput, EmbedOptions, Embedder, EmbeddingBackend, EncodedInput, Error, Precision, SentenceFiles,
};
use nstream_hub::{Hub, ModelSource};

const REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/embeddings")
}

fn hub() -> Option<Hub> {
    let hub = Hub::from_env().with_offline(true).with_progress(false);
    if hub.list_cached_files(&ModelSource::new(REPO)).map(|files| files.is_empty()).unwrap_or(true) {
        eprintln!(
            "SKIPPED: {REPO} is not in the hub cache {}; run scripts/offline-models.sh",
            hub.cache_dir().display()
        );
        return None;
    }
    Some(hub)
}

fn read_jsonl(name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture");
    text.lines().map(|line| serde_json::from_str(line).expect("json line")).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_sentence_transformers_on_the_corpus() {
    let Some(hub) = hub() else { return };
    matches_the_reference(&hub, EmbedOptions::default()).await;
}

/// `--dtype bf16` on a CPU with AVX-512 BF16: bf16 products on the kernels, the same floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_products_match_sentence_transformers_on_the_corpus() {
    let Some(hub) = hub() else { return };
    if !nstream_kernels::dense_bf16::bf16_available() {
        eprintln!("SKIPPED: this CPU has no AVX-512 BF16 (bf16 runs on candle ops here)");
        return;
    }
    matches_the_reference(&hub, EmbedOptions::default().with_dtype(Precision::BF16)).await;
}

async fn matches_the_reference(hub: &Hub, options: EmbedOptions) {
    let corpus = read_jsonl("corpus.jsonl");
    let reference = read_jsonl("all-minilm-l6-v2.reference.jsonl");
    assert!(corpus.len() >= 200 && corpus.len() == reference.len());

    let options = options.with_max_batch_tokens(4096).with_max_batch_requests(32);
    let backend = EmbeddingBackend::load_with("minilm", hub, &ModelSource::new(REPO), options, None).expect("loads");
    assert_eq!(backend.info().dimension, 384);
    assert_eq!(backend.info().max_seq_length, 256);

    let inputs: Vec<EmbedInput> =
        corpus.iter().map(|row| EmbedInput::Text(row["text"].as_str().expect("text").to_owned())).collect();
    let output = backend.embed(inputs, true).await.expect("embeds");

    let mut worst = (1.0f64, 0usize);
    let mut expected_tokens = 0;
    for (index, row) in reference.iter().enumerate() {
        let expected: Vec<f32> =
            row["embedding"].as_array().expect("array").iter().map(|v| v.as_f64().expect("float") as f32).collect();
        let similarity = cosine(&output.embeddings[index], &expected);
        if similarity < worst.0 {
            worst = (similarity, index);
        }
        let tokens = row["tokens"].as_u64().expect("tokens") as usize;
        expected_tokens += tokens.min(256);
        assert_eq!(output.truncated[index], tokens > 256, "truncation flag of input {index}");
    }
    eprintln!("worst cosine {:.7} at input {}", worst.0, worst.1);
    assert!(worst.0 >= 0.9999, "input {} has cosine {} with the reference", worst.1, worst.0);
    assert_eq!(output.prompt_tokens, expected_tokens);

    let metrics = backend.metrics().snapshot();
    assert_eq!(metrics.inputs_total, corpus.len() as u64);
    assert!(metrics.batches_total >= 7, "{metrics:?}");
    assert_eq!(metrics.queue_depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_can_be_refused_and_token_arrays_pass_through() {
    let Some(hub) = hub() else { return };
    let backend = EmbeddingBackend::load_with("minilm", &hub, &ModelSource::new(REPO), EmbedOptions::default(), None)
        .expect("loads");
    let long = "word ".repeat(400);
    let error = backend.embed(vec![EmbedInput::Text(long)], false).await.expect_err("too long");
    assert!(matches!(error, Error::InputTooLong { index: 0, tokens: 402, max_tokens: 256 }), "{error}");

    // [CLS] hello world [SEP] as ids gives the same vector as the text.
    let text = backend.embed(vec![EmbedInput::Text("hello world".into())], true).await.expect("text");
    let ids = backend.embed(vec![EmbedInput::Tokens(vec![101, 7592, 2088, 102])], true).await.expect("ids");
    assert!(cosine(&text.embeddings[0], &ids.embeddings[0]) > 0.999_999);
    assert_eq!(ids.prompt_tokens, 4);

    for bad in [vec![], vec![30522]] {
        assert!(matches!(backend.embed(vec![EmbedInput::Tokens(bad)], true).await, Err(Error::InvalidInput { .. })));
    }
    assert!(matches!(backend.embed(vec![], true).await, Err(Error::InvalidInput { .. })));
    let long_ids = backend.embed(vec![EmbedInput::Tokens(vec![1000; 300])], true).await.expect("cut");
    assert_eq!((long_ids.prompt_tokens, long_ids.truncated[0]), (256, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_overloaded_at_once() {
    let Some(hub) = hub() else { return };
    let options = EmbedOptions::default().with_queue_capacity(1).with_max_batch_requests(1);
    let backend = EmbeddingBackend::load_with("minilm", &hub, &ModelSource::new(REPO), options, None).expect("loads");
    let heavy: Vec<EmbedInput> =
        (0..64).map(|i| EmbedInput::Text(format!("{i} {}", "long text ".repeat(100)))).collect();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let backend = Arc::clone(&backend);
            let inputs = heavy.clone();
            tokio::spawn(async move { backend.embed(inputs, true).await })
        })
        .collect();
    let mut overloaded = 0;
    let mut served = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(_) => served += 1,
            Err(Error::Overloaded { retry_after }) => {
                assert!(retry_after.as_secs() >= 1);
                overloaded += 1;
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert!(served >= 1 && overloaded >= 1, "served {served}, overloaded {overloaded}");
    assert_eq!(backend.metrics().snapshot().overloaded_total, overloaded);
}

/// Loads the MiniLM files with some of them replaced, for layout variants.
fn variant(hub: &Hub, pooling: Option<&str>, modules: Option<&str>, sentence_bert: Option<&str>) -> Embedder {
    let source = ModelSource::new(REPO);
    let path = |file: &str| hub.resolve_file(&source, file).expect("cached file");
    let config = std::fs::read_to_string(path("config.json")).expect("config");
    let files = SentenceFiles { modules, pooling, sentence_bert, tokenizer_config: None };
    Embedder::from_parts(&config, &path("tokenizer.json"), &path("model.safetensors"), &files, &Device::Cpu, DType::F32)
        .expect("variant loads")
}

fn embed_one(embedder: &Embedder, text: &str) -> Vec<f32> {
    let encoded = embedder.encode(&EmbedInput::Text(text.into()), true, 0).expect("encode");
    embedder.embed_batch(&[&encoded]).expect("embed").remove(0)
}

#[test]
fn layout_variants_and_padding_invariance() {
    let Some(hub) = hub() else { return };
    let text = "Padding must not change what a sentence means.";

    // No sentence-transformers files: mean pooling, not normalised, 512 positions.
    let plain = variant(&hub, None, None, None);
    assert_eq!(plain.info().max_seq_length, 512);
    let reference = variant(
        &hub,
        Some(r#"{"pooling_mode_mean_tokens": true}"#),
        Some(
            r#"[{"path":"","type":"sentence_transformers.models.Transformer"},{"path":"1_Pooling","type":"sentence_transformers.models.Pooling"},{"path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        ),
        Some(r#"{"max_seq_length": 256}"#),
    );
    let unnormalised = embed_one(&plain, text);
    let normalised = embed_one(&reference, text);
    let norm: f32 = unnormalised.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() > 1e-3, "plain mean pooling is not unit length");
    assert!(cosine(&unnormalised, &normalised) > 0.999_999);

    // CLS, max, mean-sqrt-len and last-token pooling run and differ from mean.
    for mode in [
        "pooling_mode_cls_token",
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_lasttoken",
    ] {
        let embedder = variant(&hub, Some(&format!(r#"{{"{mode}": true}}"#)), None, None);
        let vector = embed_one(&embedder, text);
        assert_eq!(vector.len(), 384);
        assert!(vector.iter().all(|x| x.is_finite()), "{mode}");
        let similarity = cosine(&vector, &unnormalised);
        if mode == "pooling_mode_mean_sqrt_len_tokens" {
            assert!(similarity > 0.999_999, "{mode} is mean up to scale");
        } else {
            assert!(similarity < 0.9999, "{mode} equals mean pooling");
        }
    }

    // Batched with longer and shorter neighbours (padding, mask) = alone.
    let inputs: Vec<EncodedInput> = [text, "short", &"a much longer neighbour sentence ".repeat(10)]
        .iter()
        .map(|t| reference.encode(&EmbedInput::Text((*t).into()), true, 0).expect("encode"))
        .collect();
    let batched = reference.embed_batch(&inputs.iter().collect::<Vec<_>>()).expect("batch");
    assert!(cosine(&batched[0], &normalised) > 0.999_999);
    assert!(cosine(&batched[1], &embed_one(&reference, "short")) > 0.999_999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_openai_shaped_requests_through_model_backend() {
    use nstream_backend::{BackendError, EmbeddingRequest, Input, ModelBackend};
    let Some(hub) = hub() else { return };
    let backend = EmbeddingBackend::load_with("minilm", &hub, &ModelSource::new(REPO), EmbedOptions::default(), None)
        .expect("loads");
    let model: Arc<dyn ModelBackend> = backend;
    let description = model.describe();
    assert_eq!((description.embedding_dimension, description.context_length), (Some(384), Some(256)));

    let request = EmbeddingRequest::new("minilm", Input::TextBatch(vec!["one".into(), "two words".into()]));
    let response = model.embed(request).await.expect("embeds");
    assert_eq!(response.data.len(), 2);
    assert_eq!(response.usage.prompt_tokens, 3 + 4);
    assert_eq!(response.data[1].embedding.len(), 384);

    let mut strict = EmbeddingRequest::new("minilm", Input::Text("word ".repeat(300)));
    strict.truncate = false;
    assert!(matches!(model.embed(strict).await, Err(BackendError::ContextLengthExceeded { max_tokens: 256, .. })));
    let mut shorter = EmbeddingRequest::new("minilm", Input::Text("x".into()));
    shorter.dimensions = Some(128);
    assert!(matches!(model.embed(shorter).await, Err(BackendError::InvalidRequest { .. })));
}

//! The architectures beyond BERT (XLM-RoBERTa, ModernBERT, NomicBert, Qwen2) against
//! sentence-transformers.
//!
//! Each fixture in tests/fixtures is a tiny random checkpoint made by transformers and saved as a
//! sentence-transformers folder by tests/fixtures/make_tiny_models.py, with the vectors that
//! `SentenceTransformer(folder).encode(sentences)` returned (`reference.json`). The folder is laid
//! out as a hub-cache snapshot and loaded offline through nstream-hub, the path users take; each
//! sentence is embedded alone and in one padded batch with the others, and both must match.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use nstream_embed::pooling::Pooling;
use nstream_embed::{Architecture, EmbedInput, EmbedOptions, Embedder, EmbeddingBackend, EncodedInput};
use nstream_hub::{Hub, ModelSource};
use serde::Deserialize;

/// A made-up commit: the snapshot folder name of the hub cache.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Deserialize)]
struct Reference {
    sentences: Vec<String>,
    tokens: Vec<usize>,
    normalize: bool,
    embeddings: Vec<Vec<f32>>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// An offline hub whose cache holds the fixture as `nstream-fixtures/NAME` at `main`.
fn hub_with(name: &str, cache: &Path) -> (Hub, ModelSource) {
    let repo = cache.join(format!("models--nstream-fixtures--{name}"));
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), COMMIT).expect("ref");
    copy_tree(&fixture(name), &repo.join("snapshots").join(COMMIT));
    let hub = Hub::new(cache).with_offline(true).with_progress(false);
    (hub, ModelSource::new(format!("nstream-fixtures/{name}")))
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference json")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Asserts cosine > 0.9999 and max abs difference < 1e-4; returns the difference. Both bounds are
/// needed: unmasked padding moves a CLS vector by about 1e-2 while its cosine stays above 0.99999.
fn assert_matches(what: &str, got: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(got.len(), expected.len(), "{what}: dimension");
    let similarity = cosine(got, expected);
    let difference = max_abs_difference(got, expected);
    assert!(similarity > 0.9999 && difference < 1e-4, "{what}: cosine {similarity}, max abs difference {difference}");
    difference
}

/// Loads the fixture through the hub and checks it against sentence-transformers: alone, in one
/// padded batch, and through the backend's queue and batcher.
async fn check(name: &str, architecture: Architecture, pooling: Pooling, max_seq_length: usize) {
    let cache = tempfile::tempdir().expect("tempdir");
    let (hub, source) = hub_with(name, cache.path());
    let reference = reference(name);
    assert_eq!(reference.sentences.len(), reference.embeddings.len());
    let mut worst = 0.0f32;

    let embedder = Embedder::load(&hub, &source, &Device::Cpu, DType::F32).expect("loads");
    let info = embedder.info().clone();
    assert_eq!(info.architecture, architecture);
    assert_eq!(info.dimension, 32);
    assert_eq!(info.max_seq_length, max_seq_length);
    assert_eq!((info.layout.pooling, info.layout.normalize), (pooling, reference.normalize));

    let encoded: Vec<EncodedInput> = reference
        .sentences
        .iter()
        .enumerate()
        .map(|(index, text)| embedder.encode(&EmbedInput::Text(text.clone()), true, index).expect("encodes"))
        .collect();
    for (index, input) in encoded.iter().enumerate() {
        assert_eq!(input.ids.len(), reference.tokens[index].min(max_seq_length), "{name}: tokens of sentence {index}");
        let alone = embedder.embed_batch(&[input]).expect("embeds alone").remove(0);
        worst =
            worst.max(assert_matches(&format!("{name}: sentence {index} alone"), &alone, &reference.embeddings[index]));
    }
    let lengths: Vec<usize> = encoded.iter().map(|input| input.ids.len()).collect();
    assert!(lengths.iter().min() < lengths.iter().max(), "the batch must need padding: {lengths:?}");
    let batched = embedder.embed_batch(&encoded.iter().collect::<Vec<_>>()).expect("embeds the batch");
    for (index, vector) in batched.iter().enumerate() {
        let what = format!("{name}: sentence {index} in a batch");
        worst = worst.max(assert_matches(&what, vector, &reference.embeddings[index]));
    }

    // The server's path: the backend's worker, queue and token-budget batcher.
    let backend = EmbeddingBackend::load_with(name, &hub, &source, EmbedOptions::default(), None).expect("backend");
    let inputs = reference.sentences.iter().map(|text| EmbedInput::Text(text.clone())).collect();
    let output = backend.embed(inputs, true).await.expect("backend embeds");
    for (index, vector) in output.embeddings.iter().enumerate() {
        let what = format!("{name}: sentence {index} via the backend");
        worst = worst.max(assert_matches(&what, vector, &reference.embeddings[index]));
    }
    eprintln!("{name}: largest difference from sentence-transformers {worst:e}");
    assert_eq!(output.prompt_tokens, lengths.iter().sum::<usize>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xlm_roberta_matches_sentence_transformers() {
    // Mean pooling + Normalize, as multilingual-e5 and bge-m3; max_seq_length 48 comes from
    // tokenizer_config.json (sentence-transformers 6; the weights allow 64) and truncates the two
    // longest sentences.
    check("tiny-xlm-roberta", Architecture::XlmRoberta, Pooling::Mean, 48).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modernbert_matches_sentence_transformers() {
    // CLS pooling, not normalised; a local attention window of 8 shorter than most sentences, and
    // layer 1 of 2 sliding.
    check("tiny-modernbert", Architecture::ModernBert, Pooling::Cls, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomic_bert_matches_sentence_transformers() {
    // Last-token pooling + Normalize (the last real token moves with padding, so it checks the mask).
    check("tiny-nomic-bert", Architecture::NomicBert, Pooling::LastToken, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_matches_sentence_transformers() {
    // gte-Qwen2's recipe: a causal decoder with grouped-query attention, <|endoftext|> appended
    // by the tokenizer, last-token pooling + Normalize. sentence-transformers pads on the left (as
    // gte-Qwen2's tokenizer says), nstream on the right: both must give the same vectors.
    check("tiny-qwen2", Architecture::Qwen2, Pooling::LastToken, 128).await;
}

#[test]
fn a_gte_new_config_is_refused_with_the_reason() {
    let cache = tempfile::tempdir().expect("tempdir");
    let (hub, source) = hub_with("tiny-nomic-bert", cache.path());
    let config = hub.resolve_file(&source, "config.json").expect("config");
    std::fs::write(&config, r#"{"model_type":"new","architectures":["NewModel"]}"#).expect("write");
    let error = Embedder::load(&hub, &source, &Device::Cpu, DType::F32).err().expect("refused");
    assert!(error.to_string().contains("GTE"), "{error}");
}

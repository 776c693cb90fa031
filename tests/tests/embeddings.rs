//! `/v1/embeddings` of the real `nstream-server` serving all-MiniLM-L6-v2 from
//! `examples/quickstart.yaml`, over real HTTP: a string, a batch, token arrays, base64 that decodes
//! to exactly the float answer, `dimensions`, and usage counts; vectors match the committed
//! sentence-transformers reference (cosine >= 0.9999) and are unit length.

use base64::Engine as _;
use nstream_e2e::{DIMENSION, EMBEDDING_MODEL, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/embeddings");

/// One sentence of the reference corpus with sentence-transformers' vector and token count.
struct Reference {
    text: String,
    tokens: u64,
    embedding: Vec<f32>,
}

fn json_lines(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("reading {path}: {error}"));
    text.lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect()
}

/// The first `count` sentences of the reference corpus.
fn references(count: usize) -> Vec<Reference> {
    let corpus = json_lines(&format!("{FIXTURES}/corpus.jsonl"));
    let vectors = json_lines(&format!("{FIXTURES}/all-minilm-l6-v2.reference.jsonl"));
    corpus
        .iter()
        .zip(&vectors)
        .take(count)
        .map(|(sentence, reference)| {
            assert_eq!(sentence["id"], reference["id"], "corpus and reference are in the same order");
            Reference {
                text: sentence["text"].as_str().expect("text").to_owned(),
                tokens: reference["tokens"].as_u64().expect("tokens"),
                embedding: floats(&reference["embedding"]),
            }
        })
        .collect()
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().expect("an array of numbers").iter().map(|x| x.as_f64().expect("a number") as f32).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

fn norm(vector: &[f32]) -> f32 {
    vector.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Posts a request that must succeed and returns its JSON answer.
async fn embed_ok(server: &Server, body: Value) -> Value {
    let response = server.embed(&body).await.expect("the request is answered");
    let status = response.status();
    let answer: Value = response.json().await.expect("a JSON answer");
    assert_eq!(status, StatusCode::OK, "{body} -> {answer}");
    answer
}

/// The vectors of a float answer, checking the list shape and that `index` follows input order.
fn vectors(answer: &Value) -> Vec<Vec<f32>> {
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], EMBEDDING_MODEL);
    let data = answer["data"].as_array().expect("data is an array");
    data.iter()
        .enumerate()
        .map(|(position, item)| {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], position, "{item}");
            floats(&item["embedding"])
        })
        .collect()
}

fn usage(answer: &Value) -> (u64, u64) {
    let prompt = answer["usage"]["prompt_tokens"].as_u64().expect("usage.prompt_tokens");
    let total = answer["usage"]["total_tokens"].as_u64().expect("usage.total_tokens");
    (prompt, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_string_is_one_unit_vector_matching_the_reference() {
    let server = Server::start(&[]).await.expect("the server starts");
    let reference = references(2).remove(1);
    let answer = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": reference.text})).await;
    let vectors = vectors(&answer);
    assert_eq!(vectors.len(), 1);
    assert_eq!(vectors[0].len(), DIMENSION);
    assert!((norm(&vectors[0]) - 1.0).abs() < 1e-4, "norm {}", norm(&vectors[0]));
    let similarity = cosine(&vectors[0], &reference.embedding);
    assert!(similarity >= 0.9999, "cosine to the reference {similarity}");
    assert_eq!(usage(&answer), (reference.tokens, reference.tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_order_matches_the_reference_and_counts_every_token() {
    let server = Server::start(&[]).await.expect("the server starts");
    // Multilingual, emoji and one-character sentences: the first 16 of the corpus.
    let references = references(16);
    let texts: Vec<&str> = references.iter().map(|reference| reference.text.as_str()).collect();
    let answer = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": texts})).await;
    let vectors = vectors(&answer);
    assert_eq!(vectors.len(), references.len());
    for (vector, reference) in vectors.iter().zip(&references) {
        let similarity = cosine(vector, &reference.embedding);
        assert!(similarity >= 0.9999, "{:?}: cosine to the reference {similarity}", reference.text);
    }
    let tokens: u64 = references.iter().map(|reference| reference.tokens).sum();
    assert_eq!(usage(&answer), (tokens, tokens));

    // The same sentence alone or in a batch embeds to the same vector.
    let alone = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": [texts[5]]})).await;
    let similarity = cosine(&crate::vectors(&alone)[0], &vectors[5]);
    assert!(similarity > 0.99999, "batch and single differ: cosine {similarity}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_arrays_embed_like_their_text() {
    let server = Server::start(&[]).await.expect("the server starts");
    // "hello world" in BERT's uncased vocabulary, with [CLS] and [SEP].
    let ids = [101, 7592, 2088, 102];
    let text = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": "hello world"})).await;
    let one = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": ids})).await;
    let many = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": [ids, [101, 7592, 102]]})).await;

    let text_vector = &vectors(&text)[0];
    let one_vector = &vectors(&one)[0];
    let many_vectors = vectors(&many);
    assert_eq!(many_vectors.len(), 2);
    assert!(cosine(text_vector, one_vector) > 0.9999, "tokens and text differ");
    assert!(cosine(one_vector, &many_vectors[0]) > 0.99999, "a token array alone and in a batch differ");
    assert!(cosine(&many_vectors[0], &many_vectors[1]) < 0.999, "different token arrays embed differently");
    assert_eq!(usage(&text), (4, 4));
    assert_eq!(usage(&one), (4, 4));
    assert_eq!(usage(&many), (7, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_decodes_to_the_float_answer_bit_for_bit() {
    let server = Server::start(&[]).await.expect("the server starts");
    let input = ["The cat sits on the mat.", "Ein Hund läuft im Park.", "🚀"];
    let float = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": input, "encoding_format": "float"})).await;
    let base64 =
        embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": input, "encoding_format": "base64"})).await;
    let default = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": input})).await;
    assert_eq!(float["data"], default["data"], "float is the default encoding");
    assert_eq!(usage(&float), usage(&base64));

    let float_vectors = vectors(&float);
    let encoded = base64["data"].as_array().expect("data");
    assert_eq!(encoded.len(), input.len());
    for (position, (item, expected)) in encoded.iter().zip(&float_vectors).enumerate() {
        assert_eq!(item["index"], position);
        let text = item["embedding"].as_str().expect("a base64 string");
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).expect("standard base64");
        assert_eq!(bytes.len(), DIMENSION * 4, "little-endian f32s");
        let decoded: Vec<f32> =
            bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])).collect();
        // JSON floats print the shortest string that parses back to the same f32.
        assert_eq!(&decoded, expected, "input {position}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimensions_accepts_the_full_length_and_refuses_what_the_model_cannot_give() {
    let mut server = Server::start(&[]).await.expect("the server starts");
    let full = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": "x", "dimensions": DIMENSION})).await;
    let plain = embed_ok(&server, json!({"model": EMBEDDING_MODEL, "input": "x"})).await;
    assert_eq!(vectors(&full), vectors(&plain), "dimensions = the model's length changes nothing");

    // all-MiniLM-L6-v2 is not a Matryoshka model: shorter vectors would be meaningless, longer
    // ones impossible, and zero is never valid. Each is a 400 naming `dimensions`.
    for dimensions in [0, 128, DIMENSION + 1, 4096] {
        let body = json!({"model": EMBEDDING_MODEL, "input": "x", "dimensions": dimensions});
        let error = nstream_e2e::api_error(server.embed(&body).await.expect("answered")).await.expect("OpenAI shape");
        assert_eq!(error.status, 400, "dimensions {dimensions}: {error:?}");
        assert_eq!(error.param.as_deref(), Some("dimensions"), "{error:?}");
        assert_eq!(error.error_type, "invalid_request_error");
        assert!(error.message.contains("dimension"), "{error:?}");
    }
    server.check_serving().await.expect("still serving");
}

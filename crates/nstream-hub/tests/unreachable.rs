//! Online (HF_HUB_OFFLINE unset) with a hub that cannot be reached: a closed port, and a port that
//! accepts connections and never answers. Cached files are used as Python's `huggingface_hub`
//! uses them; an uncached file is one clear error; the silent hub costs one timeout, not a hang.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use nstream_hub::{Error, Hub, ModelSource, WeightFormat};

const REVISION: &str = "89abcdef0123456789abcdef0123456789abcdef";

mod common;

/// The fake repo at this file's revision.
fn fake_repo(hub: &Path, repo_id: &str, files: &[(&str, &str)]) {
    common::fake_repo(hub, repo_id, REVISION, files);
}

/// An endpoint on a loopback port that nothing listens on (bound, read and released).
fn closed_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// An endpoint whose listener accepts connections (the kernel completes the handshake) and never
/// answers; the listener lives as long as the returned guard.
fn silent_endpoint() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    (listener, endpoint)
}

fn online_hub(dir: &Path, endpoint: &str) -> Hub {
    Hub::new(dir).with_offline(false).with_progress(false).with_endpoint(endpoint)
}

#[test]
fn closed_port_uses_the_cached_snapshot_for_listing_and_optional_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_repo(dir.path(), "acme/gguf", &[("model.Q4_1.gguf", "weights")]);
    let hub = online_hub(dir.path(), &closed_endpoint());
    let source = ModelSource::new("acme/gguf");

    assert_eq!(hub.list_files(&source).expect("cached list"), vec!["model.Q4_1.gguf"]);
    let model = hub.resolve_model(&source).expect("resolves from the cache");
    assert_eq!(model.format, WeightFormat::Gguf { file: "model.Q4_1.gguf".into() });
    assert!(model.tokenizer.is_none());
    // An optional file the cached snapshot lacks counts as absent, as offline.
    assert!(hub.resolve_optional(&source, "tokenizer.json").expect("optional").is_none());
}

#[test]
fn closed_port_and_an_uncached_file_is_one_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_repo(dir.path(), "acme/partial", &[("config.json", "{}")]);
    let endpoint = closed_endpoint();
    let hub = online_hub(dir.path(), &endpoint);

    let error = hub.resolve_file(&ModelSource::new("acme/partial"), "model.safetensors").expect_err("not cached");
    assert!(matches!(error, Error::HubUnreachable(_)), "{error:?}");
    let message = error.to_string();
    for expected in [
        "file \"model.safetensors\" of Hugging Face repo acme/partial (revision main) is not in the local cache",
        &format!("the hub at {endpoint} cannot be reached"),
        "HF_TOKEN",
        "scripts/offline-models.sh",
        "check the network",
    ] {
        assert!(message.contains(expected), "{expected:?} missing from: {message}");
    }
    assert!(!message.contains('\n'), "one line: {message}");

    // A repo with nothing cached: the listing names the file list, never an empty file name.
    let error = hub.list_files(&ModelSource::new("acme/absent")).expect_err("nothing cached");
    let message = error.to_string();
    assert!(message.starts_with("the file list of Hugging Face repo acme/absent (revision main)"), "{message}");
    assert!(!message.contains("\"\""), "{message}");
}

#[test]
fn a_hub_that_never_answers_costs_one_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_repo(dir.path(), "acme/one", &[("model.safetensors", "w"), ("config.json", "{}")]);
    fake_repo(dir.path(), "acme/two", &[("model.safetensors", "w")]);
    let (_listener, endpoint) = silent_endpoint();
    let hub = online_hub(dir.path(), &endpoint).with_timeout(Duration::from_millis(500));

    let started = Instant::now();
    assert_eq!(
        hub.list_files(&ModelSource::new("acme/one")).expect("cached"),
        vec!["config.json", "model.safetensors"]
    );
    let first = started.elapsed();
    assert!(first >= Duration::from_millis(400), "the hub was asked and waited for: {first:?}");
    assert!(first < Duration::from_secs(5), "bounded by the timeout: {first:?}");

    // The process remembers the silent hub: the next repo and an uncached file do not wait again.
    let started = Instant::now();
    assert_eq!(hub.list_files(&ModelSource::new("acme/two")).expect("cached"), vec!["model.safetensors"]);
    let error = hub.resolve_file(&ModelSource::new("acme/two"), "tokenizer.json").expect_err("uncached");
    assert!(matches!(error, Error::HubUnreachable(_)), "{error:?}");
    assert!(started.elapsed() < Duration::from_millis(400), "not asked again: {:?}", started.elapsed());
}

#[test]
fn timeout_is_read_from_the_environment() {
    let hub = Hub::from_lookup(|key| (key == "HF_HUB_ETAG_TIMEOUT").then(|| "2.5".to_owned()));
    assert_eq!(hub.timeout(), Duration::from_millis(2500));
    let fallback = Hub::from_lookup(|key| (key == "HF_HUB_ETAG_TIMEOUT").then(|| "soon".to_owned()));
    assert_eq!(fallback.timeout(), Duration::from_secs(10));
}

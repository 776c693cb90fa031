//! `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` through the router, over backends that
//! count their adapter's sequences (the real LLM backend is exercised end to end by
//! tests/python/test_adapters.py): routing by `model`, `parent`/`root` in `/v1/models`, the base
//! chosen by `base_model` or by elimination, the API key, unload refused while in use, and errors
//! naming the field.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use axum::http::{StatusCode, header};
use nstream_backend::{BackendError, ModelBackend, ModelDescription};
use nstream_server::{ApiKey, AppState, Metrics, ModelRegistry, ServerConfig, app};
use serde_json::json;

use common::{TestApp, json_request};

/// A base that serves "adapters" whose in-use count the test controls.
struct Base {
    name: &'static str,
    root: &'static str,
    in_use: Arc<AtomicUsize>,
}

struct Adapter {
    name: String,
    parent: String,
    path: String,
    in_use: Arc<AtomicUsize>,
}

#[async_trait]
impl ModelBackend for Base {
    fn describe(&self) -> ModelDescription {
        ModelDescription::chat(self.name).with_root(self.root)
    }

    fn load_adapter(&self, name: &str, path: &str) -> nstream_backend::Result<Arc<dyn ModelBackend>> {
        if path.contains("broken") {
            return Err(BackendError::invalid_param("lora_path", format!("{path}: no adapter_config.json")));
        }
        Ok(Arc::new(Adapter {
            name: name.to_owned(),
            parent: self.name.to_owned(),
            path: path.to_owned(),
            in_use: Arc::clone(&self.in_use),
        }))
    }
}

#[async_trait]
impl ModelBackend for Adapter {
    fn describe(&self) -> ModelDescription {
        ModelDescription::chat(&self.name).with_parent(&self.parent).with_root(&self.path)
    }

    fn adapter_sequences(&self) -> Option<usize> {
        Some(self.in_use.load(Ordering::SeqCst))
    }
}

fn app_with(bases: Vec<Base>, config: ServerConfig) -> TestApp {
    let mut models = ModelRegistry::new();
    for base in bases {
        models.register(Arc::new(base)).unwrap();
    }
    let embedding = Arc::new(nstream_backend::FakeBackend::embedding("fake-embed", 4));
    models.register(embedding.clone()).unwrap();
    let chat = Arc::new(nstream_backend::FakeBackend::chat("fake-chat"));
    let metrics = Metrics::new();
    TestApp { router: app(AppState::new(models, config, metrics.clone())), embedding, chat, metrics }
}

fn base(name: &'static str, root: &'static str, in_use: &Arc<AtomicUsize>) -> Base {
    Base { name, root, in_use: Arc::clone(in_use) }
}

#[tokio::test]
async fn adapters_load_list_with_their_parent_and_unload_when_idle() {
    let in_use = Arc::new(AtomicUsize::new(0));
    let app = app_with(vec![base("smollm2", "org/smollm2", &in_use)], ServerConfig::default());

    // One base that can take adapters (the fake embedding model cannot): chosen without base_model.
    let response =
        app.post_json("/v1/load_lora_adapter", json!({"lora_name": "support", "lora_path": "/a/support"})).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.json()["base_model"], "smollm2");
    let models = app.get("/v1/models").await.json();
    let listed = models["data"].as_array().unwrap().iter().find(|model| model["id"] == "support").cloned();
    let listed = listed.expect("the adapter is listed");
    assert_eq!(listed["parent"], "smollm2");
    assert_eq!(listed["root"], "/a/support");

    let again = app.post_json("/v1/load_lora_adapter", json!({"lora_name": "support", "lora_path": "/a/other"})).await;
    let error = again.openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "lora_name");

    in_use.store(2, Ordering::SeqCst);
    let busy = app.post_json("/v1/unload_lora_adapter", json!({"lora_name": "support"})).await;
    let error = busy.openai_error(StatusCode::CONFLICT);
    assert!(error["message"].as_str().unwrap().contains("in use by 2"), "{error}");
    in_use.store(0, Ordering::SeqCst);
    let done = app.post_json("/v1/unload_lora_adapter", json!({"lora_name": "support"})).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text());
    assert!(app.get("/v1/models/support").await.status == StatusCode::NOT_FOUND);

    let gone = app.post_json("/v1/unload_lora_adapter", json!({"lora_name": "support"})).await;
    assert!(gone.openai_error(StatusCode::BAD_REQUEST)["message"].as_str().unwrap().contains("not loaded"));
    let not_adapter = app.post_json("/v1/unload_lora_adapter", json!({"lora_name": "smollm2"})).await;
    assert!(not_adapter.openai_error(StatusCode::BAD_REQUEST)["message"].as_str().unwrap().contains("not a LoRA"));
}

#[tokio::test]
async fn the_base_must_be_named_when_several_could_take_the_adapter() {
    let in_use = Arc::new(AtomicUsize::new(0));
    let app = app_with(
        vec![base("first", "org/first", &in_use), base("second", "org/second", &in_use)],
        ServerConfig::default(),
    );
    let body = json!({"lora_name": "x", "lora_path": "/nowhere/x"});
    let error = app.post_json("/v1/load_lora_adapter", body).await.openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "base_model");
    assert!(error["message"].as_str().unwrap().contains("first, second"), "{error}");

    let named = json!({"lora_name": "x", "lora_path": "/nowhere/x", "base_model": "second"});
    let response = app.post_json("/v1/load_lora_adapter", named).await;
    assert_eq!(response.json()["base_model"], "second");
    let unknown = json!({"lora_name": "y", "lora_path": "/nowhere/y", "base_model": "third"});
    let error = app.post_json("/v1/load_lora_adapter", unknown).await.openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "base_model");
    let refused = json!({"lora_name": "z", "lora_path": "/a/z", "base_model": "fake-embed"});
    let error = app.post_json("/v1/load_lora_adapter", refused).await.openai_error(StatusCode::BAD_REQUEST);
    assert!(error["message"].as_str().unwrap().contains("cannot serve LoRA adapters"), "{error}");
    let broken = json!({"lora_name": "z", "lora_path": "/a/broken", "base_model": "first"});
    let error = app.post_json("/v1/load_lora_adapter", broken).await.openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "lora_path");
    let missing = json!({"lora_name": "z"});
    app.post_json("/v1/load_lora_adapter", missing).await.openai_error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn loading_and_unloading_need_the_api_key() {
    let in_use = Arc::new(AtomicUsize::new(0));
    let app = app_with(
        vec![base("smollm2", "org/smollm2", &in_use)],
        ServerConfig::default().with_api_key(ApiKey::new("sk-k")),
    );
    for (path, body) in [
        ("/v1/load_lora_adapter", json!({"lora_name": "a", "lora_path": "/a"})),
        ("/v1/unload_lora_adapter", json!({"lora_name": "a"})),
    ] {
        app.send(json_request(path, body.to_string())).await.openai_error(StatusCode::UNAUTHORIZED);
        let mut request = json_request(path, body.to_string());
        request.headers_mut().insert(header::AUTHORIZATION, "Bearer sk-k".parse().unwrap());
        assert_eq!(app.send(request).await.status, StatusCode::OK, "{path}");
    }
}

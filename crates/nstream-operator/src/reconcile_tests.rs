//! Reconcile decisions against a mocked API server (the kube-rs controller-rs pattern): which
//! calls a reconcile makes, and that a second reconcile with nothing changed writes nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::{Client, Resource};
use nstream_core::{EmbeddingModel, ModelStatus};

use crate::controller::{Context, reconcile};
use crate::fixtures::*;
use crate::metrics::Metrics;

/// A call the operator made: method and path (without the query).
type Call = (Method, String);

/// An in-memory API server: stores what is applied, answers gets from it, lists no pods.
#[derive(Default)]
struct MockApi {
    objects: BTreeMap<String, serde_json::Value>,
    calls: Vec<Call>,
    status_writes: Vec<serde_json::Value>,
    events: Vec<serde_json::Value>,
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(Body::from(Vec::new())))
}

fn not_found() -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

impl MockApi {
    fn handle(&mut self, method: Method, path: String, body: Vec<u8>) -> Response<Body> {
        self.calls.push((method.clone(), path.clone()));
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        if method == Method::GET {
            if path.ends_with("/pods") {
                return json_response(
                    StatusCode::OK,
                    &serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []}),
                );
            }
            return match self.objects.get(&path) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(),
            };
        }
        if method == Method::POST && path.contains("/events") {
            self.events.push(body.clone());
            return json_response(StatusCode::CREATED, &body);
        }
        if method == Method::POST {
            let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let path = format!("{path}/{name}");
            if self.objects.contains_key(&path) {
                return json_response(
                    StatusCode::CONFLICT,
                    &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
                );
            }
            let mut stored = body.clone();
            stored["metadata"]["resourceVersion"] = serde_json::json!("1");
            self.objects.insert(path, stored.clone());
            return json_response(StatusCode::CREATED, &stored);
        }
        if method == Method::PATCH && path.ends_with("/status") {
            self.status_writes.push(body.clone());
            let Some(model) = self.objects.get_mut(path.trim_end_matches("/status")) else { return not_found() };
            model["status"] = body["status"].clone();
            return json_response(StatusCode::OK, model);
        }
        if method == Method::PATCH {
            let mut stored = body.clone();
            let version = match self.objects.get(&path) {
                Some(previous)
                    if previous.get("spec") == body.get("spec") && previous.get("data") == body.get("data") =>
                {
                    previous["metadata"]["resourceVersion"].clone()
                }
                Some(previous) => serde_json::json!(
                    (previous["metadata"]["resourceVersion"].as_str().unwrap_or("0").parse::<u64>().unwrap_or(0) + 1)
                        .to_string()
                ),
                None => serde_json::json!("1"),
            };
            stored["metadata"]["resourceVersion"] = version;
            self.objects.insert(path, stored.clone());
            return json_response(StatusCode::OK, &stored);
        }
        json_response(StatusCode::METHOD_NOT_ALLOWED, &serde_json::json!({}))
    }

    fn created(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|(method, path)| method == Method::POST && !path.contains("/events"))
            .map(|(_, path)| path.clone())
            .collect()
    }

    fn applied(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|(method, path)| method == Method::PATCH && !path.ends_with("/status"))
            .map(|(_, path)| path.rsplit('/').nth(1).unwrap_or_default().to_string())
            .collect()
    }
}

/// A mock API server that holds `model`.
fn api_with(model: &EmbeddingModel) -> Arc<Mutex<MockApi>> {
    let mut api = MockApi::default();
    let name = model.metadata.name.clone().unwrap_or_default();
    api.objects.insert(
        format!("/apis/llm.nstream.ai/v1/namespaces/models/embeddingmodels/{name}"),
        serde_json::to_value(model).unwrap_or_default(),
    );
    Arc::new(Mutex::new(api))
}

fn mocked_context(api: Arc<Mutex<MockApi>>) -> Arc<Context> {
    let service = tower::service_fn(move |request: Request<Body>| {
        let api = api.clone();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.map(|collected| collected.to_bytes().to_vec()).unwrap_or_default();
            let path = parts.uri.path().to_string();
            let response = match api.lock() {
                Ok(mut api) => api.handle(parts.method, path, bytes),
                Err(_) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &serde_json::json!({})),
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let client = Client::new(service, "models");
    Arc::new(Context::new(client, settings(), Arc::new(Metrics::default()), None))
}

fn with_status(mut model: EmbeddingModel, write: &serde_json::Value) -> EmbeddingModel {
    model.status = serde_json::from_value::<ModelStatus>(write["status"].clone()).ok();
    model
}

#[tokio::test]
async fn a_new_model_gets_its_objects_a_status_and_an_event_then_nothing_more() {
    let model = EmbeddingModel::test("minilm").with_inline_token("hf_mock_token");
    let api = api_with(&model);
    let context = mocked_context(api.clone());

    reconcile(Arc::new(model.clone()), context.clone()).await.expect("first reconcile");
    let (applied, first_status, events) = {
        let api = api.lock().expect("mock");
        (api.applied(), api.status_writes.first().cloned().expect("a status write"), api.events.len())
    };
    assert_eq!(applied, ["secrets", "configmaps", "services", "networkpolicies", "deployments"]);
    let api_key_path = "/api/v1/namespaces/models/secrets/em-minilm-api-key";
    let api_key = api.lock().expect("mock").objects.get(api_key_path).cloned().expect("the API key Secret");
    assert_eq!(api_key["metadata"]["ownerReferences"][0]["uid"], "uid-minilm");
    assert_eq!(first_status["status"]["conditions"].as_array().map(Vec::len), Some(3));
    assert_eq!(first_status["status"]["endpoint"], "http://em-minilm.models.svc.cluster.local/v1");
    assert!(!first_status.to_string().contains("hf_mock_token"), "the token leaked into the status");
    assert_eq!(events, 1, "one event for the first Ready=False");

    // The next reconcile sees its own status: same applies (no-ops), no status write, no event.
    let model = with_status(model, &first_status);
    reconcile(Arc::new(model), context).await.expect("second reconcile");
    let api = api.lock().expect("mock");
    assert_eq!(api.created(), ["/api/v1/namespaces/models/secrets"], "the API key is made once, never again");
    assert_eq!(api.objects.get(api_key_path), Some(&api_key), "the key changed on a reconcile");
    assert_eq!(api.status_writes.len(), 1, "an unchanged status was written again");
    assert_eq!(api.events.len(), 1, "an unchanged status published an event");
    let deployment = api.objects.get("/apis/apps/v1/namespaces/models/deployments/em-minilm").expect("deployment");
    assert_eq!(deployment["metadata"]["resourceVersion"], "1", "the second apply changed the Deployment");
    assert!(!deployment.to_string().contains("hf_mock_token"));
}

#[tokio::test]
async fn a_missing_secret_reference_builds_no_deployment_and_says_which_secret() {
    let model = EmbeddingModel::test("gated").with_token_from("hf-token", "token");
    let api = api_with(&model);
    let context = mocked_context(api.clone());
    reconcile(Arc::new(model), context).await.expect("reconcile");
    let api = api.lock().expect("mock");
    assert!(!api.applied().contains(&"deployments".to_string()), "{:?}", api.applied());
    let status = &api.status_writes[0]["status"];
    let degraded = status["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|condition| condition["type"] == "Degraded"))
        .expect("Degraded");
    assert_eq!(degraded["reason"], "SecretNotFound");
    assert!(degraded["message"].as_str().unwrap_or_default().contains("hf-token"));
}

#[tokio::test]
async fn an_invalid_spec_applies_nothing() {
    let mut model = EmbeddingModel::test("bad");
    model.spec.embedding_model_serving_template.replicas = nstream_core::Replicas::Text("two".into());
    let api = api_with(&model);
    let context = mocked_context(api.clone());
    reconcile(Arc::new(model), context).await.expect("reconcile");
    let api = api.lock().expect("mock");
    assert!(api.applied().is_empty(), "{:?}", api.applied());
    assert!(api.status_writes[0].to_string().contains("InvalidSpec"));
}

#[tokio::test]
async fn a_model_being_deleted_is_left_to_the_garbage_collector() {
    let mut model = EmbeddingModel::test("doomed");
    model.meta_mut().deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1).expect("time"),
    ));
    let api = api_with(&model);
    let context = mocked_context(api.clone());
    reconcile(Arc::new(model), context).await.expect("reconcile");
    assert!(api.lock().expect("mock").calls.is_empty(), "a deleting model must not recreate its objects");
}

fn degraded(write: &serde_json::Value) -> serde_json::Value {
    write["status"]["conditions"]
        .as_array()
        .and_then(|conditions| conditions.iter().find(|condition| condition["type"] == "Degraded"))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn an_object_of_the_same_name_that_the_resource_does_not_own_is_never_taken_over() {
    let model = EmbeddingModel::test("minilm");
    let api = api_with(&model);
    let theirs = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "em-minilm", "namespace": "models", "resourceVersion": "7"}, "spec": {"ports": [{"port": 443}]}});
    api.lock().expect("mock").objects.insert("/api/v1/namespaces/models/services/em-minilm".into(), theirs.clone());
    let context = mocked_context(api.clone());
    reconcile(Arc::new(model), context).await.expect("reconcile");
    let api = api.lock().expect("mock");
    assert!(api.applied().is_empty(), "applied {:?} next to a Service it does not own", api.applied());
    assert!(api.created().is_empty(), "created {:?}", api.created());
    assert_eq!(api.objects.get("/api/v1/namespaces/models/services/em-minilm"), Some(&theirs));
    let condition = degraded(&api.status_writes[0]);
    assert_eq!(condition["reason"], "NameConflict");
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Service models/em-minilm exists and is not owned by EmbeddingModel minilm"),
        "{message}"
    );
    assert!(
        api.events.iter().any(|event| event["reason"] == "NameConflict" && event["type"] == "Warning"),
        "a Warning event says why: {:?}",
        api.events
    );
    assert!(api.status_writes[0]["status"].get("endpoint").is_none(), "someone else's Service is not advertised");
}

#[tokio::test]
async fn a_mega_model_key_secret_without_the_opt_in_label_is_not_read() {
    let mut model = crate::fixtures::openai_mega_model("gateway", "unused");
    if let Some(openai) = model.spec.model_template.open_ai.as_mut() {
        openai.apikey = None;
        openai.apikey_secret_ref = Some(nstream_core::SecretKeyRef { name: "billing".into(), key: "token".into() });
    }
    let mut api = MockApi::default();
    api.objects.insert(
        "/apis/llm.nstream.ai/v1/namespaces/models/megamodels/gateway".into(),
        serde_json::to_value(&model).unwrap_or_default(),
    );
    api.objects.insert(
        "/api/v1/namespaces/models/secrets/billing".into(),
        serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "billing", "namespace": "models"}, "data": {"token": "c2VjcmV0"}}),
    );
    let api = Arc::new(Mutex::new(api));
    let context = mocked_context(api.clone());
    reconcile(Arc::new(model), context).await.expect("reconcile");
    let api = api.lock().expect("mock");
    assert!(!api.applied().contains(&"deployments".to_string()), "{:?}", api.applied());
    let condition = degraded(&api.status_writes[0]);
    assert_eq!(condition["reason"], "SecretNotOptedIn");
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(message.contains("kubectl label secret billing llm.nstream.ai/provider-credentials=true"), "{message}");
}

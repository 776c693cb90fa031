//! KnowledgeBases on a real control plane: the operator (with the ServiceAccount of
//! deploy/operator/rbac.yaml) serves a KnowledgeBase with pods of its own, which the stand-in
//! kubelet runs as real `nstream-server` processes with the claim of the embedded store as their
//! data directory. A file uploaded and attached through OpenAI's vector-stores API on the pod is
//! chunked, embedded and found by a search; the store is on the claim. A KnowledgeBase naming a
//! missing EmbeddingModel is Degraded with an Event.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use nstream_core::KnowledgeBase;
use support::kubelet::KubeletOptions;
use support::*;

const MINUTE: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "knowledge";

fn knowledge_base(name: &str, embedding_model: &str) -> String {
    format!(
        "apiVersion: llm.nstream.ai/v1\nkind: KnowledgeBase\nmetadata:\n  name: {name}\nspec:\n  embeddingModel: \
         {embedding_model}\n  chunking: {{maxTokens: 64, overlapTokens: 8}}\n  store: {{embedded: {{size: 1Gi}}}}\n"
    )
}

/// `POST /v1/files` as multipart/form-data (what the official client sends): the file's JSON.
async fn upload(address: SocketAddr, key: &str, filename: &str, content: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let boundary = "nstream-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: text/markdown\r\n\r\n\
         {content}\r\n--{boundary}--\r\n"
    );
    let request = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connecting to the pod");
    stream.write_all(request.as_bytes()).await.expect("sending the upload");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("reading the answer");
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    assert!(head.starts_with("HTTP/1.1 200"), "upload refused: {head}\n{body}");
    serde_json::from_str(&body).expect("the file as JSON")
}

async fn call(address: SocketAddr, key: &str, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
    let (status, answer) = http_to(address, method, path, body, Some(key)).await.expect("the pod answers");
    assert_eq!(status, 200, "{method} {path}: {answer}");
    serde_json::from_str(&answer).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_knowledge_base_is_served_by_its_own_pods_on_its_claim() {
    assert_model_cached(MINI_LM);
    let setup = OperatorTestbed::start_with_credentials(
        OperatorSettings::new("knowledge").serve_locally(),
        operator_service_account_kubeconfig,
    )
    .await;
    let client = setup.client.clone();
    namespace(&client, NAMESPACE).await;
    let servers = setup.kubelet(NAMESPACE, "app.kubernetes.io/instance=kb-docs", KubeletOptions::new(setup.path()));

    // The EmbeddingModel asks for 2 replicas; the embedded store's servers run 1.
    apply_yaml(&client, NAMESPACE, &embedding_model("mini").replicas(2).small_resources().to_string())
        .await
        .expect("the EmbeddingModel applies");
    apply_yaml(&client, NAMESPACE, &knowledge_base("docs", "mini")).await.expect("the KnowledgeBase applies");

    let pods = servers.wait_ready(1, 3 * MINUTE).await;
    let pod = &pods[0];
    let knowledge_bases = Api::<KnowledgeBase>::namespaced(client.clone(), NAMESPACE);
    let status = eventually("the KnowledgeBase is Ready", MINUTE, || async {
        let status = knowledge_bases.get("docs").await.ok()?.status?;
        status.serving.is_ready().then_some(status)
    })
    .await;
    assert_eq!(status.deployment.as_deref(), Some("kb-docs"));
    assert_eq!(status.claim.as_deref(), Some("kb-docs-data"));
    assert_eq!(status.serving.endpoint.as_deref(), Some("http://kb-docs.knowledge.svc.cluster.local/v1"));
    let limited = status.serving.condition("ReplicasLimited").expect("the limit is said");
    assert_eq!((limited.status.as_str(), limited.reason.as_str()), ("True", "EmbeddedStore"));
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NAMESPACE)
        .get("kb-docs-data")
        .await
        .expect("the claim of the embedded store");
    let owner = claim.metadata.owner_references.unwrap_or_default();
    assert_eq!(owner.first().map(|owner| (owner.kind.as_str(), owner.name.as_str())), Some(("KnowledgeBase", "docs")));

    // Upload, attach, wait for completed, search: on the pod, with the KnowledgeBase's key.
    let key = api_key(&client, NAMESPACE, "kb-docs-api-key").await;
    let (status_code, _) = http_to(pod.address, "GET", "/v1/vector_stores/docs", None, None).await.expect("answer");
    assert_eq!(status_code, 401, "the vector stores need the key");
    let store = call(pod.address, &key, "GET", "/v1/vector_stores/docs", None).await;
    assert_eq!(store["id"], "docs", "{store}");
    let text = "# Rotating keys\n\nTo rotate the API key, write a new value into the Secret; the server re-reads \
                its key file.\n\n# Penguins\n\nEmperor penguins huddle together to survive the Antarctic winter.\n";
    let file = upload(pod.address, &key, "notes.md", text).await;
    let file_id = file["id"].as_str().expect("a file id").to_string();
    let attach = serde_json::json!({"file_id": file_id}).to_string();
    call(pod.address, &key, "POST", "/v1/vector_stores/docs/files", Some(&attach)).await;
    eventually("the file is indexed", 2 * MINUTE, || async {
        let path = format!("/v1/vector_stores/docs/files/{file_id}");
        let (status, body) = http_to(pod.address, "GET", &path, None, Some(&key)).await.ok()?;
        let file: serde_json::Value = serde_json::from_str(&body).ok()?;
        assert_ne!(file["status"], "failed", "indexing failed: {body}");
        (status == 200 && file["status"] == "completed").then_some(())
    })
    .await;
    let search = serde_json::json!({"query": "how do penguins survive the cold", "max_num_results": 1}).to_string();
    let results = call(pod.address, &key, "POST", "/v1/vector_stores/docs/search", Some(&search)).await;
    let best = results["data"][0]["content"][0]["text"].as_str().unwrap_or_default().to_string();
    assert!(best.contains("penguins huddle"), "the best result is the penguin paragraph: {results}");

    // The store lives on the claim, not in the pod.
    let store_folder = servers.claim_folder("kb-docs-data").join("kb/docs");
    assert!(
        std::fs::read_dir(&store_folder).map(|entries| entries.count() > 0).unwrap_or(false),
        "the embedded store is on the claim: {}",
        store_folder.display()
    );

    // A KnowledgeBase naming no EmbeddingModel: Degraded, with a Warning Event, and nothing built.
    apply_yaml(&client, NAMESPACE, &knowledge_base("orphan", "missing")).await.expect("applies");
    eventually("the orphan is Degraded for its missing EmbeddingModel", MINUTE, || async {
        let status = knowledge_bases.get("orphan").await.ok()?.status?;
        let degraded = status.serving.condition("Degraded")?.clone();
        (degraded.status == "True" && degraded.reason == "EmbeddingModelNotFound").then_some(())
    })
    .await;
    eventually("a Warning Event names the missing EmbeddingModel", MINUTE, || async {
        let events = Api::<Event>::namespaced(client.clone(), NAMESPACE).list(&ListParams::default()).await.ok()?;
        events
            .items
            .iter()
            .any(|event| {
                event.regarding.as_ref().and_then(|object| object.name.as_deref()) == Some("orphan")
                    && event.reason.as_deref() == Some("EmbeddingModelNotFound")
                    && event.type_.as_deref() == Some("Warning")
            })
            .then_some(())
    })
    .await;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NAMESPACE);
    assert!(claims.get_opt("kb-orphan-data").await.expect("a get").is_none(), "nothing is built for the orphan");
}

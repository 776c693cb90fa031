//! The `/v1/files` and `/v1/vector_stores` routes: request parsing (multipart, queries, JSON), the
//! OpenAI error shape, auth, and the answer without a vector-store backend. The backend here
//! records what it is given (the real one is tested in nstream-kb and by the Python client test).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use nstream_backend::vector_store::{
    CreateVectorStore, CreateVectorStoreFile, DeletedObject, FileObject, FileUpload, ListPage, ListQuery,
    SearchResultsPage, SearchVectorStore, VectorStoreBackend, VectorStoreFileObject, VectorStoreObject, paginate,
};
use nstream_backend::{BackendError, Result};
use nstream_server::{ApiKey, AppState, Metrics, ModelRegistry, ServerConfig, app};
use tower::ServiceExt;

#[derive(Default)]
struct Recorder {
    files: Mutex<Vec<FileObject>>,
}

fn missing(id: &str) -> BackendError {
    BackendError::NotFound { message: format!("No object found with id '{id}'."), param: None }
}

#[async_trait]
impl VectorStoreBackend for Recorder {
    async fn create_file(&self, upload: FileUpload) -> Result<FileObject> {
        let file = FileObject {
            id: format!("file-{}", self.files.lock().unwrap().len()),
            object: "file".to_string(),
            bytes: upload.bytes.len() as u64,
            created_at: 1,
            filename: upload.filename,
            purpose: upload.purpose,
            status: "processed".to_string(),
            expires_at: None,
            status_details: None,
        };
        self.files.lock().unwrap().push(file.clone());
        Ok(file)
    }
    async fn list_files(&self, query: ListQuery) -> Result<ListPage<FileObject>> {
        paginate(&self.files.lock().unwrap(), &query, 100)
    }
    async fn file(&self, id: &str) -> Result<FileObject> {
        Err(missing(id))
    }
    async fn file_content(&self, id: &str) -> Result<Vec<u8>> {
        Err(missing(id))
    }
    async fn delete_file(&self, id: &str) -> Result<DeletedObject> {
        Err(missing(id))
    }
    async fn create_vector_store(&self, _request: CreateVectorStore) -> Result<VectorStoreObject> {
        Err(BackendError::invalid_param("metadata.embedding_model", "metadata.embedding_model: none served"))
    }
    async fn list_vector_stores(&self, query: ListQuery) -> Result<ListPage<VectorStoreObject>> {
        paginate(&[], &query, 100)
    }
    async fn vector_store(&self, id: &str) -> Result<VectorStoreObject> {
        Err(missing(id))
    }
    async fn delete_vector_store(&self, id: &str) -> Result<DeletedObject> {
        Err(missing(id))
    }
    async fn attach_file(&self, store: &str, _request: CreateVectorStoreFile) -> Result<VectorStoreFileObject> {
        Err(missing(store))
    }
    async fn list_vector_store_files(&self, store: &str, _query: ListQuery) -> Result<ListPage<VectorStoreFileObject>> {
        Err(missing(store))
    }
    async fn vector_store_file(&self, _store: &str, file: &str) -> Result<VectorStoreFileObject> {
        Err(missing(file))
    }
    async fn detach_file(&self, _store: &str, file: &str) -> Result<DeletedObject> {
        Err(missing(file))
    }
    async fn search(&self, store: &str, _request: SearchVectorStore) -> Result<SearchResultsPage> {
        Err(missing(store))
    }
}

fn router(config: ServerConfig, backend: Option<Arc<Recorder>>) -> axum::Router {
    let mut state = AppState::new(ModelRegistry::new(), config, Metrics::new());
    if let Some(backend) = backend {
        state = state.with_vector_stores(backend);
    }
    app(state)
}

async fn send(router: &axum::Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

fn multipart(parts: &[(&str, Option<&str>, &str)]) -> Request<Body> {
    let boundary = "nstream-boundary";
    let mut body = String::new();
    for (name, filename, content) in parts {
        body.push_str(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""));
        if let Some(filename) = filename {
            body.push_str(&format!("; filename=\"{filename}\"\r\nContent-Type: text/markdown"));
        }
        body.push_str(&format!("\r\n\r\n{content}\r\n"));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    Request::post("/v1/files")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn uploads_are_parsed_and_listed() {
    let backend = Arc::new(Recorder::default());
    let router = router(ServerConfig::default(), Some(backend.clone()));
    let (status, body) =
        send(&router, multipart(&[("purpose", None, "assistants"), ("file", Some("dir/notes.md"), "# Hi\n\nthere")]))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "file");
    assert_eq!(body["filename"], "dir/notes.md");
    assert_eq!(body["bytes"], "# Hi\n\nthere".len());
    assert_eq!(body["purpose"], "assistants");
    let (status, listed) =
        send(&router, Request::get("/v1/files?limit=5&order=asc").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["object"], "list");
    assert_eq!(listed["data"][0]["id"], body["id"]);
    assert_eq!(listed["has_more"], false);
}

#[tokio::test]
async fn bad_uploads_and_queries_are_400_naming_the_field() {
    let router = router(ServerConfig::default(), Some(Arc::new(Recorder::default())));
    let (status, body) = send(&router, multipart(&[("file", Some("a.md"), "x")])).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("purpose")), "{body}");
    let (status, body) = send(&router, multipart(&[("purpose", None, "assistants")])).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("file")), "{body}");
    let json =
        Request::post("/v1/files").header(header::CONTENT_TYPE, "application/json").body(Body::from("{}")).unwrap();
    let (status, body) = send(&router, json).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("multipart"), "{body}");
    let (status, body) = send(&router, Request::get("/v1/files?limit=many").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = send(&router, Request::get("/v1/vector_stores?limit=0").body(Body::empty()).unwrap()).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("limit")), "{body}");
    let unknown_field = Request::post("/v1/vector_stores")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"nmae": "x"}"#))
        .unwrap();
    let (status, body) = send(&router, unknown_field).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("nmae"), "{body}");
    let (status, body) =
        send(&router, Request::get("/v1/vector_stores/vs_x/files/file-1").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn routes_need_the_key_and_a_backend() {
    let locked = router(ServerConfig::default().with_api_key(ApiKey::new("sk-1")), Some(Arc::new(Recorder::default())));
    let (status, _) = send(&locked, Request::get("/v1/vector_stores").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let authorised = Request::get("/v1/vector_stores").header(header::AUTHORIZATION, "Bearer sk-1").body(Body::empty());
    let (status, _) = send(&locked, authorised.unwrap()).await;
    assert_eq!(status, StatusCode::OK);

    let without = router(ServerConfig::default(), None);
    let (status, body) = send(&without, Request::get("/v1/vector_stores").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("serves no vector stores"), "{body}");
}

#[tokio::test]
async fn batch_and_content_routes_reach_the_backend() {
    let router = router(ServerConfig::default(), Some(Arc::new(Recorder::default())));
    let post = |uri: &str, body: &'static str| {
        Request::post(uri).header(header::CONTENT_TYPE, "application/json").body(Body::from(body)).unwrap()
    };
    // The recorder keeps the trait's answers for what it does not implement: a 400 saying so.
    for (request, what) in [
        (post("/v1/vector_stores/vs_x/file_batches", r#"{"file_ids": ["file-1"]}"#), "file batches"),
        (Request::get("/v1/vector_stores/vs_x/file_batches/vsfb_1").body(Body::empty()).unwrap(), "file batches"),
        (
            Request::post("/v1/vector_stores/vs_x/file_batches/vsfb_1/cancel").body(Body::empty()).unwrap(),
            "file batches",
        ),
        (
            Request::get("/v1/vector_stores/vs_x/file_batches/vsfb_1/files?limit=2&filter=completed")
                .body(Body::empty())
                .unwrap(),
            "file batches",
        ),
        (Request::get("/v1/vector_stores/vs_x/files/file-1/content").body(Body::empty()).unwrap(), "file contents"),
    ] {
        let uri = request.uri().to_string();
        let (status, body) = send(&router, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{what} are not supported")), "{uri}: {body}");
    }
    let (status, body) = send(&router, post("/v1/vector_stores/vs_x/file_batches", r#"{"fileids": []}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("fileids"), "{body}");
    let (status, body) = send(
        &router,
        Request::get("/v1/vector_stores/vs_x/file_batches/vsfb_1/files?limit=lots").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn uploads_have_their_own_body_limit() {
    let config = ServerConfig::default().with_max_body_bytes(1024).with_max_upload_bytes(64 * 1024);
    let router = router(config, Some(Arc::new(Recorder::default())));
    // Past the 1 KiB request limit, within the 64 KiB upload limit.
    let content = "word ".repeat(2_000);
    let (status, body) =
        send(&router, multipart(&[("purpose", None, "assistants"), ("file", Some("big.md"), &content)])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["bytes"], content.len());

    // Past the upload limit: 413, read while streaming and declared up front alike.
    let content = "word ".repeat(20_000);
    let (status, body) =
        send(&router, multipart(&[("purpose", None, "assistants"), ("file", Some("huge.md"), &content)])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("upload limit of 65536 bytes"), "{body}");
    let mut declared = multipart(&[("purpose", None, "assistants"), ("file", Some("huge.md"), &content)]);
    declared.headers_mut().insert(header::CONTENT_LENGTH, (content.len() + 200).into());
    let (status, body) = send(&router, declared).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("upload limit"), "{body}");

    // Other routes keep the request limit.
    let name = "n".repeat(2_000);
    let request = Request::post("/v1/vector_stores")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::json!({ "name": name }).to_string()))
        .unwrap();
    let (status, body) = send(&router, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("limit of 1024 bytes"), "{body}");
}

//! `/v1/files` and `/v1/vector_stores`: OpenAI's files and vector-stores API, answered by the
//! state's [`VectorStoreBackend`] (the server knows no store, as it knows no model provider).

use std::sync::Arc;

use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nstream_backend::BackendError;
use nstream_backend::vector_store::{
    CreateVectorStore, CreateVectorStoreFile, CreateVectorStoreFileBatch, FileUpload, ListQuery, SearchVectorStore,
    UpdateVectorStore, UpdateVectorStoreFile, VectorStoreBackend,
};

use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::state::AppState;

/// The routes, merged into the API router (behind the API key like the others). Uploads to
/// `POST /v1/files` may be up to `upload_limit` bytes; every other body has the server's limit.
pub(crate) fn routes(upload_limit: usize) -> Router<AppState> {
    Router::new()
        .route("/v1/files", post(create_file).layer(DefaultBodyLimit::max(upload_limit)).get(list_files))
        .route("/v1/files/{file_id}", get(file).delete(delete_file))
        .route("/v1/files/{file_id}/content", get(file_content))
        .route("/v1/vector_stores", post(create_vector_store).get(list_vector_stores))
        .route("/v1/vector_stores/{store_id}", get(vector_store).post(update_vector_store).delete(delete_vector_store))
        .route("/v1/vector_stores/{store_id}/files", post(attach_file).get(list_vector_store_files))
        .route(
            "/v1/vector_stores/{store_id}/files/{file_id}",
            get(vector_store_file).post(update_vector_store_file).delete(detach_file),
        )
        .route("/v1/vector_stores/{store_id}/files/{file_id}/content", get(vector_store_file_content))
        .route("/v1/vector_stores/{store_id}/file_batches", post(create_file_batch))
        .route("/v1/vector_stores/{store_id}/file_batches/{batch_id}", get(file_batch))
        .route("/v1/vector_stores/{store_id}/file_batches/{batch_id}/cancel", post(cancel_file_batch))
        .route("/v1/vector_stores/{store_id}/file_batches/{batch_id}/files", get(list_file_batch_files))
        .route("/v1/vector_stores/{store_id}/search", post(search))
}

type Answer = Result<Response, ApiError>;

/// Whether `request` is an upload (`POST /v1/files`), which has its own body limit.
pub(crate) fn is_upload(request: &axum::extract::Request) -> bool {
    request.method() == axum::http::Method::POST && request.uri().path() == "/v1/files"
}

fn backend(state: &AppState) -> Result<Arc<dyn VectorStoreBackend>, ApiError> {
    state.vector_stores().cloned().ok_or_else(|| {
        ApiError::from(BackendError::NotFound {
            message: "this server serves no vector stores (start it with an EmbeddingModel and a data directory)"
                .to_string(),
            param: None,
        })
    })
}

fn list_query(query: Result<Query<ListQuery>, QueryRejection>) -> Result<ListQuery, ApiError> {
    query.map(|Query(query)| query).map_err(|rejection| {
        ApiError::bad_request(format!("Invalid query parameters: {}", rejection.body_text()), None)
    })
}

fn json<T: serde::Serialize>(value: T) -> Response {
    Json(value).into_response()
}

/// `POST /v1/files`: multipart with `file`, `purpose` and optionally `expires_after[anchor]` and
/// `expires_after[seconds]` (checked by the backend).
async fn create_file(State(state): State<AppState>, multipart: Result<Multipart, MultipartRejection>) -> Answer {
    let backend = backend(&state)?;
    let mut multipart = multipart.map_err(|rejection| {
        ApiError::bad_request(format!("expected a multipart/form-data body: {}", rejection.body_text()), None)
    })?;
    let mut upload: Option<(String, Vec<u8>)> = None;
    let mut purpose: Option<String> = None;
    let mut expires_after_anchor: Option<String> = None;
    let mut expires_after_seconds: Option<String> = None;
    loop {
        let field = multipart.next_field().await.map_err(|error| {
            if error.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::upload_too_large(state.config().max_upload_bytes)
            } else {
                ApiError::bad_request(format!("could not read the multipart body: {}", error.body_text()), None)
            }
        })?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                let filename = field.file_name().unwrap_or("upload.txt").to_string();
                let bytes = field.bytes().await.map_err(|error| {
                    if error.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::upload_too_large(state.config().max_upload_bytes)
                    } else {
                        ApiError::bad_request(
                            format!("could not read `file`: {}", error.body_text()),
                            Some("file".into()),
                        )
                    }
                })?;
                upload = Some((filename, bytes.to_vec()));
            }
            "purpose" => {
                let text = field.text().await.map_err(|error| {
                    ApiError::bad_request(
                        format!("could not read `purpose`: {}", error.body_text()),
                        Some("purpose".into()),
                    )
                })?;
                purpose = Some(text);
            }
            "expires_after[anchor]" | "expires_after[seconds]" => {
                let text = field.text().await.map_err(|error| {
                    ApiError::bad_request(format!("could not read `{name}`: {}", error.body_text()), Some(name.clone()))
                })?;
                if name == "expires_after[anchor]" {
                    expires_after_anchor = Some(text);
                } else {
                    expires_after_seconds = Some(text);
                }
            }
            other if other.starts_with("expires_after") => {
                return Err(ApiError::bad_request(
                    format!("{other}: unknown field; expected expires_after[anchor] and expires_after[seconds]"),
                    Some(other.to_string()),
                ));
            }
            // Other fields OpenAI may add are ignored, as the official clients expect.
            _ => {}
        }
    }
    let Some((filename, bytes)) = upload else {
        return Err(ApiError::bad_request("file: expected a file part named `file`", Some("file".into())));
    };
    let purpose = purpose.filter(|purpose| !purpose.trim().is_empty()).ok_or_else(|| {
        ApiError::bad_request("purpose: expected a purpose such as `assistants`", Some("purpose".into()))
    })?;
    let upload =
        FileUpload::new(filename, purpose, bytes).with_expires_after(expires_after_anchor, expires_after_seconds);
    Ok(json(backend.create_file(upload).await?))
}

/// `GET /v1/files`.
async fn list_files(State(state): State<AppState>, query: Result<Query<ListQuery>, QueryRejection>) -> Answer {
    let query = list_query(query)?;
    Ok(json(backend(&state)?.list_files(query).await?))
}

/// `GET /v1/files/{file_id}`.
async fn file(State(state): State<AppState>, Path(file_id): Path<String>) -> Answer {
    Ok(json(backend(&state)?.file(&file_id).await?))
}

/// `GET /v1/files/{file_id}/content`.
async fn file_content(State(state): State<AppState>, Path(file_id): Path<String>) -> Answer {
    let bytes = backend(&state)?.file_content(&file_id).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `DELETE /v1/files/{file_id}`.
async fn delete_file(State(state): State<AppState>, Path(file_id): Path<String>) -> Answer {
    Ok(json(backend(&state)?.delete_file(&file_id).await?))
}

/// `POST /v1/vector_stores`.
async fn create_vector_store(
    State(state): State<AppState>,
    OpenAiJson(request): OpenAiJson<CreateVectorStore>,
) -> Answer {
    Ok(json(backend(&state)?.create_vector_store(request).await?))
}

/// `GET /v1/vector_stores`.
async fn list_vector_stores(State(state): State<AppState>, query: Result<Query<ListQuery>, QueryRejection>) -> Answer {
    let query = list_query(query)?;
    Ok(json(backend(&state)?.list_vector_stores(query).await?))
}

/// `GET /v1/vector_stores/{store_id}`.
async fn vector_store(State(state): State<AppState>, Path(store_id): Path<String>) -> Answer {
    Ok(json(backend(&state)?.vector_store(&store_id).await?))
}

/// `POST /v1/vector_stores/{store_id}`.
async fn update_vector_store(
    State(state): State<AppState>,
    Path(store_id): Path<String>,
    OpenAiJson(request): OpenAiJson<UpdateVectorStore>,
) -> Answer {
    Ok(json(backend(&state)?.update_vector_store(&store_id, request).await?))
}

/// `POST /v1/vector_stores/{store_id}/files/{file_id}`.
async fn update_vector_store_file(
    State(state): State<AppState>,
    Path((store_id, file_id)): Path<(String, String)>,
    OpenAiJson(request): OpenAiJson<UpdateVectorStoreFile>,
) -> Answer {
    Ok(json(backend(&state)?.update_vector_store_file(&store_id, &file_id, request).await?))
}

/// `DELETE /v1/vector_stores/{store_id}`.
async fn delete_vector_store(State(state): State<AppState>, Path(store_id): Path<String>) -> Answer {
    Ok(json(backend(&state)?.delete_vector_store(&store_id).await?))
}

/// `POST /v1/vector_stores/{store_id}/files`.
async fn attach_file(
    State(state): State<AppState>,
    Path(store_id): Path<String>,
    OpenAiJson(request): OpenAiJson<CreateVectorStoreFile>,
) -> Answer {
    Ok(json(backend(&state)?.attach_file(&store_id, request).await?))
}

/// `GET /v1/vector_stores/{store_id}/files`.
async fn list_vector_store_files(
    State(state): State<AppState>,
    Path(store_id): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let query = list_query(query)?;
    Ok(json(backend(&state)?.list_vector_store_files(&store_id, query).await?))
}

/// `GET /v1/vector_stores/{store_id}/files/{file_id}`.
async fn vector_store_file(State(state): State<AppState>, Path((store_id, file_id)): Path<(String, String)>) -> Answer {
    Ok(json(backend(&state)?.vector_store_file(&store_id, &file_id).await?))
}

/// `DELETE /v1/vector_stores/{store_id}/files/{file_id}`.
async fn detach_file(State(state): State<AppState>, Path((store_id, file_id)): Path<(String, String)>) -> Answer {
    Ok(json(backend(&state)?.detach_file(&store_id, &file_id).await?))
}

/// `POST /v1/vector_stores/{store_id}/search`.
async fn search(
    State(state): State<AppState>,
    Path(store_id): Path<String>,
    OpenAiJson(request): OpenAiJson<SearchVectorStore>,
) -> Answer {
    Ok(json(backend(&state)?.search(&store_id, request).await?))
}

/// `GET /v1/vector_stores/{store_id}/files/{file_id}/content`: the file's parsed text.
async fn vector_store_file_content(
    State(state): State<AppState>,
    Path((store_id, file_id)): Path<(String, String)>,
) -> Answer {
    Ok(json(backend(&state)?.vector_store_file_content(&store_id, &file_id).await?))
}

/// `POST /v1/vector_stores/{store_id}/file_batches`.
async fn create_file_batch(
    State(state): State<AppState>,
    Path(store_id): Path<String>,
    OpenAiJson(request): OpenAiJson<CreateVectorStoreFileBatch>,
) -> Answer {
    Ok(json(backend(&state)?.create_file_batch(&store_id, request).await?))
}

/// `GET /v1/vector_stores/{store_id}/file_batches/{batch_id}`.
async fn file_batch(State(state): State<AppState>, Path((store_id, batch_id)): Path<(String, String)>) -> Answer {
    Ok(json(backend(&state)?.file_batch(&store_id, &batch_id).await?))
}

/// `POST /v1/vector_stores/{store_id}/file_batches/{batch_id}/cancel` (no body).
async fn cancel_file_batch(
    State(state): State<AppState>,
    Path((store_id, batch_id)): Path<(String, String)>,
) -> Answer {
    Ok(json(backend(&state)?.cancel_file_batch(&store_id, &batch_id).await?))
}

/// `GET /v1/vector_stores/{store_id}/file_batches/{batch_id}/files`.
async fn list_file_batch_files(
    State(state): State<AppState>,
    Path((store_id, batch_id)): Path<(String, String)>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let query = list_query(query)?;
    Ok(json(backend(&state)?.list_file_batch_files(&store_id, &batch_id, query).await?))
}

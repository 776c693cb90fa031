//! Hot loading of LoRA adapters, with vLLM's routes and bodies: `POST /v1/load_lora_adapter`
//! (`lora_name`, `lora_path`, and our `base_model`) serves an adapter over a served base as a new
//! model; `POST /v1/unload_lora_adapter` (`lora_name`) stops serving it, refused while sequences
//! of the adapter are queued or running (running streams are never broken).

use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use nstream_backend::ModelBackend;
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::OpenAiJson;
use crate::state::{AppState, ServerError};

/// The body of `POST /v1/load_lora_adapter`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoadAdapter {
    /// The model id to serve the adapter under.
    lora_name: String,
    /// A local folder (or hub repository) holding `adapter_config.json`.
    lora_path: String,
    /// The served model to load it over (our extension); else the served base whose source
    /// matches the adapter's recorded base, else the only base that can serve adapters.
    #[serde(default)]
    base_model: Option<String>,
    /// vLLM's numeric id; accepted and ignored.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted for vLLM clients, not used")]
    lora_int_id: Option<u64>,
}

/// The body of `POST /v1/unload_lora_adapter`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnloadAdapter {
    /// The adapter's model id.
    lora_name: String,
    /// vLLM's numeric id; accepted and ignored.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted for vLLM clients, not used")]
    lora_int_id: Option<u64>,
}

/// The base the adapter at `path` recorded (`base_model.json`, else `base_model_name_or_path`),
/// when `path` is a local adapter folder.
fn recorded_base(path: &str) -> Option<String> {
    let folder = Path::new(path);
    let record = nstream_peft::BaseRecord::read(folder).ok().flatten().and_then(|record| record.repo_id);
    record.or_else(|| nstream_peft::Adapter::read_config(folder).ok().and_then(|config| config.base_model_name_or_path))
}

/// The served base to load over: the body's `base_model`, else the base (a served model that
/// can take adapters: a local LLM, not itself an adapter) whose source matches the adapter's
/// recorded base, else the only such base.
fn pick_base(state: &AppState, request: &LoadAdapter) -> Result<(String, Arc<dyn ModelBackend>), ApiError> {
    if let Some(name) = &request.base_model {
        let backend = state.models().get(name).ok_or_else(|| {
            ApiError::bad_request(format!("base_model `{name}` is not a served model"), Some("base_model".into()))
        })?;
        return Ok((name.clone(), backend));
    }
    let bases: Vec<(String, Arc<dyn ModelBackend>)> = state
        .models()
        .iter()
        .filter(|(_, backend)| {
            let description = backend.describe();
            description.root.is_some() && description.parent.is_none()
        })
        .collect();
    if let Some(recorded) = recorded_base(&request.lora_path)
        && let Some(found) = bases.iter().find(|(_, backend)| backend.describe().root.as_deref() == Some(&recorded))
    {
        return Ok(found.clone());
    }
    match bases.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(ApiError::bad_request("no served model can take LoRA adapters", Some("base_model".into()))),
        _ => Err(ApiError::bad_request(
            format!(
                "several served models could take this adapter ({}); name one in base_model",
                bases.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", ")
            ),
            Some("base_model".into()),
        )),
    }
}

/// Adapters change what every client is served, so a key limited to some models may not load or
/// unload them.
fn may_manage_adapters(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_restricted() {
        return Err(ApiError::permission_denied(
            "This API key is limited to some models and may not load or unload LoRA adapters",
        ));
    }
    Ok(())
}

/// `POST /v1/load_lora_adapter`.
pub(crate) async fn load(
    State(state): State<AppState>,
    caller: Caller,
    OpenAiJson(request): OpenAiJson<LoadAdapter>,
) -> Response {
    if let Err(error) = may_manage_adapters(&caller) {
        return error.into_response();
    }
    load_adapter(state, request).await.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

async fn load_adapter(state: AppState, request: LoadAdapter) -> Result<Response, ApiError> {
    let name = request.lora_name.trim().to_owned();
    if name.is_empty() {
        return Err(ApiError::bad_request("lora_name must not be empty", Some("lora_name".into())));
    }
    if request.lora_path.trim().is_empty() {
        return Err(ApiError::bad_request("lora_path must not be empty", Some("lora_path".into())));
    }
    if state.models().get(&name).is_some() {
        return Err(ApiError::bad_request(
            format!("The model `{name}` is already served; unload it first or pick another lora_name"),
            Some("lora_name".into()),
        ));
    }
    let (base_name, base) = pick_base(&state, &request)?;
    let (adapter_name, path) = (name.clone(), request.lora_path.clone());
    let adapter = tokio::task::spawn_blocking(move || base.load_adapter(&adapter_name, &path))
        .await
        .map_err(|error| ApiError::internal(format!("loading adapter {name}: {error}")))??;
    match state.models().insert(name.clone(), adapter) {
        Ok(()) => {}
        Err(ServerError::DuplicateModel(_)) => {
            return Err(ApiError::bad_request(
                format!("The model `{name}` is already served; unload it first or pick another lora_name"),
                Some("lora_name".into()),
            ));
        }
        Err(error) => return Err(ApiError::bad_request(error.to_string(), Some("lora_name".into()))),
    }
    tracing::info!(adapter = %name, base = %base_name, path = %request.lora_path, "LoRA adapter loaded");
    Ok(Json(serde_json::json!({
        "status": "loaded",
        "message": format!("Success: LoRA adapter '{name}' added successfully."),
        "lora_name": name,
        "base_model": base_name,
    }))
    .into_response())
}

/// `POST /v1/unload_lora_adapter`.
pub(crate) async fn unload(
    State(state): State<AppState>,
    caller: Caller,
    OpenAiJson(request): OpenAiJson<UnloadAdapter>,
) -> Response {
    if let Err(error) = may_manage_adapters(&caller) {
        return error.into_response();
    }
    unload_adapter(&state, &request.lora_name).map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

fn unload_adapter(state: &AppState, name: &str) -> Result<Response, ApiError> {
    let outcome = state.models().remove_if(name, |backend| match backend.adapter_sequences() {
        None => Err(ApiError::bad_request(
            format!("The model `{name}` is not a LoRA adapter; only adapters can be unloaded"),
            Some("lora_name".into()),
        )),
        Some(0) => Ok(()),
        Some(count) => Err(ApiError::conflict(
            format!("The LoRA adapter `{name}` is in use by {count} sequence(s); retry when they have finished"),
            "lora_name",
        )),
    });
    match outcome {
        None => {
            Err(ApiError::bad_request(format!("The LoRA adapter `{name}` is not loaded"), Some("lora_name".into())))
        }
        Some(Err(error)) => Err(error),
        Some(Ok(_)) => {
            tracing::info!(adapter = %name, "LoRA adapter unloaded");
            Ok(Json(serde_json::json!({
                "status": "unloaded",
                "message": format!("Success: LoRA adapter '{name}' removed successfully."),
                "lora_name": name,
            }))
            .into_response())
        }
    }
}

//! What the router reads and writes on the cluster besides the watches: the servers' API keys
//! (Secrets read one by one, by name) and the scale from zero.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use nstream_core::{BaseModel, EmbeddingModel, SecretString};
use nstream_operator::ModelKind;
use nstream_operator::desired::API_KEY_DATA_KEY;

use crate::table::{ResourceRef, SecretLocation};

/// Each key read, with when it was read (`None`: the Secret or its `api-key` was missing).
type KeyCache = HashMap<SecretLocation, (Instant, Option<SecretString>)>;
/// When each resource (namespace, name, kind) was last woken.
type WakeTimes = HashMap<(String, String, &'static str), Instant>;

/// The servers' keys, read with `get` from `<object>-api-key` and kept for
/// [`UpstreamKeys::new`]'s `refresh` before being read again. [`UpstreamKeys::forget`] drops one
/// (after the server refused it: the key was rotated), so the next request reads it at once.
#[derive(Clone)]
pub struct UpstreamKeys {
    client: Client,
    refresh: Duration,
    cache: Arc<Mutex<KeyCache>>,
}

impl std::fmt::Debug for UpstreamKeys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("UpstreamKeys").field("refresh", &self.refresh).finish_non_exhaustive()
    }
}

impl UpstreamKeys {
    /// Keys read through `client`, each kept for `refresh`.
    pub fn new(client: Client, refresh: Duration) -> Self {
        Self { client, refresh, cache: Arc::default() }
    }

    /// The key at `location`; `None` when the Secret or its `api-key` is missing (the request is
    /// sent without a key and the server answers 401). A failed read keeps the last value.
    pub async fn get(&self, location: &SecretLocation) -> Option<SecretString> {
        let cached = self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(location).cloned();
        if let Some((read_at, key)) = &cached
            && read_at.elapsed() < self.refresh
        {
            return key.clone();
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &location.namespace);
        let key = match api.get_opt(&location.name).await {
            Ok(secret) => secret.and_then(|secret| {
                let bytes = secret.data?.remove(API_KEY_DATA_KEY)?.0;
                String::from_utf8(bytes).ok().map(|key| SecretString::new(key.trim_end().to_owned()))
            }),
            Err(error) => {
                tracing::warn!(namespace = %location.namespace, secret = %location.name, %error, "reading a server's API key failed");
                return cached.and_then(|(_, key)| key);
            }
        };
        if key.is_none() {
            tracing::warn!(namespace = %location.namespace, secret = %location.name, "the server's API key Secret is missing or has no api-key");
        }
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(location.clone(), (Instant::now(), key.clone()));
        key
    }

    /// Forgets the key at `location`.
    pub fn forget(&self, location: &SecretLocation) {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).remove(location);
    }
}

/// What a scale-from-zero attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeOutcome {
    /// The scale was 0 and is now 1.
    Patched,
    /// The scale was no longer 0 (the autoscaler or a person moved it): nothing written.
    AlreadyScaled,
    /// Attempted too recently; nothing done.
    Skipped,
    /// The read or the patch failed (logged).
    Failed,
}

impl WakeOutcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patched => "patched",
            Self::AlreadyScaled => "already_scaled",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
        }
    }
}

/// Scales resources from 0 to 1 through the scale subresource, at most once per `interval` per
/// resource.
#[derive(Clone)]
pub struct Scaler {
    client: Client,
    interval: Duration,
    last: Arc<Mutex<WakeTimes>>,
}

impl std::fmt::Debug for Scaler {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Scaler").field("interval", &self.interval).finish_non_exhaustive()
    }
}

impl Scaler {
    /// A scaler writing through `client`.
    pub fn new(client: Client, interval: Duration) -> Self {
        Self { client, interval, last: Arc::default() }
    }

    /// Reads `resource`'s scale and, only when it is 0, patches it to 1 with the read
    /// `resourceVersion` as a precondition, so a concurrent change by the autoscaler wins.
    pub async fn wake(&self, resource: &ResourceRef) -> WakeOutcome {
        {
            let key = (resource.namespace.clone(), resource.name.clone(), resource.kind.as_str());
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if last.get(&key).is_some_and(|at| at.elapsed() < self.interval) {
                return WakeOutcome::Skipped;
            }
            last.insert(key, Instant::now());
        }
        let outcome = match resource.kind {
            ModelKind::BaseModel => {
                wake_with(Api::<BaseModel>::namespaced(self.client.clone(), &resource.namespace), &resource.name).await
            }
            ModelKind::EmbeddingModel => {
                wake_with(Api::<EmbeddingModel>::namespaced(self.client.clone(), &resource.namespace), &resource.name)
                    .await
            }
            // Not scaled from zero: a MegaModel's gateway and a KnowledgeBase's servers run always.
            ModelKind::MegaModel | ModelKind::KnowledgeBase => Ok(WakeOutcome::AlreadyScaled),
        };
        match outcome {
            Ok(outcome) => {
                tracing::info!(kind = resource.kind.as_str(), namespace = %resource.namespace, name = %resource.name, outcome = outcome.as_str(), "scale from zero");
                outcome
            }
            Err(error) => {
                tracing::warn!(kind = resource.kind.as_str(), namespace = %resource.namespace, name = %resource.name, %error, "scaling from zero failed");
                WakeOutcome::Failed
            }
        }
    }
}

async fn wake_with<K>(api: Api<K>, name: &str) -> Result<WakeOutcome, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let scale = api.get_scale(name).await?;
    if scale.spec.as_ref().and_then(|spec| spec.replicas).unwrap_or(0) != 0 {
        return Ok(WakeOutcome::AlreadyScaled);
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": scale.metadata.resource_version },
        "spec": { "replicas": 1 },
    });
    match api.patch_scale(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(WakeOutcome::Patched),
        // The scale changed since it was read: someone else decided.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(WakeOutcome::AlreadyScaled),
        Err(error) => Err(error),
    }
}

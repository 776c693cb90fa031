//! The controllers: one per kind, each reconciling a resource into its ConfigMap, Secrets,
//! Deployment, Service and NetworkPolicy with server-side apply, then writing the status it
//! derives. Nothing is applied over a same-named object the resource does not control, the API
//! key Secret is only ever created, and a MegaModel's key Secret is read only when it carries
//! [`PROVIDER_CREDENTIALS_LABEL`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::desired;
use crate::error::{Error, Result};
use crate::health::{self, Blocker, Observed};
use crate::metrics::Metrics;
use crate::model::{Credential, Served, ServedResource, api_key_secret_name, credentials_secret_name, object_name};
use crate::provider::ProviderChecks;
use crate::settings::{FIELD_MANAGER, OperatorSettings, PROVIDER_CREDENTIALS_LABEL};

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// How servers are built.
    pub settings: OperatorSettings,
    /// Reconcile counts, errors, durations and writes.
    pub metrics: Arc<Metrics>,
    /// Publishes Events.
    pub recorder: Recorder,
    /// The last resourceVersion seen per object, to count only the applies that changed something.
    versions: Mutex<HashMap<String, String>>,
    /// The latest provider check of every MegaModel.
    provider_checks: ProviderChecks,
    /// Consecutive failed reconciles per object, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for `client`; Events are reported as `nstream-operator` from `instance`.
    pub fn new(client: Client, settings: OperatorSettings, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance });
        Self {
            client,
            settings,
            metrics,
            recorder,
            versions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            provider_checks: ProviderChecks::default(),
        }
    }

    /// Remembers an object's resourceVersion; `true` when it moved since the last time (a write).
    fn changed(&self, key: String, version: Option<String>) -> bool {
        let Some(version) = version else { return false };
        let Ok(mut versions) = self.versions.lock() else { return false };
        match versions.insert(key, version.clone()) {
            Some(previous) => previous != version,
            // First sight since this process started: unknown, not counted.
            None => false,
        }
    }
}

/// Server-side applies `object` under the operator's field manager and returns what the API
/// server stored.
pub(crate) async fn apply<T>(api: &Api<T>, object: &T, context: &Context, kind: &str) -> Result<T>
where
    T: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().ok_or(Error::MissingMetadata("name"))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let stored = api.patch(&name, &params, &Patch::Apply(object)).await.map_err(Error::Kube)?;
    let object_kind = T::kind(&());
    let key = format!("{object_kind}/{}/{name}", stored.namespace().unwrap_or_default());
    if context.changed(key, stored.resource_version()) {
        context.metrics.wrote(kind, &object_kind);
    }
    Ok(stored)
}

/// Whether `metadata` names the resource of `uid` as its controller.
pub(crate) fn controlled_by(metadata: &ObjectMeta, uid: &str) -> bool {
    !uid.is_empty()
        && metadata.owner_references.iter().flatten().any(|owner| owner.uid == uid && owner.controller == Some(true))
}

/// The blocker for an object `kind` `name` that exists without the resource as its controller.
pub(crate) fn name_conflict(served: &Served, kind: &str, name: &str) -> Blocker {
    Blocker::NameConflict {
        kind: kind.into(),
        object: format!("{}/{name}", served.namespace),
        owner_kind: served.kind.as_str().into(),
        owner_name: served.name.clone(),
    }
}

/// `Some` when an object of type `T` named `name` exists and the resource is not its controller.
async fn conflict_of<T>(client: &Client, served: &Served, name: &str) -> Result<Option<Blocker>>
where
    T: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<T>::namespaced(client.clone(), &served.namespace);
    let existing = api.get_metadata_opt(name).await.map_err(Error::Kube)?;
    Ok(existing
        .filter(|object| !controlled_by(&object.metadata, &served.uid))
        .map(|_| name_conflict(served, &T::kind(&()), name)))
}

/// The first object the resource would apply that exists under its name without the resource as
/// its controller: force server-side apply would silently take it over, so the reconcile refuses.
pub(crate) async fn first_name_conflict(
    client: &Client,
    served: &Served,
    settings: &OperatorSettings,
) -> Result<Option<Blocker>> {
    let name = object_name(served.kind, &served.name);
    if let Some(conflict) = conflict_of::<ConfigMap>(client, served, &name).await? {
        return Ok(Some(conflict));
    }
    if let Some(conflict) = conflict_of::<Service>(client, served, &name).await? {
        return Ok(Some(conflict));
    }
    if let Some(conflict) = conflict_of::<Deployment>(client, served, &name).await? {
        return Ok(Some(conflict));
    }
    if settings.network_policy.enabled
        && let Some(conflict) = conflict_of::<NetworkPolicy>(client, served, &name).await?
    {
        return Ok(Some(conflict));
    }
    if matches!(served.credential, Some(Credential::Inline { .. }))
        && let Some(conflict) =
            conflict_of::<Secret>(client, served, &credentials_secret_name(served.kind, &served.name)).await?
    {
        return Ok(Some(conflict));
    }
    Ok(None)
}

/// The API key Secret as it is, or why it cannot be used. Read in full (its value is not kept)
/// so that one call checks both its owner and its key.
pub(crate) async fn existing_api_key(
    secrets: &Api<Secret>,
    served: &Served,
) -> Result<Option<std::result::Result<(), Blocker>>> {
    let name = api_key_secret_name(served.kind, &served.name);
    let Some(secret) = secrets.get_opt(&name).await.map_err(Error::Kube)? else {
        return Ok(None);
    };
    if !controlled_by(&secret.metadata, &served.uid) {
        return Ok(Some(Err(name_conflict(served, "Secret", &name))));
    }
    let has_key = secret.data.as_ref().is_some_and(|data| data.contains_key(desired::API_KEY_DATA_KEY));
    Ok(Some(if has_key {
        Ok(())
    } else {
        Err(Blocker::SecretKeyMissing { name, key: desired::API_KEY_DATA_KEY.into() })
    }))
}

/// Creates the API key Secret with a new random key. Only ever created, never applied: the value
/// a user wrote to rotate the key must survive every reconcile.
pub(crate) async fn create_api_key(
    secrets: &Api<Secret>,
    served: &Served,
    context: &Context,
    kind: &str,
) -> Result<()> {
    let key = desired::generate_api_key().map_err(|cause| Error::Random { cause })?;
    let secret = desired::api_key_secret(served, &key);
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
    match secrets.create(&params, &secret).await {
        Ok(_) => {
            context.metrics.wrote(kind, "Secret");
            tracing::info!(secret = %api_key_secret_name(served.kind, &served.name), "created the API key Secret");
            Ok(())
        }
        // Created in between (another reconcile): the next reconcile checks its owner.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(Error::Kube(error)),
    }
}

/// Applies the resource's NetworkPolicy, or, when they are turned off, deletes the one the
/// operator made earlier (never one it does not control).
pub(crate) async fn reconcile_network_policy(served: &Served, context: &Context, kind: &str) -> Result<()> {
    let policies = Api::<NetworkPolicy>::namespaced(context.client.clone(), &served.namespace);
    match desired::network_policy(served, &context.settings) {
        Some(policy) => {
            apply(&policies, &policy, context, kind).await?;
        }
        None => {
            let name = object_name(served.kind, &served.name);
            let existing = policies.get_metadata_opt(&name).await.map_err(Error::Kube)?;
            if existing.is_some_and(|policy| controlled_by(&policy.metadata, &served.uid)) {
                match policies.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => context.metrics.wrote(kind, "NetworkPolicy"),
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(error) => return Err(Error::Kube(error)),
                }
            }
        }
    }
    Ok(())
}

/// Reads the referenced Secret's key: its content hash and value, or why it cannot be used.
/// With `require_opt_in`, a Secret without [`PROVIDER_CREDENTIALS_LABEL`]` = "true"` is not read.
pub(crate) async fn referenced_secret(
    secrets: &Api<Secret>,
    name: &str,
    key: &str,
    require_opt_in: bool,
) -> Result<std::result::Result<(String, nstream_core::SecretString), Blocker>> {
    if require_opt_in {
        // Metadata first: the value of a Secret that was not opted in never reaches the operator.
        let Some(metadata) = secrets.get_metadata_opt(name).await.map_err(Error::Kube)? else {
            return Ok(Err(Blocker::SecretNotFound { name: name.into() }));
        };
        let opted_in = metadata
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(PROVIDER_CREDENTIALS_LABEL))
            .is_some_and(|value| value == "true");
        if !opted_in {
            return Ok(Err(Blocker::SecretNotOptedIn { name: name.into() }));
        }
    }
    let Some(secret) = secrets.get_opt(name).await.map_err(Error::Kube)? else {
        return Ok(Err(Blocker::SecretNotFound { name: name.into() }));
    };
    let value =
        secret.data.as_ref().and_then(|data| data.get(key)).map(|bytes| bytes.0.clone()).or_else(|| {
            secret.string_data.as_ref().and_then(|data| data.get(key)).map(|text| text.clone().into_bytes())
        });
    Ok(match value {
        Some(bytes) => Ok((
            desired::content_hash(&bytes),
            nstream_core::SecretString::new(String::from_utf8_lossy(&bytes).trim_end_matches(['\r', '\n'])),
        )),
        None => Err(Blocker::SecretKeyMissing { name: name.into(), key: key.into() }),
    })
}

/// Reconciles one resource. Idempotent: with nothing changed, the applies are no-ops on the API
/// server and the status is not written.
#[tracing::instrument(skip(object, context), fields(kind = K::KIND.as_str(), namespace, name = %object.name_any()))]
pub async fn reconcile<K: ServedResource>(object: Arc<K>, context: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let kind = K::KIND.as_str();
    // Being deleted: garbage collection removes what it owns; applying now would recreate it.
    if object.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let served = object.served();
    if served.namespace.is_empty() {
        return Err(Error::MissingMetadata("namespace"));
    }
    tracing::Span::current().record("namespace", served.namespace.as_str());
    let client = &context.client;
    let namespace = served.namespace.as_str();
    let settings = &context.settings;

    let mut blocker = None;
    let desired_replicas = desired::replicas(&served);
    if !served.problems.is_empty() {
        blocker = Some(Blocker::InvalidSpec(served.problems.join("; ")));
    } else if desired_replicas.is_none() {
        blocker = Some(Blocker::InvalidSpec(format!("replicas {} is not a whole number", served.template.replicas)));
    }

    let invalid = matches!(blocker, Some(Blocker::InvalidSpec(_)));
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    // Ownership first, so that a conflict applies nothing at all.
    let mut api_key = None;
    if !invalid {
        blocker = first_name_conflict(client, &served, settings).await?;
        if blocker.is_none() {
            api_key = existing_api_key(&secrets, &served).await?;
            if let Some(Err(conflict @ Blocker::NameConflict { .. })) = &api_key {
                blocker = Some(conflict.clone());
            }
        }
    }
    let conflicted = matches!(blocker, Some(Blocker::NameConflict { .. }));
    let hands_off = invalid || conflicted;
    if !hands_off {
        match api_key {
            None => create_api_key(&secrets, &served, &context, kind).await?,
            Some(Err(unusable)) => blocker = Some(unusable),
            Some(Ok(())) => {}
        }
    }

    let mut secret_hash = None;
    let mut secret_value = None;
    if blocker.is_none() {
        match &served.credential {
            Some(Credential::Inline { value, .. }) => {
                if let Some(secret) = desired::credentials_secret(&served) {
                    apply(&Api::<Secret>::namespaced(client.clone(), namespace), &secret, &context, kind).await?;
                }
                secret_hash = Some(desired::content_hash(value.expose().as_bytes()));
                secret_value = Some(value.clone());
            }
            Some(Credential::Reference(reference)) => {
                // A MegaModel's key goes to the endpoint its spec names: only opted-in Secrets.
                let require_opt_in = object.mega_model_spec().is_some();
                match referenced_secret(&secrets, &reference.name, &reference.key, require_opt_in).await? {
                    Ok((hash, value)) => {
                        secret_hash = Some(hash);
                        secret_value = Some(value);
                    }
                    Err(missing) => blocker = Some(missing),
                }
            }
            None => {}
        }
    }

    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let mut deployment = None;
    if !hands_off {
        apply(&Api::<ConfigMap>::namespaced(client.clone(), namespace), &desired::config_map(&served), &context, kind)
            .await?;
        apply(
            &Api::<Service>::namespaced(client.clone(), namespace),
            &desired::service(&served, settings),
            &context,
            kind,
        )
        .await?;
        reconcile_network_policy(&served, &context, kind).await?;
    }
    if blocker.is_none() {
        let wanted = desired::deployment(&served, settings, secret_hash.as_deref());
        deployment = Some(apply(&deployments, &wanted, &context, kind).await?);
    } else if !conflicted {
        // A missing Secret leaves a running Deployment alone: its pods still hold the old value.
        let name = object_name(served.kind, &served.name);
        deployment = deployments.get_opt(&name).await.map_err(Error::Kube)?.or(deployment);
    }

    let pods = match &deployment {
        Some(_) => {
            let selector = desired::selector_string(&served);
            Api::<Pod>::namespaced(client.clone(), namespace)
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(Error::Kube)?
                .items
        }
        None => Vec::new(),
    };
    // A MegaModel's provider is checked in the background (see crate::provider).
    let check_id = format!("{namespace}/{}", served.name);
    let mut check_in_flight = false;
    let provider = match (object.mega_model_spec(), &blocker, secret_value) {
        (Some(spec), None, Some(key)) if !settings.provider_check_interval.is_zero() => {
            let fingerprint = format!("{:?}/{}", served.generation, secret_hash.as_deref().unwrap_or_default());
            let observation = context.provider_checks.observe(
                &check_id,
                &fingerprint,
                settings.provider_check_interval,
                &served.name,
                spec,
                key,
            );
            check_in_flight = observation.in_flight;
            Some(observation.check)
        }
        // A MegaModel that cannot be checked now (blocked, or checks off) keeps no stale result.
        (Some(_), ..) => {
            context.provider_checks.forget(&check_id);
            None
        }
        (None, ..) => None,
    };
    let observed = Observed {
        generation: served.generation,
        desired_replicas: desired_replicas.unwrap_or(0),
        deployment: deployment.as_ref(),
        pods: &pods,
        blocker,
        endpoint: (!hands_off).then(|| desired::endpoint(&served, settings)),
        selector: Some(desired::selector_string(&served)),
        provider,
    };
    let previous = object.model_status();
    let status = health::derive_status(&observed, previous, Time(Timestamp::now()));
    if previous != Some(&status) {
        let api = Api::<K>::namespaced(client.clone(), namespace);
        // Server-side apply of the whole status: a field the operator no longer sets is removed.
        // `autoscaler` is the autoscaler's (its own field manager): left out, so it is kept.
        let patch = serde_json::json!({
            "apiVersion": nstream_core::spec::API_VERSION,
            "kind": kind,
            "status": nstream_core::ModelStatus { autoscaler: None, ..status.clone() },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&served.name, &params, &Patch::Apply(&patch)).await.map_err(Error::Kube)?;
        context.metrics.wrote(kind, "status");
        context.publish_transitions(kind, &object.object_ref(&()), health::transitions(previous, &status)).await;
        tracing::info!(
            ready = status.is_ready(),
            ready_replicas = status.ready_replicas.unwrap_or(0),
            reason =
                status.condition(nstream_core::status::READY).map(|condition| condition.reason.as_str()).unwrap_or(""),
            "status updated"
        );
    }
    context.metrics.reconciled(kind, started.elapsed());
    // A provider check under way: come back soon for its result.
    Ok(Action::requeue(if check_in_flight { settings.resync.min(Duration::from_secs(1)) } else { settings.resync }))
}

/// The first retry after a failure comes this soon; each further consecutive failure doubles it.
pub const RETRY_BASE: Duration = Duration::from_secs(1);

/// Retries of a resource that keeps failing come at most this far apart.
pub const RETRY_CAP: Duration = Duration::from_secs(5 * 60);

/// The delay before retrying after the `failures`-th consecutive failure (1 for the first):
/// `base * 2^(failures - 1)`, at most `cap`, then shortened by up to a fifth by `jitter` (in
/// `[0, 1)`), so that resources failing together do not retry in lockstep.
pub fn retry_delay(failures: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let exponential = base.checked_mul(1 << doublings).unwrap_or(cap).min(cap);
    let jittered = exponential.mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0));
    // Whole milliseconds: finer is meaningless for a requeue.
    Duration::from_millis(u64::try_from(jittered.as_millis()).unwrap_or(u64::MAX))
}

/// A number in `[0, 1)` from the standard library's randomly keyed hasher (jitter needs no
/// cryptographic quality).
fn jitter() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

fn object_key<K: ServedResource>(object: &K) -> String {
    format!("{}/{}/{}", K::KIND.as_str(), object.namespace().unwrap_or_default(), object.name_any())
}

impl Context {
    /// Publishes one Event per change of a resource's serving conditions (Warning for a change
    /// for the worse) and counts each one written under `kind`.
    pub(crate) async fn publish_transitions(
        &self,
        kind: &str,
        reference: &k8s_openapi::api::core::v1::ObjectReference,
        transitions: Vec<health::Transition>,
    ) {
        for transition in transitions {
            let event = Event {
                type_: if transition.warning { EventType::Warning } else { EventType::Normal },
                reason: transition.reason,
                note: Some(transition.note),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(error) = self.recorder.publish(&event, reference).await {
                tracing::warn!(error = %error, "publishing an event failed");
            } else {
                self.metrics.wrote(kind, "event");
            }
        }
    }

    /// Counts one more consecutive failure of `key`; the delay before its retry.
    pub(crate) fn failed(&self, key: String) -> Duration {
        let failures = match self.failures.lock() {
            Ok(mut failures) => {
                let count = failures.entry(key).or_insert(0);
                *count = count.saturating_add(1);
                *count
            }
            Err(_) => 1,
        };
        retry_delay(failures, RETRY_BASE, RETRY_CAP, jitter())
    }

    /// Forgets the failures of `key`: its next failure retries after [`RETRY_BASE`] again.
    pub(crate) fn succeeded(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }
}

/// [`reconcile`], and a success resets the object's retry backoff.
pub async fn reconcile_with_backoff<K: ServedResource>(object: Arc<K>, context: Arc<Context>) -> Result<Action> {
    let key = object_key(&*object);
    let result = reconcile(object, context.clone()).await;
    if result.is_ok() {
        context.succeeded(&key);
    }
    result
}

/// After a failed reconcile: count it by error label and retry with exponential backoff per
/// object (see [`retry_delay`]), reset by its next success.
pub fn error_policy<K: ServedResource>(object: Arc<K>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.failed(K::KIND.as_str(), &error.label());
    let delay = context.failed(object_key(&*object));
    tracing::warn!(kind = K::KIND.as_str(), name = %object.name_any(), namespace = object.namespace().unwrap_or_default(), error = %error, retry_seconds = delay.as_secs_f64(), "reconcile failed");
    Action::requeue(delay)
}

/// An API of namespaced objects in `namespace`, or in every namespace when `None`.
pub(crate) fn scoped<T>(client: &Client, namespace: Option<&str>) -> Api<T>
where
    T: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller of one kind until `shutdown` resolves: watches the resources, the objects
/// they own, their pods (via the model-name annotation) and, in watched namespaces, the Secrets
/// they may read. With [`OperatorSettings::watch_namespaces`] set, one controller per namespace,
/// each watching only its namespace; otherwise one for the whole cluster.
pub async fn run<K: ServedResource>(context: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let namespaces = context.settings.watch_namespaces.clone();
    crate::namespaces::per_namespace(&namespaces, shutdown, |namespace, shutdown| {
        run_in::<K>(context.clone(), namespace, shutdown)
    })
    .await;
}

/// The controller of one kind over `namespace` (every namespace when `None`).
async fn run_in<K: ServedResource>(
    context: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = context.client.clone();
    let owned_label = format!("{}={}", desired::KIND_LABEL, K::KIND.as_str());
    let owned = watcher::Config::default().labels(&owned_label);
    let controller = Controller::new(scoped::<K>(&client, namespace), watcher::Config::default())
        .with_config(controller::Config::default().concurrency(16));
    let store = controller.store();
    let mut controller = controller
        .owns(scoped::<Deployment>(&client, namespace), owned.clone())
        .owns(scoped::<Service>(&client, namespace), owned.clone())
        .owns(scoped::<ConfigMap>(&client, namespace), owned.clone())
        .owns(scoped::<NetworkPolicy>(&client, namespace), owned.clone())
        .watches(scoped::<Pod>(&client, namespace), owned.clone(), |pod: Pod| {
            let name = pod.annotations().get(desired::MODEL_NAME_ANNOTATION).cloned();
            let namespace = pod.namespace();
            name.zip(namespace).map(|(name, namespace)| ObjectRef::<K>::new(&name).within(&namespace))
        });
    // Secrets are watched only inside watched namespaces (never list/watch on Secrets across the
    // cluster: the cluster-wide mode notices a rotated Secret at the next resync), only their
    // metadata (the value is read by the reconcile that needs it, so no Secret data is cached),
    // and only those the operator may read: its own (by label) and those opted in with
    // PROVIDER_CREDENTIALS_LABEL.
    if let Some(namespace) = namespace {
        // Api<PartialObjectMeta<_>> makes metadata-only requests.
        let secrets = Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), namespace);
        let opted_in = watcher::Config::default().labels(&format!("{PROVIDER_CREDENTIALS_LABEL}=true"));
        controller = controller.owns(secrets.clone(), owned).watches(secrets, opted_in, move |secret| {
            let secret_name = secret.name_any();
            let secret_namespace = secret.namespace();
            store
                .state()
                .into_iter()
                .filter(|model| {
                    model.namespace() == secret_namespace
                        && desired::credential_location(&model.served()).is_some_and(|(name, _)| name == secret_name)
                })
                .map(|model| ObjectRef::from_obj(&*model))
                .collect::<Vec<_>>()
        });
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile_with_backoff::<K>, error_policy::<K>, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(error = %error, "controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod backoff_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use kube::Client;
    use kube::client::Body;
    use kube::runtime::controller::Action;
    use nstream_core::EmbeddingModel;

    use super::{Context, RETRY_BASE, error_policy, retry_delay};
    use crate::error::Error;
    use crate::fixtures::{HubModelFixture, settings};
    use crate::metrics::Metrics;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap_with_at_most_a_fifth_of_jitter() {
        assert_eq!(retry_delay(1, SECOND, 300 * SECOND, 0.0), SECOND);
        assert_eq!(retry_delay(2, SECOND, 300 * SECOND, 0.0), 2 * SECOND);
        assert_eq!(retry_delay(5, SECOND, 300 * SECOND, 0.0), 16 * SECOND);
        assert_eq!(retry_delay(9, SECOND, 300 * SECOND, 0.0), 256 * SECOND);
        assert_eq!(retry_delay(10, SECOND, 300 * SECOND, 0.0), 300 * SECOND, "capped");
        assert_eq!(retry_delay(u32::MAX, SECOND, 300 * SECOND, 0.0), 300 * SECOND, "no overflow");
        assert_eq!(retry_delay(0, SECOND, 300 * SECOND, 0.0), SECOND, "0 counts as the first failure");
        assert_eq!(retry_delay(3, SECOND, 300 * SECOND, 0.5), 4 * SECOND * 9 / 10);
        let most_jitter = retry_delay(3, SECOND, 300 * SECOND, 0.999_999);
        assert!(most_jitter >= 4 * SECOND * 8 / 10 && most_jitter < 4 * SECOND, "{most_jitter:?}");
        assert_eq!(retry_delay(3, SECOND, 300 * SECOND, 7.0), 4 * SECOND * 8 / 10, "jitter is clamped");
    }

    fn context() -> Arc<Context> {
        // Never called: error_policy makes no request.
        let service = tower::service_fn(|_request: axum::http::Request<Body>| async {
            Err::<axum::http::Response<Body>, std::io::Error>(std::io::Error::other("no API server in this test"))
        });
        Arc::new(Context::new(Client::new(service, "models"), settings(), Arc::new(Metrics::default()), None))
    }

    fn delay_of(action: &Action) -> Duration {
        // Action keeps its delay private; these are the delays error_policy can return.
        (0..=u64::try_from((RETRY_BASE * 16).as_millis()).unwrap_or(0))
            .map(Duration::from_millis)
            .find(|delay| Action::requeue(*delay) == *action)
            .unwrap_or(Duration::MAX)
    }

    #[tokio::test]
    async fn error_policy_backs_off_per_object_and_a_success_resets_it() {
        let context = context();
        let failing = Arc::new(EmbeddingModel::test("failing"));
        let other = Arc::new(EmbeddingModel::test("other"));
        let error = Error::MissingMetadata("namespace");
        let mut delays = Vec::new();
        for _ in 0..4 {
            delays.push(delay_of(&error_policy(failing.clone(), &error, context.clone())));
        }
        for pair in delays.windows(2) {
            assert!(pair[1] > pair[0], "each consecutive failure waits longer: {delays:?}");
        }
        assert!(delays[3] <= RETRY_BASE * 8, "{delays:?}");
        let first_of_other = delay_of(&error_policy(other.clone(), &error, context.clone()));
        assert!(first_of_other <= RETRY_BASE, "another object's failures are its own: {first_of_other:?}");

        context.succeeded(&super::object_key(&*failing));
        let after_success = delay_of(&error_policy(failing, &error, context));
        assert!(after_success <= RETRY_BASE, "a success resets the backoff: {after_success:?}");
    }
}

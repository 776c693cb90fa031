//! The controllers: one per kind, each reconciling a resource into its ConfigMap, Secret,
//! Deployment and Service with server-side apply, then writing the status it derives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
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
use crate::model::{Credential, ServedResource};
use crate::provider::ProviderChecks;
use crate::settings::{FIELD_MANAGER, OperatorSettings};

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
async fn apply<T>(api: &Api<T>, object: &T, context: &Context, kind: &str) -> Result<T>
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

/// Reads the referenced Secret's key: its content hash and value, or why it cannot be used.
async fn referenced_secret(
    secrets: &Api<Secret>,
    name: &str,
    key: &str,
) -> Result<std::result::Result<(String, nstream_core::SecretString), Blocker>> {
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
                let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
                match referenced_secret(&secrets, &reference.name, &reference.key).await? {
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
    let invalid = matches!(blocker, Some(Blocker::InvalidSpec(_)));
    if !invalid {
        apply(&Api::<ConfigMap>::namespaced(client.clone(), namespace), &desired::config_map(&served), &context, kind)
            .await?;
        apply(
            &Api::<Service>::namespaced(client.clone(), namespace),
            &desired::service(&served, settings),
            &context,
            kind,
        )
        .await?;
    }
    if blocker.is_none() {
        let wanted = desired::deployment(&served, settings, secret_hash.as_deref());
        deployment = Some(apply(&deployments, &wanted, &context, kind).await?);
    } else {
        // A missing Secret leaves a running Deployment alone: its pods still hold the old value.
        let name = crate::model::object_name(served.kind, &served.name);
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
        endpoint: (!invalid).then(|| desired::endpoint(&served, settings)),
        selector: Some(desired::selector_string(&served)),
        provider,
    };
    let previous = object.model_status();
    let status = health::derive_status(&observed, previous, Time(Timestamp::now()));
    if previous != Some(&status) {
        let api = Api::<K>::namespaced(client.clone(), namespace);
        // Server-side apply of the whole status: a field the operator no longer sets is removed.
        let patch = serde_json::json!({
            "apiVersion": nstream_core::spec::API_VERSION,
            "kind": kind,
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&served.name, &params, &Patch::Apply(&patch)).await.map_err(Error::Kube)?;
        context.metrics.wrote(kind, "status");
        let reference = object.object_ref(&());
        for transition in health::transitions(previous, &status) {
            let event = Event {
                type_: if transition.warning { EventType::Warning } else { EventType::Normal },
                reason: transition.reason,
                note: Some(transition.note),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(error) = context.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %error, "publishing an event failed");
            } else {
                context.metrics.wrote(kind, "event");
            }
        }
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

/// After a failed reconcile: count it by error label and retry soon.
pub fn error_policy<K: ServedResource>(object: Arc<K>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.failed(K::KIND.as_str(), &error.label());
    tracing::warn!(kind = K::KIND.as_str(), name = %object.name_any(), namespace = object.namespace().unwrap_or_default(), error = %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller of one kind until `shutdown` resolves: watches the resources, the objects
/// they own, their pods (via the model-name annotation) and the Secrets they reference.
pub async fn run<K: ServedResource>(context: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = context.client.clone();
    let owned = watcher::Config::default().labels(&format!("{}={}", desired::KIND_LABEL, K::KIND.as_str()));
    let controller = Controller::new(Api::<K>::all(client.clone()), watcher::Config::default())
        .with_config(controller::Config::default().concurrency(16));
    let store = controller.store();
    // Only the Secrets' metadata is watched (a changed value moves the resourceVersion); the
    // value is read by the reconcile that needs it, so no Secret data is cached here.
    let secrets = Api::<PartialObjectMeta<Secret>>::all(client.clone());
    controller
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
        .watches(Api::<Pod>::all(client.clone()), owned, |pod: Pod| {
            let name = pod.annotations().get(desired::MODEL_NAME_ANNOTATION).cloned();
            let namespace = pod.namespace();
            name.zip(namespace).map(|(name, namespace)| ObjectRef::<K>::new(&name).within(&namespace))
        })
        .watches(secrets, watcher::Config::default(), move |secret: PartialObjectMeta<Secret>| {
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
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, error_policy::<K>, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(error = %error, "controller event");
            }
        })
        .await;
}

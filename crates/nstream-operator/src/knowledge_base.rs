//! KnowledgeBases on a cluster. Each KnowledgeBase is served by a server Deployment of its own,
//! `kb-<name>`, whose model file holds its EmbeddingModel (as that model's own pods load it) and
//! the KnowledgeBase, so the pods embed in process and answer OpenAI's vector-stores API for the
//! store whose id is the KnowledgeBase's `metadata.name`.
//!
//! Why its own Deployment rather than the EmbeddingModel's pods: an embedded store has a single
//! writer (LMDB), so its server runs one replica with the `Recreate` strategy; putting it in the
//! EmbeddingModel's pods would force that on an embeddings service that may be scaled or
//! autoscaled, and every KnowledgeBase added or changed would roll the embeddings pods. Apart, the
//! EmbeddingModel keeps its replicas and rolling updates, and the KnowledgeBase gets its own
//! Service, API key, status and failure domain; the cost is the embedding model loaded once more.
//!
//! - **Embedded store**: a PersistentVolumeClaim `kb-<name>-data` (owned by the KnowledgeBase,
//!   created once, `store.embedded.size` and `storageClassName`) mounted at [`DATA_DIR`], the
//!   pods' `NSTREAM_DATA_DIR`; one replica whatever the EmbeddingModel asks (the
//!   `ReplicasLimited` condition says so), replaced with `Recreate`.
//! - **PostgreSQL**: the connection Secret is mounted as the server's secrets folder reads it;
//!   the replicas follow the EmbeddingModel's (at least one); the data directory (uploaded files)
//!   is an `emptyDir`.
//!
//! Desired objects are the server's ([`crate::desired`]) with these changes; status is derived
//! as for the models ([`crate::health`]), plus the Deployment's and the claim's names.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    ConfigMap, EnvVar, KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, Secret, Service,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use nstream_core::knowledge_base::DEFAULT_CLAIM_SIZE;
use nstream_core::status::{ConditionStatus, DEGRADED, READY};
use nstream_core::{EmbeddingModel, KnowledgeBase, KnowledgeBaseStatus, Replicas, SecretKeyRef};

use crate::controller::{self as models, Context};
use crate::desired;
use crate::error::{Error, Result};
use crate::health::{self, Blocker, Observed};
use crate::model::{Credential, ModelKind, Served, ServedResource, credentials_secret_name, object_name};
use crate::settings::FIELD_MANAGER;

/// The kind, as metrics and Events name it.
const KIND: &str = "KnowledgeBase";

/// The data directory of a KnowledgeBase's pods (`NSTREAM_DATA_DIR`): the claim of an embedded
/// store, or an `emptyDir` for a postgres one. Relative store paths, the default store folder
/// (`kb/<name>`) and uploaded files (`openai/`) are under it.
pub const DATA_DIR: &str = "/var/lib/nstream";

/// The name of the pod volume mounted at [`DATA_DIR`].
pub const DATA_VOLUME: &str = "data";

/// Condition type: the servers run fewer replicas than the EmbeddingModel asks for (an embedded
/// store has one writer).
pub const REPLICAS_LIMITED: &str = "ReplicasLimited";

/// The PersistentVolumeClaim of a KnowledgeBase's embedded store: `kb-<name>-data`.
pub fn claim_name(name: &str) -> String {
    format!("{}-data", object_name(ModelKind::KnowledgeBase, name))
}

/// Where a KnowledgeBase keeps its chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorePlan {
    /// An embedded store on the claim `claim`.
    Embedded {
        /// The claim's name ([`claim_name`]).
        claim: String,
        /// The claim's size request.
        size: String,
        /// The claim's storage class; the cluster's default when `None`.
        storage_class_name: Option<String>,
    },
    /// A PostgreSQL table; the connection URL is in this Secret key.
    Postgres(SecretKeyRef),
}

/// Everything the servers of one KnowledgeBase are made from.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The KnowledgeBase as the server builders see it: its names and uid, the EmbeddingModel's
    /// resources and hub token, and the replicas it runs.
    pub served: Served,
    /// The store.
    pub store: StorePlan,
    /// The model file: the EmbeddingModel's document, then the KnowledgeBase's.
    pub model_file: String,
    /// The replicas the EmbeddingModel asks for.
    pub asked_replicas: i32,
}

impl Plan {
    /// The replicas the Deployment runs.
    pub fn replicas(&self) -> i32 {
        desired::replicas(&self.served).unwrap_or(1)
    }
}

/// The KnowledgeBase as the server builders see it, before its EmbeddingModel is known: names,
/// uid and generation (enough for object names, labels, selector and owner references).
pub fn served_base(knowledge_base: &KnowledgeBase) -> Served {
    let metadata = &knowledge_base.metadata;
    Served {
        kind: ModelKind::KnowledgeBase,
        name: metadata.name.clone().unwrap_or_default(),
        namespace: metadata.namespace.clone().unwrap_or_default(),
        uid: metadata.uid.clone().unwrap_or_default(),
        generation: metadata.generation,
        annotations: BTreeMap::new(),
        template: nstream_core::ServingTemplate::default(),
        credential: None,
        server_document: serde_json::Value::Null,
        problems: Vec::new(),
    }
}

/// What is wrong with a KnowledgeBase's spec, on a cluster: the spec's own checks, and an
/// absolute embedded store path outside [`DATA_DIR`] (only the claim there survives the pod).
pub fn problems(knowledge_base: &KnowledgeBase) -> Vec<String> {
    use nstream_core::validate::Check as _;
    let mut problems: Vec<String> = knowledge_base.spec.problems("spec").iter().map(ToString::to_string).collect();
    let store = knowledge_base.spec.store_or_default();
    if let Some(path) = store.embedded.as_ref().and_then(|embedded| embedded.path.as_deref())
        && path.starts_with('/')
        && !(path == DATA_DIR || path.strip_prefix(DATA_DIR).is_some_and(|rest| rest.starts_with('/')))
    {
        problems.push(format!(
            "spec.store.embedded.path: `{path}` is outside the data directory {DATA_DIR}, which is the \
             KnowledgeBase's claim on a cluster; write a relative path (it is under {DATA_DIR}) or one \
             under {DATA_DIR}"
        ));
    }
    problems
}

/// The plan of a KnowledgeBase served with `embedding_model`; `Err` with the problems of either
/// spec when one is invalid.
pub fn plan(knowledge_base: &KnowledgeBase, embedding_model: &EmbeddingModel) -> std::result::Result<Plan, String> {
    let mut problems = problems(knowledge_base);
    let model = embedding_model.served();
    let model_name = model.name.clone();
    let asked_replicas = desired::replicas(&model);
    problems.extend(model.problems.iter().map(|problem| format!("EmbeddingModel {model_name}: {problem}")));
    if asked_replicas.is_none() {
        problems
            .push(format!("EmbeddingModel {model_name}: replicas {} is not a whole number", model.template.replicas));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let asked_replicas = asked_replicas.unwrap_or(1);
    let mut served = served_base(knowledge_base);
    let store = match knowledge_base.spec.store_or_default().postgres {
        Some(postgres) => StorePlan::Postgres(postgres.connection_secret_ref),
        None => {
            let embedded = knowledge_base.spec.store_or_default().embedded.unwrap_or_default();
            StorePlan::Embedded {
                claim: claim_name(&served.name),
                size: embedded.size.map_or_else(|| DEFAULT_CLAIM_SIZE.to_string(), |size| size.as_str().to_string()),
                storage_class_name: embedded.storage_class_name,
            }
        }
    };
    // The model's resources, GPU and model cache; the scaling is the KnowledgeBase's.
    served.template = nstream_core::ServingTemplate {
        replicas: Replicas::from(match store {
            StorePlan::Embedded { .. } => 1,
            StorePlan::Postgres(_) => asked_replicas.max(1),
        }),
        min_replicas: None,
        max_replicas: None,
        target_requests_per_replica: None,
        scale_down_delay_seconds: None,
        ..model.template.clone()
    };
    served.annotations = model.annotations.clone();
    // The model's own pods read an inline token from the Secret its controller makes.
    served.credential = match &model.credential {
        Some(Credential::Inline { key, .. }) => Some(Credential::Reference(SecretKeyRef {
            name: credentials_secret_name(ModelKind::EmbeddingModel, &model_name),
            key: (*key).to_string(),
        })),
        other => other.clone(),
    };
    served.server_document = serde_json::json!({
        "apiVersion": nstream_core::spec::API_VERSION,
        "kind": KIND,
        "metadata": { "name": served.name },
        "spec": serde_json::to_value(&knowledge_base.spec).unwrap_or_default(),
    });
    let model_file = [&model.server_document, &served.server_document]
        .iter()
        .map(|document| serde_yaml::to_string(document).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n");
    Ok(Plan { served, store, model_file, asked_replicas })
}

/// The ConfigMap holding the model file.
pub fn config_map(plan: &Plan) -> ConfigMap {
    let mut config_map = desired::config_map(&plan.served);
    config_map.data = Some(BTreeMap::from([(desired::MODEL_FILE_KEY.to_string(), plan.model_file.clone())]));
    config_map
}

/// The claim of an embedded store, owned by the KnowledgeBase (deleting it deletes the claim);
/// `None` for a postgres store.
pub fn claim(plan: &Plan) -> Option<PersistentVolumeClaim> {
    let StorePlan::Embedded { claim, size, storage_class_name } = &plan.store else {
        return None;
    };
    Some(PersistentVolumeClaim {
        metadata: desired::object_metadata(
            claim.clone(),
            &plan.served.namespace,
            desired::labels(&plan.served),
            Some(desired::owner_reference(&plan.served)),
        ),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), Quantity(size.clone()))])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    })
}

/// The server Deployment: the models' ([`desired::deployment`]) with the model file's hash,
/// `NSTREAM_DATA_DIR`, the data volume, the postgres Secret, and, for an embedded store, one
/// replica replaced with `Recreate` (the old pod lets go of the store before the new one opens
/// it; a ReadWriteOnce claim could not be mounted by both on two nodes anyway).
pub fn deployment(plan: &Plan, settings: &crate::settings::OperatorSettings, secret_hash: Option<&str>) -> Deployment {
    let mut deployment = desired::deployment(&plan.served, settings, secret_hash);
    let Some(spec) = deployment.spec.as_mut() else { return deployment };
    spec.replicas = Some(plan.replicas());
    if matches!(plan.store, StorePlan::Embedded { .. }) {
        spec.strategy = Some(DeploymentStrategy { type_: Some("Recreate".into()), rolling_update: None });
    }
    let template = &mut spec.template;
    template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(desired::CONFIG_HASH_ANNOTATION.to_string(), desired::content_hash(plan.model_file.as_bytes()));
    let Some(pod) = template.spec.as_mut() else { return deployment };
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    volumes.push(match &plan.store {
        StorePlan::Embedded { claim, .. } => desired::claim_volume(DATA_VOLUME, claim.clone(), false),
        StorePlan::Postgres(_) => desired::empty_dir_volume(DATA_VOLUME, None),
    });
    let mut mounts = vec![desired::volume_mount(DATA_VOLUME, DATA_DIR.to_string(), false)];
    if let StorePlan::Postgres(reference) = &plan.store {
        let token = desired::credential_location(&plan.served);
        match token {
            // One Secret holds both: one volume with both keys (two mounts at one path clash).
            Some((secret, _)) if secret == reference.name => {
                let shared = volumes.iter_mut().find(|volume| volume.name == "credentials");
                if let Some(items) =
                    shared.and_then(|volume| volume.secret.as_mut()).and_then(|secret| secret.items.as_mut())
                    && !items.iter().any(|item| item.key == reference.key)
                {
                    items.push(KeyToPath { key: reference.key.clone(), path: reference.key.clone(), mode: None });
                }
            }
            _ => {
                volumes.push(desired::secret_volume("postgres", reference.name.clone(), &reference.key));
                mounts.push(desired::volume_mount("postgres", desired::secrets_dir(&reference.name), true));
            }
        }
    }
    if let Some(container) = pod.containers.first_mut() {
        container.volume_mounts.get_or_insert_with(Vec::new).extend(mounts);
        container.env.get_or_insert_with(Vec::new).push(EnvVar {
            name: "NSTREAM_DATA_DIR".into(),
            value: Some(DATA_DIR.into()),
            value_from: None,
        });
    }
    deployment
}

/// The `ReplicasLimited` condition's message, when the servers run fewer replicas than the
/// EmbeddingModel asks for.
pub fn replicas_limited(plan: &Plan) -> Option<String> {
    (matches!(plan.store, StorePlan::Embedded { .. }) && plan.asked_replicas > 1).then(|| {
        format!(
            "the EmbeddingModel asks for {} replicas, but an embedded store has one writer: 1 replica serves \
             this KnowledgeBase and is replaced (Recreate) on updates; use a postgres store to run more",
            plan.asked_replicas
        )
    })
}

/// The Secrets the servers read, as (name, key): the hub token's and the postgres URL's.
fn read_secrets(plan: &Plan) -> Vec<(String, String)> {
    let mut secrets: Vec<(String, String)> = desired::credential_location(&plan.served).into_iter().collect();
    if let StorePlan::Postgres(reference) = &plan.store {
        secrets.push((reference.name.clone(), reference.key.clone()));
    }
    secrets
}

/// `Some` when the claim exists and the KnowledgeBase is not its controller.
async fn claim_conflict(context: &Context, plan: &Plan, claim: &str) -> Result<Option<Blocker>> {
    let claims = Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), &plan.served.namespace);
    let existing = claims.get_metadata_opt(claim).await.map_err(Error::Kube)?;
    Ok(existing
        .filter(|object| !models::controlled_by(&object.metadata, &plan.served.uid))
        .map(|_| models::name_conflict(&plan.served, "PersistentVolumeClaim", claim)))
}

/// Creates the claim unless it exists (a claim's spec is immutable where it matters: it is made
/// once and never applied again).
async fn create_claim(context: &Context, claim: &PersistentVolumeClaim) -> Result<()> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let claims = Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), &namespace);
    let name = claim.metadata.name.clone().ok_or(Error::MissingMetadata("name"))?;
    if claims.get_metadata_opt(&name).await.map_err(Error::Kube)?.is_some() {
        return Ok(());
    }
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
    match claims.create(&params, claim).await {
        Ok(_) => {
            context.metrics.wrote(KIND, "PersistentVolumeClaim");
            tracing::info!(claim = %name, "created the claim of the embedded store");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(Error::Kube(error)),
    }
}

/// Reconciles one KnowledgeBase. Idempotent: with nothing changed, the applies are no-ops on the
/// API server and the status is not written.
#[tracing::instrument(skip(knowledge_base, context), fields(kind = KIND, namespace, name = %knowledge_base.name_any()))]
pub async fn reconcile(knowledge_base: Arc<KnowledgeBase>, context: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    // Being deleted: garbage collection removes what it owns; applying now would recreate it.
    if knowledge_base.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let base = served_base(&knowledge_base);
    if base.namespace.is_empty() {
        return Err(Error::MissingMetadata("namespace"));
    }
    tracing::Span::current().record("namespace", base.namespace.as_str());
    let client = &context.client;
    let namespace = base.namespace.as_str();
    let settings = &context.settings;

    let mut blocker = None;
    let own_problems = problems(&knowledge_base);
    let mut plan = None;
    if own_problems.is_empty() {
        let model_name = &knowledge_base.spec.embedding_model;
        match Api::<EmbeddingModel>::namespaced(client.clone(), namespace)
            .get_opt(model_name)
            .await
            .map_err(Error::Kube)?
        {
            None => blocker = Some(Blocker::EmbeddingModelNotFound { name: model_name.clone() }),
            Some(model) => match self::plan(&knowledge_base, &model) {
                Ok(made) => plan = Some(made),
                Err(problems) => blocker = Some(Blocker::InvalidSpec(problems)),
            },
        }
    } else {
        blocker = Some(Blocker::InvalidSpec(own_problems.join("; ")));
    }

    // Ownership first, so that a conflict applies nothing at all.
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    if let Some(plan) = &plan {
        blocker = models::first_name_conflict(client, &plan.served, settings).await?;
        if blocker.is_none()
            && let StorePlan::Embedded { claim, .. } = &plan.store
        {
            blocker = claim_conflict(&context, plan, claim).await?;
        }
        if blocker.is_none() {
            match models::existing_api_key(&secrets, &plan.served).await? {
                None => models::create_api_key(&secrets, &plan.served, &context, KIND).await?,
                Some(Err(unusable)) => blocker = Some(unusable),
                Some(Ok(())) => {}
            }
        }
    }
    let hands_off = plan.is_none() || matches!(blocker, Some(Blocker::NameConflict { .. }));

    // The hashes of the Secrets' values roll the pods when one is rotated.
    let mut hashes = Vec::new();
    if let Some(plan) = plan.as_ref().filter(|_| blocker.is_none()) {
        for (name, key) in read_secrets(plan) {
            match models::referenced_secret(&secrets, &name, &key, false).await? {
                Ok((hash, _value)) => hashes.push(hash),
                Err(missing) => {
                    blocker = Some(missing);
                    break;
                }
            }
        }
    }
    let secret_hash = (!hashes.is_empty()).then(|| desired::content_hash(hashes.join("/").as_bytes()));

    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let mut deployment = None;
    if let Some(plan) = plan.as_ref().filter(|_| !hands_off) {
        models::apply(&Api::<ConfigMap>::namespaced(client.clone(), namespace), &config_map(plan), &context, KIND)
            .await?;
        models::apply(
            &Api::<Service>::namespaced(client.clone(), namespace),
            &desired::service(&plan.served, settings),
            &context,
            KIND,
        )
        .await?;
        models::reconcile_network_policy(&plan.served, &context, KIND).await?;
        if let Some(claim) = claim(plan) {
            create_claim(&context, &claim).await?;
        }
        if blocker.is_none() {
            let wanted = self::deployment(plan, settings, secret_hash.as_deref());
            deployment = Some(models::apply(&deployments, &wanted, &context, KIND).await?);
        }
    }
    let conflicted = matches!(blocker, Some(Blocker::NameConflict { .. }));
    if deployment.is_none() && !conflicted {
        // A missing EmbeddingModel or Secret leaves a running Deployment alone: its pods still
        // serve with what they loaded.
        let name = object_name(ModelKind::KnowledgeBase, &base.name);
        deployment = deployments
            .get_opt(&name)
            .await
            .map_err(Error::Kube)?
            .filter(|existing| models::controlled_by(&existing.metadata, &base.uid));
    }
    let pods = match &deployment {
        Some(_) => {
            Api::<Pod>::namespaced(client.clone(), namespace)
                .list(&ListParams::default().labels(&desired::selector_string(&base)))
                .await
                .map_err(Error::Kube)?
                .items
        }
        None => Vec::new(),
    };

    let observed = Observed {
        generation: base.generation,
        desired_replicas: plan.as_ref().map_or(0, Plan::replicas),
        deployment: deployment.as_ref(),
        pods: &pods,
        blocker,
        endpoint: plan.as_ref().filter(|_| !hands_off).map(|plan| desired::endpoint(&plan.served, settings)),
        // A KnowledgeBase has no scale subresource, so no selector for one.
        selector: None,
        provider: None,
    };
    let previous = knowledge_base.status.as_ref();
    let now = Time(Timestamp::now());
    let mut serving = health::derive_status(&observed, previous.map(|status| &status.serving), now.clone());
    // No autoscaler scales a KnowledgeBase.
    serving.autoscaler = None;
    match plan.as_ref().and_then(replicas_limited) {
        Some(message) => serving.set_condition(
            REPLICAS_LIMITED,
            ConditionStatus::True,
            "EmbeddedStore",
            &message,
            base.generation,
            now,
        ),
        None => serving.conditions.retain(|condition| condition.type_ != REPLICAS_LIMITED),
    }
    let status = KnowledgeBaseStatus {
        serving,
        deployment: deployment.as_ref().map(|_| object_name(ModelKind::KnowledgeBase, &base.name)),
        claim: plan.as_ref().and_then(|plan| match &plan.store {
            StorePlan::Embedded { claim, .. } => Some(claim.clone()),
            StorePlan::Postgres(_) => None,
        }),
    };
    if previous != Some(&status) {
        let api = Api::<KnowledgeBase>::namespaced(client.clone(), namespace);
        let patch = serde_json::json!({
            "apiVersion": nstream_core::spec::API_VERSION,
            "kind": KIND,
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&base.name, &params, &Patch::Apply(&patch)).await.map_err(Error::Kube)?;
        context.metrics.wrote(KIND, "status");
        let transitions = health::transitions(previous.map(|status| &status.serving), &status.serving);
        context.publish_transitions(KIND, &knowledge_base.object_ref(&()), transitions).await;
        let ready = status.serving.condition(READY);
        tracing::info!(
            ready = status.serving.is_ready(),
            reason = ready.map(|condition| condition.reason.as_str()).unwrap_or(""),
            degraded = status.serving.condition(DEGRADED).is_some_and(|condition| condition.status == "True"),
            "status updated"
        );
    }
    context.metrics.reconciled(KIND, started.elapsed());
    Ok(Action::requeue(settings.resync))
}

fn object_key(knowledge_base: &KnowledgeBase) -> String {
    format!("{KIND}/{}/{}", knowledge_base.namespace().unwrap_or_default(), knowledge_base.name_any())
}

/// [`reconcile`], and a success resets the object's retry backoff.
async fn reconcile_with_backoff(knowledge_base: Arc<KnowledgeBase>, context: Arc<Context>) -> Result<Action> {
    let key = object_key(&knowledge_base);
    let result = reconcile(knowledge_base, context.clone()).await;
    if result.is_ok() {
        context.succeeded(&key);
    }
    result
}

/// After a failed reconcile: count it and retry with the models' exponential backoff.
fn error_policy(knowledge_base: Arc<KnowledgeBase>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.failed(KIND, &error.label());
    let delay = context.failed(object_key(&knowledge_base));
    tracing::warn!(kind = KIND, name = %knowledge_base.name_any(), namespace = knowledge_base.namespace().unwrap_or_default(), error = %error, retry_seconds = delay.as_secs_f64(), "reconcile failed");
    Action::requeue(delay)
}

/// Runs the KnowledgeBase controller until `shutdown` resolves: one over the whole cluster, or
/// one per namespace of [`crate::OperatorSettings::watch_namespaces`]. It watches the
/// KnowledgeBases, the objects they own, their pods, and the EmbeddingModels they name (a
/// changed model rolls the KnowledgeBase's servers). Secrets are read at each reconcile, so a
/// rotated one is noticed at the next resync.
pub async fn run(context: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let namespaces = context.settings.watch_namespaces.clone();
    crate::namespaces::per_namespace(&namespaces, shutdown, |namespace, shutdown| {
        run_in(context.clone(), namespace, shutdown)
    })
    .await;
}

/// The KnowledgeBase controller over `namespace` (every namespace when `None`).
async fn run_in(
    context: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = context.client.clone();
    let owned = watcher::Config::default().labels(&format!("{}={KIND}", desired::KIND_LABEL));
    let controller = Controller::new(models::scoped::<KnowledgeBase>(&client, namespace), watcher::Config::default())
        .with_config(controller::Config::default().concurrency(4));
    let store = controller.store();
    controller
        .owns(models::scoped::<Deployment>(&client, namespace), owned.clone())
        .owns(models::scoped::<Service>(&client, namespace), owned.clone())
        .owns(models::scoped::<ConfigMap>(&client, namespace), owned.clone())
        .owns(models::scoped::<NetworkPolicy>(&client, namespace), owned.clone())
        .watches(models::scoped::<Pod>(&client, namespace), owned, |pod: Pod| {
            let name = pod.annotations().get(desired::MODEL_NAME_ANNOTATION).cloned();
            let namespace = pod.namespace();
            name.zip(namespace).map(|(name, namespace)| ObjectRef::<KnowledgeBase>::new(&name).within(&namespace))
        })
        .watches(
            models::scoped::<EmbeddingModel>(&client, namespace),
            watcher::Config::default(),
            move |model: EmbeddingModel| {
                let model_name = model.name_any();
                let model_namespace = model.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|knowledge_base| {
                        knowledge_base.namespace() == model_namespace
                            && knowledge_base.spec.embedding_model == model_name
                    })
                    .map(|knowledge_base| ObjectRef::from_obj(&*knowledge_base))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile_with_backoff, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(error = %error, "knowledge base controller event");
            }
        })
        .await;
}

#[cfg(test)]
#[path = "knowledge_base_tests.rs"]
mod tests;

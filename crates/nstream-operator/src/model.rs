//! One view of the three kinds, so that desired objects, status and reconcile are written once.

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use nstream_core::validate::Check;
use nstream_core::{
    BaseModel, EmbeddingModel, HubModelSpec, MegaModel, MegaModelSpec, ModelStatus, SecretKeyRef, SecretSource,
    SecretString, ServingInfo, ServingTemplate,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::settings::{ADAPTERS_CLAIM_ANNOTATION, ADAPTERS_MOUNT_PATH};

/// The kinds the operator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// A hosted model behind a gateway pod.
    MegaModel,
    /// A causal language model served with candle.
    BaseModel,
    /// A sentence-embedding model served with candle.
    EmbeddingModel,
    /// A KnowledgeBase, served with its EmbeddingModel by servers of its own
    /// ([`crate::knowledge_base`]).
    KnowledgeBase,
}

impl ModelKind {
    /// Every model kind, in a fixed order (a KnowledgeBase is not a model: the router and the
    /// autoscaler leave it out).
    pub const ALL: [ModelKind; 3] = [Self::MegaModel, Self::BaseModel, Self::EmbeddingModel];

    /// The kind as Kubernetes writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MegaModel => "MegaModel",
            Self::BaseModel => "BaseModel",
            Self::EmbeddingModel => "EmbeddingModel",
            Self::KnowledgeBase => "KnowledgeBase",
        }
    }

    /// The short prefix of the objects made for a resource of this kind (the CRD's short name).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::MegaModel => "mm",
            Self::BaseModel => "bm",
            Self::EmbeddingModel => "em",
            Self::KnowledgeBase => "kb",
        }
    }

    /// The `app.kubernetes.io/component` of the server: what the pod does.
    pub fn component(self) -> &'static str {
        match self {
            Self::MegaModel => "gateway",
            Self::BaseModel => "llm",
            Self::EmbeddingModel => "embeddings",
            Self::KnowledgeBase => "knowledge-base",
        }
    }
}

/// Where the credential of a resource comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Inline in the spec: the operator copies it into a Secret it owns, under `key`.
    Inline {
        /// The value (redacting type: never printed).
        value: SecretString,
        /// The key in the operator-owned Secret (`token` or `apikey`).
        key: &'static str,
    },
    /// A key of a Secret the user manages.
    Reference(SecretKeyRef),
}

/// A resource as the operator sees it: names, replicas, resources, the credential and the
/// document the server loads.
#[derive(Clone, Debug)]
pub struct Served {
    /// Which kind.
    pub kind: ModelKind,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`, for owner references.
    pub uid: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.annotations` (per-resource settings such as the cache claim).
    pub annotations: BTreeMap<String, String>,
    /// Replicas and resources; a MegaModel's gateway has the default (one replica, no limits).
    pub template: ServingTemplate,
    /// The credential, if the spec names one.
    pub credential: Option<Credential>,
    /// The resource as the server loads it: apiVersion, kind, metadata.name and the spec, with an
    /// inline credential replaced by a reference to the operator-owned Secret.
    pub server_document: serde_json::Value,
    /// What is wrong with the spec beyond what the API server's schema checks.
    pub problems: Vec<String>,
}

/// The name of the Secret the operator creates for an inline credential.
pub fn credentials_secret_name(kind: ModelKind, name: &str) -> String {
    format!("{}-credentials", object_name(kind, name))
}

/// The name of the Secret holding the API key clients present to the resource's server
/// (`<object name>-api-key`).
pub fn api_key_secret_name(kind: ModelKind, name: &str) -> String {
    format!("{}-api-key", object_name(kind, name))
}

/// The name of the Deployment, Service and ConfigMap of a resource: `<prefix>-<name>`, a DNS-1035
/// label (a Service name), so it stays under 63 characters and has no dots; a name that does not fit
/// is shortened and made unique with a hash of the original.
pub fn object_name(kind: ModelKind, name: &str) -> String {
    const MAX: usize = 63;
    // The `-credentials` suffix must fit too (Secret names allow 253, so only the label matters).
    let plain = format!("{}-{}", kind.prefix(), name);
    if plain.len() <= MAX && !plain.contains('.') {
        return plain;
    }
    let digest = Sha256::digest(name.as_bytes());
    let suffix: String = digest.iter().take(4).map(|byte| format!("{byte:02x}")).collect();
    let mut head: String = plain.replace('.', "-").chars().take(MAX - suffix.len() - 1).collect();
    while head.ends_with('-') {
        head.pop();
    }
    format!("{head}-{suffix}")
}

/// A resource kind the operator reconciles.
pub trait ServedResource:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Which kind this is.
    const KIND: ModelKind;
    /// The operator's view of this resource.
    fn served(&self) -> Served;
    /// The status last written.
    fn model_status(&self) -> Option<&ModelStatus>;
    /// The spec of a MegaModel, whose provider the operator checks; `None` for the other kinds.
    fn mega_model_spec(&self) -> Option<&MegaModelSpec> {
        None
    }
}

fn base(kind: ModelKind, metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Served {
    Served {
        kind,
        name: metadata.name.clone().unwrap_or_default(),
        namespace: metadata.namespace.clone().unwrap_or_default(),
        uid: metadata.uid.clone().unwrap_or_default(),
        generation: metadata.generation,
        annotations: metadata.annotations.clone().unwrap_or_default(),
        template: ServingTemplate::default(),
        credential: None,
        server_document: serde_json::Value::Null,
        problems: Vec::new(),
    }
}

/// The fields of a ServingTemplate that size the Deployment and mean nothing to the server.
const SCALING_FIELDS: [&str; 5] =
    ["replicas", "minReplicas", "maxReplicas", "targetRequestsPerReplica", "scaleDownDelaySeconds"];

/// The model file's document: the spec without the scaling fields, so that a scale (by
/// `kubectl scale`, an HPA or the autoscaler) changes neither the file nor the config hash on the
/// pod template, and does not roll the pods already serving.
fn server_document(kind: ModelKind, name: &str, mut spec: serde_json::Value) -> serde_json::Value {
    for template in ["baseModelServingTemplate", "embeddingModelServingTemplate"] {
        if let Some(fields) = spec.get_mut(template).and_then(serde_json::Value::as_object_mut) {
            for field in SCALING_FIELDS {
                fields.remove(field);
            }
        }
    }
    serde_json::json!({
        "apiVersion": nstream_core::spec::API_VERSION,
        "kind": kind.as_str(),
        "metadata": { "name": name },
        "spec": spec,
    })
}

fn credential_of(source: Option<SecretSource<'_>>, key: &'static str) -> Option<Credential> {
    match source? {
        SecretSource::Inline(value) => Some(Credential::Inline { value: value.clone(), key }),
        SecretSource::Reference(reference) => Some(Credential::Reference(reference.clone())),
    }
}

/// Local folders a pod cannot read. On a cluster, `hfModelId` (the model's or an adapter's) may
/// name an absolute folder (in the server image, or under [`ADAPTERS_MOUNT_PATH`]), but not one
/// relative to the machine the file was written on (`./`, `../`, `~/`), nor one under
/// [`ADAPTERS_MOUNT_PATH`] when no claim is mounted there ([`ADAPTERS_CLAIM_ANNOTATION`]).
fn local_path_problems<S: HubModelSpec>(info: &ServingInfo, annotations: &BTreeMap<String, String>) -> Vec<String> {
    let prefix = S::FIELD_PREFIX;
    let mounted = annotations.contains_key(ADAPTERS_CLAIM_ANNOTATION);
    let mut fields = vec![(format!("spec.{prefix}ServingInfo.hfModelId"), info.hf_model_id.as_str())];
    for (index, adapter) in info.adapters.iter().flatten().enumerate() {
        fields.push((format!("spec.{prefix}ServingInfo.adapters[{index}].hfModelId"), adapter.hf_model_id.as_str()));
    }
    let remedy = format!(
        "put the folder on a PersistentVolumeClaim, name the claim in the annotation \
         {ADAPTERS_CLAIM_ANNOTATION} (mounted read-only at {ADAPTERS_MOUNT_PATH}) and write \
         {ADAPTERS_MOUNT_PATH}/NAME, or push it to the hub"
    );
    fields
        .into_iter()
        .filter_map(|(field, id)| {
            if ["./", "../", "~/"].iter().any(|start| id.starts_with(start)) {
                Some(format!("{field}: `{id}` is relative to the machine the file was written on, which a pod cannot read; {remedy}"))
            } else if !mounted && id.strip_prefix(ADAPTERS_MOUNT_PATH).is_some_and(|rest| rest.starts_with('/')) {
                Some(format!("{field}: `{id}` is on the adapters volume, but no claim is mounted there; {remedy}"))
            } else {
                None
            }
        })
        .collect()
}

fn problems_of(check: &dyn Check) -> Vec<String> {
    check.problems("spec").iter().map(ToString::to_string).collect()
}

/// A BaseModel or EmbeddingModel as served: its hub token (an inline one moves to the
/// credentials Secret, and the server's document references it), its servers, its problems.
fn served_hub_model<S>(
    kind: ModelKind,
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: &S,
) -> Served
where
    S: HubModelSpec + Check + Clone + Serialize,
{
    let mut served = base(kind, metadata);
    served.credential = credential_of(spec.serving_info().token_source(), "token");
    served.template = spec.serving_template().clone();
    served.problems = problems_of(spec);
    served.problems.extend(local_path_problems::<S>(spec.serving_info(), &served.annotations));
    let mut spec = spec.clone();
    let info = spec.serving_info_mut();
    if info.model_provider_token.take().is_some() {
        info.model_provider_token_secret_ref =
            Some(SecretKeyRef { name: credentials_secret_name(kind, &served.name), key: "token".into() });
    }
    served.server_document = server_document(kind, &served.name, serde_json::to_value(&spec).unwrap_or_default());
    served
}

impl ServedResource for EmbeddingModel {
    const KIND: ModelKind = ModelKind::EmbeddingModel;

    fn served(&self) -> Served {
        served_hub_model(Self::KIND, &self.metadata, &self.spec)
    }

    fn model_status(&self) -> Option<&ModelStatus> {
        self.status.as_ref()
    }
}

impl ServedResource for BaseModel {
    const KIND: ModelKind = ModelKind::BaseModel;

    fn served(&self) -> Served {
        served_hub_model(Self::KIND, &self.metadata, &self.spec)
    }

    fn model_status(&self) -> Option<&ModelStatus> {
        self.status.as_ref()
    }
}

impl ServedResource for MegaModel {
    const KIND: ModelKind = ModelKind::MegaModel;

    fn served(&self) -> Served {
        let mut served = base(Self::KIND, &self.metadata);
        served.problems = problems_of(&self.spec);
        let source = self.spec.provider_template().and_then(|template| template.api_key_fields().api_key_source());
        served.credential = credential_of(source, "apikey");
        let reference = SecretKeyRef { name: credentials_secret_name(Self::KIND, &served.name), key: "apikey".into() };
        let mut spec = self.spec.clone();
        if let Some(azure) = spec.model_template.azure_open_ai.as_mut()
            && azure.apikey.take().is_some()
        {
            azure.apikey_secret_ref = Some(reference.clone());
        }
        if let Some(openai) = spec.model_template.open_ai.as_mut()
            && openai.apikey.take().is_some()
        {
            openai.apikey_secret_ref = Some(reference.clone());
        }
        if let Some(anthropic) = spec.model_template.anthropic.as_mut()
            && anthropic.apikey.take().is_some()
        {
            anthropic.apikey_secret_ref = Some(reference);
        }
        served.server_document =
            server_document(Self::KIND, &served.name, serde_json::to_value(&spec).unwrap_or_default());
        served
    }

    fn model_status(&self) -> Option<&ModelStatus> {
        self.status.as_ref()
    }

    fn mega_model_spec(&self) -> Option<&MegaModelSpec> {
        Some(&self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_short_dns_labels_that_stay_unique() {
        assert_eq!(object_name(ModelKind::EmbeddingModel, "all-minilm-l6-v2"), "em-all-minilm-l6-v2");
        let long = "a".repeat(80);
        let shortened = object_name(ModelKind::BaseModel, &long);
        assert!(shortened.len() <= 63, "{shortened}");
        assert_ne!(shortened, object_name(ModelKind::BaseModel, &"a".repeat(81)));
        let dotted = object_name(ModelKind::MegaModel, "gpt-4.1");
        assert!(!dotted.contains('.'), "{dotted}");
        assert_ne!(dotted, object_name(ModelKind::MegaModel, "gpt-4-1"));
    }
}

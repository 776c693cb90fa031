//! The CustomResourceDefinitions of the five kinds, as installed on a cluster.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::distillation::Distillation;
use crate::knowledge_base::KnowledgeBase;
use crate::spec::{BaseModel, EmbeddingModel, MegaModel};

/// The five CRDs, in a fixed order: MegaModel, BaseModel, EmbeddingModel, KnowledgeBase,
/// Distillation.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![MegaModel::crd(), BaseModel::crd(), EmbeddingModel::crd(), KnowledgeBase::crd(), Distillation::crd()]
}

/// File names under `deploy/crds/`, in the order of [`crds`].
pub const CRD_FILE_NAMES: [&str; 5] = [
    "megamodels.llm.nstream.ai.yaml",
    "basemodels.llm.nstream.ai.yaml",
    "embeddingmodels.llm.nstream.ai.yaml",
    "knowledgebases.llm.nstream.ai.yaml",
    "distillations.llm.nstream.ai.yaml",
];

/// One CRD as the YAML that `nstream crds` prints and `deploy/crds/` holds.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(crd)
}

/// All five CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&crd_yaml(&crd)?);
    }
    Ok(out)
}

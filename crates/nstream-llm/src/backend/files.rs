//! The local files of a checkpoint: a safetensors folder or the hub's resolution, and the end
//! ids of its generation config.

use std::path::{Path, PathBuf};

use nstream_hub::ResolvedModel;

use crate::error::{Error, Result};
use crate::template::ChatTemplate;
use crate::tokenizer::{HfTokenizerConfig, LlmTokenizer};

/// The local files of a Hugging Face safetensors checkpoint.
#[derive(Clone, Debug)]
pub struct SafetensorsFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// The weights: one file, or every shard.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `tokenizer_config.json`, when present.
    pub tokenizer_config: Option<PathBuf>,
    /// `generation_config.json`, when present.
    pub generation_config: Option<PathBuf>,
    /// `chat_template.jinja`, when present.
    pub chat_template: Option<PathBuf>,
}

impl SafetensorsFiles {
    /// The checkpoint's tokenizer (`tokenizer.json`, with the end ids of `config.json` and
    /// `generation_config.json`), its chat template (see [`ChatTemplate::for_model`]), and whether
    /// that template is the model's own (`tokenizer_config.json` or `chat_template.jinja`) rather
    /// than ChatML. Serving and fine-tuning both read a checkpoint's text side through it.
    pub fn tokenizer_and_template(&self) -> Result<(LlmTokenizer, ChatTemplate, bool)> {
        let config = HfTokenizerConfig::read(self.tokenizer_config.as_deref(), self.chat_template.as_deref())?;
        let (eos_ids, bos_id) = end_ids(&self.config, self.generation_config.as_deref())?;
        let tokenizer = LlmTokenizer::from_hf(&self.tokenizer, &config, &eos_ids, bos_id)?;
        let template =
            ChatTemplate::for_model(config.chat_template.as_deref(), config.bos_token, config.eos_token, &tokenizer)?;
        Ok((tokenizer, template, config.chat_template.is_some()))
    }

    /// The files the hub resolved; `config.json` and `tokenizer.json` are required.
    pub fn from_resolved(resolved: &ResolvedModel) -> Result<Self> {
        let missing = |file: &str| Error::InvalidModel {
            file: format!("{}/{file}", resolved.repo_id),
            message: "the repo has safetensors weights but no such file".into(),
        };
        Ok(Self {
            config: resolved.config.clone().ok_or_else(|| missing("config.json"))?,
            weights: resolved.weights.clone(),
            tokenizer: resolved.tokenizer.clone().ok_or_else(|| missing("tokenizer.json"))?,
            tokenizer_config: resolved.tokenizer_config.clone(),
            generation_config: resolved.generation_config.clone(),
            chat_template: resolved.chat_template.clone(),
        })
    }

    /// The files of a local checkpoint folder: `model.safetensors`, else the shards named by
    /// `model.safetensors.index.json`, else the only `*.safetensors` file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let required = |file: &str| {
            let path = dir.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::InvalidModel { file: path.display().to_string(), message: "the file is missing".into() })
            }
        };
        let optional = |file: &str| Some(dir.join(file)).filter(|path| path.is_file());
        let weights = if let Some(single) = optional("model.safetensors") {
            vec![single]
        } else if let Some(index) = optional(nstream_hub::SAFETENSORS_INDEX) {
            nstream_hub::shard_files(&index)?.iter().map(|shard| dir.join(shard)).collect()
        } else {
            let entries =
                std::fs::read_dir(dir).map_err(|cause| Error::Io { path: dir.display().to_string(), cause })?;
            let found: Vec<PathBuf> = entries
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| path.extension().is_some_and(|extension| extension == "safetensors"))
                .collect();
            match found.as_slice() {
                [single] => vec![single.clone()],
                _ => {
                    return Err(Error::InvalidModel {
                        file: dir.display().to_string(),
                        message: format!(
                            "expected model.safetensors or {} ({} other safetensors files)",
                            nstream_hub::SAFETENSORS_INDEX,
                            found.len()
                        ),
                    });
                }
            }
        };
        Ok(Self {
            config: required("config.json")?,
            weights,
            tokenizer: required("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json"),
            generation_config: optional("generation_config.json"),
            chat_template: optional("chat_template.jinja"),
        })
    }
}

/// The end-of-sequence ids of `generation_config.json` (else `config.json`), which may be one id
/// or a list, and the beginning-of-sequence id.
pub fn end_ids(config: &Path, generation_config: Option<&Path>) -> Result<(Vec<u32>, Option<u32>)> {
    let read = |path: &Path| -> Result<serde_json::Value> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Io { path: file.clone(), cause })?;
        serde_json::from_str(&text)
            .map_err(|error| Error::InvalidModel { file, message: format!("not valid JSON: {error}") })
    };
    let ids = |value: Option<&serde_json::Value>| -> Vec<u32> {
        match value {
            Some(serde_json::Value::Array(items)) => {
                items.iter().filter_map(|item| item.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
            }
            Some(value) => value.as_u64().and_then(|id| u32::try_from(id).ok()).into_iter().collect(),
            None => Vec::new(),
        }
    };
    let mut sources = vec![read(config)?];
    if let Some(path) = generation_config {
        sources.insert(0, read(path)?);
    }
    let mut eos = Vec::new();
    for source in &sources {
        for id in ids(source.get("eos_token_id")) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let bos = sources.iter().find_map(|source| ids(source.get("bos_token_id")).first().copied());
    Ok((eos, bos))
}

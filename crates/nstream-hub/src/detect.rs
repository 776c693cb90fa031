//! Which weights a repo holds, and resolving a whole model (weights, config, tokenizer).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::source::{ModelSource, glob_match};

/// The index file of sharded safetensors weights.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// The weight format of a repo, as file paths inside the repo.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WeightFormat {
    /// One safetensors file (normally `model.safetensors`).
    Safetensors {
        /// The weight file.
        file: String,
    },
    /// Safetensors split into shards listed by `model.safetensors.index.json`.
    ShardedSafetensors {
        /// The index file.
        index: String,
    },
    /// One GGUF file (quantised weights with their own metadata).
    Gguf {
        /// The GGUF file.
        file: String,
    },
}

/// Picks the weights among a repo's `files`. With a `selector` (name or glob), only matching files
/// are candidates; GGUF is chosen when the selector names it or when the repo has no safetensors.
pub fn detect_format(repo_id: &str, files: &[String], selector: Option<&str>) -> Result<WeightFormat> {
    let selected = |file: &String| selector.is_none_or(|pattern| glob_match(pattern, file));
    let candidates = |suffix: &str| -> Vec<String> {
        files.iter().filter(|file| file.ends_with(suffix) && selected(file)).cloned().collect()
    };
    let wants_gguf = selector.is_some_and(|pattern| pattern.ends_with(".gguf"));
    if !wants_gguf {
        if files.iter().any(|file| file == SAFETENSORS_INDEX) && selector.is_none() {
            return Ok(WeightFormat::ShardedSafetensors { index: SAFETENSORS_INDEX.to_owned() });
        }
        let safetensors = candidates(".safetensors");
        match safetensors.as_slice() {
            [file] => return Ok(WeightFormat::Safetensors { file: file.clone() }),
            [] => {}
            several => {
                if let Some(file) = several.iter().find(|file| file.as_str() == "model.safetensors") {
                    return Ok(WeightFormat::Safetensors { file: file.clone() });
                }
                return Err(ambiguous(repo_id, selector, several));
            }
        }
    }
    match candidates(".gguf").as_slice() {
        [file] => Ok(WeightFormat::Gguf { file: file.clone() }),
        [] => Err(Error::NoWeights { repo_id: repo_id.to_owned(), files: files.to_vec() }),
        several => Err(ambiguous(repo_id, selector, several)),
    }
}

fn ambiguous(repo_id: &str, selector: Option<&str>, candidates: &[String]) -> Error {
    Error::AmbiguousWeights {
        repo_id: repo_id.to_owned(),
        selector: selector.unwrap_or("*").to_owned(),
        candidates: candidates.to_vec(),
    }
}

/// The shard files named by a `model.safetensors.index.json`, sorted and deduplicated.
pub fn shard_files(index_path: &Path) -> Result<Vec<String>> {
    let invalid = |message: String| Error::InvalidIndex { path: index_path.to_owned(), message };
    let text = std::fs::read_to_string(index_path).map_err(|cause| Error::Io { path: index_path.to_owned(), cause })?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|error| invalid(error.to_string()))?;
    let map = index
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| invalid("no `weight_map` object".to_owned()))?;
    let shards: BTreeSet<String> = map.values().filter_map(|value| value.as_str().map(str::to_owned)).collect();
    if shards.is_empty() {
        return Err(invalid("`weight_map` names no shard".to_owned()));
    }
    if shards.iter().any(|shard| shard.split('/').any(|part| part == ".." || part.is_empty())) {
        return Err(invalid("a shard path leaves the repo".to_owned()));
    }
    Ok(shards.into_iter().collect())
}

/// A model's local files, ready to load.
#[derive(Clone, Debug)]
pub struct ResolvedModel {
    /// The repo id.
    pub repo_id: String,
    /// The weight format detected.
    pub format: WeightFormat,
    /// The weight files (one, or every shard), local paths.
    pub weights: Vec<PathBuf>,
    /// `config.json`, when the repo has one.
    pub config: Option<PathBuf>,
    /// `tokenizer.json`, when the repo has one.
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, when the repo has one.
    pub tokenizer_config: Option<PathBuf>,
    /// `generation_config.json` (end-of-sequence ids of causal LMs), when the repo has one.
    pub generation_config: Option<PathBuf>,
    /// `chat_template.jinja` (where transformers 5 saves the chat template), when the repo has one.
    pub chat_template: Option<PathBuf>,
}

impl Hub {
    /// Detects the repo's weight format (see [`detect_format`]) and resolves the weights with
    /// `config.json`, `tokenizer.json`, `tokenizer_config.json`, `generation_config.json` and
    /// `chat_template.jinja` when present.
    pub fn resolve_model(&self, source: &ModelSource) -> Result<ResolvedModel> {
        let files = self.list_files(source)?;
        let format = detect_format(&source.repo_id, &files, source.file.as_deref())?;
        let weights = match &format {
            WeightFormat::Safetensors { file } | WeightFormat::Gguf { file } => vec![self.resolve_file(source, file)?],
            WeightFormat::ShardedSafetensors { index } => {
                let index_path = self.resolve_file(source, index)?;
                shard_files(&index_path)?
                    .iter()
                    .map(|shard| self.resolve_file(source, shard))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let optional = |file: &str| -> Result<Option<PathBuf>> {
            if files.iter().any(|listed| listed == file) { self.resolve_optional(source, file) } else { Ok(None) }
        };
        Ok(ResolvedModel {
            repo_id: source.repo_id.clone(),
            format,
            weights,
            config: optional("config.json")?,
            tokenizer: optional("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json")?,
            generation_config: optional("generation_config.json")?,
            chat_template: optional("chat_template.jinja")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(files: &[&str]) -> Vec<String> {
        files.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn single_safetensors() {
        let files = names(&["config.json", "model.safetensors", "tokenizer.json", "onnx/model.onnx"]);
        assert_eq!(
            detect_format("r", &files, None).ok(),
            Some(WeightFormat::Safetensors { file: "model.safetensors".into() })
        );
    }

    #[test]
    fn sharded_safetensors() {
        let files = names(&[
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]);
        assert_eq!(
            detect_format("r", &files, None).ok(),
            Some(WeightFormat::ShardedSafetensors { index: SAFETENSORS_INDEX.into() })
        );
    }

    #[test]
    fn gguf_with_and_without_selector() {
        let files = names(&["README.md", "m.Q4_0.gguf", "m.Q4_1.gguf", "m.Q8_0.gguf"]);
        assert_eq!(
            detect_format("r", &files, Some("*Q4_1.gguf")).ok(),
            Some(WeightFormat::Gguf { file: "m.Q4_1.gguf".into() })
        );
        let error = detect_format("r", &files, None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("m.Q8_0.gguf") && error.contains("selector"), "{error}");
        assert!(matches!(detect_format("r", &files, Some("*Q2_K.gguf")), Err(Error::NoWeights { .. })));
    }

    #[test]
    fn no_weights_lists_files() {
        let error = detect_format("r", &names(&["pytorch_model.bin"]), None).err().map(|e| e.to_string());
        assert!(error.unwrap_or_default().contains("pytorch_model.bin"));
    }

    #[test]
    fn shard_index() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        let path = dir.path().join(SAFETENSORS_INDEX);
        let write = |text: &str| std::fs::write(&path, text).is_ok();
        assert!(write(
            r#"{"metadata":{},"weight_map":{"a":"s2.safetensors","b":"s1.safetensors","c":"s1.safetensors"}}"#
        ));
        assert_eq!(shard_files(&path).ok(), Some(names(&["s1.safetensors", "s2.safetensors"])));
        assert!(write(r#"{"weight_map":{"a":"../escape.safetensors"}}"#));
        assert!(shard_files(&path).is_err());
        assert!(write("{}"));
        assert!(shard_files(&path).is_err());
    }
}

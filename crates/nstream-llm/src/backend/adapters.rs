//! Models named by a PEFT LoRA adapter: where its files are (a local folder or a hub repository
//! holding `adapter_config.json`) and which base it adapts (`base_model.json` written by
//! `nstream finetune`, else `base_model_name_or_path` and `revision` of its config), as the
//! Hugging Face hub treats adapter repositories.

use std::path::{Path, PathBuf};

use nstream_hub::{Hub, ModelSource};
use nstream_peft::{BaseRecord, CONFIG_FILE, LoraConfig, WEIGHTS_FILE};

use crate::error::{Error, Result};

/// Where a PEFT LoRA adapter's files are, and the base it was trained on.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AdapterSource {
    /// The folder holding `adapter_config.json` and `adapter_model.safetensors` (a hub snapshot
    /// for a hub repository).
    pub folder: PathBuf,
    /// Its `adapter_config.json`.
    pub config: LoraConfig,
    /// Its `base_model.json`, when `nstream finetune` wrote one.
    pub base_record: Option<BaseRecord>,
}

/// Whether a model id names a local path rather than a hub repository: absolute, `./`, `../`
/// or `~/`, or an existing directory.
pub(super) fn is_local_path(id: &str) -> bool {
    id.starts_with('/')
        || id.starts_with("./")
        || id.starts_with("../")
        || id.starts_with("~/")
        || Path::new(id).is_dir()
}

/// `~/` expanded with `HOME`.
pub(super) fn local_path(id: &str) -> PathBuf {
    match (id.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(id),
    }
}

impl AdapterSource {
    /// Reads an adapter folder's configuration and base record (the weights are read when the
    /// adapter is laid out for a model).
    pub fn from_folder(folder: &Path) -> Result<Self> {
        let config = nstream_peft::Adapter::read_config(folder).map_err(adapter_error)?;
        let weights = folder.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(Error::InvalidModel {
                file: weights.display().to_string(),
                message: "the adapter's weights file is missing".into(),
            });
        }
        let base_record = BaseRecord::read(folder).map_err(adapter_error)?;
        Ok(Self { folder: folder.to_path_buf(), config, base_record })
    }

    /// The adapter `source` names, if it names one: a local folder with `adapter_config.json`,
    /// or a hub repository listing it. `None` for an ordinary model.
    pub fn detect(hub: &Hub, source: &ModelSource) -> Result<Option<Self>> {
        if is_local_path(&source.repo_id) {
            let path = local_path(&source.repo_id);
            return match path.join(CONFIG_FILE).is_file() {
                true => Self::from_folder(&path).map(Some),
                false => Ok(None),
            };
        }
        let files = hub.list_files(source)?;
        if !files.iter().any(|file| file == CONFIG_FILE) {
            return Ok(None);
        }
        let config = hub.resolve_file(source, CONFIG_FILE)?;
        hub.resolve_file(source, WEIGHTS_FILE)?;
        if files.iter().any(|file| file == nstream_peft::BASE_RECORD_FILE) {
            hub.resolve_file(source, nstream_peft::BASE_RECORD_FILE)?;
        }
        let folder = config.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_folder(&folder).map(Some)
    }

    /// The base model's repository (or local folder): `base_model.json`'s, else the config's
    /// `base_model_name_or_path`.
    pub fn base_model(&self) -> Option<&str> {
        self.base_record
            .as_ref()
            .and_then(|record| record.repo_id.as_deref())
            .or(self.config.base_model_name_or_path.as_deref())
            .filter(|base| !base.is_empty())
    }

    /// Where the base comes from: its repository and revision, and for a GGUF base the file
    /// recorded with the adapter unless `model_file` (the BaseModel's `modelFile`) names one;
    /// `token` is the adapter's, for the base too.
    pub fn base_source(
        &self,
        model_file: Option<&str>,
        token: Option<nstream_hub::SecretToken>,
    ) -> Result<ModelSource> {
        let base = self.base_model().ok_or_else(|| Error::InvalidModel {
            file: self.folder.join(CONFIG_FILE).display().to_string(),
            message: "names no base model (no base_model_name_or_path, no base_model.json)".into(),
        })?;
        let mut source = ModelSource::new(base);
        let revision = self
            .base_record
            .as_ref()
            .and_then(|record| record.revision.clone())
            .or_else(|| self.config.revision.clone());
        if let Some(revision) = revision {
            source = source.with_revision(revision);
        }
        let file = model_file.or_else(|| self.base_record.as_ref().and_then(BaseRecord::gguf_file));
        if let Some(file) = file {
            source = source.with_file(file);
        }
        if let Some(token) = token {
            source = source.with_token(token);
        }
        Ok(source)
    }

    /// Reads the adapter's weights.
    pub fn read(&self) -> Result<nstream_peft::Adapter> {
        nstream_peft::Adapter::read(&self.folder).map_err(adapter_error)
    }
}

/// An adapter file that cannot be used, as this crate's error (the message names the file).
fn adapter_error(error: nstream_peft::Error) -> Error {
    match error {
        nstream_peft::Error::Io { path, cause } => Error::Io { path, cause },
        other => Error::InvalidModel { file: "LoRA adapter".into(), message: other.to_string() },
    }
}

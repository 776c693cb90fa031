//! Loading: through the hub, from a safetensors folder or files, or from a GGUF file; each ends
//! in [`LlmBackend::start`] with the model, its tokenizer and its chat template.

use std::path::Path;
use std::sync::Arc;

use nstream_hub::{Hub, ModelSource, WeightFormat};
use nstream_kernels::CpuLevel;

use super::adapters::{AdapterSource, is_local_path, local_path};
use super::device::thread_pool;
use super::{LlmBackend, LlmInfo, LlmOptions, SafetensorsFiles};
use crate::error::{Error, Result};
use crate::model::LlamaModel;
use crate::template::ChatTemplate;
use crate::tokenizer::LlmTokenizer;

impl LlmBackend {
    /// Resolves a model through the hub (from the environment: `HF_HOME`, `HF_HUB_OFFLINE`...),
    /// loads it (blocking: call it from `spawn_blocking` or before the runtime starts) and
    /// starts the scheduler thread. A repo with safetensors weights loads them with its
    /// `config.json` and `tokenizer.json`; `source.file` selects a GGUF instead (or among several).
    pub fn load(name: impl Into<String>, source: &ModelSource, options: LlmOptions) -> Result<Arc<Self>> {
        Self::load_with(name, &Hub::from_env(), source, options)
    }

    /// As [`LlmBackend::load`], with an explicit hub.
    ///
    /// `source.repo_id` may also be a local path (absolute, `./`, `../`, `~/`, or an existing
    /// directory): a checkpoint folder, a folder holding one `.gguf` (or the one `source.file`
    /// names), or a `.gguf` file. When it names a PEFT LoRA adapter (a folder or a hub repository
    /// with `adapter_config.json`), its base is loaded ([`AdapterSource::base_source`]: the GGUF
    /// file recorded with the adapter unless `source.file` names one) and every sequence runs
    /// with the adapter, applied at run time.
    pub fn load_with(
        name: impl Into<String>,
        hub: &Hub,
        source: &ModelSource,
        options: LlmOptions,
    ) -> Result<Arc<Self>> {
        let name = name.into();
        let Some(adapter) = AdapterSource::detect(hub, source)? else {
            return Ok(Self::load_base(name, hub, source, options)?.with_root(&source.repo_id));
        };
        let base_source = adapter.base_source(source.file.as_deref(), source.token.clone())?;
        if AdapterSource::detect(hub, &base_source)?.is_some() {
            return Err(Error::Unsupported(format!(
                "the base of adapter {} ({}) is itself an adapter",
                source.repo_id, base_source.repo_id
            )));
        }
        tracing::info!(model = %name, adapter = %adapter.folder.display(), base = %base_source.repo_id, file = ?base_source.file, "loading a LoRA adapter over its base");
        let base = Self::load_base(name.clone(), hub, &base_source, options)?;
        let lora = base.lora_adapter(name.clone(), &adapter.read()?)?;
        Ok(base.with_adapter(name, lora, None).with_root(&source.repo_id))
    }

    /// Loads a model that is not an adapter: through the hub, or from a local path.
    fn load_base(name: String, hub: &Hub, source: &ModelSource, options: LlmOptions) -> Result<Arc<Self>> {
        if is_local_path(&source.repo_id) {
            return Self::from_local_path(name, &local_path(&source.repo_id), source.file.as_deref(), options);
        }
        let resolved = hub.resolve_model(source)?;
        match (&resolved.format, resolved.weights.first()) {
            (WeightFormat::Gguf { .. }, Some(path)) => Self::from_gguf_file(name, path, options),
            (WeightFormat::Safetensors { .. } | WeightFormat::ShardedSafetensors { .. }, Some(_)) => {
                Self::from_safetensors(name, &SafetensorsFiles::from_resolved(&resolved)?, options)
            }
            (format, _) => Err(Error::Unsupported(format!(
                "{}: no loadable weights (found {format:?}); expected safetensors or a .gguf file",
                resolved.repo_id
            ))),
        }
    }

    /// Loads a local `.gguf` file, or a folder: the GGUF `file` names (or its only `.gguf`), else
    /// a Hugging Face checkpoint.
    pub fn from_local_path(name: String, path: &Path, file: Option<&str>, options: LlmOptions) -> Result<Arc<Self>> {
        if path.is_file() {
            return Self::from_gguf_file(name, path, options);
        }
        if !path.is_dir() {
            return Err(Error::InvalidModel {
                file: path.display().to_string(),
                message: "no such file or directory".into(),
            });
        }
        if let Some(file) = file {
            return Self::from_gguf_file(name, &path.join(file), options);
        }
        if path.join("config.json").is_file() {
            return Self::from_safetensors_dir(name, path, options);
        }
        let ggufs: Vec<_> = std::fs::read_dir(path)
            .map_err(|cause| Error::Io { path: path.display().to_string(), cause })?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|entry| entry.extension().is_some_and(|extension| extension == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [only] => Self::from_gguf_file(name, only, options),
            _ => Err(Error::InvalidModel {
                file: path.display().to_string(),
                message: format!(
                    "holds no config.json and {} .gguf files (expected a checkpoint folder or one .gguf; name one \
                     with modelFile)",
                    ggufs.len()
                ),
            }),
        }
    }

    /// Loads a Hugging Face checkpoint from a local folder (`config.json`, `model.safetensors` or
    /// the shards of `model.safetensors.index.json`, `tokenizer.json`, and when present
    /// `tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`).
    pub fn from_safetensors_dir(name: impl Into<String>, dir: &Path, options: LlmOptions) -> Result<Arc<Self>> {
        Self::from_safetensors(name, &SafetensorsFiles::from_dir(dir)?, options)
    }

    /// Loads a safetensors checkpoint and its tokenizer and starts the scheduler thread.
    pub fn from_safetensors(
        name: impl Into<String>,
        files: &SafetensorsFiles,
        options: LlmOptions,
    ) -> Result<Arc<Self>> {
        let name = name.into();
        let device = options.device.device()?;
        let pool = thread_pool(options.threads)?;
        let load = || LlamaModel::from_safetensors(&files.config, &files.weights, &device);
        let model = match &pool {
            Some(pool) => pool.install(load)?,
            None => load()?,
        };
        let (tokenizer, template, own_template) = files.tokenizer_and_template()?;
        let tokenizer = Arc::new(tokenizer);
        let weights = format!("{:?}", model.dtype()).to_lowercase();
        let info = LlmInfo::new(&model, &tokenizer, &options, own_template, weights);
        tracing::info!(model = %name, ?info, "loaded safetensors model");
        Ok(Self::start(name, model, tokenizer, template, info, &options, pool))
    }

    /// Loads a local GGUF file and starts the scheduler thread.
    pub fn from_gguf_file(name: impl Into<String>, path: &Path, options: LlmOptions) -> Result<Arc<Self>> {
        let name = name.into();
        let io_error = |cause| Error::Io { path: path.display().to_string(), cause };
        let mut file = std::fs::File::open(path).map_err(io_error)?;
        let content = crate::model::read_gguf(&mut file, &path.display().to_string())?;
        let device = options.device.device()?;
        let pool = thread_pool(options.threads)?;
        let mut load = || LlamaModel::from_gguf(&content, &mut file, &device, options.requantize);
        let model = match &pool {
            Some(pool) => pool.install(&mut load)?,
            None => load()?,
        };
        let tokenizer = Arc::new(LlmTokenizer::from_gguf(&content)?);
        let file_template = content.metadata.get("tokenizer.chat_template").and_then(|value| value.to_string().ok());
        let template = ChatTemplate::for_model(file_template.map(String::as_str), None, None, &tokenizer)?;
        let info = LlmInfo::new(&model, &tokenizer, &options, file_template.is_some(), "gguf".into());
        let kernels = if !options.device.is_cpu() {
            "cuda"
        } else {
            match nstream_kernels::cpu_level().map_err(|error| Error::Unsupported(error.to_string()))? {
                CpuLevel::Avx512Vnni => "nstream-kernels AVX-512 VNNI for Q4_0/Q4_1/Q8_0, candle for other formats",
                CpuLevel::Avx2 => "nstream-kernels AVX2 for Q4_0/Q4_1/Q8_0, candle for other formats",
                CpuLevel::Portable => "candle",
            }
        };
        tracing::info!(model = %name, ?info, requantize = ?options.requantize, kernels, "loaded GGUF model");
        Ok(Self::start(name, model, tokenizer, template, info, &options, pool))
    }
}

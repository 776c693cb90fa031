//! The base model as training needs it: every weight dense (f32 on the CPU) under its Hugging
//! Face name (`model.layers.0.self_attn.q_proj.weight`), the tokenizer, the chat template, and
//! where it came from.
//!
//! Safetensors checkpoints are read as stored (converted to the training dtype). GGUF files are
//! dequantised at load, and llama.cpp's Q/K row permutation (GGUF Llamas use interleaved RoPE
//! pairs) is undone, so that the weights, and therefore an adapter trained on them, are in the
//! Hugging Face layout that `peft` and the safetensors checkpoints use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use nstream_hub::{ResolvedModel, WeightFormat};
use nstream_llm::SafetensorsFiles;
use nstream_llm::model::LlamaConfig;
use nstream_llm::template::ChatTemplate;
use nstream_llm::tokenizer::LlmTokenizer;

use crate::error::{Error, Result};

/// Where the base model's weights came from, recorded with the adapter so that serving finds the
/// same base.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Provenance {
    /// The Hugging Face repository (`org/name`), when known.
    pub repo_id: Option<String>,
    /// The revision asked for (`main` when none).
    pub revision: Option<String>,
    /// `safetensors` or `gguf`.
    pub format: String,
    /// The weight files, relative to the repository (the GGUF file for a GGUF base).
    pub files: Vec<String>,
}

/// A base model loaded for training.
pub struct BaseModel {
    /// The hyper-parameters.
    pub config: LlamaConfig,
    /// Every weight under its Hugging Face name; no `lm_head.weight` when the embeddings are tied.
    pub weights: HashMap<String, Tensor>,
    /// The tokenizer.
    pub tokenizer: LlmTokenizer,
    /// The chat template (the model's own, else ChatML).
    pub template: ChatTemplate,
    /// Where the weights came from.
    pub provenance: Provenance,
    /// The `config.json` of a safetensors base (copied beside merged or fully fine-tuned weights).
    pub hf_config: Option<serde_json::Value>,
    /// The tokenizer files of a safetensors base (copied beside merged weights).
    pub tokenizer_files: Vec<PathBuf>,
}

impl std::fmt::Debug for BaseModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BaseModel")
            .field("config", &self.config)
            .field("provenance", &self.provenance)
            .finish_non_exhaustive()
    }
}

impl BaseModel {
    /// Whether the output head shares the embedding matrix.
    pub fn tied_embeddings(&self) -> bool {
        !self.weights.contains_key("lm_head.weight")
    }

    /// Loads what the hub resolved (safetensors or GGUF) onto `device` in `dtype`.
    pub fn load(resolved: &ResolvedModel, revision: Option<&str>, device: &Device, dtype: DType) -> Result<Self> {
        let relative =
            |path: &Path| path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let mut model = match (&resolved.format, resolved.weights.first()) {
            (WeightFormat::Gguf { file }, Some(path)) => {
                let mut model = Self::from_gguf(path, device, dtype)?;
                model.provenance.files = vec![file.clone()];
                model
            }
            (WeightFormat::Safetensors { .. } | WeightFormat::ShardedSafetensors { .. }, Some(_)) => {
                let files = SafetensorsFiles::from_resolved(resolved)?;
                let mut model = Self::from_safetensors(&files, device, dtype)?;
                model.provenance.files = resolved.weights.iter().map(|path| relative(path)).collect();
                model
            }
            (format, _) => {
                return Err(Error::Model(nstream_llm::Error::Unsupported(format!(
                    "{}: no loadable weights (found {format:?}); expected safetensors or a .gguf file",
                    resolved.repo_id
                ))));
            }
        };
        model.provenance.repo_id = Some(resolved.repo_id.clone());
        model.provenance.revision = revision.map(str::to_owned);
        Ok(model)
    }

    /// Loads a local Hugging Face checkpoint folder (`config.json`, safetensors, `tokenizer.json`...).
    pub fn from_safetensors_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let files = SafetensorsFiles::from_dir(dir)?;
        let mut model = Self::from_safetensors(&files, device, dtype)?;
        model.provenance.files = files
            .weights
            .iter()
            .filter_map(|path| path.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        Ok(model)
    }

    /// Loads a safetensors checkpoint.
    pub fn from_safetensors(files: &SafetensorsFiles, device: &Device, dtype: DType) -> Result<Self> {
        let config_file = files.config.display().to_string();
        let text = std::fs::read_to_string(&files.config).map_err(|cause| Error::io(&files.config, cause))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|error| invalid_model(&config_file, format!("not valid JSON: {error}")))?;
        let config = LlamaConfig::from_hf_config(&json, &config_file)?;
        let mut weights = HashMap::new();
        for path in &files.weights {
            let file = path.display().to_string();
            let tensors = candle_core::safetensors::load(path, device)
                .map_err(|error| invalid_model(&file, format!("not a safetensors file: {error}")))?;
            for (name, tensor) in tensors {
                if name.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                // Some checkpoints store the decoder without the `model.` prefix.
                let name =
                    if name.starts_with("model.") || name == "lm_head.weight" { name } else { format!("model.{name}") };
                weights.insert(name, tensor.to_dtype(dtype)?);
            }
        }
        check_shapes(&config, &weights, &config_file)?;
        let (tokenizer, template, _) = files.tokenizer_and_template()?;
        let tokenizer_files = [
            Some(&files.tokenizer),
            files.tokenizer_config.as_ref(),
            files.generation_config.as_ref(),
            files.chat_template.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        Ok(Self {
            config,
            weights,
            tokenizer,
            template,
            provenance: Provenance { format: "safetensors".into(), ..Provenance::default() },
            hf_config: Some(json),
            tokenizer_files,
        })
    }

    /// Loads a GGUF file, dequantising every weight and undoing llama.cpp's Q/K permutation.
    pub fn from_gguf(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let file_name = path.display().to_string();
        let mut file = std::fs::File::open(path).map_err(|cause| Error::io(path, cause))?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|error| invalid_model(&file_name, error.to_string()))?;
        let mut config = LlamaConfig::from_gguf(&content)?;
        let mut load = |name: &str| -> Result<Tensor> {
            let tensor = content
                .tensor(&mut file, name, device)
                .map_err(|error| invalid_model(&file_name, format!("tensor `{name}`: {error}")))?;
            Ok(tensor.dequantize(device)?.to_dtype(dtype)?)
        };
        let mut weights = HashMap::new();
        weights.insert("model.embed_tokens.weight".to_owned(), load("token_embd.weight")?);
        weights.insert("model.norm.weight".to_owned(), load("output_norm.weight")?);
        if content.tensor_infos.contains_key("output.weight") {
            weights.insert("lm_head.weight".to_owned(), load("output.weight")?);
        }
        let permuted = !config.rope_is_neox;
        for layer in 0..config.layers {
            let gguf = |part: &str| format!("blk.{layer}.{part}");
            let hf = |part: &str| format!("model.layers.{layer}.{part}");
            for (from, to) in [
                ("attn_q", "self_attn.q_proj"),
                ("attn_k", "self_attn.k_proj"),
                ("attn_v", "self_attn.v_proj"),
                ("attn_output", "self_attn.o_proj"),
                ("ffn_gate", "mlp.gate_proj"),
                ("ffn_up", "mlp.up_proj"),
                ("ffn_down", "mlp.down_proj"),
            ] {
                let mut weight = load(&gguf(&format!("{from}.weight")))?;
                let mut bias = match content.tensor_infos.contains_key(&gguf(&format!("{from}.bias"))) {
                    true => Some(load(&gguf(&format!("{from}.bias")))?),
                    false => None,
                };
                let heads = match from {
                    "attn_q" => Some(config.heads),
                    "attn_k" => Some(config.kv_heads),
                    _ => None,
                };
                if let (true, Some(heads)) = (permuted, heads) {
                    weight = unpermute_rows(&weight, heads)?;
                    bias = bias.map(|bias| unpermute_rows(&bias, heads)).transpose()?;
                }
                weights.insert(hf(&format!("{to}.weight")), weight);
                if let Some(bias) = bias {
                    weights.insert(hf(&format!("{to}.bias")), bias);
                }
            }
            weights.insert(hf("input_layernorm.weight"), load(&gguf("attn_norm.weight"))?);
            weights.insert(hf("post_attention_layernorm.weight"), load(&gguf("ffn_norm.weight"))?);
        }
        // The rows are now in the Hugging Face order: RoPE pairs (i, i + d/2).
        config.rope_is_neox = true;
        check_shapes(&config, &weights, &file_name)?;
        let tokenizer = LlmTokenizer::from_gguf(&content)?;
        let source = content.metadata.get("tokenizer.chat_template").and_then(|value| value.to_string().ok());
        let template = ChatTemplate::for_model(source.map(String::as_str), None, None, &tokenizer)?;
        Ok(Self {
            config,
            weights,
            tokenizer,
            template,
            provenance: Provenance { format: "gguf".into(), ..Provenance::default() },
            hf_config: None,
            tokenizer_files: Vec::new(),
        })
    }
}

/// Undoes llama.cpp's `permute` of Q/K rows (`reshape(heads, 2, d/2, ..).swapaxes(1, 2)`): the
/// GGUF rows of a head are in the order `(pair, half)`, Hugging Face's `(half, pair)`.
pub fn unpermute_rows(weight: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = weight.dims().to_vec();
    let rows = dims[0];
    let columns: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    if half * 2 * heads != rows {
        return Err(Error::Tensor(format!("{rows} rows are not {heads} heads of even width")));
    }
    let unpermuted = weight.reshape((heads, half, 2, columns))?.transpose(1, 2)?.contiguous()?.reshape(dims)?;
    Ok(unpermuted)
}

fn invalid_model(file: &str, message: impl Into<String>) -> Error {
    Error::Model(nstream_llm::Error::InvalidModel { file: file.to_owned(), message: message.into() })
}

/// Checks that every tensor the Llama layout needs is there with its shape.
fn check_shapes(config: &LlamaConfig, weights: &HashMap<String, Tensor>, file: &str) -> Result<()> {
    let hidden = config.hidden_size;
    let q = config.heads * config.head_dim;
    let kv = config.kv_heads * config.head_dim;
    let intermediate = weights
        .get("model.layers.0.mlp.gate_proj.weight")
        .map(|tensor| tensor.dims()[0])
        .ok_or_else(|| invalid_model(file, "tensor `model.layers.0.mlp.gate_proj.weight` is missing"))?;
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![config.vocab_size, hidden]),
        ("model.norm.weight".into(), vec![hidden]),
    ];
    if weights.contains_key("lm_head.weight") {
        expected.push(("lm_head.weight".into(), vec![config.vocab_size, hidden]));
    }
    for layer in 0..config.layers {
        let name = |part: &str| format!("model.layers.{layer}.{part}");
        expected.extend([
            (name("self_attn.q_proj.weight"), vec![q, hidden]),
            (name("self_attn.k_proj.weight"), vec![kv, hidden]),
            (name("self_attn.v_proj.weight"), vec![kv, hidden]),
            (name("self_attn.o_proj.weight"), vec![hidden, q]),
            (name("mlp.gate_proj.weight"), vec![intermediate, hidden]),
            (name("mlp.up_proj.weight"), vec![intermediate, hidden]),
            (name("mlp.down_proj.weight"), vec![hidden, intermediate]),
            (name("input_layernorm.weight"), vec![hidden]),
            (name("post_attention_layernorm.weight"), vec![hidden]),
        ]);
        for (part, width) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            let bias = name(&format!("self_attn.{part}.bias"));
            if weights.contains_key(&bias) {
                expected.push((bias, vec![width]));
            }
        }
    }
    for (name, shape) in expected {
        match weights.get(&name) {
            None => return Err(invalid_model(file, format!("tensor `{name}` is missing"))),
            Some(tensor) if tensor.dims() != shape.as_slice() => {
                return Err(invalid_model(
                    file,
                    format!("tensor `{name}` has shape {:?}, expected {shape:?}", tensor.dims()),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

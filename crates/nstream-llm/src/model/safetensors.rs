//! Loading a Hugging Face Llama-layout checkpoint: `config.json` and safetensors (one file or
//! every shard), unquantised.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use super::config::hf_invalid;
use super::weights::{Layer, Linear, Projections, Weight};
use super::{LlamaConfig, LlamaModel, precompute_rope};
use crate::error::{Error, Result};

/// The tensors of a safetensors checkpoint (one file or every shard), converted to one dtype.
struct SafetensorsWeights {
    tensors: std::collections::HashMap<String, Tensor>,
    /// Where a tensor came from, for errors.
    files: std::collections::HashMap<String, String>,
    prefix: &'static str,
    first_file: String,
}

impl SafetensorsWeights {
    /// Reads every file (one at a time, so the peak is the model plus one file's bytes) and
    /// converts each tensor to `dtype` on `device`; `None` keeps the embedding's dtype (f32 when
    /// it is not a float type).
    fn read(paths: &[std::path::PathBuf], device: &Device, dtype: Option<DType>) -> Result<(Self, DType)> {
        let mut tensors = std::collections::HashMap::new();
        let mut files = std::collections::HashMap::new();
        let mut dtype = dtype;
        for path in paths {
            let file = path.display().to_string();
            let bytes = std::fs::read(path).map_err(|cause| Error::Io { path: file.clone(), cause })?;
            let slice = candle_core::safetensors::SliceSafetensors::new(&bytes)
                .map_err(|error| hf_invalid(&file, format!("not a safetensors file: {error}")))?;
            let mut views = slice.tensors();
            views.sort_by(|a, b| a.0.cmp(&b.0));
            // The embedding decides the dtype when the caller keeps the checkpoint's.
            if dtype.is_none()
                && let Some((_, view)) = views.iter().find(|(name, _)| name.ends_with("embed_tokens.weight"))
            {
                dtype = Some(match DType::try_from(view.dtype()) {
                    Ok(stored @ (DType::BF16 | DType::F16)) => stored,
                    _ => DType::F32,
                });
            }
            for (name, _) in views {
                let tensor = slice
                    .load(&name, device)
                    .map_err(|error| hf_invalid(&file, format!("tensor `{name}`: {error}")))?;
                let target = dtype.unwrap_or(DType::F32);
                let tensor = if tensor.dtype() == target { tensor } else { tensor.to_dtype(target)? };
                files.insert(name.clone(), file.clone());
                tensors.insert(name, tensor);
            }
        }
        let first_file = paths.first().map(|path| path.display().to_string()).unwrap_or_default();
        let prefix =
            if tensors.contains_key("model.embed_tokens.weight") || !tensors.contains_key("embed_tokens.weight") {
                "model."
            } else {
                ""
            };
        Ok((Self { tensors, files, prefix, first_file }, dtype.unwrap_or(DType::F32)))
    }

    fn file_of(&self, name: &str) -> &str {
        self.files.get(name).map_or(self.first_file.as_str(), String::as_str)
    }

    /// Takes a tensor and checks its shape.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.take_optional(name, shape)?
            .ok_or_else(|| hf_invalid(&self.first_file, format!("tensor `{name}` is missing from the checkpoint")))
    }

    fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(tensor) = self.tensors.remove(name) else {
            return Ok(None);
        };
        if tensor.dims() != shape {
            return Err(hf_invalid(
                self.file_of(name),
                format!("tensor `{name}` has shape {:?}, expected {shape:?}", tensor.dims()),
            ));
        }
        Ok(Some(tensor))
    }

    /// A projection `prefix.weight` of shape `(out, in)` with its bias when the checkpoint has one.
    fn linear(&mut self, prefix: &str, out: usize, input: usize) -> Result<Linear> {
        let weight = self.take(&format!("{prefix}.weight"), &[out, input])?;
        let bias = self.take_optional(&format!("{prefix}.bias"), &[out])?;
        Ok(Linear { weight: Weight::Candle(QMatMul::Tensor(weight)), bias })
    }
}

impl LlamaModel {
    /// Loads a Hugging Face Llama-layout checkpoint: `config.json` and the safetensors files (one,
    /// or every shard). Weights are kept unquantised (`QMatMul::Tensor`); on CPU they are converted
    /// to f32 (candle's CPU matmuls are fastest and exact there), on CUDA the checkpoint's dtype
    /// (f32, f16 or bf16) is kept. Q/K are used as stored: Hugging Face weights are not permuted
    /// for interleaved RoPE as llama.cpp's GGUF ones are, so NeoX-style RoPE applies.
    pub fn from_safetensors(
        config_path: &std::path::Path,
        weights: &[std::path::PathBuf],
        device: &Device,
    ) -> Result<Self> {
        let config_file = config_path.display().to_string();
        let text =
            std::fs::read_to_string(config_path).map_err(|cause| Error::Io { path: config_file.clone(), cause })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|error| hf_invalid(&config_file, format!("not valid JSON: {error}")))?;
        let config = LlamaConfig::from_hf_config(&json, &config_file)?;
        if weights.is_empty() {
            return Err(hf_invalid(&config_file, "no safetensors weight file"));
        }
        let requested = if device.is_cpu() { Some(DType::F32) } else { None };
        let (mut weights, dtype) = SafetensorsWeights::read(weights, device, requested)?;
        let prefix = weights.prefix;
        let hidden = config.hidden_size;
        let q_size = config.heads * config.head_dim;
        let kv_size = config.kv_heads * config.head_dim;
        let embeddings = weights.take(&format!("{prefix}embed_tokens.weight"), &[config.vocab_size, hidden])?;
        let norm = weights.take(&format!("{prefix}norm.weight"), &[hidden])?;
        let output = match weights.take_optional("lm_head.weight", &[config.vocab_size, hidden])? {
            Some(head) => Weight::Candle(QMatMul::Tensor(head)),
            // Tied embeddings (`tie_word_embeddings`): the checkpoint stores no head.
            None => Weight::Candle(QMatMul::Tensor(embeddings.clone())),
        };
        let intermediate = weights
            .tensors
            .get(&format!("{prefix}layers.0.mlp.gate_proj.weight"))
            .map(|tensor| tensor.dims()[0])
            .ok_or_else(|| {
                hf_invalid(&weights.first_file, format!("tensor `{prefix}layers.0.mlp.gate_proj.weight` is missing"))
            })?;
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("{prefix}layers.{index}.{part}");
            layers.push(Layer {
                attention_qkv: {
                    let parts = vec![
                        weights.linear(&name("self_attn.q_proj"), q_size, hidden)?,
                        weights.linear(&name("self_attn.k_proj"), kv_size, hidden)?,
                        weights.linear(&name("self_attn.v_proj"), kv_size, hidden)?,
                    ];
                    // On CUDA the split outputs would each need a copy before RoPE: as many
                    // launches as three products, so only the CPU (where a product is a
                    // thread-pool dispatch) stacks them.
                    if device.is_cpu() { Projections::fuse_tensors(parts)? } else { Projections::Separate(parts) }
                },
                attention_output: weights.linear(&name("self_attn.o_proj"), hidden, q_size)?,
                attention_norm: weights.take(&name("input_layernorm.weight"), &[hidden])?,
                ffn_gate_up: Projections::fuse_tensors(vec![
                    weights.linear(&name("mlp.gate_proj"), intermediate, hidden)?,
                    weights.linear(&name("mlp.up_proj"), intermediate, hidden)?,
                ])?,
                ffn_down: weights.linear(&name("mlp.down_proj"), hidden, intermediate)?,
                ffn_norm: weights.take(&name("post_attention_layernorm.weight"), &[hidden])?,
            });
        }
        let unused: Vec<&String> =
            weights.tensors.keys().filter(|name| !name.ends_with("rotary_emb.inv_freq")).collect();
        if !unused.is_empty() {
            let example = unused[0];
            tracing::warn!(count = unused.len(), %example, "checkpoint tensors not used by the Llama layout");
        }
        let (cos, sin) = precompute_rope(&config, device, dtype)?;
        Ok(Self::assemble(config, intermediate, embeddings, layers, norm, output, (cos, sin), device, dtype))
    }
}

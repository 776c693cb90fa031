//! The hyper-parameters of a Llama-family model, read from GGUF metadata or a Hugging Face
//! `config.json`, and RoPE frequency scaling.

use candle_core::quantized::gguf_file;

use super::MAX_CONTEXT;
use crate::error::{Error, Result};

/// The hyper-parameters of a Llama-family GGUF.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture` (`llama`, `mistral`, `qwen2`...).
    pub architecture: String,
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// `hidden_size / heads`.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// The context served: the file's `context_length` capped at [`MAX_CONTEXT`].
    pub context_length: usize,
    /// RoPE pairs `(i, i + d/2)` (NeoX) instead of `(2i, 2i + 1)` (GGUF Llama after llama.cpp's
    /// weight permutation). Hugging Face checkpoints are never permuted, so they always use NeoX
    /// pairs (transformers' `rotate_half`).
    pub rope_is_neox: bool,
    /// How the RoPE frequencies are scaled (Hugging Face `rope_scaling`; none for GGUF).
    pub rope_scaling: RopeScaling,
}

/// RoPE frequency scaling, as Hugging Face configs describe it (`rope_scaling` or, since
/// transformers 5, `rope_parameters`).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: default`).
    #[default]
    None,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling (`rope_type: llama3`).
    Llama3 {
        /// Scale of the low frequencies.
        factor: f32,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f32,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: f32,
    },
}

impl RopeScaling {
    /// The inverse frequencies after scaling (transformers' `_compute_*_parameters`).
    pub(super) fn apply(&self, inverse_frequencies: &mut [f32]) {
        match *self {
            Self::None => {}
            Self::Linear { factor } => inverse_frequencies.iter_mut().for_each(|frequency| *frequency /= factor),
            Self::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: original } => {
                let low_freq_wavelen = original / low_freq_factor;
                let high_freq_wavelen = original / high_freq_factor;
                for frequency in inverse_frequencies.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *frequency;
                    if wavelen < high_freq_wavelen {
                        continue;
                    }
                    if wavelen > low_freq_wavelen {
                        *frequency /= factor;
                    } else {
                        let smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *frequency = (1.0 - smooth) * *frequency / factor + smooth * *frequency;
                    }
                }
            }
        }
    }
}

fn metadata<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| Error::InvalidModel { file: "gguf".into(), message: format!("metadata key `{key}` is missing") })
}

fn metadata_usize(content: &gguf_file::Content, key: &str) -> Result<usize> {
    let value = metadata(content, key)?;
    let number = value.to_u32().map(u64::from).or_else(|_| value.to_u64()).map_err(|error| Error::InvalidModel {
        file: "gguf".into(),
        message: format!("metadata key `{key}` is not an integer: {error}"),
    })?;
    usize::try_from(number)
        .map_err(|_| Error::InvalidModel { file: "gguf".into(), message: format!("`{key}` is too large") })
}

impl LlamaConfig {
    /// Reads the hyper-parameters from GGUF metadata (`<arch>.block_count` and friends).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let architecture = metadata(content, "general.architecture")?
            .to_string()
            .map_err(|error| Error::InvalidModel { file: "gguf".into(), message: error.to_string() })?
            .clone();
        if !matches!(architecture.as_str(), "llama" | "mistral" | "qwen2" | "granite" | "smollm3") {
            tracing::warn!(%architecture, "not a known Llama-family architecture; trying the Llama layout");
        }
        if content.metadata.contains_key(&format!("{architecture}.expert_count")) {
            return Err(Error::Unsupported("mixture-of-experts GGUF models".into()));
        }
        let key = |name: &str| format!("{architecture}.{name}");
        let heads = metadata_usize(content, &key("attention.head_count"))?;
        let kv_heads = metadata_usize(content, &key("attention.head_count_kv")).unwrap_or(heads);
        let hidden_size = metadata_usize(content, &key("embedding_length"))?;
        let layers = metadata_usize(content, &key("block_count"))?;
        let context_length = metadata_usize(content, &key("context_length")).unwrap_or(MAX_CONTEXT).min(MAX_CONTEXT);
        let rms_norm_eps = metadata(content, &key("attention.layer_norm_rms_epsilon"))
            .and_then(|value| value.to_f32().map_err(|error| Error::Inference(error.to_string())))
            .map(f64::from)
            .unwrap_or(1e-5);
        let rope_theta = metadata(content, &key("rope.freq_base"))
            .and_then(|value| value.to_f32().map_err(|error| Error::Inference(error.to_string())))
            .unwrap_or(10_000.0);
        if heads == 0 || kv_heads == 0 || hidden_size % heads != 0 || heads % kv_heads != 0 || layers == 0 {
            return Err(Error::InvalidModel {
                file: "gguf".into(),
                message: format!("inconsistent shape: {heads} heads, {kv_heads} kv heads, hidden {hidden_size}"),
            });
        }
        let head_dim = hidden_size / heads;
        if let Ok(rope_dim) = metadata_usize(content, &key("rope.dimension_count"))
            && rope_dim != head_dim
        {
            return Err(Error::Unsupported(format!("partial RoPE ({rope_dim} of {head_dim} dimensions)")));
        }
        // Each block is several tensors: a count beyond the file's tensors is corrupt metadata,
        // refused before anything is sized by it.
        if layers > content.tensor_infos.len() {
            return Err(Error::InvalidModel {
                file: "gguf".into(),
                message: format!(
                    "`{}` is {layers}, but the file holds only {} tensors (each block has several)",
                    key("block_count"),
                    content.tensor_infos.len()
                ),
            });
        }
        let embeddings = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::InvalidModel { file: "gguf".into(), message: "no token_embd.weight".into() })?;
        let (vocab_size, width) = match embeddings.shape.dims() {
            [vocab_size, width] => (*vocab_size, *width),
            dims => {
                return Err(Error::InvalidModel {
                    file: "gguf".into(),
                    message: format!("tensor `token_embd.weight` has shape {dims:?} (expected [vocabulary, width])"),
                });
            }
        };
        if width != hidden_size {
            return Err(Error::InvalidModel {
                file: "gguf".into(),
                message: format!(
                    "`{}` is {hidden_size}, but tensor `token_embd.weight` is {width} wide",
                    key("embedding_length")
                ),
            });
        }
        // llama.cpp's rule (llama_model_rope_type): these use NeoX pairs, Llama-like ones do not.
        let rope_is_neox = matches!(architecture.as_str(), "qwen" | "qwen2" | "qwen3" | "phi3" | "stablelm" | "olmo2");
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            layers,
            heads,
            kv_heads,
            head_dim,
            rope_theta,
            rms_norm_eps,
            context_length,
            rope_is_neox,
            rope_scaling: RopeScaling::None,
        })
    }
}

/// The Hugging Face `model_type`s whose checkpoints have the Llama layout served here.
const HF_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

pub(super) fn hf_invalid(file: &str, message: impl Into<String>) -> Error {
    Error::InvalidModel { file: file.to_owned(), message: message.into() }
}

fn hf_usize(config: &serde_json::Value, file: &str, key: &str) -> Result<Option<usize>> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .and_then(|number| usize::try_from(number).ok())
            .map(Some)
            .ok_or_else(|| hf_invalid(file, format!("`{key}` is not a non-negative integer: {value}"))),
    }
}

fn hf_f64(config: &serde_json::Value, file: &str, key: &str) -> Result<Option<f64>> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => {
            value.as_f64().map(Some).ok_or_else(|| hf_invalid(file, format!("`{key}` is not a number: {value}")))
        }
    }
}

fn hf_rope_scaling(config: &serde_json::Value, file: &str) -> Result<RopeScaling> {
    // transformers 5 writes `rope_parameters` (with `rope_theta` inside); older ones `rope_scaling`.
    let Some(scaling) =
        ["rope_scaling", "rope_parameters"].iter().find_map(|key| config.get(*key).filter(|value| value.is_object()))
    else {
        return Ok(RopeScaling::None);
    };
    let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|value| value.as_str());
    let number = |key: &str| -> Result<f32> {
        hf_f64(scaling, file, key)?
            .map(|value| value as f32)
            .ok_or_else(|| hf_invalid(file, format!("rope scaling `{}` needs `{key}`", kind.unwrap_or("?"))))
    };
    match kind {
        None | Some("default") => Ok(RopeScaling::None),
        Some("linear") => Ok(RopeScaling::Linear { factor: number("factor")? }),
        Some("llama3") => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        }),
        Some(other) => {
            Err(Error::Unsupported(format!("{file}: RoPE scaling `{other}` (supported: default, linear, llama3)")))
        }
    }
}

impl LlamaConfig {
    /// Reads the hyper-parameters from a Hugging Face `config.json` (`model_type` llama, mistral
    /// or qwen2). `file` names the file in errors. The context served is
    /// `max_position_embeddings`, capped at [`MAX_CONTEXT`] and at Mistral's `sliding_window`
    /// (within the window, sliding-window attention is full attention).
    pub fn from_hf_config(config: &serde_json::Value, file: &str) -> Result<Self> {
        let model_type = config.get("model_type").and_then(|value| value.as_str()).unwrap_or_default().to_owned();
        if !HF_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(Error::Unsupported(format!(
                "{file}: model_type {model_type:?} (safetensors checkpoints load for {})",
                HF_MODEL_TYPES.join(", ")
            )));
        }
        let activation = config.get("hidden_act").and_then(|value| value.as_str()).unwrap_or("silu");
        if activation != "silu" {
            return Err(Error::Unsupported(format!("{file}: hidden_act {activation:?} (only silu)")));
        }
        let required = |key: &str| -> Result<usize> {
            hf_usize(config, file, key)?.ok_or_else(|| hf_invalid(file, format!("`{key}` is missing")))
        };
        let hidden_size = required("hidden_size")?;
        let layers = required("num_hidden_layers")?;
        let heads = required("num_attention_heads")?;
        let vocab_size = required("vocab_size")?;
        let kv_heads = hf_usize(config, file, "num_key_value_heads")?.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || layers == 0 || hidden_size == 0 {
            return Err(hf_invalid(
                file,
                format!(
                    "inconsistent shape: {heads} heads, {kv_heads} kv heads, {layers} layers, hidden {hidden_size}"
                ),
            ));
        }
        let head_dim = match hf_usize(config, file, "head_dim")? {
            Some(head_dim) => head_dim,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(hf_invalid(file, format!("hidden_size {hidden_size} is not a multiple of {heads} heads")));
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(hf_invalid(file, format!("head_dim {head_dim} must be even")));
        }
        if let Some(factor) = hf_f64(config, file, "partial_rotary_factor")?
            && factor != 1.0
        {
            return Err(Error::Unsupported(format!("{file}: partial RoPE (partial_rotary_factor {factor})")));
        }
        let rope_theta = match hf_f64(config, file, "rope_theta")? {
            Some(theta) => theta,
            None => match config.get("rope_parameters") {
                Some(parameters) => hf_f64(parameters, file, "rope_theta")?.unwrap_or(10_000.0),
                None => 10_000.0,
            },
        } as f32;
        let rms_norm_eps = hf_f64(config, file, "rms_norm_eps")?.unwrap_or(1e-6);
        let mut context_length = hf_usize(config, file, "max_position_embeddings")?.unwrap_or(MAX_CONTEXT);
        let sliding = match model_type.as_str() {
            "qwen2" => config.get("use_sliding_window").and_then(|value| value.as_bool()).unwrap_or(false),
            _ => true,
        };
        if sliding && let Some(window) = hf_usize(config, file, "sliding_window")? {
            context_length = context_length.min(window);
        }
        Ok(Self {
            architecture: model_type,
            vocab_size,
            hidden_size,
            layers,
            heads,
            kv_heads,
            head_dim,
            rope_theta,
            rms_norm_eps,
            context_length: context_length.clamp(1, MAX_CONTEXT),
            rope_is_neox: true,
            rope_scaling: hf_rope_scaling(config, file)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_scaling_matches_transformers() {
        // transformers 5.24 `ROPE_INIT_FUNCTIONS["llama3"]`, head_dim 32, theta 500000, factor 8,
        // low/high frequency factors 1/4, original context 8192.
        let expected = [
            1.0,
            0.440_366_6,
            0.193_922_76,
            0.085_397_1,
            0.037_606_03,
            0.016_560_44,
            0.007_292_665,
            0.003_211_446,
            0.000_524_846,
            7.784_655e-5,
            3.428_102_4e-5,
            1.509_621_8e-5,
            6.647_869_7e-6,
            2.927_499_7e-6,
            1.289_173_2e-6,
            5.677_088e-7,
        ];
        let mut frequencies: Vec<f32> = (0..32).step_by(2).map(|i| 1.0 / 500_000f32.powf(i as f32 / 32.0)).collect();
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        scaling.apply(&mut frequencies);
        for (ours, theirs) in frequencies.iter().zip(expected) {
            assert!((ours - theirs).abs() <= theirs * 1e-5, "{ours} vs {theirs}");
        }
    }
}

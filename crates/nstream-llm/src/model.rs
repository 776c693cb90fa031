//! A Llama-family decoder over quantised GGUF weights, with per-sequence KV caches and positions.
//!
//! Forked from candle-transformers 0.11.1 `models/quantized_llama.rs` (Apache-2.0/MIT) and cut
//! down to what continuous batching needs:
//!
//! - the weights ([`LlamaModel`]) hold no mutable state, so one model serves many sequences;
//! - each sequence owns a [`SequenceCache`]: preallocated K/V tensors per layer that grow by
//!   doubling (never `Tensor::cat` per token) and its own position;
//! - [`LlamaModel::forward`] runs one step for several sequences at once: every projection and
//!   MLP is one matrix product over all the step's rows (prefill chunks and single decode tokens
//!   mixed), RoPE takes a position per row, and attention runs per sequence against its cache;
//! - grouped-query attention reshapes the queries instead of repeating K/V;
//! - at load, weights whose CPU kernels are scalar (Q4_1 and others) can be re-quantised to a
//!   format with SIMD kernels ([`Requantize`]).
//!
//! Mixture-of-experts and the old GGML format of the original are left out.

use std::io::{Read, Seek};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};

use crate::error::{Error, Result};

/// The longest context this implementation serves, whatever the GGUF says (the RoPE tables are
/// precomputed up to it, as in candle's quantized llama).
pub const MAX_CONTEXT: usize = 4096;

/// What to do at load with weights whose CPU matrix-product kernel is slow.
///
/// candle's CPU path for Q4_1 (and the other non-K 4/5-bit formats) is scalar, while Q8_0 and
/// Q4_0 have SIMD dot products. Re-quantising costs a little accuracy for Q4_0 and a little
/// memory for Q8_0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Requantize {
    /// Keep every weight as stored in the file.
    Keep,
    /// Re-quantise Q4_1, Q5_0 and Q5_1 weights to Q8_0 (the CPU default: fastest here, and
    /// the most faithful since Q8_0 represents a 4/5-bit block almost exactly).
    #[default]
    Q8_0,
    /// Re-quantise Q4_1, Q5_0 and Q5_1 weights to Q4_0 (least memory).
    Q4_0,
}

impl Requantize {
    fn target(self, stored: GgmlDType) -> Option<GgmlDType> {
        let slow = matches!(stored, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
        match self {
            Self::Keep => None,
            Self::Q8_0 if slow => Some(GgmlDType::Q8_0),
            Self::Q4_0 if slow => Some(GgmlDType::Q4_0),
            _ => None,
        }
    }
}

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
    /// weight permutation).
    pub rope_is_neox: bool,
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
        let vocab_size = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|info| info.shape.dims()[0])
            .ok_or_else(|| Error::InvalidModel { file: "gguf".into(), message: "no token_embd.weight".into() })?;
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
        })
    }
}

struct Layer {
    attention_q: QMatMul,
    attention_k: QMatMul,
    attention_v: QMatMul,
    attention_output: QMatMul,
    attention_norm: Tensor,
    ffn_gate: QMatMul,
    ffn_up: QMatMul,
    ffn_down: QMatMul,
    ffn_norm: Tensor,
}

/// The weights of a Llama-family model: immutable, shared by every sequence.
pub struct LlamaModel {
    config: LlamaConfig,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("LlamaModel").field("config", &self.config).finish_non_exhaustive()
    }
}

/// One sequence's attention memory: per layer, K and V of shape `(kv_heads, capacity, head_dim)`.
///
/// Allocated for a first stretch and doubled when full, up to the sequence's own limit (prompt
/// plus `max_tokens`), so a short answer never pays for the whole context.
pub struct SequenceCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
    limit: usize,
}

impl SequenceCache {
    /// Tokens stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the cache holds without growing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The most tokens this sequence may ever hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn reserve(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        if needed > self.limit {
            return Err(Error::Inference(format!("sequence cache overflow: {needed} > {}", self.limit)));
        }
        let capacity = needed.max(self.capacity.saturating_mul(2)).min(self.limit);
        for tensors in [&mut self.keys, &mut self.values] {
            for tensor in tensors.iter_mut() {
                let (heads, _, head_dim) = tensor.dims3()?;
                let grown = Tensor::zeros((heads, capacity, head_dim), tensor.dtype(), tensor.device())?;
                if self.len > 0 {
                    grown.slice_set(&tensor.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                *tensor = grown;
            }
        }
        self.capacity = capacity;
        Ok(())
    }
}

/// One sequence's part of a [`LlamaModel::forward`] step: the new tokens and its cache.
pub struct StepInput<'a> {
    /// Tokens to append: a prompt chunk, or the last sampled token.
    pub tokens: &'a [u32],
    /// The sequence's cache; its length is the position of `tokens[0]`.
    pub cache: &'a mut SequenceCache,
}

fn precompute_rope(config: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..config.head_dim)
        .step_by(2)
        .map(|index| 1.0 / config.rope_theta.powf(index as f32 / config.head_dim as f32))
        .collect();
    let half = theta.len();
    let theta = Tensor::from_vec(theta, (1, half), device)?;
    let positions =
        Tensor::arange(0u32, MAX_CONTEXT as u32, device)?.to_dtype(DType::F32)?.reshape((MAX_CONTEXT, 1))?;
    let angles = positions.matmul(&theta)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl LlamaModel {
    /// Loads the weights of a Llama-family GGUF onto `device`, re-quantising slow formats as
    /// `requantize` says (only on CPU: the CUDA kernels are fast for every format).
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        requantize: Requantize,
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(content)?;
        let requantize = if device.is_cpu() { requantize } else { Requantize::Keep };
        let embeddings_q = load_tensor(content, reader, device, "token_embd.weight")?;
        let embeddings = embeddings_q.dequantize(device)?;
        let norm = load_tensor(content, reader, device, "output_norm.weight")?.dequantize(device)?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            load_matmul(content, reader, device, requantize, "output.weight")?
        } else {
            // Tied embeddings: the output head is the embedding matrix.
            match requantize.target(embeddings_q.dtype()) {
                Some(target) => QMatMul::from_qtensor(QTensor::quantize(&embeddings, target)?)?,
                None => QMatMul::from_qtensor(embeddings_q)?,
            }
        };
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("blk.{index}.{part}.weight");
            let mut matmul = |part: &str| load_matmul(content, reader, device, requantize, &name(part));
            let attention_q = matmul("attn_q")?;
            let attention_k = matmul("attn_k")?;
            let attention_v = matmul("attn_v")?;
            let attention_output = matmul("attn_output")?;
            let ffn_gate = matmul("ffn_gate")?;
            let ffn_up = matmul("ffn_up")?;
            let ffn_down = matmul("ffn_down")?;
            layers.push(Layer {
                attention_q,
                attention_k,
                attention_v,
                attention_output,
                attention_norm: load_tensor(content, reader, device, &name("attn_norm"))?.dequantize(device)?,
                ffn_gate,
                ffn_up,
                ffn_down,
                ffn_norm: load_tensor(content, reader, device, &name("ffn_norm"))?.dequantize(device)?,
            });
        }
        let (cos, sin) = precompute_rope(&config, device)?;
        Ok(Self { config, embeddings, layers, norm, output, cos, sin, device: device.clone() })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for a sequence that will hold at most `limit` tokens (capped at the
    /// context length), preallocated for `initial` of them.
    pub fn new_cache(&self, initial: usize, limit: usize) -> Result<SequenceCache> {
        let limit = limit.min(self.config.context_length).max(1);
        let capacity = initial.clamp(1, limit);
        let shape = (self.config.kv_heads, capacity, self.config.head_dim);
        let zeros = || Tensor::zeros(shape, DType::F32, &self.device);
        Ok(SequenceCache {
            keys: (0..self.config.layers).map(|_| zeros()).collect::<candle_core::Result<_>>()?,
            values: (0..self.config.layers).map(|_| zeros()).collect::<candle_core::Result<_>>()?,
            len: 0,
            capacity,
            limit,
        })
    }

    /// Runs one step for several sequences: appends each input's tokens to its cache and returns
    /// the logits after each input's last token, shape `(inputs, vocab_size)`, f32.
    ///
    /// On error the caches are left at their old length (what was written past it is ignored).
    pub fn forward(&self, inputs: &mut [StepInput<'_>]) -> Result<Tensor> {
        let config = &self.config;
        if inputs.is_empty() || inputs.iter().any(|input| input.tokens.is_empty()) {
            return Err(Error::Inference("a forward step needs at least one token per sequence".into()));
        }
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for input in inputs.iter_mut() {
            let start = input.cache.len;
            let end = start + input.tokens.len();
            if end > input.cache.limit {
                return Err(Error::Inference(format!("sequence too long: {end} > {}", input.cache.limit)));
            }
            input.cache.reserve(end)?;
            if let Some(&bad) = input.tokens.iter().find(|&&token| token as usize >= config.vocab_size) {
                return Err(Error::Inference(format!("token id {bad} is outside the vocabulary")));
            }
            tokens.extend_from_slice(input.tokens);
            positions.extend((start..end).map(|position| position as u32));
        }
        let rows = tokens.len();
        let token_ids = Tensor::from_vec(tokens, rows, &self.device)?;
        let position_ids = Tensor::from_vec(positions, rows, &self.device)?;
        let half = config.head_dim / 2;
        let cos = self.cos.index_select(&position_ids, 0)?.reshape((rows, 1, half))?;
        let sin = self.sin.index_select(&position_ids, 0)?.reshape((rows, 1, half))?;
        let rope = |x: &Tensor, heads: usize| -> Result<Tensor> {
            // Each row is its own "batch" of one position, so every row gets its own angle.
            let x = x.reshape((rows, heads, 1, config.head_dim))?;
            let rotated = if config.rope_is_neox {
                candle_nn::rotary_emb::rope(&x, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
            };
            Ok(rotated.reshape((rows, heads, config.head_dim))?)
        };
        let scale = 1.0 / (config.head_dim as f64).sqrt();
        let group = config.heads / config.kv_heads;

        let mut hidden = self.embeddings.index_select(&token_ids, 0)?;
        for (layer_index, layer) in self.layers.iter().enumerate() {
            let normed = candle_nn::ops::rms_norm(&hidden, &layer.attention_norm, config.rms_norm_eps as f32)?;
            let queries = rope(&layer.attention_q.forward(&normed)?, config.heads)?;
            let keys = rope(&layer.attention_k.forward(&normed)?, config.kv_heads)?;
            let values = layer.attention_v.forward(&normed)?.reshape((rows, config.kv_heads, config.head_dim))?;
            let mut outputs = Vec::with_capacity(inputs.len());
            let mut row = 0;
            for input in inputs.iter_mut() {
                let count = input.tokens.len();
                let start = input.cache.len;
                let total = start + count;
                let cache_keys = &input.cache.keys[layer_index];
                let cache_values = &input.cache.values[layer_index];
                cache_keys.slice_set(&keys.narrow(0, row, count)?.transpose(0, 1)?.contiguous()?, 1, start)?;
                cache_values.slice_set(&values.narrow(0, row, count)?.transpose(0, 1)?.contiguous()?, 1, start)?;
                let all_keys = cache_keys.narrow(1, 0, total)?;
                let all_values = cache_values.narrow(1, 0, total)?;
                // (count, heads, d) -> (kv_heads, group * count, d): query heads h*group..h*group+group
                // share key/value head h, so no K/V repetition is needed.
                let query = queries.narrow(0, row, count)?.transpose(0, 1)?.contiguous()?.reshape((
                    config.kv_heads,
                    group * count,
                    config.head_dim,
                ))?;
                let mut scores = (query.matmul(&all_keys.t()?)? * scale)?;
                if count > 1 {
                    let mask = causal_mask(count, start, &self.device)?;
                    scores = scores
                        .reshape((config.kv_heads, group, count, total))?
                        .broadcast_add(&mask)?
                        .reshape((config.kv_heads, group * count, total))?;
                }
                let weights = candle_nn::ops::softmax_last_dim(&scores)?;
                let attended = weights.matmul(&all_values.contiguous()?)?;
                let attended = attended
                    .reshape((config.heads, count, config.head_dim))?
                    .transpose(0, 1)?
                    .reshape((count, config.hidden_size))?;
                outputs.push(attended);
                row += count;
            }
            let attended = if outputs.len() == 1 { outputs.remove(0) } else { Tensor::cat(&outputs, 0)? };
            hidden = (layer.attention_output.forward(&attended)? + &hidden)?;
            let normed = candle_nn::ops::rms_norm(&hidden, &layer.ffn_norm, config.rms_norm_eps as f32)?;
            let gate = candle_nn::ops::silu(&layer.ffn_gate.forward(&normed)?)?;
            let up = layer.ffn_up.forward(&normed)?;
            hidden = (layer.ffn_down.forward(&(gate * up)?)? + &hidden)?;
        }
        let mut last_rows = Vec::with_capacity(inputs.len());
        let mut row = 0u32;
        for input in inputs.iter_mut() {
            row += input.tokens.len() as u32;
            last_rows.push(row - 1);
            input.cache.len += input.tokens.len();
        }
        let last_rows = Tensor::from_vec(last_rows, inputs.len(), &self.device)?;
        let last = hidden.index_select(&last_rows, 0)?;
        let normed = candle_nn::ops::rms_norm(&last, &self.norm, config.rms_norm_eps as f32)?;
        Ok(self.output.forward(&normed)?.to_dtype(DType::F32)?)
    }
}

fn load_tensor<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    name: &str,
) -> Result<QTensor> {
    content
        .tensor(reader, name, device)
        .map_err(|error| Error::InvalidModel { file: "gguf".into(), message: format!("tensor `{name}`: {error}") })
}

fn load_matmul<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    requantize: Requantize,
    name: &str,
) -> Result<QMatMul> {
    let weight = load_tensor(content, reader, device, name)?;
    let weight = match requantize.target(weight.dtype()) {
        Some(target) if weight.shape().dims().last().is_some_and(|cols| cols % target.block_size() == 0) => {
            QTensor::quantize(&weight.dequantize(device)?, target)?
        }
        _ => weight,
    };
    Ok(QMatMul::from_qtensor(weight)?)
}

/// The additive causal mask of `count` new queries after `start` cached tokens:
/// `(count, start + count)`, 0 where a query may look and -inf where it may not.
fn causal_mask(count: usize, start: usize, device: &Device) -> Result<Tensor> {
    let total = start + count;
    let mask: Vec<f32> = (0..count)
        .flat_map(|query| (0..total).map(move |key| if key > start + query { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (count, total), device)?)
}

/// Index of the largest value (the lowest index on ties), for greedy decoding and tests.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_causal_mask_sees_the_prefix_and_the_past() {
        let mask: Vec<Vec<f32>> = causal_mask(2, 1, &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(mask[0], [0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(mask[1], [0.0, 0.0, 0.0]);
    }

    #[test]
    fn only_slow_formats_are_requantised() {
        assert_eq!(Requantize::Q8_0.target(GgmlDType::Q4_1), Some(GgmlDType::Q8_0));
        assert_eq!(Requantize::Q8_0.target(GgmlDType::Q4K), None);
        assert_eq!(Requantize::Q8_0.target(GgmlDType::F32), None);
        assert_eq!(Requantize::Keep.target(GgmlDType::Q4_1), None);
        assert_eq!(Requantize::Q4_0.target(GgmlDType::Q5_0), Some(GgmlDType::Q4_0));
    }
}

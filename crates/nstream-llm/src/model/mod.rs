//! A Llama-family decoder over quantised GGUF weights or Hugging Face safetensors, with a pooled
//! KV cache (a slot per sequence) and per-sequence positions.
//!
//! Forked from candle-transformers 0.11.1 `models/quantized_llama.rs` (Apache-2.0/MIT) and cut
//! down to what continuous batching needs:
//!
//! - the weights ([`LlamaModel`]) hold no mutable state, so one model serves many sequences;
//! - the K/V memory is one preallocated pool per layer, `(slots, kv_heads, capacity, head_dim)`,
//!   growing by doubling (never `Tensor::cat` per token); each sequence owns a slot of it
//!   through its [`SequenceCache`], with its own position;
//! - [`LlamaModel::forward`] runs one step for several sequences at once: every projection and
//!   MLP is one matrix product over all the step's rows (prefill chunks and single decode tokens
//!   mixed), RoPE takes a position per row, the new K/V rows go into the pool with one scatter,
//!   the decoding sequences attend together in one batched product over their slots (masked to
//!   each one's length) and prefill chunks attend one by one with a causal mask;
//! - grouped-query attention reshapes the queries instead of repeating K/V;
//! - projections that read the same input (q/k/v on the CPU, gate/up everywhere) are stacked into
//!   one matrix product when that changes no weight bit;
//! - on the CPU, Q4_0/Q4_1/Q8_0 products run nstream-kernels where the CPU has AVX-512 VNNI, and
//!   decode attention, the q/k/v split with RoPE and SwiGLU are single ops on candle's threads
//!   (`crate::cpu`); at load, weights without a fast kernel are re-quantised to one that has
//!   ([`Requantize`]).
//!
//! - [`LlamaModel::from_safetensors`] builds the same model from a Hugging Face checkpoint
//!   (`model.layers.N.self_attn.q_proj.weight`...) with unquantised `QMatMul::Tensor` weights,
//!   optional projection biases (Qwen2) and `rope_scaling` (linear, llama3). GGUF Llama weights
//!   have Q/K permuted by llama.cpp's converter for interleaved RoPE (`rope_i`); Hugging Face
//!   ones are not, so they use NeoX RoPE (`rope`, transformers' `rotate_half`).
//!
//! Mixture-of-experts and the old GGML format of the original are left out.

use std::io::{Read, Seek};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};
use nstream_kernels::{BlockFormat, QuantMatrix};

use crate::cpu::{CandleThreads, QuantMatmul, SplitRope, SwiGlu};

use crate::error::{Error, Result};

/// The longest context this implementation serves, whatever the GGUF says (the RoPE tables are
/// precomputed up to it, as in candle's quantized llama).
pub const MAX_CONTEXT: usize = 4096;

/// What to do at load with weights whose CPU matrix-product kernel is slow.
///
/// On a CPU with AVX-512 VNNI, nstream-kernels multiplies Q4_0, Q4_1 and Q8_0 weights as stored
/// (the arithmetic of llama.cpp's CPU backend); elsewhere candle's kernels run, and its CPU path
/// for Q4_1 (and the other non-K 4/5-bit formats) is scalar while Q8_0 and Q4_0 have SIMD dot
/// products. Re-quantising costs a little accuracy for Q4_0 and a little memory for Q8_0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Requantize {
    /// Keep what a fast kernel multiplies on this CPU; re-quantise the rest to Q8_0 (with
    /// AVX-512 VNNI: only Q5_0 and Q5_1; without: Q4_1, Q5_0 and Q5_1, as [`Requantize::Q8_0`]).
    #[default]
    Auto,
    /// Keep every weight as stored in the file.
    Keep,
    /// Re-quantise Q4_1, Q5_0 and Q5_1 weights to Q8_0 (the most faithful re-quantisation: Q8_0
    /// represents a 4/5-bit block almost exactly).
    Q8_0,
    /// Re-quantise Q4_1, Q5_0 and Q5_1 weights to Q4_0 (least memory).
    Q4_0,
}

impl Requantize {
    fn target(self, stored: GgmlDType) -> Option<GgmlDType> {
        let slow = matches!(stored, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
        match self {
            Self::Keep => None,
            Self::Auto if nstream_kernels::avx512_available() => {
                matches!(stored, GgmlDType::Q5_0 | GgmlDType::Q5_1).then_some(GgmlDType::Q8_0)
            }
            Self::Auto | Self::Q8_0 if slow => Some(GgmlDType::Q8_0),
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
    fn apply(&self, inverse_frequencies: &mut [f32]) {
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
            rope_scaling: RopeScaling::None,
        })
    }
}

/// A weight matrix as the matrix products use it.
enum Weight {
    /// candle's (quantised or dense) matrix product.
    Candle(QMatMul),
    /// Q4_0/Q4_1/Q8_0 weights on a CPU with AVX-512 VNNI: nstream-kernels' product, which reads
    /// each weight once per step whatever the batch (candle's once per activation row).
    Kernel(QuantMatmul),
}

impl Weight {
    /// A quantised weight: nstream-kernels' product where it is faster than candle's (a CPU
    /// with AVX-512 VNNI, a format it multiplies), candle's otherwise.
    fn quantised(weight: QTensor) -> Result<Self> {
        let format = match weight.dtype() {
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            _ => None,
        };
        if let (Some(format), true, &[rows, cols]) =
            (format, weight.device().is_cpu() && nstream_kernels::avx512_available(), weight.shape().dims())
        {
            // A matrix the kernel cannot hold (a scale out of its range) stays with candle.
            if let Ok(matrix) = QuantMatrix::from_ggml(format, &weight.data()?, rows, cols) {
                return Ok(Self::Kernel(QuantMatmul::new(matrix)));
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(weight)?))
    }

    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Candle(weight) => weight.forward(input)?,
            Self::Kernel(weight) => input.contiguous()?.apply_op1_no_bwd(weight)?,
        })
    }
}

/// A projection: a (possibly quantised) weight and an optional bias (Qwen2's q/k/v, from GGUF or
/// safetensors; Llama's `attention_bias`/`mlp_bias`).
struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(weight: Weight) -> Self {
        Self { weight, bias: None }
    }

    fn dense(weight: Tensor) -> Self {
        Self::new(Weight::Candle(QMatMul::Tensor(weight)))
    }

    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let output = self.weight.forward(input)?;
        Ok(match &self.bias {
            Some(bias) => output.broadcast_add(bias)?,
            None => output,
        })
    }
}

/// Projections that read the same input, as separate matrix products or as one over their
/// weights stacked by rows (one product, one quantisation of the activations, one thread-pool
/// dispatch instead of several), whose output columns are then split.
enum Projections {
    /// One product per projection.
    Separate(Vec<Linear>),
    /// One product; the outputs are `widths` columns each, in order.
    Fused {
        /// The stacked projection.
        linear: Linear,
        /// Output columns of each part.
        widths: Vec<usize>,
    },
}

impl Projections {
    /// Each part's output, `(rows, width)`; fused parts are column slices of one product (strided:
    /// callers that need contiguous memory copy).
    fn forward(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|part| part.forward(input)).collect(),
            Self::Fused { linear, widths } => {
                let output = linear.forward(input)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&width| {
                        let part = output.narrow(D::Minus1, start, width)?;
                        start += width;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }

    /// Gives each part its bias (`None`: no bias); a stacked projection gets them stacked, with
    /// zeros for the parts without one.
    fn set_biases(&mut self, biases: Vec<Option<Tensor>>) -> Result<()> {
        match self {
            Self::Separate(parts) => {
                for (part, bias) in parts.iter_mut().zip(biases) {
                    part.bias = bias;
                }
            }
            Self::Fused { linear, widths } => {
                let reference = biases.iter().flatten().next().cloned();
                let Some(reference) = reference else { return Ok(()) };
                let stacked = biases
                    .into_iter()
                    .zip(widths.iter())
                    .map(|(bias, &width)| match bias {
                        Some(bias) => Ok(bias),
                        None => Tensor::zeros(width, reference.dtype(), reference.device()),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                linear.bias = Some(Tensor::cat(&stacked, 0)?);
            }
        }
        Ok(())
    }

    /// Stacks unquantised projections (`QMatMul::Tensor`) into one; they stay separate when a
    /// part is quantised or the dtypes differ. A missing bias stacks as zeros when another part
    /// has one.
    fn fuse_tensors(parts: Vec<Linear>) -> Result<Self> {
        let weights: Option<Vec<Tensor>> = parts
            .iter()
            .map(|part| match &part.weight {
                Weight::Candle(QMatMul::Tensor(weight)) => Some(weight.clone()),
                _ => None,
            })
            .collect();
        let Some(weights) = weights else { return Ok(Self::Separate(parts)) };
        if weights.windows(2).any(|pair| pair[0].dtype() != pair[1].dtype()) {
            return Ok(Self::Separate(parts));
        }
        let widths: Vec<usize> = weights.iter().map(|weight| weight.dim(0)).collect::<candle_core::Result<_>>()?;
        let biases = parts.into_iter().map(|part| part.bias).collect();
        let mut fused = Self::Fused { linear: Linear::dense(Tensor::cat(&weights, 0)?), widths };
        fused.set_biases(biases)?;
        Ok(fused)
    }
}

struct Layer {
    /// Q, K and V.
    attention_qkv: Projections,
    attention_output: Linear,
    attention_norm: Tensor,
    /// The MLP's gate and up projections.
    ffn_gate_up: Projections,
    ffn_down: Linear,
    ffn_norm: Tensor,
}

/// The weights of a Llama-family model: immutable, shared by every sequence.
pub struct LlamaModel {
    config: LlamaConfig,
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Weight,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// The activations' and caches' dtype: f32 for GGUF and on CPU, the checkpoint's on CUDA.
    dtype: DType,
    /// The K/V memory of every live sequence.
    pool: std::sync::Arc<std::sync::Mutex<KvPool>>,
    /// Decode attention as one batched tensor product even on the CPU (see
    /// [`LlamaModel::with_batched_decode_attention`]).
    batched_decode: bool,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("LlamaModel").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The attention memory of every sequence of a model: per layer, K and V of shape
/// `(slots, kv_heads, capacity, head_dim)`, one slot per live [`SequenceCache`].
///
/// One tensor per layer, rather than one per sequence, lets a decode step write every new K/V row
/// with one scatter and attend for every decoding sequence with one batched matrix product. It
/// grows by doubling (slots when every slot is taken, capacity when a sequence needs more, up to
/// the context length) and is released when the last sequence is dropped, so an idle model holds
/// no cache and a short answer never pays for the whole context.
struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    slots: usize,
    capacity: usize,
    /// Free slots; the lowest is taken first so the live ones stay packed at the front.
    free: std::collections::BTreeSet<usize>,
    live: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    context_length: usize,
    dtype: DType,
    device: Device,
}

impl KvPool {
    fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            slots: 0,
            capacity: 0,
            free: std::collections::BTreeSet::new(),
            live: 0,
            layers: config.layers,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
            context_length: config.context_length,
            dtype,
            device: device.clone(),
        }
    }

    /// Reallocates every layer's K and V at `slots` × `capacity`, keeping what they hold.
    fn resize(&mut self, slots: usize, capacity: usize) -> Result<()> {
        let shape = (slots, self.kv_heads, capacity, self.head_dim);
        for tensors in [&mut self.keys, &mut self.values] {
            if tensors.is_empty() {
                *tensors = (0..self.layers)
                    .map(|_| Tensor::zeros(shape, self.dtype, &self.device))
                    .collect::<candle_core::Result<_>>()?;
                continue;
            }
            for tensor in tensors.iter_mut() {
                let mut grown = tensor.clone();
                if capacity != self.capacity {
                    let wider =
                        Tensor::zeros((self.slots, self.kv_heads, capacity, self.head_dim), self.dtype, &self.device)?;
                    wider.slice_set(&grown, 2, 0)?;
                    grown = wider;
                }
                if slots != self.slots {
                    let taller = Tensor::zeros(shape, self.dtype, &self.device)?;
                    taller.slice_set(&grown, 0, 0)?;
                    grown = taller;
                }
                *tensor = grown;
            }
        }
        self.free.extend(self.slots..slots);
        self.slots = slots;
        self.capacity = capacity;
        Ok(())
    }

    /// Takes a slot, growing the pool when none is free; an empty pool starts over at
    /// `capacity` (so memory left by a long burst goes back when the model is idle).
    fn acquire(&mut self, capacity: usize) -> Result<usize> {
        if self.live == 0 && (self.slots > 0 || !self.keys.is_empty()) {
            self.keys.clear();
            self.values.clear();
            self.free.clear();
            self.slots = 0;
            self.capacity = 0;
        }
        if self.keys.is_empty() {
            self.resize(1, capacity.clamp(1, self.context_length))?;
        } else {
            self.reserve(capacity)?;
        }
        if self.free.is_empty() {
            self.resize(self.slots * 2, self.capacity)?;
        }
        let slot = self.free.pop_first().ok_or_else(|| Error::Inference("no free cache slot".into()))?;
        self.live += 1;
        Ok(slot)
    }

    fn release(&mut self, slot: usize) {
        if slot < self.slots && self.free.insert(slot) {
            self.live = self.live.saturating_sub(1);
        }
    }

    /// Makes room for `needed` tokens per slot (doubling, capped at the context length).
    fn reserve(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        if needed > self.context_length {
            return Err(Error::Inference(format!("sequence cache overflow: {needed} > {}", self.context_length)));
        }
        let capacity = needed.max(self.capacity.saturating_mul(2)).min(self.context_length);
        self.resize(self.slots, capacity)
    }
}

/// One sequence's claim on the model's K/V memory: a slot of the pool, its length (the position
/// of its next token) and its limit. Dropping it frees the slot.
pub struct SequenceCache {
    slot: usize,
    len: usize,
    limit: usize,
    pool: std::sync::Arc<std::sync::Mutex<KvPool>>,
}

impl std::fmt::Debug for SequenceCache {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SequenceCache")
            .field("slot", &self.slot)
            .field("len", &self.len)
            .field("limit", &self.limit)
            .finish()
    }
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

    /// The most tokens this sequence may ever hold.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Drop for SequenceCache {
    fn drop(&mut self) {
        lock(&self.pool).release(self.slot);
    }
}

/// Locks the pool; a panic in an earlier step leaves nothing half-written that matters (a
/// failed step never advances a cache's length), so a poisoned lock is taken as is.
fn lock(pool: &std::sync::Mutex<KvPool>) -> std::sync::MutexGuard<'_, KvPool> {
    pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One sequence's part of a [`LlamaModel::forward`] step: the new tokens and its cache.
pub struct StepInput<'a> {
    /// Tokens to append: a prompt chunk, or the last sampled token.
    pub tokens: &'a [u32],
    /// The sequence's cache; its length is the position of `tokens[0]`.
    pub cache: &'a mut SequenceCache,
}

fn precompute_rope(config: &LlamaConfig, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    let mut theta: Vec<f32> = (0..config.head_dim)
        .step_by(2)
        .map(|index| 1.0 / config.rope_theta.powf(index as f32 / config.head_dim as f32))
        .collect();
    config.rope_scaling.apply(&mut theta);
    let half = theta.len();
    let theta = Tensor::from_vec(theta, (1, half), device)?;
    let positions =
        Tensor::arange(0u32, MAX_CONTEXT as u32, device)?.to_dtype(DType::F32)?.reshape((MAX_CONTEXT, 1))?;
    let angles = positions.matmul(&theta)?;
    Ok((angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?))
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
            load_matmul(content, reader, device, requantize, "output.weight")?.weight
        } else {
            // Tied embeddings: the output head is the embedding matrix.
            match requantize.target(embeddings_q.dtype()) {
                Some(target) => Weight::quantised(QTensor::quantize(&embeddings, target)?)?,
                None => Weight::quantised(embeddings_q)?,
            }
        };
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("blk.{index}.{part}.weight");
            let mut matmul = |part: &str| load_matmul(content, reader, device, requantize, &name(part));
            let attention_output = matmul("attn_output")?;
            let ffn_down = matmul("ffn_down")?;
            let mut attention_qkv = load_projections(
                content,
                reader,
                device,
                requantize,
                &[name("attn_q"), name("attn_k"), name("attn_v")],
            )?;
            // Qwen2 GGUFs carry q/k/v biases (`blk.N.attn_q.bias`...); stacked projections get
            // them stacked too (zeros for a part without one).
            let biases = ["attn_q", "attn_k", "attn_v"].map(|part| format!("blk.{index}.{part}.bias"));
            if biases.iter().any(|bias| content.tensor_infos.contains_key(bias)) {
                let mut loaded = Vec::with_capacity(biases.len());
                for bias in &biases {
                    loaded.push(match content.tensor_infos.contains_key(bias) {
                        true => Some(load_tensor(content, reader, device, bias)?.dequantize(device)?),
                        false => None,
                    });
                }
                attention_qkv.set_biases(loaded)?;
            }
            let ffn_gate_up =
                load_projections(content, reader, device, requantize, &[name("ffn_gate"), name("ffn_up")])?;
            layers.push(Layer {
                attention_qkv,
                attention_output,
                attention_norm: load_tensor(content, reader, device, &name("attn_norm"))?.dequantize(device)?,
                ffn_gate_up,
                ffn_down,
                ffn_norm: load_tensor(content, reader, device, &name("ffn_norm"))?.dequantize(device)?,
            });
        }
        let (cos, sin) = precompute_rope(&config, device, DType::F32)?;
        Ok(Self::assemble(config, embeddings, layers, norm, output, (cos, sin), device, DType::F32))
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: LlamaConfig,
        embeddings: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: Weight,
        (cos, sin): (Tensor, Tensor),
        device: &Device,
        dtype: DType,
    ) -> Self {
        let pool = std::sync::Arc::new(std::sync::Mutex::new(KvPool::new(&config, dtype, device)));
        Self {
            config,
            embeddings,
            layers,
            norm,
            output,
            cos,
            sin,
            device: device.clone(),
            dtype,
            pool,
            batched_decode: false,
        }
    }

    /// Runs decode attention as one batched tensor product over the pool (what CUDA and half
    /// precision use) on the CPU too, instead of the CPU's per-sequence kernel: for tests that
    /// check the GPU's code path on machines without one.
    pub fn with_batched_decode_attention(mut self) -> Self {
        self.batched_decode = true;
        self
    }

    /// A cache slot for a sequence that will hold at most `limit` tokens (capped at the context
    /// length); the pool makes room for `initial` of them now and grows later as needed.
    pub fn new_cache(&self, initial: usize, limit: usize) -> Result<SequenceCache> {
        let limit = limit.min(self.config.context_length).max(1);
        let slot = lock(&self.pool).acquire(initial.clamp(1, limit))?;
        Ok(SequenceCache { slot, len: 0, limit, pool: std::sync::Arc::clone(&self.pool) })
    }

    /// Runs one step for several sequences: appends each input's tokens to its cache and returns
    /// the logits after each input's last token, shape `(inputs, vocab_size)`, f32.
    ///
    /// Every projection and the MLP run once over all the step's rows. New K/V rows go into the
    /// pool with one scatter per layer; the sequences decoding one token attend together in one
    /// batched product over the pool's slots (padded to the longest, masked), and those
    /// prefilling a chunk attend one by one with a causal mask.
    ///
    /// On error the caches are left at their old length (what was written past it is ignored).
    pub fn forward(&self, inputs: &mut [StepInput<'_>]) -> Result<Tensor> {
        let config = &self.config;
        if inputs.is_empty() || inputs.iter().any(|input| input.tokens.is_empty()) {
            return Err(Error::Inference("a forward step needs at least one token per sequence".into()));
        }
        if inputs.iter().any(|input| !std::sync::Arc::ptr_eq(&input.cache.pool, &self.pool)) {
            return Err(Error::Inference("a cache of another model was passed to forward".into()));
        }
        let mut pool = lock(&self.pool);
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut needed = 0;
        for input in inputs.iter() {
            let start = input.cache.len;
            let end = start + input.tokens.len();
            if end > input.cache.limit {
                return Err(Error::Inference(format!("sequence too long: {end} > {}", input.cache.limit)));
            }
            if let Some(&bad) = input.tokens.iter().find(|&&token| token as usize >= config.vocab_size) {
                return Err(Error::Inference(format!("token id {bad} is outside the vocabulary")));
            }
            needed = needed.max(end);
            tokens.extend_from_slice(input.tokens);
            positions.extend((start..end).map(|position| position as u32));
        }
        pool.reserve(needed)?;
        let (kv_heads, head_dim, capacity) = (config.kv_heads, config.head_dim, pool.capacity);
        let rows = tokens.len();
        let token_ids = Tensor::from_vec(tokens, rows, &self.device)?;
        let position_ids = Tensor::from_vec(positions, rows, &self.device)?;

        let decode = DecodeBatch::new(inputs, &self.device, self.dtype, self.batched_decode)?;
        // New K/V rows of decoding sequences go into the pool with one scatter along the
        // positions: one value per (slot, head), `u32::MAX` (skipped) where a slot does not
        // decode. Every (slot, head, dimension) is its own GPU thread, so the write costs the
        // same for 1 or 64 sequences. Prefill chunks are block copies, one per sequence.
        let decode_writes = match &decode {
            None => None,
            Some(decode) => {
                let mut slot_rows = vec![0u32; pool.slots];
                let mut positions = vec![u32::MAX; pool.slots * kv_heads * head_dim];
                for &(row, slot, length) in &decode.sequences {
                    slot_rows[slot] = row as u32;
                    positions[slot * kv_heads * head_dim..(slot + 1) * kv_heads * head_dim].fill((length - 1) as u32);
                }
                Some((
                    Tensor::from_vec(slot_rows, pool.slots, &self.device)?,
                    Tensor::from_vec(positions, (pool.slots, kv_heads, 1, head_dim), &self.device)?,
                ))
            }
        };
        let prefill_masks = inputs
            .iter()
            .filter(|input| input.tokens.len() > 1)
            .map(|input| {
                causal_mask(input.tokens.len(), input.cache.len, &self.device)?
                    .to_dtype(self.dtype)
                    .map_err(Error::from)
            })
            .collect::<Result<Vec<Tensor>>>()?;

        let half = head_dim / 2;
        let cos = self.cos.index_select(&position_ids, 0)?.reshape((rows, 1, half))?;
        let sin = self.sin.index_select(&position_ids, 0)?.reshape((rows, 1, half))?;
        // On the CPU in f32, q/k/v are split with RoPE in one op and SwiGLU is one op.
        let fused_cpu_ops = self.device.is_cpu() && self.dtype == DType::F32;
        let (cos_rows, sin_rows) = (cos.reshape((rows, half))?, sin.reshape((rows, half))?);
        let rope = |x: &Tensor, heads: usize| -> Result<Tensor> {
            // Each row is its own "batch" of one position, so every row gets its own angle.
            let x = x.reshape((rows, heads, 1, head_dim))?;
            let rotated = if config.rope_is_neox {
                candle_nn::rotary_emb::rope(&x, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
            };
            Ok(rotated.reshape((rows, heads, head_dim))?)
        };
        let scale = 1.0 / (head_dim as f64).sqrt();
        let group = config.heads / kv_heads;

        let mut hidden = self.embeddings.index_select(&token_ids, 0)?;
        for (layer_index, layer) in self.layers.iter().enumerate() {
            let normed = candle_nn::ops::rms_norm(&hidden, &layer.attention_norm, config.rms_norm_eps as f32)?;
            let (queries, keys, values) = match &layer.attention_qkv {
                Projections::Fused { linear, widths } if fused_cpu_ops && widths.len() == 3 => {
                    let split =
                        SplitRope { widths: [widths[0], widths[1], widths[2]], head_dim, neox: config.rope_is_neox };
                    let [queries, keys, values] = split.apply(&linear.forward(&normed)?, &cos_rows, &sin_rows)?;
                    (
                        queries.reshape((rows, config.heads, head_dim))?,
                        keys.reshape((rows, kv_heads, head_dim))?,
                        values,
                    )
                }
                _ => {
                    let [queries, keys, values]: [Tensor; 3] = layer
                        .attention_qkv
                        .forward(&normed)?
                        .try_into()
                        .map_err(|_| Error::Inference("q/k/v projections are not three".into()))?;
                    (
                        rope(&queries.contiguous()?, config.heads)?,
                        rope(&keys.contiguous()?, kv_heads)?,
                        values.contiguous()?,
                    )
                }
            };
            let pool_keys = &pool.keys[layer_index];
            let pool_values = &pool.values[layer_index];
            let values = values.reshape((rows, kv_heads, head_dim))?;
            if let Some((slot_rows, positions)) = &decode_writes {
                let shape = (pool.slots, kv_heads, 1, head_dim);
                pool_keys.scatter_set(positions, &keys.index_select(slot_rows, 0)?.reshape(shape)?, 2)?;
                pool_values.scatter_set(positions, &values.index_select(slot_rows, 0)?.reshape(shape)?, 2)?;
            }
            let mut row = 0;
            for input in inputs.iter() {
                let count = input.tokens.len();
                if count > 1 {
                    for (pool_part, part) in [(pool_keys, &keys), (pool_values, &values)] {
                        let block = part.narrow(0, row, count)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
                        pool_part.narrow(0, input.cache.slot, 1)?.slice_set(&block, 2, input.cache.len)?;
                    }
                }
                row += count;
            }

            let mut parts = Vec::new();
            if let Some(decode) = &decode {
                parts.push(match &decode.batched {
                    None => {
                        cpu_decode_attention(&queries, pool_keys, pool_values, &decode.sequences, config, capacity)?
                    }
                    Some(batched) => {
                        // (rows, heads, d) -> per slot (slots, kv_heads, group, d): query heads
                        // h*group..h*group+group share key/value head h, so no K/V repetition.
                        let query =
                            queries.reshape((rows, kv_heads, group, head_dim))?.index_select(&batched.query_rows, 0)?;
                        let all_keys = pool_keys.narrow(0, 0, batched.slots)?.narrow(2, 0, batched.longest)?;
                        let all_values = pool_values.narrow(0, 0, batched.slots)?.narrow(2, 0, batched.longest)?;
                        let scores = (query.matmul(&all_keys.t()?)? * scale)?.broadcast_add(&batched.mask)?;
                        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
                        let attended =
                            weights.matmul(&all_values)?.reshape((batched.slots, config.heads * head_dim))?;
                        attended.index_select(&batched.output_rows, 0)?
                    }
                });
            }
            let mut row = 0;
            let mut masks = prefill_masks.iter();
            for input in inputs.iter() {
                let count = input.tokens.len();
                if count > 1 {
                    let start = input.cache.len;
                    let total = start + count;
                    let slot_keys = pool_keys.narrow(0, input.cache.slot, 1)?.squeeze(0)?.narrow(1, 0, total)?;
                    let slot_values = pool_values.narrow(0, input.cache.slot, 1)?.squeeze(0)?.narrow(1, 0, total)?;
                    let query = queries.narrow(0, row, count)?.transpose(0, 1)?.contiguous()?.reshape((
                        kv_heads,
                        group * count,
                        head_dim,
                    ))?;
                    let mask = masks.next().ok_or_else(|| Error::Inference("a prefill mask is missing".into()))?;
                    let scores = (query.matmul(&slot_keys.t()?)? * scale)?
                        .reshape((kv_heads, group, count, total))?
                        .broadcast_add(mask)?
                        .reshape((kv_heads, group * count, total))?;
                    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
                    let attended = weights
                        .matmul(&slot_values)?
                        .reshape((config.heads, count, head_dim))?
                        .transpose(0, 1)?
                        .reshape((count, config.heads * head_dim))?;
                    parts.push(attended);
                }
                row += count;
            }
            let attended = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
            // The parts hold the decoding rows first, then each prefill chunk: back to row order.
            let attended = match decode.as_ref().and_then(|decode| decode.reorder.as_ref()) {
                Some(reorder) => attended.index_select(reorder, 0)?,
                None => attended,
            };
            hidden = (layer.attention_output.forward(&attended)? + &hidden)?;
            let normed = candle_nn::ops::rms_norm(&hidden, &layer.ffn_norm, config.rms_norm_eps as f32)?;
            let activated = match &layer.ffn_gate_up {
                Projections::Fused { linear, widths }
                    if fused_cpu_ops && widths.len() == 2 && widths[0] == widths[1] =>
                {
                    linear.forward(&normed)?.apply_op1_no_bwd(&SwiGlu)?
                }
                _ => {
                    let [gate, up]: [Tensor; 2] = layer
                        .ffn_gate_up
                        .forward(&normed)?
                        .try_into()
                        .map_err(|_| Error::Inference("gate/up projections are not two".into()))?;
                    (candle_nn::ops::silu(&gate)? * up)?
                }
            };
            hidden = (layer.ffn_down.forward(&activated)? + &hidden)?;
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

/// The sequences of a step that decode one token.
struct DecodeBatch {
    /// `(step row, slot, length after this step)` of each, in step order.
    sequences: Vec<(usize, usize, usize)>,
    /// The tensors of one batched product over the pool (any device but the CPU in f32, which
    /// has [`cpu_decode_attention`]).
    batched: Option<BatchedDecode>,
    /// When prefill chunks share the step: for each step row, its row in
    /// `[decoded rows; prefill chunks in order]`.
    reorder: Option<Tensor>,
}

/// The decoding sequences laid out for one batched attention over the pool's first `slots`
/// slots (live slots are packed at the front).
struct BatchedDecode {
    /// Slots covered: the highest decoding slot plus one.
    slots: usize,
    /// The longest decoding sequence after this step, so the keys attended.
    longest: usize,
    /// For each slot, the step row holding its query (row 0 for slots not decoding).
    query_rows: Tensor,
    /// `(slots, 1, 1, longest)`, 0 where a slot's query may look, -inf past its length. Slots
    /// not decoding see their position 0 so that no softmax row is all -inf.
    mask: Tensor,
    /// The slots of the decoding sequences, in step order.
    output_rows: Tensor,
}

impl DecodeBatch {
    fn new(inputs: &[StepInput<'_>], device: &Device, dtype: DType, force_batched: bool) -> Result<Option<Self>> {
        let mut sequences = Vec::new();
        let mut row = 0;
        for input in inputs {
            if input.tokens.len() == 1 {
                sequences.push((row, input.cache.slot, input.cache.len + 1));
            }
            row += input.tokens.len();
        }
        if sequences.is_empty() {
            return Ok(None);
        }
        let reorder = if sequences.len() == inputs.len() {
            None
        } else {
            let mut reorder = Vec::with_capacity(row);
            let mut decoded = 0u32;
            let mut prefilled = sequences.len() as u32;
            for input in inputs {
                if input.tokens.len() == 1 {
                    reorder.push(decoded);
                    decoded += 1;
                } else {
                    reorder.extend(prefilled..prefilled + input.tokens.len() as u32);
                    prefilled += input.tokens.len() as u32;
                }
            }
            Some(Tensor::from_vec(reorder, row, device)?)
        };
        let batched = if device.is_cpu() && dtype == DType::F32 && !force_batched {
            None
        } else {
            let slots = sequences.iter().map(|&(_, slot, _)| slot + 1).max().unwrap_or(1);
            let longest = sequences.iter().map(|&(_, _, length)| length).max().unwrap_or(1);
            let mut query_rows = vec![0u32; slots];
            let mut lengths = vec![1usize; slots];
            for &(row, slot, length) in &sequences {
                query_rows[slot] = row as u32;
                lengths[slot] = length;
            }
            let mask: Vec<f32> = lengths
                .iter()
                .flat_map(|&length| (0..longest).map(move |key| if key < length { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let output_rows: Vec<u32> = sequences.iter().map(|&(_, slot, _)| slot as u32).collect();
            Some(BatchedDecode {
                slots,
                longest,
                query_rows: Tensor::from_vec(query_rows, slots, device)?,
                mask: Tensor::from_vec(mask, (slots, 1, 1, longest), device)?.to_dtype(dtype)?,
                output_rows: Tensor::from_vec(output_rows, sequences.len(), device)?,
            })
        };
        Ok(Some(Self { sequences, batched, reorder }))
    }
}

/// Decode attention on the CPU in f32, straight from the pool's memory: for each decoding
/// sequence and query head, scores against its own keys only, softmax, weighted sum of its
/// values. Each (sequence, head) is computed the same way whatever else is in the step, so a
/// sequence's numbers never depend on its neighbours (seeded sampling reproduces under load),
/// and nothing is padded or masked. Returns `(sequences, heads * head_dim)`.
fn cpu_decode_attention(
    queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    sequences: &[(usize, usize, usize)],
    config: &LlamaConfig,
    capacity: usize,
) -> Result<Tensor> {
    let (heads, kv_heads, head_dim) = (config.heads, config.kv_heads, config.head_dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let queries = queries.contiguous()?;
    let (query_storage, query_layout) = queries.storage_and_layout();
    let (key_storage, key_layout) = keys.storage_and_layout();
    let (value_storage, value_layout) = values.storage_and_layout();
    let (
        candle_core::Storage::Cpu(query_storage),
        candle_core::Storage::Cpu(key_storage),
        candle_core::Storage::Cpu(value_storage),
    ) = (&*query_storage, &*key_storage, &*value_storage)
    else {
        return Err(Error::Inference("CPU decode attention on tensors that are not on the CPU".into()));
    };
    if !key_layout.is_contiguous() || !value_layout.is_contiguous() {
        return Err(Error::Inference("the K/V pool is not contiguous".into()));
    }
    let query_data = &query_storage.as_slice::<f32>()?[query_layout.start_offset()..];
    let key_data = &key_storage.as_slice::<f32>()?[key_layout.start_offset()..];
    let value_data = &value_storage.as_slice::<f32>()?[value_layout.start_offset()..];
    let mut output = vec![0f32; sequences.len() * heads * head_dim];
    // On candle's threads, like the matrix products around it: a second pool would compete with
    // their spinning workers for the cores.
    // One work item per (sequence, K/V head): the query heads of its group are consecutive in a
    // row and read its cached keys and values once.
    nstream_kernels::for_each_row(&CandleThreads, &mut output, group * head_dim, &|index, out| {
        let (sequence, kv_head) = (index / kv_heads, index % kv_heads);
        let (row, slot, length) = sequences[sequence];
        let queries = &query_data[(row * heads + kv_head * group) * head_dim..][..group * head_dim];
        let base = (slot * kv_heads + kv_head) * capacity * head_dim;
        let keys = &key_data[base..base + length * head_dim];
        let values = &value_data[base..base + length * head_dim];
        nstream_kernels::attend(queries, keys, values, head_dim, scale, out);
    });
    Ok(Tensor::from_vec(output, (sequences.len(), heads * head_dim), &Device::Cpu)?)
}

/// The Hugging Face `model_type`s whose checkpoints have the Llama layout served here.
const HF_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

fn hf_invalid(file: &str, message: impl Into<String>) -> Error {
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
        Ok(Self::assemble(config, embeddings, layers, norm, output, (cos, sin), device, dtype))
    }

    /// The dtype of the activations and KV caches (f32 except for f16/bf16 checkpoints on CUDA).
    pub fn dtype(&self) -> DType {
        self.dtype
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
) -> Result<Linear> {
    let weight = load_tensor(content, reader, device, name)?;
    let weight = match requantize_target(&weight, requantize) {
        Some(target) => QTensor::quantize(&weight.dequantize(device)?, target)?,
        None => weight,
    };
    Ok(Linear::new(Weight::quantised(weight)?))
}

/// The format a weight is re-quantised to at load, if any (only whole blocks per row).
fn requantize_target(weight: &QTensor, requantize: Requantize) -> Option<GgmlDType> {
    requantize
        .target(weight.dtype())
        .filter(|target| weight.shape().dims().last().is_some_and(|cols| cols % target.block_size() == 0))
}

/// Projections that read the same input (q/k/v, gate/up). When every part is re-quantised at
/// load anyway, they are stacked by rows before quantising: the blocks of a row do not depend on
/// the other rows, so the fused weights hold exactly the bits the separate ones would. Weights
/// kept as stored stay separate (re-quantising them would change them).
fn load_projections<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    requantize: Requantize,
    names: &[String],
) -> Result<Projections> {
    let weights =
        names.iter().map(|name| load_tensor(content, reader, device, name)).collect::<Result<Vec<QTensor>>>()?;
    let targets: Vec<Option<GgmlDType>> = weights.iter().map(|weight| requantize_target(weight, requantize)).collect();
    if let Some(Some(target)) = targets.first()
        && targets.iter().all(|other| *other == Some(*target))
    {
        let widths = weights.iter().map(|weight| weight.shape().dims()[0]).collect();
        let dense =
            weights.iter().map(|weight| weight.dequantize(device)).collect::<candle_core::Result<Vec<Tensor>>>()?;
        let fused = QTensor::quantize(&Tensor::cat(&dense, 0)?, *target)?;
        return Ok(Projections::Fused { linear: Linear::new(Weight::quantised(fused)?), widths });
    }
    weights
        .into_iter()
        .zip(targets)
        .map(|(weight, target)| {
            let weight = match target {
                Some(target) => QTensor::quantize(&weight.dequantize(device)?, target)?,
                None => weight,
            };
            Ok(Linear::new(Weight::quantised(weight)?))
        })
        .collect::<Result<Vec<Linear>>>()
        .map(Projections::Separate)
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

    #[test]
    fn only_slow_formats_are_requantised() {
        assert_eq!(Requantize::Q8_0.target(GgmlDType::Q4_1), Some(GgmlDType::Q8_0));
        assert_eq!(Requantize::Q8_0.target(GgmlDType::Q4K), None);
        assert_eq!(Requantize::Q8_0.target(GgmlDType::F32), None);
        assert_eq!(Requantize::Keep.target(GgmlDType::Q4_1), None);
        assert_eq!(Requantize::Q4_0.target(GgmlDType::Q5_0), Some(GgmlDType::Q4_0));
        assert_eq!(Requantize::Auto.target(GgmlDType::Q5_1), Some(GgmlDType::Q8_0));
        assert_eq!(Requantize::Auto.target(GgmlDType::Q4K), None);
        let kernels = nstream_kernels::avx512_available();
        assert_eq!(Requantize::Auto.target(GgmlDType::Q4_1), (!kernels).then_some(GgmlDType::Q8_0));
    }

    #[test]
    fn stacked_projections_with_biases_equal_separate_ones() {
        let device = Device::Cpu;
        let weight = |rows: usize, seed: f32| {
            let values: Vec<f32> = (0..rows * 4).map(|index| (index as f32 * 0.37 + seed).sin()).collect();
            Tensor::from_vec(values, (rows, 4), &device).unwrap()
        };
        let parts = || vec![Linear::dense(weight(3, 0.1)), Linear::dense(weight(2, 0.7))];
        let biases = || vec![Some(Tensor::new(&[1f32, 2., 3.], &device).unwrap()), None];
        let mut separate = Projections::Separate(parts());
        separate.set_biases(biases()).unwrap();
        let mut fused = Projections::fuse_tensors(parts()).unwrap();
        assert!(matches!(fused, Projections::Fused { .. }));
        fused.set_biases(biases()).unwrap();
        let input =
            Tensor::from_vec((0..8).map(|index| index as f32 / 8.0).collect::<Vec<_>>(), (2, 4), &device).unwrap();
        for (a, b) in separate.forward(&input).unwrap().iter().zip(fused.forward(&input).unwrap()) {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a.len(), b.len());
            assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-6), "{a:?} vs {b:?}");
        }
    }
}

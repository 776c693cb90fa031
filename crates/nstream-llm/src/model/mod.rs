//! A Llama-family decoder over quantised GGUF weights or Hugging Face safetensors, with a pooled
//! KV cache (a slot per sequence) and per-sequence positions.
//!
//! Forked from candle-transformers 0.11.1 `models/quantized_llama.rs` (Apache-2.0/MIT) and cut
//! down to what continuous batching needs:
//!
//! - the weights ([`LlamaModel`]) hold no mutable state, so one model serves many sequences;
//! - the K/V memory is one pool per layer, `(kv_heads, tokens, head_dim)`, in which each
//!   sequence owns a region of the token axis through its [`SequenceCache`], sized for its own
//!   length and growing by doubling (never `Tensor::cat` per token), with its own position;
//! - [`LlamaModel::forward`] runs one step for several sequences at once: every projection and
//!   MLP is one matrix product over all the step's rows (prefill chunks and single decode tokens
//!   mixed), RoPE takes a position per row, the new K/V rows go into the pool with one scatter,
//!   the decoding sequences attend together in one batched product over their regions (gathered
//!   and masked to each one's length) and prefill chunks attend one by one with a causal mask;
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
//!
//! One job per file: `config` (hyper-parameters from GGUF metadata or `config.json`), `weights`
//! (projections and their stacking), `gguf` and `safetensors` (loading), `kv_pool` (the pooled
//! K/V memory), `forward` (one batched step) and `attention` (decode and prefill attention).

mod attention;
mod config;
mod forward;
mod gguf;
mod kv_pool;
mod lora;
mod safetensors;
mod weights;

use candle_core::{D, DType, Device, Tensor};

pub use config::{LlamaConfig, RopeScaling};
pub use forward::StepInput;
pub use gguf::{Requantize, read_gguf};
pub use kv_pool::{KvUsage, SequenceCache};
pub use lora::LoraAdapter;

use crate::error::Result;
use kv_pool::{KvPool, lock};
use weights::{Layer, Weight};

/// The longest context this implementation serves, whatever the GGUF says (the RoPE tables are
/// precomputed up to it, as in candle's quantized llama).
pub const MAX_CONTEXT: usize = 4096;

/// The weights of a Llama-family model: immutable, shared by every sequence.
pub struct LlamaModel {
    config: LlamaConfig,
    /// Width of the MLP's hidden layer (rows of `gate_proj`), for checking adapters.
    intermediate_size: usize,
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

/// The RoPE tables `(cos, sin)`, `(MAX_CONTEXT, head_dim / 2)`, in `dtype`.
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
    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the activations and KV caches (f32 except for f16/bf16 checkpoints on CUDA).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Width of the MLP's hidden layer.
    pub fn intermediate_size(&self) -> usize {
        self.intermediate_size
    }

    /// Identifies this model (its K/V pool) for caches and adapters laid out for it.
    fn identity(&self) -> usize {
        std::sync::Arc::as_ptr(&self.pool) as usize
    }

    /// The model from its loaded parts, with an empty K/V pool.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: LlamaConfig,
        intermediate_size: usize,
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
            intermediate_size,
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

    /// Bytes of K/V cache one token takes: K and V of every layer's K/V heads, in the cache's
    /// dtype.
    pub fn kv_bytes_per_token(&self) -> usize {
        let config = &self.config;
        2 * config.layers * config.kv_heads * config.head_dim * self.dtype.size_in_bytes()
    }

    /// How much of the K/V pool is allocated and claimed now.
    pub fn kv_usage(&self) -> KvUsage {
        lock(&self.pool).usage()
    }

    /// A cache slot for a sequence that will hold at most `limit` tokens (capped at the context
    /// length); the pool makes room for `initial` of them now and grows later as needed.
    pub fn new_cache(&self, initial: usize, limit: usize) -> Result<SequenceCache> {
        let limit = limit.min(self.config.context_length).max(1);
        let slot = lock(&self.pool).acquire(initial, limit)?;
        Ok(SequenceCache { slot, len: 0, limit, pool: std::sync::Arc::clone(&self.pool), adapter: None })
    }
}

/// Index of the largest value (the lowest index on ties), for greedy decoding and tests.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

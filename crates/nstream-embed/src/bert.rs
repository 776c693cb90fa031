//! A BERT encoder: a small fork of candle-transformers' `bert.rs` (0.11.1) for embeddings.
//!
//! Why a fork rather than `candle_transformers::models::bert::BertModel`:
//! - its attention mask adds `f32::MIN`, which is `-inf` in f16/bf16 and turns padded rows into
//!   NaN; here the mask is a finite `-1e4` in the model's dtype, so half precision works on CUDA;
//! - the query, key and value projections are fused into one matrix product per layer, with the
//!   `1/sqrt(head_dim)` scale folded into the query weights at load;
//! - linear layers run on the flattened (batch × sequence, hidden) matrix, and no mask is built at
//!   all when the batch has no padding (the batcher sorts by length, so that is common);
//! - only what embeddings need: token type 0, absolute positions, no pooler, no dropout.
//!
//! On the CPU in f32 (the CPU default) the same weights run on nstream-kernels' dense kernels
//! instead of candle ops (see `bert_cpu.rs`: weights packed once, fused GELU, residual and
//! attention); [`BertEncoder::load_candle_ops`] keeps the candle path, the reference the kernels
//! are tested and timed against.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use nstream_kernels::dense_bf16::bf16_available;

use crate::bert_cpu::{CpuBert, CpuLayer, Norm, activation_for, pack};
use crate::config::{BertConfig, HiddenAct};
use crate::error::{Error, Result};

/// The value added to attention scores of padding positions: finite in every dtype.
const MASK_VALUE: f64 = -1e4;

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `x` is (rows, in); returns (rows, out).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}

struct Layer {
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// BERT embeddings + encoder, loaded from a safetensors state dict.
pub struct BertEncoder {
    inner: Inner,
    hidden: usize,
    device: Device,
}

/// Which implementation runs the forward pass.
enum Inner {
    /// candle ops (any device and dtype).
    Candle(CandleBert),
    /// nstream-kernels' dense kernels (the CPU in f32).
    Cpu(CpuBert),
}

/// The encoder as candle tensors.
struct CandleBert {
    word_embeddings: Tensor,
    /// Position embeddings with token-type 0 already added: one add per forward instead of two.
    position_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    activation: HiddenAct,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    dtype: DType,
    device: Device,
}

/// Fetches tensors by name, trying the bare name and the `bert.` prefix that some checkpoints use.
struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
    prefix: &'static str,
    dtype: DType,
    device: &'a Device,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let tensor = self.tensors.get(&full).ok_or_else(|| Error::InvalidModel {
            file: "model.safetensors".into(),
            message: format!("tensor {full} is missing"),
        })?;
        if tensor.dims() != shape {
            return Err(Error::InvalidModel {
                file: "model.safetensors".into(),
                message: format!("tensor {full} has shape {:?}, config.json implies {shape:?}", tensor.dims()),
            });
        }
        Ok(tensor.to_dtype(DType::F32)?.to_device(self.device)?)
    }

    fn finish(&self, tensor: Tensor) -> Result<Tensor> {
        Ok(tensor.to_dtype(self.dtype)?)
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.finish(self.get(&format!("{name}.weight"), &[out_features, in_features])?)?,
            bias: self.finish(self.get(&format!("{name}.bias"), &[out_features])?)?,
        })
    }

    fn layer_norm(&self, name: &str, size: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.finish(self.get(&format!("{name}.weight"), &[size])?)?,
            bias: self.finish(self.get(&format!("{name}.bias"), &[size])?)?,
            eps: eps as f32,
        })
    }
}

impl BertEncoder {
    /// Builds the encoder from a state dict (names as in Hugging Face's `BertModel`, optionally
    /// prefixed with `bert.`), converting weights to `dtype` on `device`. On the CPU in f32 it
    /// runs on nstream-kernels' dense kernels (at `NSTREAM_CPU_LEVEL`'s level), elsewhere on
    /// candle ops.
    pub fn load(tensors: &HashMap<String, Tensor>, config: &BertConfig, dtype: DType, device: &Device) -> Result<Self> {
        let bf16_products = device.is_cpu() && dtype == DType::BF16 && bf16_available();
        // With bf16 products, f32 weights for everything but the products (packed as bfloat16).
        let load_dtype = if bf16_products { DType::F32 } else { dtype };
        let candle = CandleBert::load(tensors, config, load_dtype, device)?;
        let inner = if device.is_cpu() && load_dtype == DType::F32 {
            Inner::Cpu(candle.into_cpu(bf16_products)?)
        } else {
            Inner::Candle(candle)
        };
        Ok(Self { inner, hidden: config.hidden_size, device: device.clone() })
    }

    /// [`BertEncoder::load`] on candle ops whatever the device and dtype: the reference the CPU
    /// kernels are checked and timed against.
    pub fn load_candle_ops(
        tensors: &HashMap<String, Tensor>,
        config: &BertConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let candle = CandleBert::load(tensors, config, dtype, device)?;
        Ok(Self { inner: Inner::Candle(candle), hidden: config.hidden_size, device: device.clone() })
    }

    /// Whether the forward pass runs on nstream-kernels' CPU kernels (else on candle ops).
    pub fn uses_cpu_kernels(&self) -> bool {
        matches!(self.inner, Inner::Cpu(_))
    }

    /// The width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the encoder on right-padded `input_ids` (batch, sequence; u32) whose real lengths are
    /// `lengths`. Returns the last hidden states (batch, sequence, hidden) in f32.
    pub fn forward(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        match &self.inner {
            Inner::Candle(candle) => candle.forward(input_ids, lengths),
            Inner::Cpu(cpu) => {
                let (batch, sequence) = input_ids.dims2()?;
                if lengths.len() != batch || lengths.iter().any(|&length| length == 0 || length > sequence) {
                    return Err(Error::Inference(format!(
                        "lengths {lengths:?} do not fit a batch of {batch} × {sequence}"
                    )));
                }
                let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
                let states = cpu.forward(&ids, batch, sequence, lengths)?;
                Ok(Tensor::from_vec(states, (batch, sequence, self.hidden), &self.device)?)
            }
        }
    }
}

impl CandleBert {
    /// See [`BertEncoder::load`].
    fn load(tensors: &HashMap<String, Tensor>, config: &BertConfig, dtype: DType, device: &Device) -> Result<Self> {
        let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") { "" } else { "bert." };
        let weights = Weights { tensors, prefix, dtype, device };
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let head_dim = hidden / heads;

        let word_embeddings =
            weights.finish(weights.get("embeddings.word_embeddings.weight", &[config.vocab_size, hidden])?)?;
        let positions =
            weights.get("embeddings.position_embeddings.weight", &[config.max_position_embeddings, hidden])?;
        let token_types = weights.get("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, hidden])?;
        let position_embeddings = weights.finish(positions.broadcast_add(&token_types.narrow(0, 0, 1)?)?)?;
        let embeddings_norm = weights.layer_norm("embeddings.LayerNorm", hidden, config.layer_norm_eps)?;

        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let name = |part: &str| format!("encoder.layer.{index}.{part}");
            let projection = |part: &str| -> Result<(Tensor, Tensor)> {
                Ok((
                    weights.get(&name(&format!("attention.self.{part}.weight")), &[hidden, hidden])?,
                    weights.get(&name(&format!("attention.self.{part}.bias")), &[hidden])?,
                ))
            };
            let (query_weight, query_bias) = projection("query")?;
            let (key_weight, key_bias) = projection("key")?;
            let (value_weight, value_bias) = projection("value")?;
            let qkv = Linear {
                weight: weights.finish(Tensor::cat(&[(query_weight * scale)?, key_weight, value_weight], 0)?)?,
                bias: weights.finish(Tensor::cat(&[(query_bias * scale)?, key_bias, value_bias], 0)?)?,
            };
            layers.push(Layer {
                qkv,
                attention_output: weights.linear(&name("attention.output.dense"), hidden, hidden)?,
                attention_norm: weights.layer_norm(
                    &name("attention.output.LayerNorm"),
                    hidden,
                    config.layer_norm_eps,
                )?,
                intermediate: weights.linear(&name("intermediate.dense"), config.intermediate_size, hidden)?,
                output: weights.linear(&name("output.dense"), hidden, config.intermediate_size)?,
                output_norm: weights.layer_norm(&name("output.LayerNorm"), hidden, config.layer_norm_eps)?,
            });
        }
        Ok(Self {
            word_embeddings,
            position_embeddings,
            embeddings_norm,
            layers,
            activation: config.hidden_act,
            heads,
            head_dim,
            hidden,
            dtype,
            device: device.clone(),
        })
    }

    /// The same weights for the CPU kernels (f32 on the CPU only), consuming the tensors; with
    /// `bf16_products` the products' weights are stored as bfloat16.
    fn into_cpu(self, bf16_products: bool) -> Result<CpuBert> {
        let norm = |norm: LayerNorm| -> Result<Norm> {
            Ok(Norm { weight: norm.weight.to_vec1()?, bias: norm.bias.to_vec1()?, epsilon: norm.eps })
        };
        let word_embeddings = self.word_embeddings.flatten_all()?.to_vec1::<f32>()?;
        let position_embeddings = self.position_embeddings.flatten_all()?.to_vec1::<f32>()?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in self.layers {
            layers.push(CpuLayer {
                qkv: pack(&layer.qkv.weight, &layer.qkv.bias, bf16_products)?,
                attention_output: pack(&layer.attention_output.weight, &layer.attention_output.bias, bf16_products)?,
                attention_norm: norm(layer.attention_norm)?,
                intermediate: pack(&layer.intermediate.weight, &layer.intermediate.bias, bf16_products)?,
                output: pack(&layer.output.weight, &layer.output.bias, bf16_products)?,
                output_norm: norm(layer.output_norm)?,
            });
        }
        Ok(CpuBert {
            word_embeddings,
            position_embeddings,
            embeddings_norm: norm(self.embeddings_norm)?,
            layers,
            activation: activation_for(self.activation),
            heads: self.heads,
            head_dim: self.head_dim,
            buffers: Default::default(),
        })
    }

    /// See [`BertEncoder::forward`].
    fn forward(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (batch, sequence) = input_ids.dims2()?;
        if sequence > self.position_embeddings.dim(0)? {
            return Err(Error::Inference(format!(
                "sequence of {sequence} tokens exceeds the {} positions of the model",
                self.position_embeddings.dim(0)?
            )));
        }
        let rows = batch * sequence;
        let embeddings = self
            .word_embeddings
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, sequence, self.hidden))?
            .broadcast_add(&self.position_embeddings.narrow(0, 0, sequence)?)?;
        let mut hidden = self.embeddings_norm.forward(&embeddings)?.reshape((rows, self.hidden))?;

        let mask = if lengths.iter().all(|&length| length == sequence) {
            None
        } else {
            let values: Vec<f32> = lengths
                .iter()
                .flat_map(|&length| (0..sequence).map(move |p| if p < length { 0.0 } else { MASK_VALUE as f32 }))
                .collect();
            Some(Tensor::from_vec(values, (batch, 1, 1, sequence), &self.device)?.to_dtype(self.dtype)?)
        };

        for layer in &self.layers {
            hidden = self.layer_forward(layer, &hidden, batch, sequence, mask.as_ref())?;
        }
        Ok(hidden.reshape((batch, sequence, self.hidden))?.to_dtype(DType::F32)?)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        hidden: &Tensor,
        batch: usize,
        sequence: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let qkv = layer.qkv.forward(hidden)?.reshape((batch, sequence, 3, self.heads, self.head_dim))?;
        // (batch, heads, sequence, head_dim) each; matmul needs them contiguous.
        let split = |index: usize| -> Result<Tensor> {
            Ok(qkv.narrow(2, index, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?)
        };
        let (query, key, value) = (split(0)?, split(1)?, split(2)?);
        let mut scores = query.matmul(&key.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probabilities = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probabilities.matmul(&value)?.transpose(1, 2)?.reshape((batch * sequence, self.hidden))?;
        let attention = layer.attention_norm.forward(&(layer.attention_output.forward(&context)? + hidden)?)?;

        let intermediate = layer.intermediate.forward(&attention)?;
        let activated = match self.activation {
            HiddenAct::Gelu => intermediate.gelu_erf()?,
            HiddenAct::GeluApproximate => intermediate.gelu()?,
            HiddenAct::Relu => intermediate.relu()?,
        };
        layer.output_norm.forward(&(layer.output.forward(&activated)? + attention)?)
    }
}

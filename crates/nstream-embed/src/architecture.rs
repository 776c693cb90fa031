//! Which encoder a `config.json` describes, and the encoders themselves: the BERT fork
//! ([`crate::bert`]) and, for the architectures that need no fork, candle-transformers' models
//! (XLM-RoBERTa, ModernBERT, NomicBert, and Qwen2 for the gte-Qwen2 decoder embedders).
//!
//! Every encoder takes right-padded token ids and the real lengths and returns the last hidden
//! states in f32, so pooling, normalisation and batching are the same for all of them.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{modernbert, nomic_bert, qwen2, xlm_roberta};
use serde::Deserialize;

use crate::bert::BertEncoder;
use crate::config::BertConfig;
use crate::error::{Error, Result};

/// The encoder architectures nstream-embed runs, read from `config.json`'s `model_type` (or,
/// without one, its `architectures`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Architecture {
    /// BERT (`model_type` `bert`; also assumed when `config.json` names no architecture): the
    /// batched fork in [`crate::bert`].
    Bert,
    /// XLM-RoBERTa (`xlm-roberta`: multilingual-e5, bge-m3, paraphrase-multilingual):
    /// `candle_transformers::models::xlm_roberta`.
    XlmRoberta,
    /// ModernBERT (`modernbert`: gte-modernbert, modernbert-embed):
    /// `candle_transformers::models::modernbert`.
    ModernBert,
    /// NomicBert (`nomic_bert`: nomic-embed-text v1 and v1.5):
    /// `candle_transformers::models::nomic_bert`.
    NomicBert,
    /// Qwen2 (`qwen2`: gte-Qwen2-1.5B-instruct and gte-Qwen2-7B-instruct, decoder embedders
    /// pooling the last token): the base model of `candle_transformers::models::qwen2`, with
    /// causal attention as transformers runs it.
    Qwen2,
}

#[derive(Deserialize)]
struct ArchitectureFields {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Option<Vec<String>>,
}

impl Architecture {
    /// Reads the architecture from the text of `config.json`. An architecture nstream-embed does
    /// not run is [`Error::Unsupported`], naming it and the supported ones.
    pub fn detect(config_json: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(config_json).map_err(|error| invalid("config.json", error))?;
        if !value.is_object() {
            return Err(invalid("config.json", "expected a JSON object"));
        }
        let fields: ArchitectureFields =
            serde_json::from_value(value).map_err(|error| invalid("config.json", error))?;
        let named = match (&fields.model_type, fields.architectures.as_deref()) {
            (Some(model_type), _) => model_type.as_str(),
            // Old configs without model_type: the class name says it (`BertModel`, `XLMRobertaModel`).
            (None, Some([class, ..])) => {
                return Ok(match class.as_str() {
                    name if name.starts_with("XLMRoberta") => Self::XlmRoberta,
                    name if name.starts_with("ModernBert") => Self::ModernBert,
                    name if name.starts_with("NomicBert") => Self::NomicBert,
                    name if name.starts_with("Qwen2") => Self::Qwen2,
                    _ => Self::Bert,
                });
            }
            (None, _) => return Ok(Self::Bert),
        };
        match named {
            "bert" => Ok(Self::Bert),
            "xlm-roberta" | "xlm_roberta" => Ok(Self::XlmRoberta),
            "modernbert" => Ok(Self::ModernBert),
            "nomic_bert" => Ok(Self::NomicBert),
            "qwen2" => Ok(Self::Qwen2),
            "new" | "gte" => Err(Error::Unsupported(format!(
                "model_type {named:?} (GTE's \"new\" architecture: gte-multilingual-base, gte-*-en-v1.5) has no candle-transformers implementation yet; gte-small/base/large run as bert, gte-modernbert-base as modernbert and gte-Qwen2 as qwen2"
            ))),
            other => Err(Error::Unsupported(format!(
                "model_type {other:?} in config.json: nstream-embed runs bert, xlm-roberta, modernbert, nomic_bert and qwen2"
            ))),
        }
    }
}

/// A loaded encoder of any supported architecture.
pub(crate) enum Encoder {
    Bert(BertEncoder),
    XlmRoberta(xlm_roberta::XLMRobertaModel),
    ModernBert(modernbert::ModernBert),
    NomicBert(nomic_bert::NomicBertModel),
    /// Never run itself: its forward pass keeps a key/value cache, so each batch runs on a clone
    /// (the weights are shared) that starts with an empty one.
    Qwen2(qwen2::Model),
}

/// What the engine needs to know of a loaded encoder.
pub(crate) struct EncoderInfo {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// The longest input the position scheme allows.
    pub max_positions: usize,
    /// The token id to pad with; `None`: the tokenizer's `[PAD]` (BERT).
    pub pad_token_id: Option<u32>,
}

/// A loaded encoder with what the engine needs to know of it.
pub(crate) struct LoadedEncoder {
    pub encoder: Encoder,
    pub info: EncoderInfo,
    pub device: Device,
}

impl Encoder {
    /// Loads the encoder `config_json` describes from a safetensors state dict (on the CPU).
    /// candle-transformers' models run in f32 whatever `dtype` asks: their attention masks and
    /// position arithmetic are written for f32 (see docs/embeddings.md).
    pub fn load(
        config_json: &str,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<LoadedEncoder> {
        let architecture = Architecture::detect(config_json)?;
        if architecture != Architecture::Bert && dtype != DType::F32 {
            tracing::warn!(
                ?architecture,
                ?dtype,
                "this architecture runs in f32 (candle-transformers' model); the requested dtype is ignored"
            );
        }
        let weights_error = |error: candle_core::Error| Error::InvalidModel {
            file: "model.safetensors".into(),
            message: format!("{architecture:?} weights: {error}"),
        };
        let (encoder, hidden_size, vocab_size, max_positions, pad_token_id) = match architecture {
            Architecture::Bert => {
                let config = BertConfig::from_json(config_json)?;
                let encoder = BertEncoder::load(&tensors, &config, dtype, device)?;
                (Encoder::Bert(encoder), config.hidden_size, config.vocab_size, config.max_position_embeddings, None)
            }
            Architecture::XlmRoberta => {
                let config = XlmRobertaFields::parse(config_json)?;
                let candle_config = config.to_candle();
                // Masked-LM checkpoints (xlm-roberta-base) keep the encoder under `roberta.`.
                let prefixed = !tensors.contains_key("embeddings.word_embeddings.weight")
                    && tensors.contains_key("roberta.embeddings.word_embeddings.weight");
                let builder = VarBuilder::from_tensors(tensors, DType::F32, device);
                let builder = if prefixed { builder.pp("roberta") } else { builder };
                let model = xlm_roberta::XLMRobertaModel::new(&candle_config, builder).map_err(weights_error)?;
                // Positions start after the padding id (RoBERTa's scheme), so fewer are usable.
                let max_positions = config.max_position_embeddings.saturating_sub(config.pad_token_id as usize + 1);
                (
                    Encoder::XlmRoberta(model),
                    config.hidden_size,
                    config.vocab_size,
                    max_positions,
                    Some(config.pad_token_id),
                )
            }
            Architecture::ModernBert => {
                let config = ModernBertFields::parse(config_json)?;
                let candle_config = config.to_candle()?;
                // The masked-LM checkpoints name weights `model.*`; an exported ModernBertModel
                // (sentence-transformers) does not.
                let tensors = with_model_prefix(tensors);
                let builder = VarBuilder::from_tensors(tensors, DType::F32, device);
                let model = modernbert::ModernBert::load(builder, &candle_config).map_err(weights_error)?;
                (
                    Encoder::ModernBert(model),
                    config.hidden_size,
                    config.vocab_size,
                    config.max_position_embeddings,
                    Some(config.pad_token_id),
                )
            }
            Architecture::NomicBert => {
                let config = NomicBertFields::parse(config_json)?;
                let candle_config = config.to_candle()?;
                let builder = VarBuilder::from_tensors(tensors, DType::F32, device);
                let model = nomic_bert::NomicBertModel::load(builder, &candle_config).map_err(weights_error)?;
                (
                    Encoder::NomicBert(model),
                    candle_config.n_embd,
                    candle_config.vocab_size,
                    candle_config.n_positions,
                    Some(config.pad_token_id),
                )
            }
            Architecture::Qwen2 => {
                let config = Qwen2Fields::parse(config_json)?;
                let candle_config = config.to_candle()?;
                // The hub's gte-Qwen2 checkpoints name weights `model.*`; an exported Qwen2Model
                // (sentence-transformers) does not.
                let tensors = with_model_prefix(tensors);
                let builder = VarBuilder::from_tensors(tensors, DType::F32, device);
                let model = qwen2::Model::new(&candle_config, builder).map_err(weights_error)?;
                (
                    Encoder::Qwen2(model),
                    config.hidden_size,
                    config.vocab_size,
                    config.max_position_embeddings,
                    Some(config.pad_id()),
                )
            }
        };
        let info = EncoderInfo { architecture, hidden_size, vocab_size, max_positions, pad_token_id };
        Ok(LoadedEncoder { encoder, info, device: device.clone() })
    }

    /// Whether padding costs no work (BERT on nstream's CPU kernels packs the real tokens).
    pub fn is_padding_free(&self) -> bool {
        matches!(self, Self::Bert(encoder) if encoder.uses_cpu_kernels())
    }

    /// Runs the encoder on right-padded `input_ids` (batch, sequence; u32) whose real lengths are
    /// `lengths`. Returns the last hidden states (batch, sequence, hidden) in f32.
    pub fn forward(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let hidden = match self {
            Self::Bert(encoder) => return encoder.forward(input_ids, lengths),
            Self::XlmRoberta(model) => {
                let mask = attention_mask(input_ids, lengths)?;
                let token_types = input_ids.zeros_like()?;
                model.forward(input_ids, &mask, &token_types, None, None, None)?
            }
            Self::ModernBert(model) => model.forward(input_ids, &attention_mask(input_ids, lengths)?)?,
            Self::NomicBert(model) => model.forward(input_ids, None, Some(&attention_mask(input_ids, lengths)?))?,
            // No padding mask: with causal attention a real token only sees the tokens before it,
            // so the right padding after a sentence cannot change its states, and the last real
            // token (what gte-Qwen2 pools) is the same alone and in a batch. (Given a mask,
            // candle's Qwen2 attends both ways, which transformers' Qwen2Model does not.)
            Self::Qwen2(model) => model.clone().forward(input_ids, 0, None)?,
        };
        Ok(hidden.to_dtype(DType::F32)?)
    }
}

/// (batch, sequence) u32: 1 on real tokens, 0 on padding.
/// Prefixes every weight name with `model.` (what candle's ModernBERT and Qwen2 read) unless the
/// checkpoint's names already carry it.
fn with_model_prefix(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    if tensors.keys().any(|name| name.starts_with("model.")) {
        tensors
    } else {
        tensors.into_iter().map(|(name, tensor)| (format!("model.{name}"), tensor)).collect()
    }
}

fn attention_mask(input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
    let (batch, sequence) = input_ids.dims2()?;
    if lengths.len() != batch {
        return Err(Error::Inference(format!("{} lengths for a batch of {batch}", lengths.len())));
    }
    let values: Vec<u32> =
        lengths.iter().flat_map(|&length| (0..sequence).map(move |position| u32::from(position < length))).collect();
    Ok(Tensor::from_vec(values, (batch, sequence), input_ids.device())?)
}

fn invalid(file: &str, error: impl std::fmt::Display) -> Error {
    Error::InvalidModel { file: file.to_owned(), message: error.to_string() }
}

fn config_error(message: impl Into<String>) -> Error {
    Error::InvalidModel { file: "config.json".into(), message: message.into() }
}

fn check_heads(hidden_size: usize, heads: usize) -> Result<()> {
    if heads == 0 || !hidden_size.is_multiple_of(heads) {
        return Err(config_error(format!(
            "hidden_size {hidden_size} is not a multiple of num_attention_heads {heads}"
        )));
    }
    Ok(())
}

/// The fields of an XLM-RoBERTa `config.json` (transformers 5 omits some that candle's own
/// `Config` requires, so it is built from these).
#[derive(Deserialize)]
struct XlmRobertaFields {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: candle_nn::Activation,
    max_position_embeddings: usize,
    #[serde(default = "one")]
    type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    layer_norm_eps: f64,
    #[serde(default = "one_u32")]
    pad_token_id: u32,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn one() -> usize {
    1
}

fn one_u32() -> u32 {
    1
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

impl XlmRobertaFields {
    fn parse(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|error| invalid("config.json", error))?;
        check_heads(config.hidden_size, config.num_attention_heads)?;
        if let Some(kind) = &config.position_embedding_type
            && kind != "absolute"
        {
            return Err(Error::Unsupported(format!("position_embedding_type {kind:?} (only \"absolute\")")));
        }
        if config.max_position_embeddings < config.pad_token_id as usize + 3 || config.type_vocab_size == 0 {
            return Err(config_error(format!(
                "max_position_embeddings {} leaves no position after pad_token_id {} (RoBERTa positions start after it), or type_vocab_size is 0",
                config.max_position_embeddings, config.pad_token_id
            )));
        }
        Ok(config)
    }

    fn to_candle(&self) -> xlm_roberta::Config {
        xlm_roberta::Config {
            hidden_size: self.hidden_size,
            layer_norm_eps: self.layer_norm_eps,
            attention_probs_dropout_prob: 0.0,
            hidden_dropout_prob: 0.0,
            num_attention_heads: self.num_attention_heads,
            position_embedding_type: "absolute".into(),
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act,
            num_hidden_layers: self.num_hidden_layers,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            pad_token_id: self.pad_token_id,
        }
    }
}

/// The fields of a ModernBERT `config.json`, in both spellings: the hub's original
/// (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) and transformers 5's
/// (`layer_types`, `rope_parameters`).
#[derive(Deserialize)]
struct ModernBertFields {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_layer_norm_eps", alias = "layer_norm_eps")]
    norm_eps: f64,
    #[serde(default)]
    pad_token_id: u32,
    #[serde(default)]
    global_attn_every_n_layers: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default)]
    global_rope_theta: Option<f64>,
    #[serde(default)]
    local_rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<HashMap<String, RopeParameters>>,
    #[serde(default = "default_local_attention")]
    local_attention: usize,
    #[serde(default = "default_gelu")]
    hidden_activation: String,
    #[serde(default)]
    norm_bias: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

#[derive(Deserialize)]
struct RopeParameters {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_type: Option<String>,
}

fn default_local_attention() -> usize {
    128
}

fn default_gelu() -> String {
    "gelu".into()
}

impl ModernBertFields {
    fn parse(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|error| invalid("config.json", error))?;
        check_heads(config.hidden_size, config.num_attention_heads)?;
        // candle's ModernBERT has no biases and uses erf GELU: refuse what it would compute wrongly.
        for (field, on) in
            [("norm_bias", config.norm_bias), ("attention_bias", config.attention_bias), ("mlp_bias", config.mlp_bias)]
        {
            if on {
                return Err(Error::Unsupported(format!("ModernBERT with {field}: true")));
            }
        }
        if config.hidden_activation != "gelu" {
            return Err(Error::Unsupported(format!(
                "ModernBERT hidden_activation {:?} (only \"gelu\")",
                config.hidden_activation
            )));
        }
        if let Some(parameters) = &config.rope_parameters
            && let Some(kind) = parameters.values().find_map(|p| p.rope_type.as_deref().filter(|t| *t != "default"))
        {
            return Err(Error::Unsupported(format!("ModernBERT rope_type {kind:?} (only \"default\")")));
        }
        Ok(config)
    }

    /// Every `n`-th layer (from 0) attends globally, the rest within the local window: the one
    /// pattern candle's model runs. `layer_types` must follow it.
    fn global_every(&self) -> Result<usize> {
        let Some(types) = &self.layer_types else {
            return Ok(self.global_attn_every_n_layers.unwrap_or(3).max(1));
        };
        if types.len() != self.num_hidden_layers {
            return Err(config_error(format!(
                "layer_types has {} entries for {} layers",
                types.len(),
                self.num_hidden_layers
            )));
        }
        let every =
            types.iter().skip(1).position(|kind| kind == "full_attention").map_or(types.len().max(1), |i| i + 1);
        let follows = types.iter().enumerate().all(|(layer, kind)| {
            let expected = if layer % every == 0 { "full_attention" } else { "sliding_attention" };
            kind == expected
        });
        if !follows {
            return Err(Error::Unsupported(format!(
                "ModernBERT layer_types {types:?}: only a full-attention layer every n layers, starting with layer 0"
            )));
        }
        Ok(every)
    }

    fn theta(&self, kind: &str, old: Option<f64>, default: f64) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|parameters| parameters.get(kind))
            .and_then(|parameters| parameters.rope_theta)
            .or(old)
            .unwrap_or(default)
    }

    fn to_candle(&self) -> Result<modernbert::Config> {
        Ok(modernbert::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            layer_norm_eps: self.norm_eps,
            pad_token_id: self.pad_token_id,
            global_attn_every_n_layers: self.global_every()?,
            global_rope_theta: self.theta("full_attention", self.global_rope_theta, 160_000.0),
            local_attention: self.local_attention,
            local_rope_theta: self.theta("sliding_attention", self.local_rope_theta, 10_000.0),
            classifier_config: None,
        })
    }
}

/// The fields of a NomicBert `config.json`, in both spellings: the hub's (`n_embd`, `n_head`,
/// `rotary_emb_base`, ..., as nomic-embed-text writes them) and transformers 5's (`hidden_size`,
/// `num_attention_heads`, `rope_parameters`, ...).
#[derive(Deserialize)]
struct NomicBertFields {
    vocab_size: usize,
    #[serde(alias = "n_embd")]
    hidden_size: usize,
    #[serde(alias = "n_head")]
    num_attention_heads: usize,
    #[serde(alias = "n_layer")]
    num_hidden_layers: usize,
    #[serde(alias = "n_inner")]
    intermediate_size: Option<usize>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: usize,
    #[serde(default = "two")]
    type_vocab_size: usize,
    #[serde(default = "bert_layer_norm_eps", alias = "layer_norm_epsilon")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: u32,
    #[serde(default)]
    rotary_emb_base: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default = "one_f64")]
    rotary_emb_fraction: f64,
    #[serde(default)]
    rotary_emb_interleaved: bool,
    #[serde(default)]
    rotary_scaling_factor: Option<f64>,
    #[serde(default)]
    qkv_proj_bias: bool,
    #[serde(default)]
    mlp_fc1_bias: bool,
    #[serde(default)]
    mlp_fc2_bias: bool,
    /// The hub's spelling: `swiglu`.
    #[serde(default)]
    activation_function: Option<String>,
    /// transformers 5's spelling: `silu` (gated, so the same SwiGLU).
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    prenorm: bool,
    #[serde(default)]
    moe_every_n_layers: usize,
}

fn two() -> usize {
    2
}

fn one_f64() -> f64 {
    1.0
}

fn bert_layer_norm_eps() -> f64 {
    1e-12
}

impl NomicBertFields {
    fn parse(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|error| invalid("config.json", error))?;
        check_heads(config.hidden_size, config.num_attention_heads)?;
        let unsupported = |what: String| Err(Error::Unsupported(format!("NomicBert with {what}")));
        if config.moe_every_n_layers > 0 {
            return unsupported(format!(
                "mixture-of-experts layers (moe_every_n_layers {})",
                config.moe_every_n_layers
            ));
        }
        if config.rotary_emb_fraction != 1.0 {
            return unsupported(format!("rotary_emb_fraction {} (only 1.0)", config.rotary_emb_fraction));
        }
        if let Some(factor) = config.rotary_scaling_factor {
            return unsupported(format!("rotary_scaling_factor {factor} (only null)"));
        }
        if let Some(kind) = config.rope_parameters.as_ref().and_then(|p| p.rope_type.as_deref())
            && kind != "default"
        {
            return unsupported(format!("rope_type {kind:?} (only \"default\")"));
        }
        let activation_ok = match (&config.activation_function, &config.hidden_act) {
            (Some(activation), _) => activation == "swiglu",
            (None, Some(activation)) => activation == "silu",
            (None, None) => true,
        };
        if !activation_ok {
            return unsupported(format!(
                "activation {:?} (only the SwiGLU feed-forward: activation_function \"swiglu\" or hidden_act \"silu\")",
                config.activation_function.as_ref().or(config.hidden_act.as_ref())
            ));
        }
        Ok(config)
    }

    fn to_candle(&self) -> Result<nomic_bert::Config> {
        Ok(nomic_bert::Config {
            vocab_size: self.vocab_size,
            n_embd: self.hidden_size,
            n_head: self.num_attention_heads,
            n_layer: self.num_hidden_layers,
            n_inner: self.intermediate_size.unwrap_or(4 * self.hidden_size),
            n_positions: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            layer_norm_epsilon: self.layer_norm_eps,
            rotary_emb_fraction: self.rotary_emb_fraction,
            rotary_emb_base: self
                .rope_parameters
                .as_ref()
                .and_then(|parameters| parameters.rope_theta)
                .or(self.rotary_emb_base)
                .unwrap_or(1000.0),
            rotary_emb_interleaved: self.rotary_emb_interleaved,
            qkv_proj_bias: self.qkv_proj_bias,
            mlp_fc1_bias: self.mlp_fc1_bias,
            mlp_fc2_bias: self.mlp_fc2_bias,
            activation_function: "swiglu".into(),
            prenorm: self.prenorm,
            model_type: Some("nomic_bert".into()),
        })
    }
}

/// The fields of a Qwen2 `config.json`, with the rotary base in both spellings: `rope_theta`
/// (the hub's gte-Qwen2) and transformers 5's `rope_parameters`.
#[derive(Deserialize)]
struct Qwen2Fields {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    max_position_embeddings: usize,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    /// The old spelling of a non-default rope: anything but null is refused.
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default = "default_silu")]
    hidden_act: candle_nn::Activation,
    #[serde(default)]
    pad_token_id: Option<u32>,
    /// A number or (in some configs) a list of numbers.
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_silu() -> candle_nn::Activation {
    candle_nn::Activation::Silu
}

impl Qwen2Fields {
    fn parse(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|error| invalid("config.json", error))?;
        check_heads(config.hidden_size, config.num_attention_heads)?;
        let key_value_heads = config.key_value_heads();
        if key_value_heads == 0 || !config.num_attention_heads.is_multiple_of(key_value_heads) {
            return Err(config_error(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {key_value_heads}",
                config.num_attention_heads
            )));
        }
        if config.max_position_embeddings == 0 {
            return Err(config_error("max_position_embeddings is 0"));
        }
        // candle's Qwen2 slides the window on every layer, transformers only above
        // max_window_layers; gte-Qwen2 uses none.
        if config.use_sliding_window {
            return Err(Error::Unsupported("Qwen2 with use_sliding_window: true".into()));
        }
        if let Some(scaling) = config.rope_scaling.as_ref().filter(|value| !value.is_null()) {
            return Err(Error::Unsupported(format!("Qwen2 rope_scaling {scaling} (only null)")));
        }
        if let Some(kind) = config.rope_parameters.as_ref().and_then(|p| p.rope_type.as_deref())
            && kind != "default"
        {
            return Err(Error::Unsupported(format!("Qwen2 rope_type {kind:?} (only \"default\")")));
        }
        Ok(config)
    }

    fn key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Any id pads (no real token attends to the padding after it); the configured pad or end
    /// of text token keeps it a real one.
    fn pad_id(&self) -> u32 {
        let eos = self.eos_token_id.as_ref().and_then(|value| match value {
            serde_json::Value::Array(ids) => ids.first().and_then(serde_json::Value::as_u64),
            other => other.as_u64(),
        });
        self.pad_token_id
            .or_else(|| eos.and_then(|id| u32::try_from(id).ok()))
            .filter(|&id| (id as usize) < self.vocab_size)
            .unwrap_or(0)
    }

    fn to_candle(&self) -> Result<qwen2::Config> {
        Ok(qwen2::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.key_value_heads(),
            max_position_embeddings: self.max_position_embeddings,
            // No sliding window: one as long as the longest input never masks anything.
            sliding_window: self.max_position_embeddings,
            max_window_layers: self.num_hidden_layers,
            tie_word_embeddings: false,
            rope_theta: self
                .rope_parameters
                .as_ref()
                .and_then(|parameters| parameters.rope_theta)
                .or(self.rope_theta)
                .unwrap_or(10_000.0),
            rms_norm_eps: self.rms_norm_eps,
            use_sliding_window: false,
            hidden_act: self.hidden_act,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_architecture() {
        for (config, expected) in [
            (r#"{"model_type":"bert"}"#, Architecture::Bert),
            (r#"{}"#, Architecture::Bert),
            (r#"{"model_type":"xlm-roberta"}"#, Architecture::XlmRoberta),
            (r#"{"model_type":"modernbert"}"#, Architecture::ModernBert),
            (r#"{"model_type":"nomic_bert"}"#, Architecture::NomicBert),
            (r#"{"architectures":["XLMRobertaModel"]}"#, Architecture::XlmRoberta),
            (r#"{"architectures":["BertModel"]}"#, Architecture::Bert),
            (r#"{"model_type":"qwen2"}"#, Architecture::Qwen2),
        ] {
            assert_eq!(Architecture::detect(config).expect(config), expected, "{config}");
        }
        let error = Architecture::detect(r#"{"model_type":"new"}"#).expect_err("gte");
        assert!(matches!(error, Error::Unsupported(_)) && error.to_string().contains("GTE"), "{error}");
        let error = Architecture::detect(r#"{"model_type":"llama"}"#).expect_err("llama");
        assert!(matches!(error, Error::Unsupported(_)) && error.to_string().contains("llama"), "{error}");
        for bad in ["[]", "not json", r#"{"model_type":3}"#] {
            assert!(matches!(Architecture::detect(bad), Err(Error::InvalidModel { .. })), "{bad}");
        }
    }

    const MODERNBERT: &str = r#"{"model_type":"modernbert","vocab_size":10,"hidden_size":8,"num_hidden_layers":4,
        "num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":32,"local_attention":8,
        "layer_types":["full_attention","sliding_attention","full_attention","sliding_attention"],
        "rope_parameters":{"full_attention":{"rope_theta":1000.0,"rope_type":"default"},
                           "sliding_attention":{"rope_theta":10.0,"rope_type":"default"}}}"#;

    #[test]
    fn modernbert_config_in_both_spellings() {
        let new = ModernBertFields::parse(MODERNBERT).expect("parses").to_candle().expect("maps");
        assert_eq!((new.global_attn_every_n_layers, new.global_rope_theta, new.local_rope_theta), (2, 1000.0, 10.0));
        let old = MODERNBERT
            .replace(
                r#""layer_types":["full_attention","sliding_attention","full_attention","sliding_attention"],"#,
                "",
            )
            .replace(
                r#""rope_parameters":{"full_attention":{"rope_theta":1000.0,"rope_type":"default"},
                           "sliding_attention":{"rope_theta":10.0,"rope_type":"default"}}"#,
                r#""global_attn_every_n_layers":3,"global_rope_theta":160000.0,"local_rope_theta":10000.0"#,
            );
        let old = ModernBertFields::parse(&old).expect("parses").to_candle().expect("maps");
        assert_eq!(
            (old.global_attn_every_n_layers, old.global_rope_theta, old.local_rope_theta),
            (3, 160_000.0, 10_000.0)
        );
    }

    #[test]
    fn modernbert_refuses_what_candle_would_compute_wrongly() {
        let irregular = MODERNBERT.replace(
            r#"["full_attention","sliding_attention","full_attention","sliding_attention"]"#,
            r#"["full_attention","sliding_attention","full_attention","full_attention"]"#,
        );
        let error = ModernBertFields::parse(&irregular).and_then(|c| c.to_candle()).expect_err("irregular");
        assert!(error.to_string().contains("layer_types"), "{error}");
        for (from, to) in [
            (r#""local_attention":8"#, r#""local_attention":8,"norm_bias":true"#),
            (r#""local_attention":8"#, r#""local_attention":8,"mlp_bias":true"#),
            (r#""local_attention":8"#, r#""local_attention":8,"hidden_activation":"silu""#),
        ] {
            assert!(
                matches!(ModernBertFields::parse(&MODERNBERT.replace(from, to)), Err(Error::Unsupported(_))),
                "{to}"
            );
        }
    }

    #[test]
    fn nomic_bert_config_in_both_spellings() {
        let hub = r#"{"model_type":"nomic_bert","vocab_size":30528,"n_embd":768,"n_head":12,"n_layer":12,
            "n_inner":3072,"n_positions":8192,"layer_norm_epsilon":1e-12,"rotary_emb_base":1000,
            "rotary_emb_fraction":1.0,"rotary_emb_interleaved":false,"rotary_scaling_factor":null,
            "activation_function":"swiglu","qkv_proj_bias":false,"prenorm":false}"#;
        let hub = NomicBertFields::parse(hub).expect("parses").to_candle().expect("maps");
        assert_eq!((hub.n_embd, hub.n_head, hub.n_inner, hub.n_positions), (768, 12, 3072, 8192));
        let transformers = r#"{"model_type":"nomic_bert","vocab_size":300,"hidden_size":32,"num_attention_heads":4,
            "num_hidden_layers":2,"intermediate_size":64,"max_position_embeddings":128,"hidden_act":"silu",
            "rope_parameters":{"rope_theta":500.0,"rope_type":"default"}}"#;
        let transformers = NomicBertFields::parse(transformers).expect("parses").to_candle().expect("maps");
        assert_eq!((transformers.n_embd, transformers.rotary_emb_base), (32, 500.0));
        let moe = r#"{"vocab_size":10,"n_embd":8,"n_head":2,"n_layer":2,"n_positions":16,"moe_every_n_layers":2}"#;
        assert!(matches!(NomicBertFields::parse(moe), Err(Error::Unsupported(_))));
        let gelu =
            r#"{"vocab_size":10,"n_embd":8,"n_head":2,"n_layer":2,"n_positions":16,"activation_function":"gelu"}"#;
        assert!(matches!(NomicBertFields::parse(gelu), Err(Error::Unsupported(_))));
    }

    #[test]
    fn qwen2_config_in_both_spellings_and_refusals() {
        // The hub's gte-Qwen2-1.5B-instruct config (abridged).
        let hub = r#"{"model_type":"qwen2","vocab_size":151646,"hidden_size":1536,"intermediate_size":8960,
            "num_hidden_layers":28,"num_attention_heads":12,"num_key_value_heads":2,"max_position_embeddings":131072,
            "rope_theta":1000000.0,"rms_norm_eps":1e-6,"use_sliding_window":false,"sliding_window":131072,
            "hidden_act":"silu","eos_token_id":151643,"rope_scaling":null}"#;
        let parsed = Qwen2Fields::parse(hub).expect("parses");
        assert_eq!(parsed.pad_id(), 151_643);
        let candle = parsed.to_candle().expect("maps");
        assert_eq!((candle.num_key_value_heads, candle.rope_theta, candle.sliding_window), (2, 1e6, 131_072));
        let transformers = r#"{"model_type":"qwen2","vocab_size":320,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":128,
            "rope_parameters":{"rope_theta":500.0,"rope_type":"default"},"pad_token_id":7,"eos_token_id":[3,4]}"#;
        let parsed = Qwen2Fields::parse(transformers).expect("parses");
        assert_eq!((parsed.pad_id(), parsed.to_candle().expect("maps").rope_theta), (7, 500.0));
        for (from, to) in [
            (r#""rope_scaling":null"#, r#""rope_scaling":{"type":"yarn","factor":4.0}"#),
            (r#""use_sliding_window":false"#, r#""use_sliding_window":true"#),
        ] {
            assert!(matches!(Qwen2Fields::parse(&hub.replace(from, to)), Err(Error::Unsupported(_))), "{to}");
        }
        let bad_heads = hub.replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":5"#);
        let error = Qwen2Fields::parse(&bad_heads).err().expect("bad heads");
        assert!(error.to_string().contains("num_key_value_heads"), "{error}");
    }

    #[test]
    fn xlm_roberta_positions_start_after_the_padding_id() {
        let config = r#"{"model_type":"xlm-roberta","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":16,"hidden_act":"gelu","max_position_embeddings":2,"pad_token_id":1}"#;
        assert!(matches!(XlmRobertaFields::parse(config), Err(Error::InvalidModel { .. })));
        let relative = config.replace(
            r#""max_position_embeddings":2"#,
            r#""max_position_embeddings":20,"position_embedding_type":"relative_key""#,
        );
        assert!(matches!(XlmRobertaFields::parse(&relative), Err(Error::Unsupported(_))));
    }
}

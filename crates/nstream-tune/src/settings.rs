//! What a run is asked to do: every setting of `nstream finetune`, with its default.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What is trained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Low-rank adapters on the target modules; the base is frozen.
    #[default]
    Lora,
    /// Every weight (small models only: the optimiser keeps two f32 moments per weight).
    Full,
}

/// The dtype of the weights and activations in the forward and backward passes. The optimiser
/// keeps an f32 master copy of the trained weights and f32 moments whatever this is, so updates
/// smaller than bf16's resolution accumulate instead of being rounded away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on CUDA, f32 on the CPU (where bf16 has no fast kernels).
    #[default]
    Auto,
    /// f32 everywhere.
    F32,
    /// bf16 weights and activations (the loss in f32) with the f32 master copy.
    Bf16,
}

impl Precision {
    /// The dtype this precision means on `device`.
    pub fn dtype(self, device: &candle_core::Device) -> candle_core::DType {
        match self {
            Self::Auto if device.is_cuda() => candle_core::DType::BF16,
            Self::Auto | Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressMode {
    /// A bar on a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Always a bar.
    Bar,
    /// Always plain lines.
    Lines,
    /// Nothing but errors.
    Quiet,
}

/// The settings of a run. `training_args.json` is this structure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Settings {
    /// The training data (JSONL).
    pub data: PathBuf,
    /// Validation data (JSONL); without it, `validation_split` of the training records.
    pub validation: Option<PathBuf>,
    /// The share of training records held out for validation (by a hash of each record).
    pub validation_split: f64,
    /// The output folder.
    pub output: PathBuf,
    /// LoRA or full fine-tuning.
    pub method: Method,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (the scale is alpha / rank).
    pub alpha: f64,
    /// Dropout on the adapters' input.
    pub dropout: f64,
    /// rsLoRA: scale alpha / sqrt(rank).
    pub rslora: bool,
    /// The adapted modules (`q_proj`..., or `all-linear`).
    pub target_modules: Vec<String>,
    /// Passes over the training data (when `max_steps` is not set).
    pub epochs: usize,
    /// Optimiser steps; overrides `epochs`.
    pub max_steps: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation: usize,
    /// Longest example in tokens.
    pub max_seq_len: usize,
    /// Refuse examples over `max_seq_len` instead of cutting them.
    pub no_truncate: bool,
    /// Seed of the adapter initialisation, the data order and dropout.
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only on interruption).
    pub save_every: usize,
    /// Evaluate the validation loss every this many steps (0: at the start and end only).
    pub eval_every: usize,
    /// Global gradient-norm clipping (0: none).
    pub max_grad_norm: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Also write the base with the adapter merged in (safetensors bases).
    pub merge: bool,
    /// CPU threads (default: candle's, the physical cores).
    pub threads: Option<usize>,
    /// The dtype of the forward and backward passes.
    #[serde(default)]
    pub precision: Precision,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Memory the run may use, MiB (default: what the machine has available).
    pub memory_limit_mib: Option<u64>,
    /// Also write what a parity check against PyTorch needs: the step-0 adapter, every step's
    /// batches and the final logits on one example (`parity/`).
    pub record_batches: bool,
}

impl Settings {
    /// Settings with the defaults for `data` and `output`.
    pub fn new(data: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            data: data.into(),
            validation: None,
            validation_split: 0.0,
            output: output.into(),
            method: Method::Lora,
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"].map(str::to_owned).to_vec(),
            epochs: 1,
            max_steps: None,
            learning_rate: 2e-4,
            warmup: 0,
            batch_size: 4,
            gradient_accumulation: 1,
            max_seq_len: 1024,
            no_truncate: false,
            seed: 42,
            save_every: 0,
            eval_every: 0,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            merge: false,
            threads: None,
            precision: Precision::Auto,
            progress: ProgressMode::Auto,
            memory_limit_mib: None,
            record_batches: false,
        }
    }

    /// Checks every value that can be checked without the model or the data.
    pub fn validate(&self) -> Result<()> {
        let positive = |value: f64| value.is_finite() && value > 0.0;
        if !positive(self.learning_rate) {
            return Err(Error::setting("learning-rate", format!("{} must be a positive number", self.learning_rate)));
        }
        if self.method == Method::Lora {
            if self.rank == 0 {
                return Err(Error::setting("rank", "must be at least 1"));
            }
            if !positive(self.alpha) {
                return Err(Error::setting("alpha", format!("{} must be a positive number", self.alpha)));
            }
            nstream_peft::Module::parse_list(&self.target_modules)
                .map_err(|message| Error::setting("target-modules", message))?;
        } else if self.merge {
            return Err(Error::setting(
                "merge",
                "only LoRA adapters are merged (full fine-tuning writes the whole model)",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::setting("dropout", format!("{} is not in [0, 1)", self.dropout)));
        }
        if self.batch_size == 0 {
            return Err(Error::setting("batch-size", "must be at least 1"));
        }
        if self.gradient_accumulation == 0 {
            return Err(Error::setting("gradient-accumulation", "must be at least 1"));
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return Err(Error::setting(
                "max-steps",
                "the run would take no step (--epochs and --max-steps must be at least 1)",
            ));
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            return Err(Error::setting("validation-split", format!("{} is not in [0, 1)", self.validation_split)));
        }
        if self.validation.is_some() && self.validation_split > 0.0 {
            return Err(Error::setting(
                "validation-split",
                "give either --validation FILE or --validation-split, not both",
            ));
        }
        if self.max_seq_len < 2 {
            return Err(Error::setting("max-seq-len", "must be at least 2"));
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return Err(Error::setting("max-grad-norm", "must be 0 (off) or positive"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::setting("weight-decay", "must be 0 or positive"));
        }
        Ok(())
    }

    /// The settings that decide the trained weights: a checkpoint resumes only under the same.
    pub(crate) fn fingerprint(&self) -> serde_json::Value {
        let mut copy = self.clone();
        copy.output = PathBuf::new();
        copy.save_every = 0;
        copy.eval_every = 0;
        copy.threads = None;
        copy.progress = ProgressMode::Auto;
        copy.memory_limit_mib = None;
        copy.record_batches = false;
        copy.merge = false;
        serde_json::to_value(copy).unwrap_or_default()
    }
}

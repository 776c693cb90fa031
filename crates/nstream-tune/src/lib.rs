//! Fine-tuning of Llama-family causal LMs on candle: LoRA (PEFT adapters) and full fine-tuning,
//! on the chat data `nstream generate` writes.
//!
//! - [`base`]: the base model, dense (GGUF files dequantised, their Q/K rows put back in the
//!   Hugging Face order), with its tokenizer and chat template (nstream-llm's).
//! - [`forward`]: the training forward, built only from operations candle differentiates.
//! - [`data`]: records to tokens with a loss mask on the assistant's tokens, the hashed
//!   validation split, truncation.
//! - [`optim`]: AdamW, warmup + cosine schedule, global-norm clipping.
//! - [`train`]: the loop, checkpoints (atomic), resumption bit for bit, the output folder
//!   (PEFT adapter, `training_args.json`, `metrics.jsonl`, `report.md`, `loss_curve.svg`).
//!
//! The adapter format itself lives in nstream-peft, which serving shares.

pub mod base;
pub mod curve;
pub mod data;
mod error;
pub mod forward;
mod kernels;
pub mod optim;
mod progress;
pub mod report;
pub mod settings;
mod simd;
mod sink;
pub mod threads;
pub mod train;

pub use base::{BaseModel, Provenance};
pub use error::{Error, Result};
pub use settings::{Method, Precision, ProgressMode, Settings};
pub use threads::pin_training_threads;
pub use train::{Stop, Summary, finetune};

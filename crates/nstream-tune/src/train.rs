//! The training loop: data order, micro-batches and gradient accumulation, AdamW, evaluation,
//! checkpoints and resumption, and the output folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::base::BaseModel;
use crate::data::{DataOptions, Dataset, Example, load_dataset};
use crate::error::{Error, Result};
use crate::forward::{Batch, DropoutSeed, LoraSpec, TrainModel, to_peft};
use crate::optim::{AdamW, AdamWConfig, Moments, clip_coefficient, global_norm, learning_rate};
use crate::progress::Progress;
use crate::settings::{Method, Settings};
use crate::sink::add_in_place;

/// The checkpoint file in the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The settings file in the output folder.
pub const ARGS_FILE: &str = "training_args.json";
/// One JSON object per logged step.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The loss curve.
pub const CURVE_FILE: &str = "loss_curve.svg";
/// The human-readable report.
pub const REPORT_FILE: &str = "report.md";
/// Where the base came from (repository, revision, GGUF file).
pub const BASE_FILE: &str = "base_model.json";

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimiser steps done (0: before training).
    pub step: usize,
    /// Mean loss per target token of this step's batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The learning rate of this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Tokens (context and targets) per second of this step, forward and backward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Global gradient norm before clipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Mean loss per target token of the validation set, when evaluated at this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
}

/// Why a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stop {
    /// Every step was taken and the outputs are written.
    Complete,
    /// Stopped on request; a checkpoint was written (`--resume` continues).
    Interrupted,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Summary {
    /// How it ended.
    pub stop: Stop,
    /// Steps done (over every run of this output).
    pub steps: usize,
    /// Steps planned.
    pub total_steps: usize,
    /// The step training resumed from (0 for a fresh run).
    pub resumed_from: usize,
    /// Training and validation examples.
    pub train_examples: usize,
    /// Validation examples.
    pub validation_examples: usize,
    /// Examples cut at `max_seq_len`.
    pub truncated: usize,
    /// Examples dropped for lack of a target after the cut.
    pub dropped: usize,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// All parameters.
    pub parameters: usize,
    /// The last step's training loss.
    pub final_loss: Option<f64>,
    /// The first validation loss (before training, unless resumed).
    pub first_validation_loss: Option<f64>,
    /// The last validation loss.
    pub final_validation_loss: Option<f64>,
    /// Mean training throughput of this run, tokens per second.
    pub tokens_per_second: f64,
    /// Wall time of this run, seconds.
    pub elapsed_seconds: f64,
    /// The estimated peak memory, MiB.
    pub estimated_memory_mib: u64,
    /// The output folder.
    pub output: PathBuf,
}

/// A memory estimate, bytes.
#[derive(Clone, Copy, Debug)]
pub struct MemoryEstimate {
    /// Weights (base and adapters).
    pub weights: u64,
    /// Gradients, accumulated gradients, the master copy and AdamW's moments.
    pub optimizer: u64,
    /// Activations kept for the backward pass of one micro-batch.
    pub activations: u64,
}

impl MemoryEstimate {
    /// The total.
    pub fn total(&self) -> u64 {
        self.weights + self.optimizer + self.activations
    }
}

/// Estimates the peak memory of a run on `model` (f32 on the CPU).
pub fn estimate_memory(model: &TrainModel, settings: &Settings, longest: usize) -> MemoryEstimate {
    let config = model.config();
    let bytes = 4u64;
    let weights = model.parameter_count() as u64 * bytes;
    // Candle's gradient, our accumulated copy, the master copy and two moments.
    let optimizer = model.trainable_count() as u64 * bytes * 5;
    let tokens = (settings.batch_size * longest.min(settings.max_seq_len)) as u64;
    let intermediate =
        model.weights().get("model.layers.0.mlp.gate_proj.weight").map_or(config.hidden_size * 4, |w| w.dims()[0])
            as u64;
    let hidden = config.hidden_size as u64;
    let heads = config.heads as u64;
    let length = longest.min(settings.max_seq_len) as u64;
    // Per layer: norms, q/k/v/o and their rotations (~14 hidden-wide rows), the MLP (~5
    // intermediate-wide rows), and the attention scores kept by the softmax (~4 copies).
    let per_layer =
        tokens * (14 * hidden + 5 * intermediate) + settings.batch_size as u64 * heads * length * length * 4;
    let head = tokens * config.vocab_size as u64 * 4;
    let activations = (per_layer * config.layers as u64 + head) * bytes;
    MemoryEstimate { weights, optimizer, activations }
}

/// The memory available to the process: `MemAvailable` of /proc/meminfo, if readable.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The permutation of `count` examples for `epoch`.
fn epoch_order(seed: u64, epoch: usize, count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (epoch as u64).wrapping_add(1));
    rng.shuffle(&mut order);
    order
}

/// The data stream: micro-batch `k` of the run is a fixed slice of epoch `k / per_epoch`'s
/// permutation, so any step's batches follow from the seed alone (resumption needs no state).
struct DataOrder {
    seed: u64,
    count: usize,
    batch_size: usize,
    per_epoch: usize,
    cached: Option<(usize, Vec<usize>)>,
}

impl DataOrder {
    fn new(seed: u64, count: usize, batch_size: usize) -> Self {
        Self { seed, count, batch_size, per_epoch: count.div_ceil(batch_size), cached: None }
    }

    fn micro_batch(&mut self, index: usize) -> Vec<usize> {
        let epoch = index / self.per_epoch;
        if self.cached.as_ref().is_none_or(|(cached, _)| *cached != epoch) {
            self.cached = Some((epoch, epoch_order(self.seed, epoch, self.count)));
        }
        let order = self.cached.as_ref().map(|(_, order)| order.as_slice()).unwrap_or_default();
        let start = (index % self.per_epoch) * self.batch_size;
        order[start..(start + self.batch_size).min(self.count)].to_vec()
    }
}

fn batch_of(examples: &[Example], indices: &[usize]) -> Batch {
    let sequences: Vec<(&[u32], &[bool])> =
        indices.iter().map(|&index| (examples[index].tokens.as_slice(), examples[index].mask.as_slice())).collect();
    Batch::new(&sequences)
}

/// A seed for one micro-batch's dropout masks.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> DropoutSeed {
    DropoutSeed(seed ^ 0x5bd1_e995_u64.wrapping_mul(step as u64 + 1) ^ ((micro as u64) << 40))
}

/// The mean validation loss per target token.
pub fn evaluate(model: &TrainModel, examples: &[Example], batch_size: usize) -> Result<Option<f64>> {
    if examples.is_empty() {
        return Ok(None);
    }
    let (mut total, mut count) = (0.0f64, 0usize);
    for chunk in (0..examples.len()).collect::<Vec<_>>().chunks(batch_size.max(1)) {
        let batch = batch_of(examples, chunk);
        total += model.summed_loss(&batch, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        count += batch.target_count();
    }
    Ok(Some(total / count.max(1) as f64))
}

/// The training state saved in a checkpoint besides the weights.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    adam_step: u64,
    settings: serde_json::Value,
    metrics: Vec<StepMetrics>,
}

/// Runs `f` over the values of contiguous f32 CPU tensors, in place.
fn with_cpu_values<R>(tensors: &[Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) = (&**storage, layout.contiguous_offsets())
        else {
            return Err(Error::Tensor("a gradient is not a contiguous f32 tensor on the CPU".into()));
        };
        slices.push(&values[start..end]);
    }
    Ok(f(&slices))
}

/// Copies `values` into a contiguous f32 CPU tensor's storage.
struct Overwrite<'a>(&'a [f32]);

impl InplaceOp1 for Overwrite<'_> {
    fn name(&self) -> &'static str {
        "overwrite"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(values), Some((start, end))) if end - start == self.0.len() => {
                values[start..end].copy_from_slice(self.0);
                Ok(())
            }
            _ => candle_core::bail!("overwrite: not a contiguous f32 tensor of {} values", self.0.len()),
        }
    }
}

/// Sets a trainable tensor to the f32 master copy `values`: in place when it is itself an f32
/// tensor on the CPU (no copy beside the one), else converted to its device and type.
fn overwrite(var: &Var, values: &[f32]) -> Result<()> {
    if var.device().is_cpu() && var.dtype() == DType::F32 && var.is_contiguous() {
        var.as_tensor().inplace_op1(&Overwrite(values))?;
    } else {
        var.set(&Tensor::from_slice(values, var.dims(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn write_checkpoint(
    path: &Path,
    model: &TrainModel,
    parameters: &[Vec<f32>],
    optimizer: &AdamW,
    state: &CheckpointState,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (((name, var), values), moments) in model.trainable().iter().zip(parameters).zip(&optimizer.moments) {
        let shape = var.dims().to_vec();
        tensors.insert(format!("parameter/{name}"), nstream_peft::Tensor::new(shape.clone(), values.clone()));
        tensors.insert(format!("adam_m/{name}"), nstream_peft::Tensor::new(shape.clone(), moments.m.clone()));
        tensors.insert(format!("adam_v/{name}"), nstream_peft::Tensor::new(shape, moments.v.clone()));
    }
    let state = serde_json::to_string(state).map_err(|error| Error::Tensor(error.to_string()))?;
    let metadata = HashMap::from([("nstream_state".to_owned(), state)]);
    nstream_peft::tensors::write(path, &tensors, Some(metadata))?;
    Ok(())
}

fn read_checkpoint(
    path: &Path,
    model: &TrainModel,
    optimizer: &mut AdamW,
    parameters: &mut [Vec<f32>],
) -> Result<CheckpointState> {
    let (mut tensors, metadata) = nstream_peft::tensors::read(path)?;
    let broken = |message: String| Error::Output { path: path.display().to_string(), message };
    let state: CheckpointState = metadata
        .get("nstream_state")
        .and_then(|text| serde_json::from_str(text).ok())
        .ok_or_else(|| broken("not an nstream checkpoint (no training state)".into()))?;
    for (index, (name, var)) in model.trainable().iter().enumerate() {
        let mut take = |kind: &str| -> Result<Vec<f32>> {
            let tensor =
                tensors.remove(&format!("{kind}/{name}")).ok_or_else(|| broken(format!("{kind}/{name} is missing")))?;
            if tensor.shape != var.dims() {
                return Err(broken(format!("{kind}/{name} has shape {:?}, the model {:?}", tensor.shape, var.dims())));
            }
            Ok(tensor.data)
        };
        parameters[index] = take("parameter")?;
        optimizer.moments[index] = Moments { m: take("adam_m")?, v: take("adam_v")? };
    }
    optimizer.step = state.adam_step;
    Ok(state)
}

/// Writes `text` to `path` atomically.
fn write_text(path: &Path, text: &str) -> Result<()> {
    nstream_peft::tensors::write_atomically(path, text.as_bytes())?;
    Ok(())
}

fn json_text(value: &impl Serialize) -> Result<String> {
    serde_json::to_string_pretty(value).map(|text| text + "\n").map_err(|error| Error::Tensor(error.to_string()))
}

/// Checks the output folder before anything is written: it must be new or empty, or, with
/// `resume`, hold a checkpoint of a run with the same settings.
fn check_output(settings: &Settings, resume: bool) -> Result<()> {
    let output = &settings.output;
    let output_error = |message: String| Error::Output { path: output.display().to_string(), message };
    if output.exists() && !output.is_dir() {
        return Err(output_error("exists and is not a folder".into()));
    }
    let entries = match std::fs::read_dir(output) {
        Ok(entries) => entries.filter_map(|entry| entry.ok()).count(),
        Err(_) => 0,
    };
    let checkpoint = output.join(CHECKPOINT_FILE);
    if resume {
        if !checkpoint.is_file() {
            return Err(output_error(format!(
                "--resume: no {CHECKPOINT_FILE} to continue from (the run finished, or never saved)"
            )));
        }
    } else if entries > 0 {
        let what = if output.join(ARGS_FILE).is_file() { "holds another run" } else { "is not empty" };
        return Err(output_error(format!("{what}; pass --resume to continue it, or choose another --output")));
    }
    Ok(())
}

/// Runs a fine-tuning: loads the data, trains and writes the output folder. `stop` is polled
/// after each step: when set, a checkpoint is written and the run returns [`Stop::Interrupted`].
pub fn finetune(base: BaseModel, settings: &Settings, resume: bool, stop: &AtomicBool) -> Result<Summary> {
    settings.validate()?;
    if settings.merge && base.provenance.format == "gguf" {
        return Err(Error::setting("merge", "a GGUF base is quantised: merging is for float (safetensors) bases"));
    }
    check_output(settings, resume)?;
    let pool = match settings.threads {
        Some(threads) => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .build()
                .map_err(|error| Error::Tensor(format!("cannot start the thread pool: {error}")))?,
        ),
        None => None,
    };
    match pool {
        Some(pool) => pool.install(|| run(base, settings, resume, stop)),
        None => run(base, settings, resume, stop),
    }
}

fn run(base: BaseModel, settings: &Settings, resume: bool, stop: &AtomicBool) -> Result<Summary> {
    let started = Instant::now();
    let options = DataOptions {
        max_seq_len: settings.max_seq_len,
        no_truncate: settings.no_truncate,
        validation_split: settings.validation_split,
    };
    let dataset: Dataset =
        load_dataset(&settings.data, settings.validation.as_deref(), &options, &base.template, &base.tokenizer)?;
    let lora = match settings.method {
        Method::Lora => Some(LoraSpec {
            rank: settings.rank,
            alpha: settings.alpha,
            dropout: settings.dropout,
            rslora: settings.rslora,
            targets: nstream_peft::Module::parse_list(&settings.target_modules)
                .map_err(|message| Error::setting("target-modules", message))?,
        }),
        Method::Full => None,
    };
    let BaseModel { config, weights, provenance, hf_config, tokenizer_files, .. } = base;
    let weights = match weights.values().next().map(|tensor| settings.precision.dtype(tensor.device())) {
        Some(dtype) => weights
            .into_iter()
            .map(|(name, tensor)| Ok((name, tensor.to_dtype(dtype)?)))
            .collect::<Result<HashMap<String, Tensor>>>()?,
        None => weights,
    };
    let model = TrainModel::new(config, weights, lora, settings.seed)?;
    let longest =
        dataset.train.iter().chain(&dataset.validation).map(|example| example.tokens.len()).max().unwrap_or(1);
    let estimate = estimate_memory(&model, settings, longest);
    let mib = |bytes: u64| bytes / (1 << 20);
    let available = settings.memory_limit_mib.map(|limit| limit << 20).or_else(available_memory);
    if let Some(available) = available
        && estimate.total() > available
    {
        return Err(Error::OutOfMemory {
            needed_mib: mib(estimate.total()),
            weights_mib: mib(estimate.weights),
            optimizer_mib: mib(estimate.optimizer),
            activations_mib: mib(estimate.activations),
            available_mib: mib(available),
        });
    }

    let per_epoch = dataset.train.len().div_ceil(settings.batch_size);
    let total_steps =
        settings.max_steps.unwrap_or_else(|| (per_epoch * settings.epochs).div_ceil(settings.gradient_accumulation));
    let sizes: Vec<usize> = model.trainable().values().map(|var| var.elem_count()).collect();
    let mut optimizer =
        AdamW::new(AdamWConfig { weight_decay: settings.weight_decay as f32, ..AdamWConfig::default() }, &sizes);
    let mut parameters: Vec<Vec<f32>> = model
        .trainable()
        .values()
        .map(|var| Ok(var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
        .collect::<Result<_>>()?;
    let output = settings.output.clone();
    let checkpoint_path = output.join(CHECKPOINT_FILE);
    let mut metrics: Vec<StepMetrics> = Vec::new();
    let mut start_step = 0;
    if resume {
        let state = read_checkpoint(&checkpoint_path, &model, &mut optimizer, &mut parameters)?;
        if state.settings != settings.fingerprint() {
            return Err(Error::Output {
                path: checkpoint_path.display().to_string(),
                message: "was written with other settings; resume with the same ones (see training_args.json)".into(),
            });
        }
        for ((_, var), values) in model.trainable().iter().zip(&parameters) {
            overwrite(var, values)?;
        }
        start_step = state.step;
        metrics = state.metrics;
    }
    std::fs::create_dir_all(&output).map_err(|cause| Error::io(&output, cause))?;
    write_text(&output.join(ARGS_FILE), &json_text(settings)?)?;
    write_text(&output.join(BASE_FILE), &json_text(&provenance)?)?;
    let parity = output.join("parity");
    if settings.record_batches && start_step == 0 {
        std::fs::create_dir_all(&parity).map_err(|cause| Error::io(&parity, cause))?;
        if let Some(adapter) = model.adapter(provenance.repo_id.clone(), provenance.revision.clone())? {
            let folder = parity.join("initial_adapter");
            std::fs::create_dir_all(&folder).map_err(|cause| Error::io(&folder, cause))?;
            adapter.write(&folder)?;
        }
    }
    let mut recorded_batches: Vec<serde_json::Value> = Vec::new();

    tracing::info!(
        train = dataset.train.len(),
        validation = dataset.validation.len(),
        truncated = dataset.truncated,
        total_steps,
        trainable = model.trainable_count(),
        estimated_mib = mib(estimate.total()),
        "fine-tuning"
    );
    if start_step == 0
        && let Some(loss) = evaluate(&model, &dataset.validation, settings.batch_size)?
    {
        metrics.push(StepMetrics {
            step: 0,
            loss: None,
            learning_rate: None,
            tokens_per_second: None,
            grad_norm: None,
            validation_loss: Some(loss),
        });
    }
    let mut progress = Progress::new(settings.progress, total_steps, start_step);
    let mut order = DataOrder::new(settings.seed, dataset.train.len(), settings.batch_size);
    let (mut trained_tokens, mut training_seconds) = (0usize, 0.0f64);
    let mut step = start_step;
    let mut stopped = false;
    while step < total_steps {
        let step_started = Instant::now();
        let micro_indices: Vec<Vec<usize>> = (0..settings.gradient_accumulation)
            .map(|micro| order.micro_batch(step * settings.gradient_accumulation + micro))
            .collect();
        let batches: Vec<Batch> = micro_indices.iter().map(|indices| batch_of(&dataset.train, indices)).collect();
        let targets: usize = batches.iter().map(Batch::target_count).sum();
        // Real tokens (not padding): what throughput counts.
        let tokens: usize = micro_indices.iter().flatten().map(|&index| dataset.train[index].tokens.len()).sum();
        // Each trainable tensor's gradient, summed over the micro-batches, as f32 on the CPU.
        let mut gradients: Vec<Option<Tensor>> = vec![None; sizes.len()];
        let mut loss_total = 0.0f64;
        for (micro, batch) in batches.iter().enumerate() {
            let summed = model.summed_loss(batch, Some(dropout_seed(settings.seed, step, micro)))?;
            let loss = (summed / targets as f64)?;
            loss_total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            for (gradient, accumulated) in model.backward(&loss)?.into_iter().zip(gradients.iter_mut()) {
                let gradient = gradient.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?;
                match accumulated {
                    None => *accumulated = Some(gradient),
                    Some(sum) => add_in_place(sum, &gradient)?,
                }
            }
        }
        if !loss_total.is_finite() {
            return Err(Error::Diverged { step: step + 1, what: "the loss".into() });
        }
        let gradients: Vec<Tensor> = gradients.into_iter().flatten().collect();
        let norm = with_cpu_values(&gradients, global_norm)?;
        if !norm.is_finite() {
            return Err(Error::Diverged { step: step + 1, what: "the gradient norm".into() });
        }
        let coefficient = clip_coefficient(norm, settings.max_grad_norm as f32);
        let rate = learning_rate(settings.learning_rate, step, settings.warmup, total_steps);
        let adam_step = optimizer.begin_step(rate as f32);
        for ((((_, var), values), moments), gradient) in
            model.trainable().iter().zip(&mut parameters).zip(&mut optimizer.moments).zip(&gradients)
        {
            with_cpu_values(std::slice::from_ref(gradient), |gradient| {
                adam_step.apply(moments, values, gradient[0], coefficient)
            })?;
            overwrite(var, values)?;
        }
        if settings.record_batches {
            recorded_batches.push(serde_json::json!({
                "step": step + 1,
                "learning_rate": rate,
                "loss": loss_total,
                "micro_batches": batches.iter().map(|batch| serde_json::json!({
                    "tokens": batch.tokens, "batch": batch.batch, "length": batch.length,
                    "target_rows": batch.target_rows, "targets": batch.targets,
                })).collect::<Vec<_>>(),
            }));
        }
        step += 1;
        let seconds = step_started.elapsed().as_secs_f64();
        trained_tokens += tokens;
        training_seconds += seconds;
        let evaluate_now = step == total_steps || (settings.eval_every > 0 && step % settings.eval_every == 0);
        let validation_loss =
            if evaluate_now { evaluate(&model, &dataset.validation, settings.batch_size)? } else { None };
        let entry = StepMetrics {
            step,
            loss: Some(loss_total),
            learning_rate: Some(rate),
            tokens_per_second: Some(tokens as f64 / seconds.max(1e-9)),
            grad_norm: Some(f64::from(norm)),
            validation_loss,
        };
        progress.step(&entry);
        metrics.push(entry);
        let interrupted = stop.load(Ordering::SeqCst);
        let save_now =
            interrupted || (settings.save_every > 0 && step % settings.save_every == 0 && step < total_steps);
        if save_now {
            let state = CheckpointState {
                step,
                adam_step: optimizer.step,
                settings: settings.fingerprint(),
                metrics: metrics.clone(),
            };
            write_checkpoint(&checkpoint_path, &model, &parameters, &optimizer, &state)?;
            write_metrics(&output, &metrics)?;
        }
        if interrupted && step < total_steps {
            stopped = true;
            break;
        }
    }
    progress.finish();
    write_metrics(&output, &metrics)?;
    if settings.record_batches {
        let path = parity.join(format!("batches-from-{start_step}.json"));
        std::fs::create_dir_all(&parity).map_err(|cause| Error::io(&parity, cause))?;
        write_text(&path, &json_text(&recorded_batches)?)?;
    }
    let summary_of = |stop: Stop| Summary {
        stop,
        steps: step,
        total_steps,
        resumed_from: start_step,
        train_examples: dataset.train.len(),
        validation_examples: dataset.validation.len(),
        truncated: dataset.truncated,
        dropped: dataset.dropped,
        trainable_parameters: model.trainable_count(),
        parameters: model.parameter_count(),
        final_loss: metrics.iter().rev().find_map(|entry| entry.loss),
        first_validation_loss: metrics.iter().find_map(|entry| entry.validation_loss),
        final_validation_loss: metrics.iter().rev().find_map(|entry| entry.validation_loss),
        tokens_per_second: trained_tokens as f64 / training_seconds.max(1e-9),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        estimated_memory_mib: mib(estimate.total()),
        output: output.clone(),
    };
    if stopped {
        return Ok(summary_of(Stop::Interrupted));
    }

    // The results: an adapter from the f32 master copy (the model's own may be bf16).
    match model.adapter_from(provenance.repo_id.clone(), provenance.revision.clone(), Some(&parameters))? {
        Some(adapter) => adapter.write(&output)?,
        None => {
            let weights = model.merged_weights()?;
            write_model(&output, &weights, hf_config.as_ref(), model.config(), &tokenizer_files)?;
        }
    }
    if settings.merge {
        let merged = output.join("merged");
        std::fs::create_dir_all(&merged).map_err(|cause| Error::io(&merged, cause))?;
        write_model(&merged, &model.merged_weights()?, hf_config.as_ref(), model.config(), &tokenizer_files)?;
    }
    if settings.record_batches {
        let probe = dataset
            .validation
            .first()
            .or(dataset.train.first())
            .map(|example| example.tokens.clone())
            .unwrap_or_default();
        let batch = Batch::new(&[(&probe, &vec![false; probe.len()])]);
        let logits = model.logits(&batch)?.to_dtype(DType::F32)?.squeeze(0)?;
        let last = probe.len().saturating_sub(8);
        let rows = logits.narrow(0, last, probe.len() - last)?.to_vec2::<f32>()?;
        write_text(
            &parity.join("probe.json"),
            &json_text(&serde_json::json!({"tokens": probe, "first_position": last, "logits": rows}))?,
        )?;
    }
    let summary = summary_of(Stop::Complete);
    let train_curve: Vec<(usize, f64)> =
        metrics.iter().filter_map(|entry| entry.loss.map(|loss| (entry.step, loss))).collect();
    let validation_curve: Vec<(usize, f64)> =
        metrics.iter().filter_map(|entry| entry.validation_loss.map(|loss| (entry.step, loss))).collect();
    let title = format!(
        "{} fine-tuning of {}",
        match settings.method {
            Method::Lora => "LoRA",
            Method::Full => "full",
        },
        provenance.repo_id.as_deref().unwrap_or("a local model")
    );
    write_text(&output.join(CURVE_FILE), &crate::curve::loss_curve_svg(&title, &train_curve, &validation_curve))?;
    write_text(&output.join(REPORT_FILE), &crate::report::report(settings, &summary, &provenance, &estimate))?;
    if checkpoint_path.exists() {
        std::fs::remove_file(&checkpoint_path).map_err(|cause| Error::io(&checkpoint_path, cause))?;
    }
    Ok(summary)
}

fn write_metrics(output: &Path, metrics: &[StepMetrics]) -> Result<()> {
    let mut text = String::new();
    for entry in metrics {
        text.push_str(&serde_json::to_string(entry).map_err(|error| Error::Tensor(error.to_string()))?);
        text.push('\n');
    }
    write_text(&output.join(METRICS_FILE), &text)
}

/// Writes weights in the Hugging Face layout (`model.safetensors`, `config.json`, tokenizer files).
fn write_model(
    folder: &Path,
    weights: &BTreeMap<String, nstream_peft::Tensor>,
    hf_config: Option<&serde_json::Value>,
    config: &nstream_llm::model::LlamaConfig,
    tokenizer_files: &[PathBuf],
) -> Result<()> {
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    nstream_peft::tensors::write(&folder.join("model.safetensors"), weights, Some(metadata))?;
    let config_json = match hf_config {
        Some(json) => {
            let mut json = json.clone();
            json["torch_dtype"] = "float32".into();
            json["dtype"] = "float32".into();
            json
        }
        None => serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": if config.architecture == "qwen2" { "qwen2" } else { "llama" },
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": weights.get("model.layers.0.mlp.gate_proj.weight").map_or(0, |w| w.shape[0]),
            "num_hidden_layers": config.layers,
            "num_attention_heads": config.heads,
            "num_key_value_heads": config.kv_heads,
            "head_dim": config.head_dim,
            "rope_theta": config.rope_theta,
            "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.context_length,
            "tie_word_embeddings": !weights.contains_key("lm_head.weight"),
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }),
    };
    write_text(&folder.join("config.json"), &json_text(&config_json)?)?;
    for file in tokenizer_files {
        if let Some(name) = file.file_name() {
            std::fs::copy(file, folder.join(name)).map_err(|cause| Error::io(file, cause))?;
        }
    }
    Ok(())
}

/// The current parameters of the model as f32 tensors by trainable name (for tests).
pub fn trainable_values(model: &TrainModel) -> Result<BTreeMap<String, nstream_peft::Tensor>> {
    model.trainable().iter().map(|(name, var)| Ok((name.clone(), to_peft(var.as_tensor())?))).collect()
}

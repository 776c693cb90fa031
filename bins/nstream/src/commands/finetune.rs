//! `nstream finetune`: LoRA or full fine-tuning of a BaseModel on chat data (what `nstream
//! generate` writes), resumable, writing a PEFT adapter (see the nstream-tune crate and
//! docs/finetune.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use nstream_core::ModelResource;
use nstream_hub::Hub;
use nstream_providers::{SecretLookup, model_source};
use nstream_tune::{BaseModel, Method, Precision, ProgressMode, Settings, Stop};
use serde::Deserialize;

/// Arguments of `nstream finetune`. Every setting can also come from `--config FILE` (YAML, the
/// flags' names); flags win over the file.
#[derive(Args, Debug, Default)]
pub struct FinetuneArgs {
    /// The BaseModel: a YAML file holding it (pick with --name when it holds several), or its name
    /// in the file given with -f.
    #[arg(short, long, value_name = "FILE|NAME", env = "NSTREAM_FINETUNE_MODEL")]
    pub model: Option<String>,
    /// The model file when --model is a name.
    #[arg(short = 'f', long = "filename", value_name = "FILE", env = "NSTREAM_MODEL_FILE")]
    pub file: Option<PathBuf>,
    /// Which model of the file, when it holds several.
    #[arg(long)]
    pub name: Option<String>,
    /// Training data: JSONL of `{"messages": [...]}` (what `nstream generate` writes) or
    /// `{"prompt", "completion"}` records.
    #[arg(long, value_name = "FILE", env = "NSTREAM_FINETUNE_DATA")]
    pub data: Option<PathBuf>,
    /// Validation data, same format.
    #[arg(long, value_name = "FILE")]
    pub validation: Option<PathBuf>,
    /// Hold out this share of the training records for validation, chosen by a hash of each
    /// record (stable across runs) [default: 0].
    #[arg(long, value_name = "SHARE")]
    pub validation_split: Option<f64>,
    /// The output folder: the adapter (or model), training_args.json, metrics.jsonl, report.md,
    /// loss_curve.svg and the checkpoint.
    #[arg(long = "out-dir", alias = "output", value_name = "DIR", env = "NSTREAM_FINETUNE_OUTPUT")]
    pub output: Option<PathBuf>,
    /// A YAML file with any of these settings (flag names, e.g. `learning-rate: 2e-4`).
    #[arg(long, value_name = "FILE", env = "NSTREAM_FINETUNE_CONFIG")]
    pub config: Option<PathBuf>,
    /// `lora` (adapters, base frozen) or `full` (every weight) [default: lora].
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha/rank [default: 16].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input [default: 0].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// rsLoRA: scale by alpha/sqrt(rank).
    #[arg(long)]
    pub rslora: bool,
    /// Adapted modules, comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    /// or all-linear [default: q_proj,k_proj,v_proj,o_proj].
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Vec<String>,
    /// Passes over the training data [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Optimiser steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Peak learning rate (AdamW) [default: 2e-4].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Linear warmup steps before the cosine decay [default: 0].
    #[arg(long, value_name = "STEPS")]
    pub warmup: Option<usize>,
    /// Examples per micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimiser step [default: 1].
    #[arg(long)]
    pub gradient_accumulation: Option<usize>,
    /// Longest example in tokens; longer ones are cut and counted [default: 1024].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Refuse examples over --max-seq-len instead of cutting them.
    #[arg(long)]
    pub no_truncate: bool,
    /// Seed of the adapter initialisation, the data order and dropout [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write a checkpoint every this many steps (Ctrl-C always writes one) [default: 0].
    #[arg(long, value_name = "STEPS")]
    pub save_every: Option<usize>,
    /// Evaluate the validation loss every this many steps (and at the start and end) [default: 0].
    #[arg(long, value_name = "STEPS")]
    pub eval_every: Option<usize>,
    /// Clip the global gradient norm to this (0: off) [default: 1].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// AdamW weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Also write the base with the adapter merged in (safetensors bases), in DIR/merged.
    #[arg(long)]
    pub merge: bool,
    /// Continue the run in --out-dir from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// `cpu`, or `cuda`/`cuda:N` (a build with the cuda feature) [default: cpu].
    #[arg(long, env = "NSTREAM_DEVICE")]
    pub device: Option<String>,
    /// CPU threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// The dtype of the forward and backward passes; the optimiser keeps an f32 master copy
    /// either way [default: auto: bf16 on CUDA, f32 on the CPU].
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// How progress is shown [default: auto: a bar on a terminal, lines otherwise].
    #[arg(long, value_enum)]
    pub progress: Option<ProgressArg>,
    /// Refuse runs estimated to need more memory than this (MiB) [default: what is available].
    #[arg(long, value_name = "MIB")]
    pub memory_limit_mib: Option<u64>,
    /// Also write what a parity check against PyTorch + peft needs, in DIR/parity.
    #[arg(long, hide = true)]
    pub record_batches: bool,
}

/// `--method`.
#[derive(ValueEnum, Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MethodArg {
    /// Low-rank adapters.
    Lora,
    /// Every weight.
    Full,
}

/// `--precision`.
#[derive(ValueEnum, Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionArg {
    /// bf16 on CUDA, f32 on the CPU.
    Auto,
    /// f32.
    F32,
    /// bf16 weights and activations, the loss and the optimiser in f32.
    Bf16,
}

/// `--progress`.
#[derive(ValueEnum, Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProgressArg {
    /// A bar on a terminal, lines otherwise.
    Auto,
    /// Always a bar.
    Bar,
    /// Always lines.
    Lines,
    /// Only the summary.
    Quiet,
}

/// The `--config` file: the flags' names and meanings.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ConfigFile {
    model: Option<String>,
    filename: Option<PathBuf>,
    name: Option<String>,
    data: Option<PathBuf>,
    validation: Option<PathBuf>,
    validation_split: Option<f64>,
    output: Option<PathBuf>,
    method: Option<MethodArg>,
    rank: Option<usize>,
    alpha: Option<f64>,
    dropout: Option<f64>,
    #[serde(default)]
    rslora: bool,
    #[serde(default)]
    target_modules: Vec<String>,
    epochs: Option<usize>,
    max_steps: Option<usize>,
    learning_rate: Option<f64>,
    warmup: Option<usize>,
    batch_size: Option<usize>,
    gradient_accumulation: Option<usize>,
    max_seq_len: Option<usize>,
    #[serde(default)]
    no_truncate: bool,
    seed: Option<u64>,
    save_every: Option<usize>,
    eval_every: Option<usize>,
    max_grad_norm: Option<f64>,
    weight_decay: Option<f64>,
    #[serde(default)]
    merge: bool,
    device: Option<String>,
    threads: Option<usize>,
    precision: Option<PrecisionArg>,
    progress: Option<ProgressArg>,
    memory_limit_mib: Option<u64>,
}

/// Paths in a config file are relative to the file.
fn relative_to(base: &Path, path: Option<PathBuf>) -> Option<PathBuf> {
    path.map(|path| if path.is_absolute() { path } else { base.join(path) })
}

/// Fills every unset flag from the config file.
fn merge(mut args: FinetuneArgs) -> anyhow::Result<FinetuneArgs> {
    let Some(config_path) = args.config.clone() else { return Ok(args) };
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: ConfigFile = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a valid finetune config", config_path.display()))?;
    let base = config_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    macro_rules! fill {
        ($($field:ident),*) => { $( if args.$field.is_none() { args.$field = config.$field; } )* };
    }
    macro_rules! fill_path {
        ($($field:ident),*) => { $( if args.$field.is_none() { args.$field = relative_to(&base, config.$field); } )* };
    }
    fill!(name, validation_split, method, rank, alpha, dropout, epochs, max_steps, learning_rate, warmup, batch_size);
    fill!(
        gradient_accumulation,
        max_seq_len,
        seed,
        save_every,
        eval_every,
        max_grad_norm,
        weight_decay,
        device,
        threads
    );
    fill!(precision, progress, memory_limit_mib);
    fill_path!(data, validation, output);
    if args.file.is_none() {
        args.file = relative_to(&base, config.filename);
    }
    if args.model.is_none() {
        args.model = config.model.map(|model| {
            let candidate = base.join(&model);
            if Path::new(&model).is_relative() && candidate.is_file() { candidate.display().to_string() } else { model }
        });
    }
    if args.target_modules.is_empty() {
        args.target_modules = config.target_modules;
    }
    args.rslora |= config.rslora;
    args.no_truncate |= config.no_truncate;
    args.merge |= config.merge;
    Ok(args)
}

/// The BaseModel resource that --model / -f / --name point at.
fn pick_model(args: &FinetuneArgs) -> anyhow::Result<ModelResource> {
    let Some(model) = args.model.as_deref() else {
        bail!("--model is required (a BaseModel file, or a model name with -f FILE)")
    };
    let accept = |resource: &ModelResource| matches!(resource, ModelResource::BaseModel(_));
    if Path::new(model).is_file() {
        return super::model_file::pick(model, args.name.as_deref(), "BaseModel", accept);
    }
    let Some(file) = &args.file else {
        bail!("--model {model}: no such file; to pick a model by name, give its file with -f FILE")
    };
    super::model_file::pick(&file.display().to_string(), Some(model), "BaseModel", accept)
}

/// The device `--device` names (`cpu`, `cuda`, `cuda:N`).
pub(crate) fn device(name: Option<&str>) -> anyhow::Result<Device> {
    match name.unwrap_or("cpu") {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()
                .context("--device cuda:N needs a number")?;
            Device::new_cuda(ordinal.unwrap_or(0))
                .with_context(|| format!("--device {cuda} (is this a build with the cuda feature?)"))
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

fn settings(args: &FinetuneArgs) -> anyhow::Result<Settings> {
    let Some(data) = args.data.clone() else { bail!("--data is required (a JSONL file)") };
    let Some(output) = args.output.clone() else { bail!("--out-dir is required (a folder)") };
    let mut settings = Settings::new(data, output);
    settings.validation = args.validation.clone();
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(value) = args.$field { settings.$field = value; } )* };
    }
    set!(validation_split, rank, alpha, dropout, epochs, learning_rate, warmup, batch_size, gradient_accumulation);
    set!(max_seq_len, seed, save_every, eval_every, max_grad_norm, weight_decay);
    settings.max_steps = args.max_steps;
    settings.method = match args.method {
        Some(MethodArg::Full) => Method::Full,
        Some(MethodArg::Lora) | None => Method::Lora,
    };
    settings.rslora = args.rslora;
    if !args.target_modules.is_empty() {
        settings.target_modules = args.target_modules.clone();
    }
    settings.no_truncate = args.no_truncate;
    settings.merge = args.merge;
    settings.threads = args.threads;
    settings.memory_limit_mib = args.memory_limit_mib;
    settings.record_batches = args.record_batches;
    settings.precision = match args.precision {
        Some(PrecisionArg::F32) => Precision::F32,
        Some(PrecisionArg::Bf16) => Precision::Bf16,
        Some(PrecisionArg::Auto) | None => Precision::Auto,
    };
    settings.progress = match args.progress {
        Some(ProgressArg::Bar) => ProgressMode::Bar,
        Some(ProgressArg::Lines) => ProgressMode::Lines,
        Some(ProgressArg::Quiet) => ProgressMode::Quiet,
        Some(ProgressArg::Auto) | None => ProgressMode::Auto,
    };
    settings.validate()?;
    Ok(settings)
}

/// Sets `stop` on the first Ctrl-C (the run saves a checkpoint after its current step and
/// exits); a second one exits at once.
fn watch_interrupts(stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new().name("finetune-signals".into()).spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            eprintln!(
                "interrupted: saving a checkpoint after this step (Ctrl-C again exits at once; --resume continues)"
            );
            stop.store(true, Ordering::SeqCst);
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted again: exiting now; --resume continues from the last checkpoint");
                std::process::exit(130);
            }
        });
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot watch for Ctrl-C");
    }
}

/// A BaseModel's weights as the training forward uses them: resolved through the hub exactly as
/// serving resolves them, dense f32 (a GGUF dequantised). `nstream eval` scores reference losses
/// with the same.
pub(crate) fn load_training_base(resource: &ModelResource, device: &Device) -> anyhow::Result<BaseModel> {
    let ModelResource::BaseModel(model) = resource else { bail!("--model must be a BaseModel") };
    let label = format!("BaseModel/{}", resource.name().unwrap_or_default());
    let info = &model.spec.base_model_serving_info;
    let source =
        model_source(info, &SecretLookup::from_env()).with_context(|| format!("{label}: cannot resolve its token"))?;
    let resolved = Hub::from_env()
        .resolve_model(&source)
        .with_context(|| format!("{label}: cannot resolve {}", info.hf_model_id))?;
    BaseModel::load(&resolved, info.revision.as_deref(), device, DType::F32)
        .with_context(|| format!("cannot load {label}"))
}

/// Runs the fine-tuning and prints the summary.
pub fn run(args: FinetuneArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(nstream_core::cli::LogFormat::Text)?;
    let args = merge(args)?;
    let settings = settings(&args)?;
    let resource = pick_model(&args)?;
    let base = load_training_base(&resource, &device(args.device.as_deref())?)?;
    let stop = Arc::new(AtomicBool::new(false));
    watch_interrupts(Arc::clone(&stop));
    let summary = nstream_tune::finetune(base, &settings, args.resume, &stop)?;
    let loss = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |value| format!("{value:.4}"));
    let ended = match summary.stop {
        Stop::Complete => "complete",
        Stop::Interrupted => "interrupted (checkpoint saved; --resume continues)",
    };
    eprintln!(
        "finetune {ended}: step {}/{}, {} training and {} validation examples ({} truncated), {} trainable parameters",
        summary.steps,
        summary.total_steps,
        summary.train_examples,
        summary.validation_examples,
        summary.truncated,
        summary.trainable_parameters
    );
    eprintln!(
        "  loss {}; validation {} -> {}; {:.0} tokens/s; {:.1}s",
        loss(summary.final_loss),
        loss(summary.first_validation_loss),
        loss(summary.final_validation_loss),
        summary.tokens_per_second,
        summary.elapsed_seconds
    );
    eprintln!("  output {}", summary.output.display());
    Ok(match summary.stop {
        Stop::Complete => ExitCode::SUCCESS,
        Stop::Interrupted => ExitCode::from(130),
    })
}

//! `nstream eval`: every model answers a held-out set, the answers are scored against the
//! references, and a report says how close each student came to the teacher (see the
//! nstream-pipeline crate's `eval` module and docs/eval.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use candle_core::Device;
use clap::{Args, ValueEnum};
use nstream_backend::ModelBackend;
use nstream_backend::chat::{ChatMessage, Role as ChatRole};
use nstream_core::ModelResource;
use nstream_llm::template::ChatTemplate;
use nstream_llm::tokenizer::LlmTokenizer;
use nstream_pipeline::eval::{EvalModel, EvalReport, EvalSettings, Judge, ReferenceLoss, Role, Scorer, evaluate_until};
use nstream_pipeline::{ModelInfo, OpenMode, PriceTable, ProgressMode, TakenLimits, take_over_limits};
use nstream_providers::{LoadOptions, SecretLookup, load_model};
use nstream_tune::data::tokenize_messages;
use nstream_tune::forward::{Batch, LoraSpec, TrainModel};

use super::model_file::pick;
use super::signals;

/// Arguments of `nstream eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The held-out set: JSONL of `{"messages": [..., assistant reference]}` (what `nstream
    /// generate` writes) or `{"prompt", "completion"}`.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// A model to evaluate: a YAML file holding it, or its name in the file given with -f.
    /// Repeat for several (BaseModels and MegaModels).
    #[arg(short, long = "model", value_name = "FILE|NAME", required = true)]
    pub models: Vec<String>,
    /// The model file when --model, --judge or --base/--teacher name models.
    #[arg(short = 'f', long = "filename", value_name = "FILE", env = "NSTREAM_MODEL_FILE")]
    pub file: Option<PathBuf>,
    /// A scorer: exact, contains, json, regex:PATTERN, choice:A,B,... or judge:MODEL (a MegaModel
    /// by file or by name in -f). Repeat for several; the first metric of the first is the
    /// headline [default: exact].
    #[arg(short, long = "scorer", value_name = "SCORER")]
    pub scorers: Vec<String>,
    /// A JSON schema the `json` scorer checks answers against.
    #[arg(long, value_name = "FILE")]
    pub schema: Option<PathBuf>,
    /// Where answers, journals and the report go.
    #[arg(long = "out-dir", alias = "output", value_name = "DIR")]
    pub output: PathBuf,
    /// The model (one of --model, by name) before fine-tuning: the floor of "gap closed".
    #[arg(long, value_name = "NAME")]
    pub base: Option<String>,
    /// The model (one of --model, by name) that wrote the references: the ceiling of "gap closed".
    #[arg(long, value_name = "NAME")]
    pub teacher: Option<String>,
    /// Score against this model's answers (one of --model, by name) instead of the data's
    /// reference answers.
    #[arg(long, value_name = "NAME")]
    pub reference_model: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: u32,
    /// Sampling temperature of the answers.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Requests in flight per model.
    #[arg(short, long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests per minute per hosted model [default: the MegaModel's limits].
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute per hosted model [default: the MegaModel's limits].
    #[arg(long)]
    pub tpm: Option<u32>,
    /// Spending cap per hosted model, earlier runs included, in US dollars.
    #[arg(long, value_name = "USD")]
    pub max_cost: Option<f64>,
    /// A YAML/JSON price table that extends the built-in one.
    #[arg(long, value_name = "FILE")]
    pub prices: Option<PathBuf>,
    /// Limit of one request, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    pub timeout: f64,
    /// Answer everything again instead of resuming the answers of an earlier run.
    #[arg(long)]
    pub overwrite: bool,
    /// Bootstrap resamples per interval.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap and of the judges' answer order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads of local models.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Skip the reference answers' loss under BaseModels (it loads a dense f32 copy of each
    /// BaseModel's weights besides the served one: 4 bytes per parameter).
    #[arg(long)]
    pub no_reference_loss: bool,
    /// How the summary is printed on standard output.
    #[arg(short = 'o', long = "output-format", value_enum, default_value_t = OutputFormat::Text)]
    pub output_format: OutputFormat,
}

/// How `nstream eval` and `nstream distill` print their result.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// A table for people.
    Text,
    /// The report as JSON.
    Json,
}

/// One model given on the command line, resolved.
fn resolve(
    argument: &str,
    file: Option<&Path>,
    what: &str,
    accept: impl Fn(&ModelResource) -> bool,
) -> anyhow::Result<ModelResource> {
    if Path::new(argument).is_file() {
        return pick(argument, None, what, accept);
    }
    let Some(file) = file else {
        bail!("{argument}: no such file; to pick a model by name, give its file with -f FILE")
    };
    pick(&file.display().to_string(), Some(argument), what, accept)
}

/// A loaded model: its name, identity and backend.
type Loaded = (String, ModelInfo, Arc<dyn ModelBackend>);

/// Loads `resource`; a MegaModel first hands its limits to the pipeline, which are returned.
fn load(
    mut resource: ModelResource,
    timeout: Duration,
    threads: Option<usize>,
) -> anyhow::Result<(Loaded, TakenLimits)> {
    let name = resource.name().unwrap_or_default().to_owned();
    let label = format!("{}/{name}", resource.kind());
    let limits = take_over_limits(&mut resource, timeout);
    let info = ModelInfo::from_resource(&resource);
    let mut options = LoadOptions::default();
    options.llm.threads = threads;
    let loaded = load_model(&resource, &options, &SecretLookup::from_env(), None)
        .with_context(|| format!("cannot load {label}"))?;
    Ok(((name, info, loaded.backend), limits))
}

/// Loads one model to evaluate in `role`, with the reference answers' loss when `loss` holds
/// one; also returns the limits a MegaModel handed over.
pub(crate) fn eval_model(
    resource: ModelResource,
    role: Role,
    timeout: Duration,
    threads: Option<usize>,
    loss: Option<Arc<dyn ReferenceLoss>>,
) -> anyhow::Result<(EvalModel, TakenLimits)> {
    let ((name, info, backend), limits) = load(resource, timeout, threads)?;
    let mut model = EvalModel::new(name, backend, info).with_role(role);
    if let Some(loss) = loss {
        model = model.with_loss(loss);
    }
    Ok((model, limits))
}

/// The reference answers' loss under a BaseModel: nstream-tune's training forward (the weights
/// dense in f32, a GGUF dequantised), the model's chat template and tokenizer, loss on the
/// reference answer's tokens only, as fine-tuning computes it.
pub(crate) struct TrainingForwardLoss {
    model: TrainModel,
    tokenizer: LlmTokenizer,
    template: ChatTemplate,
}

impl TrainingForwardLoss {
    /// The loss under a BaseModel as it is.
    pub(crate) fn load(resource: &ModelResource) -> anyhow::Result<Self> {
        let base = super::finetune::load_training_base(resource, &Device::Cpu)?;
        let model = TrainModel::new(base.config, base.weights, None, 0)?;
        Ok(Self { model, tokenizer: base.tokenizer, template: base.template })
    }

    /// The loss under a BaseModel with the PEFT LoRA adapter of `adapter_dir` applied (an
    /// `nstream finetune` output).
    pub(crate) fn with_adapter(base: &ModelResource, adapter_dir: &Path) -> anyhow::Result<Self> {
        let adapter = nstream_peft::Adapter::read(adapter_dir)
            .with_context(|| format!("cannot read the adapter in {}", adapter_dir.display()))?;
        let config = &adapter.config;
        let targets = config.modules().map_err(anyhow::Error::msg)?;
        let spec =
            LoraSpec { rank: config.r, alpha: config.lora_alpha, dropout: 0.0, rslora: config.use_rslora, targets };
        let base = super::finetune::load_training_base(base, &Device::Cpu)?;
        let model = TrainModel::new(base.config, base.weights, Some(spec), 0)?;
        let tensors = adapter.named_tensors();
        for (name, variable) in model.trainable() {
            let tensor = tensors.get(name).with_context(|| format!("the adapter lacks {name}"))?;
            let (shape, values) = (tensor.shape.clone(), tensor.data.clone());
            let loaded = candle_core::Tensor::from_vec(values, shape, &Device::Cpu)?;
            variable.set(&loaded).with_context(|| format!("the adapter's {name} does not fit the model"))?;
        }
        Ok(Self { model, tokenizer: base.tokenizer, template: base.template })
    }
}

impl ReferenceLoss for TrainingForwardLoss {
    fn reference_loss(&self, messages: &[serde_json::Value], reference: &str) -> Result<(f64, usize), String> {
        let mut chat = messages
            .iter()
            .map(|message| serde_json::from_value::<ChatMessage>(message.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("a message is not an OpenAI chat message: {error}"))?;
        chat.push(ChatMessage::new(ChatRole::Assistant, reference));
        let (tokens, mask) = tokenize_messages(&chat, &self.template, &self.tokenizer, "a held-out item")
            .map_err(|error| error.to_string())?;
        let batch = Batch::new(&[(&tokens, &mask)]);
        let targets = batch.target_count();
        let loss = self
            .model
            .summed_loss(&batch, None)
            .map_err(|error| error.to_string())?
            .to_scalar::<f32>()
            .map_err(|error| error.to_string())?;
        Ok((f64::from(loss), targets))
    }
}

/// Runs `nstream eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(nstream_core::cli::LogFormat::Text)?;
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|duration| !duration.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    let schema = match &args.schema {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read the schema {}", path.display()))?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text)
                    .with_context(|| format!("the schema {} is not JSON", path.display()))?,
            )
        }
        None => None,
    };
    let scorer_texts = if args.scorers.is_empty() { vec!["exact".to_owned()] } else { args.scorers.clone() };
    let scorers =
        scorer_texts.iter().map(|text| Scorer::parse(text, schema.as_ref())).collect::<Result<Vec<_>, _>>()?;
    if args.schema.is_some() && !scorers.iter().any(|scorer| matches!(scorer, Scorer::Json { .. })) {
        bail!("--schema is used by the json scorer: add --scorer json");
    }

    let chat = |resource: &ModelResource| !matches!(resource, ModelResource::EmbeddingModel(_));
    let mut models = Vec::new();
    let (mut requests_per_minute, mut tokens_per_minute) = (args.rpm, args.tpm);
    for argument in &args.models {
        let resource = resolve(argument, args.file.as_deref(), "chat model", chat)?;
        let name = resource.name().unwrap_or_default();
        let role = if args.base.as_deref() == Some(name) {
            Role::Base
        } else if args.teacher.as_deref() == Some(name) {
            Role::Teacher
        } else {
            Role::Student
        };
        let loss: Option<Arc<dyn ReferenceLoss>> =
            if !args.no_reference_loss && matches!(resource, ModelResource::BaseModel(_)) {
                Some(Arc::new(TrainingForwardLoss::load(&resource)?))
            } else {
                None
            };
        let (model, limits) = eval_model(resource, role, timeout, args.threads, loss)?;
        requests_per_minute = requests_per_minute.or(limits.requests_per_minute);
        tokens_per_minute = tokens_per_minute.or(limits.tokens_per_minute);
        models.push(model);
    }
    for (flag, wanted) in
        [("--base", &args.base), ("--teacher", &args.teacher), ("--reference-model", &args.reference_model)]
    {
        if let Some(wanted) = wanted
            && !models.iter().any(|model| &model.name == wanted)
        {
            let names: Vec<&str> = models.iter().map(|model| model.name.as_str()).collect();
            bail!("{flag} {wanted}: not one of the evaluated models ({})", names.join(", "));
        }
    }
    let mut judges = BTreeMap::new();
    let mut scorers = scorers;
    for scorer in &mut scorers {
        let Scorer::Judge { model } = scorer else { continue };
        let resource = resolve(model, args.file.as_deref(), "MegaModel", |resource| {
            matches!(resource, ModelResource::MegaModel(_))
        })?;
        let ((name, info, backend), _) = load(resource, timeout, args.threads)?;
        *model = name.clone();
        judges.insert(name, Judge { backend, info });
    }

    let mut prices = PriceTable::builtin();
    if let Some(path) = &args.prices {
        prices.extend_from_file(path)?;
    }
    let mut settings = EvalSettings::new(&args.data, &args.output);
    settings.scorers = scorers;
    settings.judges = judges;
    settings.reference_model = args.reference_model.clone();
    settings.parameters.max_tokens = Some(args.max_tokens);
    settings.parameters.temperature = Some(args.temperature);
    settings.concurrency = args.concurrency.max(1);
    settings.requests_per_minute = requests_per_minute;
    settings.tokens_per_minute = tokens_per_minute;
    settings.max_cost = args.max_cost;
    settings.request_timeout = timeout;
    settings.prices = prices;
    settings.mode = if args.overwrite { OpenMode::Overwrite } else { OpenMode::Resume };
    settings.progress = ProgressMode::Auto;
    settings.resamples = args.bootstrap;
    settings.seed = args.seed;

    let runtime = tokio::runtime::Runtime::new()?;
    // The first Ctrl-C or SIGTERM lets the requests in flight finish and journals them; running the
    // same command again resumes without asking (or paying for) an answer twice.
    let (stopped_by, interrupt) = signals::first_stop("running the same command again continues");
    let Some(report) = runtime.block_on(evaluate_until(models, settings, interrupt))? else {
        eprintln!(
            "eval interrupted: the answers so far are kept in {}; run the same command again to continue",
            args.output.join("answers").display()
        );
        return Ok(ExitCode::from(stopped_by.load(Ordering::Relaxed)));
    };
    match args.output_format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => print_table(&report, &args.output),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(report: &EvalReport, output: &Path) {
    println!("{} items scored against {}; headline: {}", report.scored_items, report.reference, report.headline);
    for model in &report.models {
        let Some(metric) = model.metrics.get(&report.headline) else { continue };
        let gap = metric.gap_closed.map(|gap| format!(", gap closed {:.0}%", gap * 100.0)).unwrap_or_default();
        let loss = model.loss.as_ref().map(|loss| format!(", reference loss {:.3}", loss.mean)).unwrap_or_default();
        println!(
            "  {:<28} {:<8} {:>6.1}% [{:.1}, {:.1}] ({}/{} answered){gap}{loss}",
            model.name,
            format!("{:?}", model.role).to_lowercase(),
            metric.mean * 100.0,
            metric.low * 100.0,
            metric.high * 100.0,
            model.answered,
            model.n
        );
    }
    println!("report: {}", output.join("report.md").display());
}

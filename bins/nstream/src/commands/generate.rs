//! `nstream generate`: a dataset through a model into fine-tuning data, exactly once and
//! resumable (see the nstream-pipeline crate and docs/generate.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use nstream_core::ModelResource;
use nstream_pipeline::{
    AnswerFormat, InputFormat, ModelInfo, OpenMode, Parameters, PriceTable, ProgressMode, Settings, Stop, Summary,
};
use nstream_providers::{LoadOptions, SecretLookup, load_model};
use serde::Deserialize;

use super::signals;

/// Arguments of `nstream generate`. Every setting can also come from `--config FILE` (YAML, the
/// same names as the flags); flags win over the file.
#[derive(Args, Debug, Default)]
pub struct GenerateArgs {
    /// The model: a YAML file holding it (pick with --name when it holds several), or the name of
    /// a model in the file given with -f.
    #[arg(short, long, value_name = "FILE|NAME")]
    pub model: Option<String>,
    /// The model file when --model is a name.
    #[arg(short = 'f', long = "filename", value_name = "FILE", env = "NSTREAM_MODEL_FILE")]
    pub file: Option<PathBuf>,
    /// Which model of the file, when it holds several.
    #[arg(long)]
    pub name: Option<String>,
    /// The dataset: JSONL (any fields), CSV (header row) or text (one item per line).
    #[arg(short, long, value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// The input's layout (default: from the extension; .jsonl/.json/.ndjson, .csv, else text).
    #[arg(long, value_parser = choices::<InputFormat>(InputFormat::NAMES))]
    pub input_format: Option<InputFormat>,
    /// The fine-tuning file to write (OpenAI chat format). Provenance, failures, report and the
    /// journal are written next to it.
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// A YAML file with any of these settings (flag names, e.g. `max-cost: 5`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A minijinja template rendering the user message from a record's fields. Without one, a
    /// record's `messages`, `prompt` or `text` field is used.
    #[arg(short, long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// A system message put first in every conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Requests in flight at most (lowered automatically on 429s, then raised again) [default: 8].
    #[arg(short, long)]
    pub concurrency: Option<usize>,
    /// Requests per minute sent upstream, retries included [default: the MegaModel's limits].
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute (prompt estimate + max_tokens) [default: the MegaModel's limits].
    #[arg(long)]
    pub tpm: Option<u32>,
    /// Stop starting new items once this many US dollars are spent (earlier runs included).
    #[arg(long, value_name = "USD")]
    pub max_cost: Option<f64>,
    /// A YAML/JSON price table that extends the built-in one: `model: {input: USD, output: USD}`
    /// per million tokens.
    #[arg(long, value_name = "FILE")]
    pub prices: Option<PathBuf>,
    /// Sampling temperature.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Most tokens per answer.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Sampling seed, for providers that honour it.
    #[arg(long)]
    pub seed: Option<i64>,
    /// A stop sequence (repeat for up to four).
    #[arg(long)]
    pub stop: Vec<String>,
    /// `text`, or `json`: the answer must be a JSON value (asks the provider for JSON mode).
    #[arg(long, value_parser = choices::<AnswerFormat>(AnswerFormat::NAMES))]
    pub format: Option<AnswerFormat>,
    /// A JSON schema file answers must match (implies --format json).
    #[arg(long, value_name = "FILE")]
    pub schema: Option<PathBuf>,
    /// Extra attempts when an answer is not valid JSON or does not match the schema [default: 2].
    #[arg(long)]
    pub invalid_answer_retries: Option<u32>,
    /// Requests sent upstream for one input at most, over every run [default: the MegaModel's
    /// maxRetries + 1, else 6].
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Limit of one request, in seconds [default: 120].
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// First backoff after a failure without a Retry-After, in milliseconds; doubles with jitter
    /// [default: 500].
    #[arg(long, value_name = "MS")]
    pub initial_backoff_ms: Option<u64>,
    /// Cap of one backoff, in milliseconds [default: 30000].
    #[arg(long, value_name = "MS")]
    pub max_backoff_ms: Option<u64>,
    /// Continue the journal of an earlier run of the same output.
    #[arg(long)]
    pub resume: bool,
    /// Delete the journal of an earlier run and start again.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// With --resume: retry inputs recorded as failed, with a fresh attempt budget.
    #[arg(long)]
    pub retry_failed: bool,
    /// Record malformed input lines and records that do not render as failures and go on
    /// (default: stop before sending anything).
    #[arg(long)]
    pub skip_bad_input: bool,
    /// How progress is shown [default: auto: a bar on a terminal, log lines otherwise].
    #[arg(long, value_parser = choices::<ProgressMode>(ProgressMode::NAMES))]
    pub progress: Option<ProgressMode>,
    /// Seconds between progress log lines [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub progress_interval: Option<f64>,
    /// Where to write report.json [default: OUTPUT_STEM.report.json].
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
    /// CPU threads of a local BaseModel [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
}

/// A flag taking one of the pipeline's named choices: the names listed in `--help`, parsed by
/// the pipeline's `FromStr` (the names live in nstream-pipeline only).
fn choices<T>(names: &'static [&'static str]) -> impl TypedValueParser<Value = T>
where
    T: std::str::FromStr<Err = nstream_pipeline::Error> + Clone + Send + Sync + 'static,
{
    PossibleValuesParser::new(names).try_map(|name| name.parse::<T>())
}

/// The `--config` file: the flags' names and meanings.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ConfigFile {
    model: Option<String>,
    filename: Option<PathBuf>,
    name: Option<String>,
    input: Option<PathBuf>,
    input_format: Option<InputFormat>,
    output: Option<PathBuf>,
    template: Option<PathBuf>,
    system: Option<String>,
    concurrency: Option<usize>,
    rpm: Option<u32>,
    tpm: Option<u32>,
    max_cost: Option<f64>,
    prices: Option<PathBuf>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<u32>,
    seed: Option<i64>,
    #[serde(default)]
    stop: Vec<String>,
    format: Option<AnswerFormat>,
    schema: Option<PathBuf>,
    invalid_answer_retries: Option<u32>,
    max_attempts: Option<u32>,
    timeout: Option<f64>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    #[serde(default)]
    skip_bad_input: bool,
    progress: Option<ProgressMode>,
    progress_interval: Option<f64>,
    report: Option<PathBuf>,
    threads: Option<usize>,
}

/// Paths in a config file are relative to the file.
fn relative_to(base: &Path, path: Option<PathBuf>) -> Option<PathBuf> {
    path.map(|path| if path.is_absolute() { path } else { base.join(path) })
}

/// Fills every unset flag from the config file.
fn merge(mut args: GenerateArgs) -> anyhow::Result<GenerateArgs> {
    let Some(config_path) = args.config.clone() else { return Ok(args) };
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
    let config: ConfigFile = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a valid generate config", config_path.display()))?;
    let base = config_path.parent().unwrap_or(Path::new(".")).to_path_buf();
    macro_rules! fill {
        ($($field:ident),*) => { $( if args.$field.is_none() { args.$field = config.$field; } )* };
    }
    macro_rules! fill_path {
        ($($field:ident),*) => { $( if args.$field.is_none() { args.$field = relative_to(&base, config.$field); } )* };
    }
    fill!(name, input_format, system, concurrency, rpm, tpm, max_cost, temperature, top_p, max_tokens, seed);
    fill!(format, invalid_answer_retries, max_attempts, timeout, initial_backoff_ms, max_backoff_ms, progress);
    fill!(progress_interval, threads);
    fill_path!(input, output, template, prices, schema, report);
    if args.file.is_none() {
        args.file = relative_to(&base, config.filename);
    }
    if args.model.is_none() {
        // A model given as a file in the config is relative to the config.
        args.model = config.model.map(|model| {
            let candidate = base.join(&model);
            if Path::new(&model).is_relative() && candidate.is_file() { candidate.display().to_string() } else { model }
        });
    }
    if args.stop.is_empty() {
        args.stop = config.stop;
    }
    args.skip_bad_input |= config.skip_bad_input;
    Ok(args)
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|duration| !duration.is_zero())
        .with_context(|| format!("--{flag} must be a positive number of seconds"))
}

/// The model resource that --model / -f / --name point at.
fn pick_model(args: &GenerateArgs) -> anyhow::Result<ModelResource> {
    let Some(model) = args.model.as_deref() else {
        bail!("--model is required (a model file, or a model name with -f FILE)")
    };
    let accept =
        |resource: &ModelResource| matches!(resource, ModelResource::MegaModel(_) | ModelResource::BaseModel(_));
    if Path::new(model).is_file() {
        return super::model_file::pick(model, args.name.as_deref(), "chat model", accept);
    }
    let Some(file) = &args.file else {
        bail!("--model {model}: no such file; to pick a model by name, give its file with -f FILE")
    };
    super::model_file::pick(&file.display().to_string(), Some(model), "chat model", accept)
}

/// Runs generation and prints the summary.
pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(nstream_core::cli::LogFormat::Text)?;
    let args = merge(args)?;
    let mut resource = pick_model(&args)?;
    let model_label = format!("{}/{}", resource.kind(), resource.name().unwrap_or_default());
    let Some(input) = args.input.clone() else { bail!("--input is required") };
    let Some(output) = args.output.clone() else { bail!("--output is required") };
    let timeout = seconds(args.timeout.unwrap_or(120.0), "timeout")?;
    // The MegaModel's own limits become the run's (flags win); its client then retries nothing.
    let taken = nstream_pipeline::take_over_limits(&mut resource, timeout);
    let requests_per_minute = args.rpm.or(taken.requests_per_minute);
    let tokens_per_minute = args.tpm.or(taken.tokens_per_minute);
    let max_attempts = args.max_attempts.or(taken.max_attempts);
    let info = ModelInfo::from_resource(&resource);
    let mut options = LoadOptions::default();
    options.llm.threads = args.threads;
    let loaded = load_model(&resource, &options, &SecretLookup::from_env(), None)
        .with_context(|| format!("cannot load {model_label}"))?;

    let mut prices = PriceTable::builtin();
    if let Some(path) = &args.prices {
        prices.extend_from_file(path)?;
    }
    let template = match &args.template {
        Some(path) => {
            let source = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the template {}", path.display()))?;
            Some((path.display().to_string(), source))
        }
        None => None,
    };
    let schema = match &args.schema {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read the schema {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("the schema {} is not JSON", path.display()))?)
        }
        None => None,
    };
    let mut settings = Settings::new(&input, &output);
    settings.input_format = args.input_format;
    settings.report = args.report.clone();
    settings.template = template;
    settings.system = args.system.clone();
    // `Parameters` is non-exhaustive: the flags fill the fields they name.
    let mut parameters = Parameters::default().with_stop(args.stop.clone());
    parameters.temperature = args.temperature;
    parameters.top_p = args.top_p;
    parameters.max_tokens = args.max_tokens;
    parameters.seed = args.seed;
    settings.parameters = parameters;
    settings.format = args.format.unwrap_or_default();
    settings.schema = schema;
    if let Some(retries) = args.invalid_answer_retries {
        settings.invalid_answer_retries = retries;
    }
    if let Some(concurrency) = args.concurrency {
        settings.concurrency = concurrency;
    }
    settings.requests_per_minute = requests_per_minute;
    settings.tokens_per_minute = tokens_per_minute;
    if let Some(attempts) = max_attempts {
        settings.max_attempts = attempts;
    }
    settings.request_timeout = timeout;
    if let Some(milliseconds) = args.initial_backoff_ms {
        settings.initial_backoff = Duration::from_millis(milliseconds);
    }
    if let Some(milliseconds) = args.max_backoff_ms {
        settings.max_backoff = Duration::from_millis(milliseconds);
    }
    settings.max_cost = args.max_cost;
    settings.prices = prices;
    settings.skip_bad_input = args.skip_bad_input;
    settings.mode = if args.overwrite {
        OpenMode::Overwrite
    } else if args.resume || args.retry_failed {
        OpenMode::Resume
    } else {
        OpenMode::Fresh
    };
    settings.retry_failed = args.retry_failed;
    settings.progress = args.progress.unwrap_or_default();
    if let Some(interval) = args.progress_interval {
        settings.progress_interval = seconds(interval, "progress-interval")?;
    }

    let runtime = tokio::runtime::Runtime::new()?;
    // The first Ctrl-C or SIGTERM lets requests in flight finish and writes the output; a second
    // one exits at once (see `signals`).
    let (stopped_by, interrupt) = signals::first_stop("--resume continues from the journal");
    let summary = runtime.block_on(nstream_pipeline::generate_until(loaded.backend, info, settings, interrupt))?;
    print_summary(&summary);
    Ok(match summary.stop {
        Stop::Budget => ExitCode::from(4),
        Stop::Interrupted => ExitCode::from(stopped_by.load(Ordering::Relaxed)),
        Stop::Complete if summary.failed > 0 => ExitCode::from(3),
        Stop::Complete => ExitCode::SUCCESS,
    })
}

fn print_summary(summary: &Summary) {
    let cost = |cost: Option<f64>| cost.map_or_else(|| "unknown (no price)".to_owned(), |cost| format!("${cost:.4}"));
    let ended = match summary.stop {
        Stop::Complete => "complete",
        Stop::Budget => "stopped: --max-cost reached",
        Stop::Interrupted => "interrupted",
    };
    eprintln!(
        "generate {ended}: {} inputs ({} distinct): {} answered, {} failed, {} pending; {} generated now, {} from earlier runs, in {:.1}s",
        summary.inputs,
        summary.unique_items,
        summary.answered,
        summary.failed,
        summary.pending,
        summary.generated_now,
        summary.skipped_done,
        summary.elapsed_seconds
    );
    eprintln!(
        "  requests {} ({:.0}/min): {} rate-limited, {} transient errors, {} invalid answers, {} slow-downs",
        summary.requests,
        summary.requests_per_minute,
        summary.rate_limited,
        summary.transient_errors,
        summary.invalid_answers,
        summary.slowdowns
    );
    eprintln!(
        "  tokens {} prompt + {} completion; cost {} now, {} for the whole output",
        summary.usage.prompt_tokens,
        summary.usage.completion_tokens,
        cost(summary.cost_usd),
        cost(summary.total_cost_usd)
    );
    let files = &summary.files;
    for (label, path) in [
        ("output", &files.output),
        ("provenance", &files.provenance),
        ("failures", &files.failures),
        ("report", &files.report),
        ("journal", &files.journal),
    ] {
        eprintln!("  {label:<10} {}", path.display());
    }
}

//! `nstream distill -f FILE`: a Distillation from one file. The teacher answers the task's inputs
//! (`generate`, exactly once), the answers are split into training and held-out parts, the student
//! is fine-tuned on the first (`finetune`, from its checkpoints), and the base, the student and the
//! teacher are scored on the second (`eval`). Each stage resumes where a killed run stopped; the
//! run ends by writing the student's BaseModel YAML and a report (see docs/distill.md). Ctrl-C
//! and SIGTERM stop it at a safe point ([`stop`]).

mod stop;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use nstream_core::{BaseModel, Distillation, DistillationSpec, FineTuningMethod, LoadedDocument, ModelResource};
use nstream_pipeline::eval::{EvalReport, EvalSettings, ReferenceLoss, Role, Scorer, evaluate_until};
use nstream_pipeline::{
    AnswerFormat, ModelInfo, OpenMode, Parameters, PriceTable, ProgressMode, Settings, Stop, take_over_limits,
};
use nstream_providers::{LoadOptions, SecretLookup, load_model};
use serde::{Deserialize, Serialize};

use super::eval::{OutputFormat, TrainingForwardLoss, eval_model};
use super::finetune::{ProgressArg, device, load_training_base};

/// Arguments of `nstream distill`.
#[derive(Args, Debug)]
pub struct DistillArgs {
    /// The file holding the Distillation, its teacher and its student.
    #[arg(short = 'f', long = "filename", value_name = "FILE", env = "NSTREAM_MODEL_FILE")]
    pub file: PathBuf,
    /// Which Distillation of the file, when it holds several.
    #[arg(long)]
    pub name: Option<String>,
    /// Delete the run folder of an earlier run and start again (the teacher is paid again).
    #[arg(long)]
    pub overwrite: bool,
    /// Skip the reference answers' loss under the base and the student (it loads a dense f32 copy
    /// of the student's weights: 4 bytes per parameter).
    #[arg(long)]
    pub no_reference_loss: bool,
    /// CPU threads of the local models [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the finetune stage trains: `cpu`, or `cuda`/`cuda:N` (a build with the cuda
    /// feature) [default: cpu]. The other stages run on the CPU.
    #[arg(long, env = "NSTREAM_DEVICE")]
    pub device: Option<String>,
    /// Limit of one teacher request, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    pub timeout: f64,
    /// How progress is shown [default: auto: a bar on a terminal, lines otherwise].
    #[arg(long, value_enum)]
    pub progress: Option<ProgressArg>,
    /// How the result is printed on standard output.
    #[arg(short = 'o', long = "output-format", value_enum, default_value_t = OutputFormat::Text)]
    pub output_format: OutputFormat,
    /// Run only these stages (comma-separated or repeated), in order: the stages before them must
    /// be done already (the operator runs one Job per stage this way). Every stage when omitted.
    #[arg(long = "stage", value_enum, value_delimiter = ',', value_name = "STAGE")]
    pub stages: Vec<StageArg>,
    /// Write a one-line JSON summary here when the run ends, succeeded or failed: the stages run,
    /// their figures (answers, cost, steps, loss, the headline per model) and the error. A
    /// Kubernetes container's `terminationMessagePath`, which the operator reads back.
    #[arg(long, value_name = "FILE", env = "NSTREAM_TERMINATION_MESSAGE")]
    pub termination_message: Option<PathBuf>,
    /// Call the teacher at this OpenAI-compatible base URL instead of the endpoint its MegaModel
    /// names (a port-forward or a proxy to the same teacher; the operator's tests stand in for
    /// cluster DNS with it). The teacher must be an OpenAI-compatible MegaModel.
    #[arg(long, value_name = "URL", env = "NSTREAM_DISTILL_TEACHER_ENDPOINT")]
    pub teacher_endpoint: Option<String>,
}

/// A stage of `--stage`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageArg {
    /// The teacher answers the inputs.
    Generate,
    /// The answers into training and held-out parts.
    Split,
    /// The student is fine-tuned.
    Finetune,
    /// The models are scored on the held-out part.
    Eval,
}

impl StageArg {
    fn name(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Split => "split",
            Self::Finetune => "finetune",
            Self::Eval => "eval",
        }
    }
}

/// The most bytes Kubernetes keeps of a termination message.
const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The one-line JSON summary of `--termination-message`.
#[derive(Serialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct RunSummary {
    /// The stages this run did (those done earlier are not repeated).
    stages: Vec<String>,
    /// Whether the run ended without an error.
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generate: Option<GenerateFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    split: Option<SplitFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finetune: Option<FinetuneFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval: Option<EvalFigures>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct GenerateFigures {
    inputs: usize,
    answered: usize,
    failed: usize,
    /// Answered by this run (the others came from the journal of earlier runs).
    answered_now: u64,
    /// Teacher requests of this run.
    requests: u64,
    /// Dollars spent, earlier runs included (absent without a price).
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_usd: Option<f64>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct SplitFigures {
    train: usize,
    held_out: usize,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct FinetuneFigures {
    step: usize,
    total_steps: usize,
    train_examples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss: Option<f64>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct EvalFigures {
    headline: String,
    models: Vec<ModelScore>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ModelScore {
    model: String,
    role: String,
    score: f64,
    low: f64,
    high: f64,
}

impl RunSummary {
    /// The summary as one JSON line under Kubernetes' limit: a long error is shortened first.
    fn line(&mut self) -> String {
        let mut text = serde_json::to_string(self).unwrap_or_default();
        while text.len() > TERMINATION_MESSAGE_LIMIT {
            match self.error.as_mut() {
                Some(error) if error.len() > 64 => {
                    let mut keep = error.len() / 2;
                    while !error.is_char_boundary(keep) {
                        keep -= 1;
                    }
                    error.truncate(keep);
                    error.push_str("...");
                }
                _ => {
                    // Only the figures are left: drop them rather than write a cut line.
                    self.eval = None;
                    self.generate = None;
                    text = serde_json::to_string(self).unwrap_or_default();
                    break;
                }
            }
            text = serde_json::to_string(self).unwrap_or_default();
        }
        text
    }
}

/// The four stages, in order.
const STAGES: [&str; 4] = ["generate", "split", "finetune", "eval"];

/// What a run folder remembers between runs: the spec it was started with and each stage's
/// progress (`distill-state.json`).
#[derive(Serialize, Deserialize, Debug, Default)]
struct State {
    /// The Distillation's spec when the run started: a changed spec is refused, not mixed in.
    spec: Option<serde_json::Value>,
    /// Per stage: done or not, and the seconds spent over every run.
    stages: std::collections::BTreeMap<String, StageState>,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
struct StageState {
    done: bool,
    seconds: f64,
}

/// The files of one run, under its output folder.
struct RunFolder {
    root: PathBuf,
}

impl RunFolder {
    fn state(&self) -> PathBuf {
        self.root.join("distill-state.json")
    }
    fn template(&self) -> PathBuf {
        self.root.join("prompt.j2")
    }
    fn schema(&self) -> PathBuf {
        self.root.join("schema.json")
    }
    fn answers(&self) -> PathBuf {
        self.root.join("generate").join("answers.jsonl")
    }
    fn train(&self) -> PathBuf {
        self.root.join("data").join("train.jsonl")
    }
    fn held_out(&self) -> PathBuf {
        self.root.join("data").join("heldout.jsonl")
    }
    fn student(&self) -> PathBuf {
        self.root.join("student")
    }
    fn student_yaml(&self) -> PathBuf {
        self.root.join("student.yaml")
    }
    fn eval(&self) -> PathBuf {
        self.root.join("eval")
    }
    fn report(&self) -> PathBuf {
        self.root.join("report.md")
    }
}

/// Writes `text` to `path` through a temporary file and a rename: a killed run leaves the old
/// file or the new one, never half of one.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    nstream_pipeline::output::write_atomically(path, text).with_context(|| format!("cannot write {}", path.display()))
}

impl State {
    fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is damaged; pass --overwrite to start again", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_atomically(path, &(serde_json::to_string_pretty(self)? + "\n"))
    }

    fn done(&self, stage: &str) -> bool {
        self.stages.get(stage).is_some_and(|stage| stage.done)
    }

    /// Adds the time spent in `stage` by this run and marks it done when `done`.
    fn record(&mut self, stage: &str, started: Instant, done: bool) {
        let entry = self.stages.entry(stage.to_owned()).or_default();
        entry.seconds += started.elapsed().as_secs_f64();
        entry.done |= done;
    }
}

/// The Distillation of the file and the resources it names.
struct Plan {
    name: String,
    spec: DistillationSpec,
    teacher: ModelResource,
    student: BaseModel,
    /// The folder the file lies in: the spec's paths are relative to it.
    base_dir: PathBuf,
}

fn plan(args: &DistillArgs) -> anyhow::Result<Plan> {
    let file = args.file.display().to_string();
    let documents = nstream_core::load_path(&args.file)?;
    if let Some(bad) = documents.iter().find(|document| !document.diagnostics.is_empty()) {
        bail!("{file} is invalid: {} (run `nstream validate -f {file}`)", bad.diagnostics[0]);
    }
    let resources: Vec<&ModelResource> = documents.iter().filter_map(LoadedDocument::valid_resource).collect();
    let distillations: Vec<&Distillation> = resources
        .iter()
        .filter_map(|resource| match resource {
            ModelResource::Distillation(distillation) => Some(distillation),
            _ => None,
        })
        .filter(|distillation| {
            args.name.as_deref().is_none_or(|name| distillation.metadata.name.as_deref() == Some(name))
        })
        .collect();
    let distillation = match distillations.as_slice() {
        [one] => (*one).clone(),
        [] => bail!(
            "{file} holds no Distillation{}",
            args.name.as_deref().map(|name| format!(" named {name}")).unwrap_or_default()
        ),
        many => bail!(
            "{file} holds several Distillations ({}); pick one with --name",
            many.iter().filter_map(|distillation| distillation.metadata.name.as_deref()).collect::<Vec<_>>().join(", ")
        ),
    };
    let name = distillation.metadata.name.clone().unwrap_or_default();
    let spec = distillation.spec;
    let named = |wanted: &str| resources.iter().find(|resource| resource.name() == Some(wanted)).copied();
    let teacher = match named(&spec.teacher) {
        Some(resource @ (ModelResource::MegaModel(_) | ModelResource::BaseModel(_))) => resource.clone(),
        Some(other) => {
            bail!("spec.teacher: {} is a {}, expected a MegaModel or a BaseModel", spec.teacher, other.kind())
        }
        None => bail!("spec.teacher: {file} holds no model named {}", spec.teacher),
    };
    let mut teacher = teacher;
    if let Some(endpoint) = &args.teacher_endpoint {
        match &mut teacher {
            ModelResource::MegaModel(mega) if mega.spec.model_template.open_ai.is_some() => {
                if let Some(openai) = mega.spec.model_template.open_ai.as_mut() {
                    openai.endpoint = Some(endpoint.clone());
                }
            }
            _ => bail!(
                "--teacher-endpoint: the teacher {} is not an OpenAI-compatible MegaModel (modelTemplate.openAI)",
                spec.teacher
            ),
        }
    }
    let student = match named(&spec.student) {
        Some(ModelResource::BaseModel(model)) => model.clone(),
        Some(other) => bail!("spec.student: {} is a {}, expected a BaseModel", spec.student, other.kind()),
        None => bail!("spec.student: {file} holds no BaseModel named {}", spec.student),
    };
    let base_dir =
        args.file.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    Ok(Plan { name, spec, teacher, student, base_dir })
}

impl Plan {
    fn relative(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() { path.to_path_buf() } else { self.base_dir.join(path) }
    }

    fn run_folder(&self) -> RunFolder {
        let output = self.spec.output.clone().unwrap_or_else(|| format!("runs/{}", self.name));
        RunFolder { root: self.relative(&output) }
    }

    fn max_tokens(&self) -> u32 {
        self.spec.task.max_tokens.unwrap_or(nstream_core::distillation::DEFAULT_MAX_TOKENS)
    }
}

fn progress_mode(progress: Option<ProgressArg>) -> ProgressMode {
    match progress {
        Some(ProgressArg::Bar) => ProgressMode::Bar,
        Some(ProgressArg::Lines) => ProgressMode::Lines,
        Some(ProgressArg::Quiet) => ProgressMode::Quiet,
        Some(ProgressArg::Auto) | None => ProgressMode::Auto,
    }
}

fn announce(stage: &str, what: &str) {
    let number = STAGES.iter().position(|name| *name == stage).map_or(0, |index| index + 1);
    eprintln!("distill: stage {number}/{} {stage}: {what}", STAGES.len());
}

/// Stage 1: the teacher answers every input, through the exactly-once journal.
fn generate(
    plan: &Plan,
    folder: &RunFolder,
    args: &DistillArgs,
    timeout: Duration,
    figures: &mut Option<GenerateFigures>,
    stop: &stop::Stop,
) -> anyhow::Result<()> {
    let mut teacher = plan.teacher.clone();
    let label = format!("{}/{}", teacher.kind(), plan.spec.teacher);
    let taken = take_over_limits(&mut teacher, timeout);
    let info = ModelInfo::from_resource(&teacher);
    let mut options = LoadOptions::default();
    options.llm.threads = args.threads;
    let loaded = load_model(&teacher, &options, &SecretLookup::from_env(), None)
        .with_context(|| format!("cannot load the teacher {label}"))?;
    let task = &plan.spec.task;
    let generation = plan.spec.generation.clone().unwrap_or_default();
    let mut settings = Settings::new(plan.relative(&task.dataset), folder.answers());
    if let Some(template) = &task.prompt_template {
        write_atomically(&folder.template(), template)?;
        settings.template = Some((folder.template().display().to_string(), template.clone()));
    }
    settings.system = task.system_prompt.clone();
    settings.parameters = Parameters::default().with_max_tokens(plan.max_tokens());
    settings.parameters.temperature = generation.temperature;
    if let Some(schema) = &task.response_schema {
        settings.format = AnswerFormat::Json;
        settings.schema = Some(schema.clone());
    }
    if let Some(concurrency) = generation.concurrency {
        settings.concurrency = concurrency as usize;
    }
    settings.requests_per_minute = taken.requests_per_minute;
    settings.tokens_per_minute = taken.tokens_per_minute;
    if let Some(attempts) = taken.max_attempts {
        settings.max_attempts = attempts;
    }
    settings.request_timeout = timeout;
    settings.max_cost = generation.max_cost;
    settings.prices = PriceTable::builtin();
    // The journal makes a rerun pay for nothing twice; a first run has none to resume.
    settings.mode = OpenMode::Resume;
    settings.progress = progress_mode(args.progress);
    let runtime = tokio::runtime::Runtime::new()?;
    let summary =
        runtime.block_on(nstream_pipeline::generate_until(loaded.backend, info, settings, stop.interrupted()))?;
    eprintln!(
        "distill: generate: {} inputs, {} answered ({} now, {} from earlier runs), {} failed; {} requests",
        summary.inputs, summary.answered, summary.generated_now, summary.skipped_done, summary.failed, summary.requests
    );
    *figures = Some(GenerateFigures {
        inputs: summary.inputs,
        answered: summary.answered,
        failed: summary.failed,
        answered_now: summary.generated_now,
        requests: summary.requests,
        cost_usd: summary.total_cost_usd,
    });
    match summary.stop {
        Stop::Budget => {
            bail!("generate stopped at generation.maxCost; raise it and run again (the answers so far are kept)")
        }
        Stop::Interrupted => bail!("generate was interrupted; run again to continue"),
        Stop::Complete if summary.answered == 0 => {
            bail!("the teacher answered none of the inputs: see {}", summary.files.failures.display())
        }
        Stop::Complete => {
            if summary.failed > 0 {
                tracing::warn!(
                    failed = summary.failed,
                    failures = %summary.files.failures.display(),
                    "some inputs got no valid answer from the teacher; the distillation goes on without them"
                );
            }
            Ok(())
        }
    }
}

/// The 64-bit FNV-1a hash: stable across versions and machines, which a split must be.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Whether a record goes to the held-out part: by a hash of its prompt (every message but the
/// answer), so the same input lands on the same side on every run and every machine.
fn held_out(record: &serde_json::Value, share: f64) -> bool {
    let prompt = record
        .get("messages")
        .and_then(serde_json::Value::as_array)
        .map(|messages| {
            messages
                .iter()
                .filter(|message| message.get("role").and_then(serde_json::Value::as_str) != Some("assistant"))
                .map(|message| message.get("content").map(ToString::to_string).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    (fnv1a(prompt.as_bytes()) as f64 / u64::MAX as f64) < share
}

/// Stage 2: the teacher's answers into train.jsonl and heldout.jsonl; returns their sizes.
fn split(plan: &Plan, folder: &RunFolder) -> anyhow::Result<(usize, usize)> {
    let answers = folder.answers();
    let text = std::fs::read_to_string(&answers).with_context(|| format!("cannot read {}", answers.display()))?;
    let share = plan.spec.held_out();
    let (mut train, mut held) = (String::new(), String::new());
    let (mut train_count, mut held_count) = (0, 0);
    for (index, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON record", answers.display(), index + 1))?;
        if held_out(&record, share) {
            held.push_str(line);
            held.push('\n');
            held_count += 1;
        } else {
            train.push_str(line);
            train.push('\n');
            train_count += 1;
        }
    }
    if train_count == 0 || held_count == 0 {
        bail!(
            "split.heldOut {share} leaves {train_count} answers to train on and {held_count} to evaluate on: both need at least one (more inputs, or another share)"
        );
    }
    write_atomically(&folder.train(), &train)?;
    write_atomically(&folder.held_out(), &held)?;
    Ok((train_count, held_count))
}

/// Stage 3: the student fine-tuned on train.jsonl, resumed from its last checkpoint.
fn finetune(
    plan: &Plan,
    folder: &RunFolder,
    args: &DistillArgs,
    figures: &mut Option<FinetuneFigures>,
    stop: &stop::Stop,
) -> anyhow::Result<()> {
    let output = folder.student();
    let checkpoint = output.join(nstream_tune::train::CHECKPOINT_FILE);
    let resume = checkpoint.is_file();
    if !resume && output.exists() {
        // Killed before its first checkpoint: nothing of it can be continued.
        std::fs::remove_dir_all(&output).with_context(|| format!("cannot clear {}", output.display()))?;
    }
    let tuning = plan.spec.fine_tuning.clone().unwrap_or_default();
    let mut settings = nstream_tune::Settings::new(folder.train(), &output);
    settings.method = match tuning.method.unwrap_or_default() {
        FineTuningMethod::Lora => nstream_tune::Method::Lora,
        FineTuningMethod::Full => nstream_tune::Method::Full,
    };
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(value) = tuning.$field { settings.$field = value as _; } )* };
    }
    set!(rank, epochs, batch_size, gradient_accumulation, max_seq_len, seed);
    set!(alpha, dropout, learning_rate);
    if let Some(warmup) = tuning.warmup_steps {
        settings.warmup = warmup as usize;
    }
    settings.max_steps = tuning.max_steps.map(|steps| steps as usize);
    settings.save_every = tuning.save_every.unwrap_or(nstream_core::distillation::DEFAULT_SAVE_EVERY) as usize;
    if !tuning.target_modules.is_empty() {
        settings.target_modules = tuning.target_modules.clone();
    }
    if let Some(share) = plan.spec.split.as_ref().and_then(|split| split.validation) {
        settings.validation_split = share;
        settings.eval_every = settings.save_every;
    }
    settings.threads = args.threads;
    settings.progress = match args.progress {
        Some(ProgressArg::Bar) => nstream_tune::ProgressMode::Bar,
        Some(ProgressArg::Lines) => nstream_tune::ProgressMode::Lines,
        Some(ProgressArg::Quiet) => nstream_tune::ProgressMode::Quiet,
        Some(ProgressArg::Auto) | None => nstream_tune::ProgressMode::Auto,
    };
    settings.validate().context("spec.fineTuning")?;
    let base = load_training_base(&ModelResource::BaseModel(plan.student.clone()), &device(args.device.as_deref())?)?;
    let summary = nstream_tune::finetune(base, &settings, resume, stop.flag())?;
    eprintln!(
        "distill: finetune: step {}/{}, {} training examples, loss {}, {:.0} tokens/s",
        summary.steps,
        summary.total_steps,
        summary.train_examples,
        summary.final_loss.map_or_else(|| "-".to_owned(), |loss| format!("{loss:.4}")),
        summary.tokens_per_second
    );
    *figures = Some(FinetuneFigures {
        step: summary.steps,
        total_steps: summary.total_steps,
        train_examples: summary.train_examples,
        loss: summary.final_loss,
    });
    match summary.stop {
        nstream_tune::Stop::Complete => Ok(()),
        nstream_tune::Stop::Interrupted => bail!("finetune was interrupted; run again to continue"),
    }
}

/// The student's BaseModel: the base's spec, its weights the adapter (or the fully fine-tuned
/// model) in the run folder.
fn student_resource(plan: &Plan, folder: &RunFolder) -> anyhow::Result<BaseModel> {
    let mut student = plan.student.clone();
    let name = plan.spec.student_name_or_default(&plan.name);
    student.metadata.name = Some(name.clone());
    student.metadata.resource_version = None;
    student.metadata.uid = None;
    student.spec.base_model_name = name;
    let directory = std::path::absolute(folder.student())
        .with_context(|| format!("cannot resolve {}", folder.student().display()))?;
    let info = &mut student.spec.base_model_serving_info;
    info.hf_model_id = directory.display().to_string();
    info.revision = None;
    if plan.spec.fine_tuning.as_ref().and_then(|tuning| tuning.method) == Some(FineTuningMethod::Full) {
        // A full fine-tuning writes a float model: the base's GGUF file is not part of it.
        info.model_file = None;
    }
    student.status = None;
    Ok(student)
}

/// The reference answers' loss under a model.
type Loss = Arc<dyn ReferenceLoss>;

/// Stage 4: the base, the student and the teacher answer the held-out inputs, scored against the
/// teacher's answers.
fn eval(
    plan: &Plan,
    folder: &RunFolder,
    args: &DistillArgs,
    student: &BaseModel,
    timeout: Duration,
    stop: &stop::Stop,
) -> anyhow::Result<EvalReport> {
    let schema = plan.spec.task.response_schema.clone();
    let scorers = plan
        .spec
        .scorers()
        .iter()
        .map(|text| Scorer::parse(text, schema.as_ref()))
        .collect::<Result<Vec<_>, _>>()
        .context("spec.evaluation.scorers")?;
    let base = ModelResource::BaseModel(plan.student.clone());
    let adapter = plan.spec.fine_tuning.as_ref().and_then(|tuning| tuning.method) != Some(FineTuningMethod::Full);
    let (base_loss, student_loss): (Option<Loss>, Option<Loss>) = if args.no_reference_loss {
        (None, None)
    } else {
        let student_loss: Loss = if adapter {
            Arc::new(TrainingForwardLoss::with_adapter(&base, &folder.student())?)
        } else {
            Arc::new(TrainingForwardLoss::load(&ModelResource::BaseModel(student.clone()))?)
        };
        (Some(Arc::new(TrainingForwardLoss::load(&base)?)), Some(student_loss))
    };
    let teacher_loss = None;
    let mut models = Vec::new();
    let mut limits = None;
    for (resource, role, loss) in [
        (plan.teacher.clone(), Role::Teacher, teacher_loss),
        (base, Role::Base, base_loss),
        (ModelResource::BaseModel(student.clone()), Role::Student, student_loss),
    ] {
        let (model, taken) = eval_model(resource, role, timeout, args.threads, loss)?;
        if role == Role::Teacher {
            limits = Some(taken);
        }
        models.push(model);
    }
    let mut settings = EvalSettings::new(folder.held_out(), folder.eval());
    settings.scorers = scorers;
    settings.parameters.max_tokens = Some(plan.max_tokens());
    settings.parameters.temperature = Some(0.0);
    settings.concurrency =
        plan.spec.generation.as_ref().and_then(|generation| generation.concurrency).unwrap_or(8) as usize;
    if let Some(limits) = limits {
        settings.requests_per_minute = limits.requests_per_minute;
        settings.tokens_per_minute = limits.tokens_per_minute;
    }
    settings.max_cost = plan.spec.generation.as_ref().and_then(|generation| generation.max_cost);
    settings.request_timeout = timeout;
    settings.mode = OpenMode::Resume;
    settings.progress = progress_mode(args.progress);
    if let Some(resamples) = plan.spec.evaluation.as_ref().and_then(|evaluation| evaluation.bootstrap) {
        settings.resamples = resamples as usize;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime
        .block_on(evaluate_until(models, settings, stop.interrupted()))?
        .context("eval was interrupted; run again to continue (the answers so far are kept)")
}

/// The run's report.md: the stages and their times, the scores, and how to serve the student.
fn report_markdown(
    plan: &Plan,
    folder: &RunFolder,
    state: &State,
    report: &EvalReport,
    sizes: (usize, usize),
) -> String {
    let mut text = format!(
        "# Distillation `{}`: {} -> {}\n\nTeacher `{}`, student `{}` fine-tuned on {} of the teacher's answers, \
         evaluated on {} held-out inputs it never saw.\n\n| stage | seconds (all runs) |\n|---|---|\n",
        plan.name,
        plan.spec.teacher,
        plan.spec.student_name_or_default(&plan.name),
        plan.spec.teacher,
        plan.spec.student,
        sizes.0,
        sizes.1
    );
    for stage in STAGES {
        let seconds = state.stages.get(stage).map_or(0.0, |stage| stage.seconds);
        text.push_str(&format!("| {stage} | {seconds:.1} |\n"));
    }
    text.push_str(&format!(
        "\nHeadline metric `{}` against {} (95% bootstrap intervals):\n\n| model | role | score | gap closed | reference loss |\n|---|---|---|---|---|\n",
        report.headline, report.reference
    ));
    for model in &report.models {
        let Some(metric) = model.metrics.get(&report.headline) else { continue };
        let gap = metric.gap_closed.map_or_else(|| "-".to_owned(), |gap| format!("{:.0}%", gap * 100.0));
        let loss = model.loss.as_ref().map_or_else(|| "-".to_owned(), |loss| format!("{:.3}", loss.mean));
        text.push_str(&format!(
            "| {} | {} | {:.1}% [{:.1}, {:.1}] | {gap} | {loss} |\n",
            model.name,
            format!("{:?}", model.role).to_lowercase(),
            metric.mean * 100.0,
            metric.low * 100.0,
            metric.high * 100.0
        ));
    }
    text.push_str(&format!(
        "\nThe full evaluation: `{}` (per item: `items.jsonl`, chart: `chart.svg`). The fine-tuning: `{}`.\n\n\
         Serve the student: `nstream up -f {}`.\n",
        folder.eval().join("report.md").display(),
        folder.student().join("report.md").display(),
        folder.student_yaml().display()
    ));
    text
}

/// Runs `nstream distill`; with `--termination-message`, writes the run's summary there at the
/// end, whether it succeeded or not.
/// Ctrl-C or SIGTERM stops it at a safe point (see [`stop`]): the termination message says so and
/// the exit code is the signal's (130, 143).
pub fn run(args: DistillArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(nstream_core::cli::LogFormat::Text)?;
    let stop = stop::Stop::watch(args.termination_message.clone());
    let mut summary = RunSummary::default();
    let result = run_stages(&args, &mut summary, &stop);
    // A stage that a signal stopped says so in its own words; the signal is named in front.
    let stopped_by = stop.exit_code().filter(|_| result.is_err());
    let result = match stopped_by {
        Some(code) => result.with_context(|| stop::signal_name(code)),
        None => result,
    };
    if let Some(path) = &args.termination_message {
        summary.ok = result.is_ok();
        summary.error = result.as_ref().err().map(|error| format!("{error:#}"));
        write_termination_message(path, &mut summary);
    }
    match (stopped_by, result) {
        (Some(code), Err(error)) => {
            eprintln!("error: {error:#}");
            Ok(ExitCode::from(code))
        }
        (_, result) => result,
    }
}

/// Writes the one-line summary for Kubernetes (a warning when it cannot).
fn write_termination_message(path: &Path, summary: &mut RunSummary) {
    // Written in place, not through a rename: a container's terminationMessagePath is a file the
    // kubelet bind-mounts, which cannot be replaced.
    if let Err(error) = std::fs::write(path, summary.line() + "\n") {
        tracing::warn!(error = %error, path = %path.display(), "cannot write the termination message");
    }
}

/// The lines of a JSONL file that hold something.
fn count_records(path: &Path) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.lines().filter(|line| !line.trim().is_empty()).count())
}

/// Which of the four stages this run does: `--stage`'s, or all. Every stage before the first
/// wanted one must be done already.
fn wanted_stages(args: &DistillArgs, state: &State) -> anyhow::Result<Vec<&'static str>> {
    if args.stages.is_empty() {
        return Ok(STAGES.to_vec());
    }
    let wanted: Vec<&'static str> =
        STAGES.iter().copied().filter(|stage| args.stages.iter().any(|arg| arg.name() == *stage)).collect();
    let first = STAGES.iter().position(|stage| Some(stage) == wanted.first()).unwrap_or(0);
    let last = STAGES.iter().position(|stage| Some(stage) == wanted.last()).unwrap_or(0);
    for stage in &STAGES[..first] {
        if !state.done(stage) {
            bail!("--stage {}: stage {stage} is not done yet; run `--stage {stage}` first", wanted.join(","));
        }
    }
    if let Some(gap) = STAGES[first..=last].iter().find(|stage| !wanted.contains(stage)) {
        bail!("--stage {}: stage {gap} lies between them; name it too", wanted.join(","));
    }
    Ok(wanted)
}

fn run_stages(args: &DistillArgs, summary: &mut RunSummary, stop: &stop::Stop) -> anyhow::Result<ExitCode> {
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|duration| !duration.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    let plan = plan(args)?;
    let folder = plan.run_folder();
    if args.overwrite && folder.root.exists() {
        std::fs::remove_dir_all(&folder.root).with_context(|| format!("cannot clear {}", folder.root.display()))?;
    }
    std::fs::create_dir_all(&folder.root).with_context(|| format!("cannot create {}", folder.root.display()))?;
    let mut state = State::load(&folder.state())?;
    let spec = serde_json::to_value(&plan.spec)?;
    match &state.spec {
        Some(earlier) if *earlier != spec => bail!(
            "{} holds a run of another version of Distillation {}: run the same spec to continue it, or pass --overwrite to start again (the teacher is paid again)",
            folder.root.display(),
            plan.name
        ),
        Some(_) => {}
        None => {
            state.spec = Some(spec);
            state.save(&folder.state())?;
        }
    }
    let wanted = wanted_stages(args, &state)?;
    let wants = |stage: &str| wanted.contains(&stage);
    // Ctrl-C (or a Job's SIGTERM) stops the stage in progress at a safe point and starts no other;
    // every stage resumes from its journal or checkpoint, so even a kill loses at most `saveEvery`
    // steps of training.
    let started = Instant::now();
    if wants("generate") {
        if state.done("generate") {
            announce("generate", "done in an earlier run");
        } else {
            announce("generate", &format!("the teacher {} answers {}", plan.spec.teacher, plan.spec.task.dataset));
            let stage_started = Instant::now();
            let result = generate(&plan, &folder, args, timeout, &mut summary.generate, stop);
            state.record("generate", stage_started, result.is_ok());
            state.save(&folder.state())?;
            result?;
            summary.stages.push("generate".into());
        }
        if let Some(schema) = &plan.spec.task.response_schema {
            write_atomically(&folder.schema(), &(serde_json::to_string_pretty(schema)? + "\n"))?;
        }
    }

    let sizes = if !wants("split") && !wants("finetune") && !wants("eval") {
        None
    } else if wants("split") {
        stop.check("split")?;
        announce("split", &format!("{:.0}% held out for evaluation", plan.spec.held_out() * 100.0));
        let stage_started = Instant::now();
        let sizes = split(&plan, &folder)?;
        state.record("split", stage_started, true);
        state.save(&folder.state())?;
        eprintln!("distill: split: {} to train on, {} held out", sizes.0, sizes.1);
        summary.stages.push("split".into());
        Some(sizes)
    } else {
        Some((count_records(&folder.train())?, count_records(&folder.held_out())?))
    };
    summary.split = sizes.map(|(train, held_out)| SplitFigures { train, held_out });

    if wants("finetune") {
        if state.done("finetune") {
            announce("finetune", "done in an earlier run");
        } else {
            stop.check("finetune")?;
            announce("finetune", &format!("{} on {}", plan.spec.student, folder.train().display()));
            let stage_started = Instant::now();
            let result = finetune(&plan, &folder, args, &mut summary.finetune, stop);
            state.record("finetune", stage_started, result.is_ok());
            state.save(&folder.state())?;
            result?;
            summary.stages.push("finetune".into());
        }
    }
    let student = student_resource(&plan, &folder)?;
    let sizes = sizes.unwrap_or_default();
    if wants("finetune") {
        let yaml = format!(
            "# The student of Distillation {} (written by `nstream distill`): `nstream up -f {}`\n{}",
            plan.name,
            folder.student_yaml().display(),
            serde_yaml::to_string(&student)?
        );
        write_atomically(&folder.student_yaml(), &yaml)?;
    }
    if !wants("eval") {
        eprintln!("distill: {} done in {:.0}s (this run)", wanted.join(", "), started.elapsed().as_secs_f64());
        return Ok(ExitCode::SUCCESS);
    }

    announce(
        "eval",
        &format!(
            "{}, {} and {} on the held-out inputs",
            plan.spec.teacher,
            plan.spec.student,
            student.metadata.name.as_deref().unwrap_or_default()
        ),
    );
    stop.check("eval")?;
    let stage_started = Instant::now();
    let result = eval(&plan, &folder, args, &student, timeout, stop);
    state.record("eval", stage_started, result.is_ok());
    state.save(&folder.state())?;
    let report = result?;
    summary.stages.push("eval".into());
    summary.eval = Some(EvalFigures {
        headline: report.headline.clone(),
        models: report
            .models
            .iter()
            .filter_map(|model| {
                let metric = model.metrics.get(&report.headline)?;
                Some(ModelScore {
                    model: model.name.clone(),
                    role: format!("{:?}", model.role).to_lowercase(),
                    score: metric.mean,
                    low: metric.low,
                    high: metric.high,
                })
            })
            .collect(),
    });
    write_atomically(&folder.report(), &report_markdown(&plan, &folder, &state, &report, sizes))?;

    match args.output_format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => {
            println!("distillation {} done in {:.0}s (this run)", plan.name, started.elapsed().as_secs_f64());
            for model in &report.models {
                let Some(metric) = model.metrics.get(&report.headline) else { continue };
                let gap = metric.gap_closed.map(|gap| format!(", gap closed {:.0}%", gap * 100.0)).unwrap_or_default();
                println!(
                    "  {:<28} {:<8} {} {:>6.1}% [{:.1}, {:.1}]{gap}",
                    model.name,
                    format!("{:?}", model.role).to_lowercase(),
                    report.headline,
                    metric.mean * 100.0,
                    metric.low * 100.0,
                    metric.high * 100.0
                );
            }
            println!("report:  {}", folder.report().display());
            println!(
                "student: {} (nstream up -f {})",
                folder.student_yaml().display(),
                folder.student_yaml().display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

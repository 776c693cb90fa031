//! The nstream command line: validate specs, print CRDs, serve models locally.

mod commands;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use nstream_core::cli::VersionInfo;

/// The exit codes of every command, for `--help` (docs/cli.md explains them).
const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    the command ran and its verdict is negative: invalid documents (validate), a failed
       provider check (check), unreadable files (kb index)
  2    error: bad usage or input, or a failure that stopped the command
  3    generate finished, but some inputs failed (the journal says which)
  4    generate stopped at its cost budget (--max-cost)
  130  interrupted (Ctrl-C); the work done so far is kept and resumable
  143  generate or eval stopped by SIGTERM (the same clean stop as Ctrl-C)";

/// nstream: MegaModel, BaseModel and EmbeddingModel as Kubernetes resources, served behind one
/// OpenAI-compatible API, on a laptop or a cluster.
#[derive(Parser, Debug)]
#[command(name = "nstream", about, long_about = None, propagate_version = true, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check model specs: every problem of every document, with file, line and field path.
    Validate(commands::validate::ValidateArgs),
    /// Print the CustomResourceDefinitions of the five kinds as YAML.
    Crds(commands::crds::CrdsArgs),
    /// Local mode: serve every servable model of a file on one port, routed by model name.
    Up(Box<commands::up::UpArgs>),
    /// Embed texts with an EmbeddingModel (a YAML file or a hub repository id) and print the
    /// vectors or their cosine similarities.
    Embed(commands::embed::EmbedArgs),
    /// Chat with a model of a file (a MegaModel today), interactively or once with --prompt.
    Chat(commands::chat::ChatArgs),
    /// Check each MegaModel of a file against its provider: key, deployment, api-version, latency.
    Check(commands::check::CheckArgs),
    /// Run a model over a dataset and write fine-tuning data (OpenAI chat format) with provenance,
    /// exactly once and resumable.
    Generate(Box<commands::generate::GenerateArgs>),
    /// Fine-tune a BaseModel (LoRA or full) on chat data and write a PEFT adapter, resumable.
    Finetune(Box<commands::finetune::FinetuneArgs>),
    /// Run models (students, base, teacher) over a held-out set, score their answers against the
    /// references and report how much of the teacher's lead each student closed.
    Eval(Box<commands::eval::EvalArgs>),
    /// Distil a teacher into a student from one file: generate, split, fine-tune and evaluate,
    /// each stage resumable; writes the student's BaseModel and a report.
    Distill(Box<commands::distill::DistillArgs>),
    /// Knowledge bases: index files, search, list and remove documents.
    Kb(commands::kb::KbArgs),
    /// Print the shell completion script (bash, zsh, fish, powershell, elvish).
    Completions(commands::completions::CompletionsArgs),
    /// Write man pages, one per command, into a folder.
    Man(commands::man::ManArgs),
}

/// What `--version` prints: version, commit, the cuda feature and the CPU kernels in use.
fn version() -> VersionInfo {
    let mut info = VersionInfo::new(env!("CARGO_PKG_VERSION"), env!("NSTREAM_GIT_COMMIT"));
    info.features = vec![("cuda", cfg!(feature = "cuda"))];
    info.cpu_kernels = Some(nstream_kernels::CpuLevel::detected().to_string());
    info
}

/// The whole command line, with the version texts (clap keeps &'static strs: made once).
fn command() -> clap::Command {
    let version = version();
    Cli::command().version(version.short().leak() as &str).long_version(version.long().leak() as &str)
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    // The commands that run models in this process: pin candle's thread count first.
    match &cli.command {
        Command::Up(args) => nstream_providers::pin_candle_threads(args.serve.threads),
        Command::Chat(args) => nstream_providers::pin_candle_threads(args.threads),
        Command::Embed(_) | Command::Generate(_) => nstream_providers::pin_candle_threads(None),
        Command::Finetune(args) => nstream_tune::pin_training_threads(args.threads),
        Command::Eval(args) => nstream_providers::pin_candle_threads(args.threads),
        Command::Distill(args) => nstream_tune::pin_training_threads(args.threads),
        Command::Kb(args) => match &args.command {
            commands::kb::KbCommand::Index(index) => nstream_providers::pin_candle_threads(index.threads),
            commands::kb::KbCommand::Search(search) => nstream_providers::pin_candle_threads(search.threads),
            _ => {}
        },
        Command::Validate(_) | Command::Crds(_) | Command::Check(_) | Command::Completions(_) | Command::Man(_) => {}
    }
    let result = match cli.command {
        Command::Validate(args) => commands::validate::run(&args),
        Command::Crds(args) => commands::crds::run(&args),
        Command::Up(args) => commands::up::run(&args),
        Command::Embed(args) => commands::embed::run(&args),
        Command::Chat(args) => commands::chat::run(&args),
        Command::Check(args) => commands::check::run(&args),
        Command::Generate(args) => commands::generate::run(*args),
        Command::Finetune(args) => commands::finetune::run(*args),
        Command::Eval(args) => commands::eval::run(*args),
        Command::Distill(args) => commands::distill::run(*args),
        Command::Kb(args) => commands::kb::run(&args),
        Command::Completions(args) => commands::completions::run(&args, command()),
        Command::Man(args) => commands::man::run(&args, command()),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

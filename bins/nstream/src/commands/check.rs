//! `nstream check`: a live connectivity check of each MegaModel of a file.

use std::path::Path;
use std::process::ExitCode;

use clap::ValueEnum;
use nstream_core::ModelResource;
use nstream_providers::{SecretLookup, hosted_backend};
use serde_json::{Value, json};

/// Arguments of `nstream check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The YAML file (or folder) whose MegaModels to check.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: String,
    /// Output format: `text` (one line per MegaModel) or `json` (one report for machines).
    #[arg(short = 'o', long = "output-format", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// How `check` prints its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One line per MegaModel, with the usual cause of a failure.
    Text,
    /// `{"ok", "checked", "failed", "models": [...]}`.
    Json,
}

/// One checked (or unusable) document, as text and as JSON.
struct Outcome {
    ok: bool,
    line: String,
    json: Value,
}

/// Calls each MegaModel's provider once and explains what failed; exit 1 when any failed or the
/// file holds none.
pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let documents = nstream_core::load_path(Path::new(&args.file))?;
    let secrets = SecretLookup::from_env();
    let runtime = tokio::runtime::Runtime::new()?;
    let mut outcomes = Vec::new();
    let mut checked = 0;
    for document in &documents {
        let Some(ModelResource::MegaModel(model)) = document.valid_resource() else {
            if !document.diagnostics.is_empty() {
                let problems: Vec<String> = document.diagnostics.iter().map(ToString::to_string).collect();
                outcomes.push(Outcome {
                    ok: false,
                    line: format!(
                        "{}: {}: invalid, run `nstream validate -f {}`",
                        document.origin.file,
                        document.label(),
                        args.file
                    ),
                    json: json!({
                        "file": document.origin.file,
                        "document": document.label(),
                        "ok": false,
                        "error": "invalid document",
                        "problems": problems,
                    }),
                });
            }
            continue;
        };
        checked += 1;
        let name = model.metadata.name.clone().unwrap_or_default();
        let outcome = match hosted_backend(&name, &model.spec, &secrets) {
            Ok(backend) => {
                let report = runtime.block_on(backend.check());
                Outcome {
                    ok: report.is_ok(),
                    line: report.to_string(),
                    json: json!({
                        "file": document.origin.file,
                        "name": report.name,
                        "ok": report.is_ok(),
                        "provider": report.provider.as_str(),
                        "endpoint": report.endpoint,
                        "target": report.target,
                        "status": report.status,
                        "latency_ms": report.latency.map(|latency| latency.as_millis() as u64),
                        "problem": report.problem.map(|problem| format!("{problem:?}")),
                        "hint": report.problem.map(|problem| problem.hint()),
                        "detail": report.detail,
                    }),
                }
            }
            Err(error) => Outcome {
                ok: false,
                line: format!("MegaModel/{name}: {error}"),
                json: json!({"file": document.origin.file, "name": name, "ok": false, "error": error.to_string()}),
            },
        };
        outcomes.push(outcome);
    }
    let failed = outcomes.iter().filter(|outcome| !outcome.ok).count();
    let ok = failed == 0 && checked > 0;
    match args.output {
        OutputFormat::Text => {
            for outcome in &outcomes {
                println!("{}", outcome.line);
            }
            if checked == 0 {
                println!("{} holds no valid MegaModel", args.file);
            }
        }
        OutputFormat::Json => {
            let models: Vec<&Value> = outcomes.iter().map(|outcome| &outcome.json).collect();
            let report = json!({"ok": ok, "checked": checked, "failed": failed, "models": models});
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

//! `nstream validate`: every problem of every document at once, for people and for machines.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use nstream_core::{LoadedDocument, Outcome};
use serde::Serialize;

/// Arguments of `nstream validate`.
#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// A YAML file, a folder (every .yaml/.yml under it) or `-` for standard input. Repeatable.
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
    pub paths: Vec<PathBuf>,
    /// Output format: `text` (one line per problem) or `json` (one report for machines).
    #[arg(short = 'o', long = "output-format", alias = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Print nothing for valid documents and no summary, only problems.
    #[arg(short, long)]
    pub quiet: bool,
}

/// How `validate` prints its report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One line per problem, `file:line:column: Kind/name: path: message`.
    Text,
    /// A JSON document with every document and problem.
    Json,
}

#[derive(Serialize)]
struct JsonDocument<'a> {
    file: &'a str,
    document: usize,
    line: usize,
    kind: Option<&'a str>,
    name: Option<&'a str>,
    status: &'static str,
    problems: &'a [nstream_core::Diagnostic],
}

#[derive(Serialize)]
struct JsonReport<'a> {
    valid: bool,
    documents: Vec<JsonDocument<'a>>,
}

/// Loads every path and reports; exit code 1 when any document is invalid.
pub fn run(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut documents = Vec::new();
    for path in &args.paths {
        if path.as_os_str() == "-" {
            let mut bytes = Vec::new();
            std::io::stdin().read_to_end(&mut bytes).context("cannot read standard input")?;
            documents.extend(nstream_core::parse_bytes(&bytes, "-"));
        } else {
            documents.extend(nstream_core::load_path(path)?);
        }
    }
    let invalid = documents.iter().filter(|document| !document.diagnostics.is_empty()).count();
    match args.output {
        OutputFormat::Text => print_text(&documents, invalid, args.quiet),
        OutputFormat::Json => print_json(&documents, invalid)?,
    }
    Ok(if invalid == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_text(documents: &[LoadedDocument], invalid: usize, quiet: bool) {
    for document in documents {
        let origin = &document.origin;
        if document.diagnostics.is_empty() {
            if !quiet {
                let verdict = match document.outcome {
                    Outcome::Foreign { .. } => "skipped (not an nstream resource)",
                    _ => "valid",
                };
                println!("{}:{}: {}: {verdict}", origin.file, origin.line, document.label());
            }
            continue;
        }
        for diagnostic in &document.diagnostics {
            let line = diagnostic.line.unwrap_or(origin.line);
            let position = match diagnostic.column {
                Some(column) => format!("{line}:{column}"),
                None => line.to_string(),
            };
            println!("{}:{position}: {}: {diagnostic}", origin.file, document.label());
        }
    }
    if !quiet {
        let total = documents.len();
        println!("{total} document(s): {} valid, {invalid} invalid", total - invalid);
    }
}

fn print_json(documents: &[LoadedDocument], invalid: usize) -> anyhow::Result<()> {
    let report = JsonReport {
        valid: invalid == 0,
        documents: documents
            .iter()
            .map(|document| {
                let (kind, name) = match &document.outcome {
                    Outcome::Resource(resource) => (Some(resource.kind()), resource.name()),
                    Outcome::Foreign { kind, .. } => (Some(kind.as_str()), None),
                    Outcome::Unreadable { kind, name } => (kind.as_deref(), name.as_deref()),
                };
                let status = match (&document.outcome, document.diagnostics.is_empty()) {
                    (Outcome::Foreign { .. }, true) => "skipped",
                    (_, true) => "valid",
                    (_, false) => "invalid",
                };
                JsonDocument {
                    file: &document.origin.file,
                    document: document.origin.document,
                    line: document.origin.line,
                    kind,
                    name,
                    status,
                    problems: &document.diagnostics,
                }
            })
            .collect(),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

//! `nstream check`: a live connectivity check of each MegaModel of a file.

use std::path::Path;
use std::process::ExitCode;

use nstream_core::ModelResource;
use nstream_providers::{SecretLookup, hosted_backend};

/// Arguments of `nstream check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The YAML file (or folder) whose MegaModels to check.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: String,
}

/// Calls each MegaModel's provider once and explains what failed.
pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let documents = nstream_core::load_path(Path::new(&args.file))?;
    let secrets = SecretLookup::from_env();
    let runtime = tokio::runtime::Runtime::new()?;
    let mut checked = 0;
    let mut failed = 0;
    for document in &documents {
        let Some(ModelResource::MegaModel(model)) = document.valid_resource() else {
            if !document.diagnostics.is_empty() {
                println!(
                    "{}: {}: invalid, run `nstream validate -f {}`",
                    document.origin.file,
                    document.label(),
                    args.file
                );
                failed += 1;
            }
            continue;
        };
        checked += 1;
        let name = model.metadata.name.clone().unwrap_or_default();
        match hosted_backend(&name, &model.spec, &secrets) {
            Ok(backend) => {
                let report = runtime.block_on(backend.check());
                println!("{report}");
                if !report.is_ok() {
                    failed += 1;
                }
            }
            Err(error) => {
                println!("MegaModel/{name}: {error}");
                failed += 1;
            }
        }
    }
    if checked == 0 {
        println!("{} holds no valid MegaModel", args.file);
    }
    Ok(if failed == 0 && checked > 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

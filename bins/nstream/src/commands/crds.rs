//! `nstream crds`: the CRDs as YAML, for `kubectl apply -f -` or `deploy/crds/`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use nstream_core::crd;

/// Arguments of `nstream crds`.
#[derive(Args, Debug)]
pub struct CrdsArgs {
    /// Write one file per CRD into this folder instead of printing them (deploy/crds/ is made so).
    #[arg(long = "out-dir", alias = "output-dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
}

/// Prints or writes the CRDs.
pub fn run(args: &CrdsArgs) -> anyhow::Result<ExitCode> {
    match &args.output_dir {
        None => print!("{}", crd::crds_yaml()?),
        Some(folder) => {
            std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
            for (definition, name) in crd::crds().iter().zip(crd::CRD_FILE_NAMES) {
                let path = folder.join(name);
                std::fs::write(&path, crd::crd_yaml(definition)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

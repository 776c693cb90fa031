//! `nstream completions SHELL`: the shell's completion script, on standard output.

use std::process::ExitCode;

use clap::Args;
use clap_complete::Shell;

/// Arguments of `nstream completions`.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Prints the completion script of `command` (the whole `nstream` command line) for the shell.
pub fn run(args: &CompletionsArgs, mut command: clap::Command) -> anyhow::Result<ExitCode> {
    clap_complete::generate(args.shell, &mut command, "nstream", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

//! `nstream man --out-dir DIR`: one man page per command and subcommand (`nstream.1`,
//! `nstream-up.1`, `nstream-kb-search.1`, ...).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

/// Arguments of `nstream man`.
#[derive(Args, Debug)]
pub struct ManArgs {
    /// The folder to write the pages into (made when missing), such as
    /// ~/.local/share/man/man1.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// Writes the page of `command` and of each of its visible subcommands, depth first.
fn write_pages(command: clap::Command, folder: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for subcommand in command.get_subcommands().filter(|subcommand| !subcommand.is_hide_set()).cloned() {
        write_pages(subcommand, folder, written)?;
    }
    let page = clap_mangen::Man::new(command);
    let path =
        page.generate_to(folder).with_context(|| format!("cannot write a man page into {}", folder.display()))?;
    written.push(path);
    Ok(())
}

/// Writes the pages of `command` (the whole `nstream` command line) and names each on stderr.
pub fn run(args: &ManArgs, command: clap::Command) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    // `help` is clap's, not a command with a page of its own.
    let mut command = command.disable_help_subcommand(true);
    // Builds the subcommands' full names (`nstream-kb-search`), which name the files.
    command.build();
    let mut written = Vec::new();
    write_pages(command, &args.out_dir, &mut written)?;
    for path in &written {
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

//! What the binaries (`nstream`, `nstream-server`, `nstream-operator`, `nstream-router`) share and
//! no library needs: one tracing-subscriber setup, the text of `--version`, and the frame of
//! `main` (parse the command line, run on a tokio runtime, exit 0 or print the error and exit 2).
//! Behind the `cli` feature, so that library users do not link a subscriber, clap or a runtime.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// How log lines are written (always to standard error, so standard output stays the command's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// `RUST_LOG` is set but does not parse as a filter.
    #[error(
        "RUST_LOG={value:?} is not a log filter (expected directives such as `info` or \
         `nstream_server=debug,kube=warn`): {cause}"
    )]
    Filter {
        /// The variable's value.
        value: String,
        /// The parser's complaint.
        cause: String,
    },
}

/// Installs the process's tracing subscriber: events at `default_filter` (such as `info` or
/// `info,kube=warn`) unless `RUST_LOG` says otherwise, written to standard error in `format`.
/// A second call in the same process keeps the first subscriber.
pub fn init_logging(format: LogFormat, default_filter: &str) -> Result<(), LoggingError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => EnvFilter::try_new(&value)
            .map_err(|error| LoggingError::Filter { value: value.clone(), cause: error.to_string() })?,
        _ => EnvFilter::new(default_filter),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // Already installed (a test harness, a second call): the first one stays, as documented.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

/// What `--version` reports: the version, the commit built and the compiled features.
#[derive(Clone, Debug)]
pub struct VersionInfo {
    /// The crate version (`CARGO_PKG_VERSION`).
    pub version: &'static str,
    /// The short commit hash the binary was built from, `unknown` outside a git checkout.
    pub commit: &'static str,
    /// Cargo features that change what the binary can do, and whether each was compiled in.
    pub features: Vec<(&'static str, bool)>,
    /// The CPU kernel level detected at run time (`portable`, `avx2`, `avx512`), for binaries that
    /// run models.
    pub cpu_kernels: Option<String>,
}

impl VersionInfo {
    /// The information of a binary built from `commit` with no feature worth listing.
    pub fn new(version: &'static str, commit: &'static str) -> Self {
        Self { version, commit, features: Vec::new(), cpu_kernels: None }
    }

    /// `-V`'s one line: `0.1.0 (abc1234)`.
    pub fn short(&self) -> String {
        format!("{} ({})", self.version, self.commit)
    }

    /// `--version`'s lines: the short line, then `commit:`, `features:` and `cpu kernels:` lines.
    pub fn long(&self) -> String {
        let mut text = self.short();
        let _ = write!(text, "\ncommit: {}", self.commit);
        if !self.features.is_empty() {
            let features: Vec<String> =
                self.features.iter().map(|(name, on)| format!("{name} {}", if *on { "on" } else { "off" })).collect();
            let _ = write!(text, "\nfeatures: {}", features.join(", "));
        }
        if let Some(level) = &self.cpu_kernels {
            let _ = write!(text, "\ncpu kernels: {level} (detected at run time)");
        }
        text
    }
}

/// Parses the process's command line into `Arguments`, with `version`'s texts as `-V` and
/// `--version`. Bad usage exits with clap's message and code 2; `--help` and `--version` print
/// their text and exit with code 0.
pub fn parse_arguments<Arguments: clap::CommandFactory + clap::FromArgMatches>(version: &VersionInfo) -> Arguments {
    // clap keeps &'static strs; the two texts are made once per process.
    let command =
        Arguments::command().version(version.short().leak() as &str).long_version(version.long().leak() as &str);
    match Arguments::from_arg_matches(&command.get_matches()) {
        Ok(arguments) => arguments,
        Err(error) => error.exit(),
    }
}

/// Runs `future` to its end on a new multi-threaded tokio runtime with every driver enabled, and
/// returns its result; a runtime that cannot be built is an `Error` too.
pub fn run_on_runtime<Output, Error: From<std::io::Error>>(
    future: impl Future<Output = Result<Output, Error>>,
) -> Result<Output, Error> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(future)
}

/// The exit status of a binary for what its work returned: success (0), or `error: ` and the
/// error with its causes (`{error:#}`, one line) on standard error, and code 2, which the
/// binaries' `--help` lists for errors.
pub fn exit_code<Error: std::fmt::Display>(outcome: Result<(), Error>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_version_lists_commit_features_and_kernels() {
        let mut info = VersionInfo::new("1.2.3", "abc1234");
        assert_eq!(info.long(), "1.2.3 (abc1234)\ncommit: abc1234");
        info.features = vec![("cuda", false), ("metal", true)];
        info.cpu_kernels = Some("avx2".to_string());
        assert_eq!(
            info.long(),
            "1.2.3 (abc1234)\ncommit: abc1234\nfeatures: cuda off, metal on\ncpu kernels: avx2 (detected at run time)"
        );
        assert_eq!(info.short(), "1.2.3 (abc1234)");
    }

    #[test]
    fn the_runtime_runs_the_future_and_returns_its_result() {
        let doubled: Result<u32, std::io::Error> = run_on_runtime(async {
            let handle = tokio::spawn(async { 21 });
            Ok(handle.await.map_err(std::io::Error::other)? * 2)
        });
        assert_eq!(doubled.ok(), Some(42));
        let failed: Result<(), std::io::Error> = run_on_runtime(async { Err(std::io::Error::other("no model")) });
        assert_eq!(failed.map_err(|error| error.to_string()), Err("no model".to_string()));
    }

    #[test]
    fn success_exits_zero_and_an_error_exits_two() {
        assert_eq!(exit_code::<std::io::Error>(Ok(())), ExitCode::SUCCESS);
        assert_eq!(exit_code(Err(std::io::Error::other("bad settings"))), ExitCode::from(2));
    }
}

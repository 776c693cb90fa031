//! What the three binaries (`nstream`, `nstream-server`, `nstream-operator`) share and no library
//! needs: one tracing-subscriber setup and the text of `--version`. Behind the `cli` feature, so
//! that library users do not link a subscriber.

use std::fmt::Write as _;
use std::io::IsTerminal as _;

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
}

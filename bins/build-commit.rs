//! The build script of the three binaries (each `bins/*/build.rs` is a link to this file, so
//! that it packages with each crate): sets `NSTREAM_GIT_COMMIT` to the short hash of the
//! commit being built, for `--version`. `unknown` outside a git checkout (a crate tarball, an
//! image build without `.git`) unless the `NSTREAM_GIT_COMMIT` variable supplies it.
//!
//! It reruns only when HEAD or the branch it points to moves (or the variable changes), not on
//! every build: it names `.git/HEAD`, the loose ref and `packed-refs` to cargo.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(arguments: &[&str]) -> Option<String> {
    let output = Command::new("git").args(arguments).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// `git rev-parse --git-path NAME`, made absolute (git answers relative to the working directory).
fn git_path(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(git(&["rev-parse", "--git-path", name])?);
    if path.is_absolute() { Some(path) } else { std::env::current_dir().ok().map(|folder| folder.join(path)) }
}

fn watch(path: &Path) {
    // A path that does not exist would make cargo rerun the script on every build.
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NSTREAM_GIT_COMMIT");
    let supplied = std::env::var("NSTREAM_GIT_COMMIT").ok().filter(|value| !value.trim().is_empty());
    let commit = supplied.or_else(|| {
        let commit = git(&["rev-parse", "--short=7", "HEAD"])?;
        for name in ["HEAD", "packed-refs"] {
            if let Some(path) = git_path(name) {
                watch(&path);
            }
        }
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"])
            && let Some(path) = git_path(&reference)
        {
            watch(&path);
        }
        Some(commit)
    });
    println!("cargo:rustc-env=NSTREAM_GIT_COMMIT={}", commit.unwrap_or_else(|| "unknown".to_string()));
}

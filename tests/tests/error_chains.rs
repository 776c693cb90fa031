//! No error message prints its cause twice.
//!
//! The binaries print errors with anyhow's `{:#}`, which writes each error of the `source()` chain
//! after the previous one. A thiserror variant that both interpolates its cause into its message
//! (`"BaseModel/{name}: {source}"`) and returns it from `source()` (a field named `source`, or
//! `#[source]`/`#[from]`) therefore shows the cause twice, as the quickstart's hub error once did.
//! The rule: a variant shows its cause in its message (field named `cause`, no source attribute)
//! or returns it from `source()`, never both; `#[error(transparent)]` is fine.
//!
//! This reads every `#[error(...)]` of the workspace's sources, so a new crate cannot bring the
//! habit back. tests/tests/cli.rs checks a real chain printed by the binary.

use std::path::{Path, PathBuf};

fn rust_files(folder: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(folder) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
}

/// The text from `start` (just after `#[error(`) to the `)` that closes it.
fn attribute_body(text: &str, start: usize) -> Option<(&str, usize)> {
    let mut depth = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for (offset, character) in text[start..].char_indices() {
        if in_string {
            match character {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match character {
            '"' => in_string = true,
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&text[start..start + offset], start + offset + 1));
                }
            }
            _ => {}
        }
    }
    None
}

/// The variant declared after an attribute: up to the next `#[error(` or the enum's end.
fn variant_text(text: &str, from: usize) -> &str {
    let rest = &text[from..];
    let end = [rest.find("#[error("), rest.find("\n}")].into_iter().flatten().min().unwrap_or(rest.len());
    &rest[..end]
}

/// The names under which a variant's source appears in a message: `source`, a `#[source]` or
/// `#[from]` field's name, or `0` for a tuple variant's source.
fn source_names(variant: &str) -> Vec<String> {
    let mut names = Vec::new();
    let lines: Vec<&str> = variant.lines().map(str::trim).collect();
    for (index, line) in lines.iter().enumerate() {
        if line.starts_with("source:") {
            names.push("source".to_owned());
        }
        let marked = line.contains("#[source]") || line.contains("#[from]");
        if !marked {
            continue;
        }
        // `Io(#[from] std::io::Error)`: a tuple variant.
        if line.contains('(') && !line.starts_with("#[") {
            names.push("0".to_owned());
        } else if let Some(field) = lines.get(index + 1).and_then(|next| next.split(':').next()) {
            names.push(field.trim().to_owned());
        }
    }
    names
}

#[test]
fn no_variant_shows_its_source_in_its_message() {
    let root = nstream_e2e::repo_root();
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("bins"), &mut files);
    assert!(files.len() > 50, "the workspace's sources were not found under {}", root.display());

    let mut offenders = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        let mut position = 0;
        while let Some(found) = text[position..].find("#[error(") {
            let start = position + found + "#[error(".len();
            let Some((message, after)) = attribute_body(&text, start) else { break };
            position = after;
            if message.trim() == "transparent" {
                continue;
            }
            checked += 1;
            for name in source_names(variant_text(&text, after)) {
                if message.contains(&format!("{{{name}}}"))
                    || message.contains(&format!("{{{name}:"))
                    || message.contains(&format!(".{name}"))
                {
                    let line = text[..start].lines().count();
                    offenders.push(format!(
                        "{}:{line}: #[error({message})] also returns `{name}` as its source",
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} error messages found: is the scan broken?");
    assert!(offenders.is_empty(), "causes printed twice by `{{:#}}`:\n{}", offenders.join("\n"));
}

#[test]
fn the_scan_catches_each_shape() {
    let cases = [
        (
            "\"BaseModel/{name}: {source}\"",
            "    Llm {\n        name: String,\n        source: Box<Error>,\n    },\n",
            "source",
        ),
        ("\"server I/O error: {0}\"", "\n    Io(#[from] std::io::Error),\n", "0"),
        (
            "\"could not serialise: {error}\"",
            "    Serialise {\n        #[source]\n        error: serde_json::Error,\n    },\n",
            "error",
        ),
    ];
    for (message, variant, name) in cases {
        assert_eq!(source_names(variant), vec![name.to_owned()], "{variant}");
        assert!(message.contains(&format!("{{{name}}}")));
    }
    assert!(source_names("    Io {\n        path: PathBuf,\n        cause: std::io::Error,\n    },\n").is_empty());
    let text = "#[error(\"a (b) {x}\")]\n    Variant { x: u8 },\n}";
    assert_eq!(attribute_body(text, "#[error(".len()).map(|(body, _)| body), Some("\"a (b) {x}\""));
}

//! Reading files into documents: plain text, markdown, HTML (as markdown-like text), JSONL (one
//! document per line: a text field and metadata) and PDF (its text layer, by `pdf-extract`). A
//! file that cannot be read is an error for that file only; the caller reports it and goes on.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::html::html_to_text;

/// The most metadata keys a document keeps (OpenAI's limit on `attributes`).
pub const MAX_METADATA_KEYS: usize = 16;

/// What a file holds, from its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Format {
    /// Plain text: paragraphs separated by blank lines.
    Text,
    /// Markdown: headings, paragraphs, fenced code.
    Markdown,
    /// HTML, turned into markdown-like text (headings, paragraphs, list items).
    Html,
    /// JSON lines, one document per line.
    Jsonl,
    /// PDF: the text of its pages (no OCR: a scanned page has none).
    Pdf,
}

impl Format {
    /// The format of a file name, or `None` for an extension nstream does not read.
    pub fn of(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "txt" | "text" | "rst" | "log" => Some(Self::Text),
            "md" | "markdown" | "mdx" => Some(Self::Markdown),
            "html" | "htm" | "xhtml" => Some(Self::Html),
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            "pdf" => Some(Self::Pdf),
            _ => None,
        }
    }

    /// The format of an upload: from its file name, else a PDF when the bytes say so, else text.
    pub fn of_upload(filename: &str, bytes: &[u8]) -> Self {
        Self::of(Path::new(filename)).unwrap_or(if bytes.starts_with(b"%PDF-") { Self::Pdf } else { Self::Text })
    }

    /// The name, as in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Markdown => "markdown",
            Self::Html => "html",
            Self::Jsonl => "jsonl",
            Self::Pdf => "pdf",
        }
    }

    /// Whether the chunker may split on markdown structure.
    pub fn is_structured(self) -> bool {
        matches!(self, Self::Markdown | Self::Html)
    }
}

/// One document to index.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceDocument {
    /// Its id: the file path, or `path#id` / `path:line` for a JSONL line. Re-indexing the same id
    /// replaces the document.
    pub id: String,
    /// The text (HTML already turned into text).
    pub text: String,
    /// Metadata, returned with every chunk and matched by search filters.
    pub metadata: Map<String, Value>,
    /// What it was read as.
    pub format: Format,
}

impl SourceDocument {
    /// A document from text, with no metadata.
    pub fn new(id: impl Into<String>, text: impl Into<String>, format: Format) -> Self {
        Self { id: id.into(), text: text.into(), metadata: Map::new(), format }
    }

    /// The same document with a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// How JSONL lines are read.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct JsonlOptions {
    /// The field holding the text; `text` by default.
    pub text_field: String,
    /// The field holding a document id; `id` by default (`path:line` when a line has none).
    pub id_field: String,
}

impl Default for JsonlOptions {
    fn default() -> Self {
        Self { text_field: "text".to_string(), id_field: "id".to_string() }
    }
}

impl JsonlOptions {
    /// Reads the text from another field.
    pub fn with_text_field(mut self, field: impl Into<String>) -> Self {
        self.text_field = field.into();
        self
    }
}

/// The documents of one file, and the lines of it that could not be read (JSONL only).
#[derive(Debug, Default)]
pub struct ReadFile {
    /// The documents.
    pub documents: Vec<SourceDocument>,
    /// One error per unreadable line.
    pub problems: Vec<Error>,
}

/// Reads one file. `id` is the document id (the path as the user named it).
pub fn read_file(path: &Path, id: &str, options: &JsonlOptions) -> Result<ReadFile> {
    let unreadable = |reason: String| Error::UnreadableFile { path: path.display().to_string(), reason };
    let format = Format::of(path)
        .ok_or_else(|| unreadable("unsupported file type (expected .txt, .md, .html, .jsonl or .pdf)".to_string()))?;
    let bytes = std::fs::read(path).map_err(|error| unreadable(format!("cannot read: {error}")))?;
    let text = file_text(bytes, path, format)?;
    parse_text(&text, path, id, format, options)
}

/// The text of a file's bytes: a PDF's extracted text, else the bytes as UTF-8. The error names
/// `path` and what was wrong (not UTF-8 at some offset; not a readable PDF; a PDF without text).
pub fn file_text(bytes: Vec<u8>, path: &Path, format: Format) -> Result<String> {
    let unreadable = |reason: String| Error::UnreadableFile { path: path.display().to_string(), reason };
    if format == Format::Pdf {
        return pdf_text(&bytes).map_err(unreadable);
    }
    String::from_utf8(bytes).map_err(|error| {
        unreadable(format!("not UTF-8 text (invalid byte at offset {})", error.utf8_error().valid_up_to()))
    })
}

/// The text of a PDF's pages, one paragraph break between pages. `pdf-extract` reports malformed
/// files as errors, but a font it does not expect can still make it panic: that is caught and
/// reported as an unreadable file too (the panic's message goes to stderr).
fn pdf_text(bytes: &[u8]) -> std::result::Result<String, String> {
    let pages = std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem_by_pages(bytes))
        .map_err(|_| "the PDF reader failed on this file (a PDF construct it does not handle)".to_string())?
        .map_err(|error| format!("not a readable PDF: {error}"))?;
    let pages: Vec<String> = pages.iter().map(|page| page.trim().to_string()).collect();
    if pages.iter().all(String::is_empty) {
        return Err(format!("the PDF's {} page(s) hold no text layer (a scan? nstream does not run OCR)", pages.len()));
    }
    Ok(pages.join("\n\n"))
}

/// Parses the text of a file that was already read (an upload).
pub fn parse_text(text: &str, path: &Path, id: &str, format: Format, options: &JsonlOptions) -> Result<ReadFile> {
    let source = path.display().to_string();
    let file_metadata = |format: Format| {
        let mut metadata = Map::new();
        metadata.insert("source".to_string(), Value::String(source.clone()));
        metadata.insert("format".to_string(), Value::String(format.as_str().to_string()));
        metadata
    };
    match format {
        Format::Text | Format::Markdown | Format::Pdf => Ok(ReadFile {
            documents: vec![SourceDocument {
                id: id.to_string(),
                text: text.to_string(),
                metadata: file_metadata(format),
                format,
            }],
            problems: Vec::new(),
        }),
        Format::Html => Ok(ReadFile {
            documents: vec![SourceDocument {
                id: id.to_string(),
                text: html_to_text(text),
                metadata: file_metadata(format),
                format,
            }],
            problems: Vec::new(),
        }),
        Format::Jsonl => Ok(parse_jsonl(text, &source, id, options)),
    }
}

fn parse_jsonl(text: &str, source: &str, id: &str, options: &JsonlOptions) -> ReadFile {
    let mut read = ReadFile::default();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let problem = |reason: String| Error::UnreadableFile { path: format!("{source}:{number}"), reason };
        let object = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => object,
            Ok(other) => {
                read.problems.push(problem(format!("expected a JSON object, found {}", json_kind(&other))));
                continue;
            }
            Err(error) => {
                read.problems.push(problem(format!("invalid JSON: {error}")));
                continue;
            }
        };
        let Some(text) = object.get(&options.text_field).and_then(Value::as_str).map(str::to_string) else {
            read.problems.push(problem(format!("no string field `{}` holding the text", options.text_field)));
            continue;
        };
        let document_id = match object.get(&options.id_field) {
            Some(Value::String(line_id)) => format!("{id}#{line_id}"),
            Some(Value::Number(line_id)) => format!("{id}#{line_id}"),
            _ => format!("{id}:{number}"),
        };
        let mut metadata = Map::new();
        metadata.insert("source".to_string(), Value::String(source.to_string()));
        metadata.insert("format".to_string(), Value::String("jsonl".to_string()));
        let mut dropped = Vec::new();
        for (key, value) in object {
            if key == options.text_field || key == options.id_field {
                continue;
            }
            let scalar = matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_));
            if scalar && metadata.len() < MAX_METADATA_KEYS {
                metadata.insert(key, value);
            } else {
                dropped.push(key);
            }
        }
        if !dropped.is_empty() {
            tracing::warn!(line = %format!("{source}:{number}"), fields = ?dropped, "metadata kept only for string, number and boolean fields, at most 16");
        }
        read.documents.push(SourceDocument { id: document_id, text, metadata, format: Format::Jsonl });
    }
    read
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Every readable file under the given paths (folders walked recursively, sorted), with the id
/// each gets: the path as written (a folder's files as `folder/sub/file.md`). Paths that do not
/// exist are errors; files of other types inside folders are skipped.
pub fn collect_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<Error>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        if path.is_dir() {
            walk(path, &mut files, &mut problems);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            problems.push(Error::UnreadableFile {
                path: path.display().to_string(),
                reason: "no such file or folder".to_string(),
            });
        }
    }
    (files, problems)
}

fn walk(folder: &Path, files: &mut Vec<PathBuf>, problems: &mut Vec<Error>) {
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(error) => {
            problems.push(Error::UnreadableFile { path: folder.display().to_string(), reason: error.to_string() });
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            walk(&path, files, problems);
        } else if Format::of(&path).is_some() {
            files.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_become_documents_and_bad_lines_problems() {
        let text = "{\"id\": \"a\", \"text\": \"alpha\", \"lang\": \"en\", \"year\": 2020}\n\n[1]\n{\"body\": \"x\"}\nnot json\n{\"text\": \"beta\"}\n";
        let read = parse_jsonl(text, "f.jsonl", "f.jsonl", &JsonlOptions::default());
        assert_eq!(read.documents.len(), 2);
        assert_eq!(read.documents[0].id, "f.jsonl#a");
        assert_eq!(read.documents[0].metadata["lang"], "en");
        assert_eq!(read.documents[0].metadata["year"], 2020);
        assert_eq!(read.documents[1].id, "f.jsonl:6");
        let messages: Vec<String> = read.problems.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].starts_with("f.jsonl:3: expected a JSON object"), "{messages:?}");
        assert!(messages[1].contains("f.jsonl:4: no string field `text`"), "{messages:?}");
        assert!(messages[2].starts_with("f.jsonl:5: invalid JSON"), "{messages:?}");
    }

    #[test]
    fn formats_come_from_extensions() {
        assert_eq!(Format::of(Path::new("a/B.MD")), Some(Format::Markdown));
        assert_eq!(Format::of(Path::new("a.htm")), Some(Format::Html));
        assert_eq!(Format::of(Path::new("a.pdf")), Some(Format::Pdf));
        assert_eq!(Format::of(Path::new("a.docx")), None);
        assert_eq!(Format::of_upload("upload", b"%PDF-1.7\n"), Format::Pdf);
        assert_eq!(Format::of_upload("notes.md", b"%PDF-1.7\n"), Format::Markdown);
        assert_eq!(Format::of_upload("upload", b"plain words"), Format::Text);
    }

    fn fixture_pdf() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kb/pdf/policy.pdf")
    }

    #[test]
    fn a_pdf_is_read_as_the_text_of_its_pages() {
        let path = fixture_pdf();
        let read = read_file(&path, "policy.pdf", &JsonlOptions::default()).unwrap();
        let [document] = read.documents.as_slice() else { panic!("{:?}", read.documents) };
        assert_eq!(document.format, Format::Pdf);
        assert_eq!(document.metadata["format"], "pdf");
        let text = &document.text;
        // Both pages, in order, the words intact.
        let returns = text.find("Customers may return a teapot within 30 days of delivery").expect(text);
        let warranty = text.find("Every kettle carries a two-year warranty").expect(text);
        assert!(returns < warranty, "{text}");
        assert!(text.contains("Express orders ship the same day"), "{text}");
    }

    #[test]
    fn a_broken_pdf_is_an_error_for_that_file_only() {
        let bytes = std::fs::read(fixture_pdf()).unwrap();
        let cases: [(&[u8], &str); 3] = [
            (&bytes[..900], "not a readable PDF"),
            (b"plain words, not a PDF", "not a readable PDF"),
            (b"%PDF-1.4\n%%EOF\n", "not a readable PDF"),
        ];
        for (content, expected) in cases {
            let error = file_text(content.to_vec(), Path::new("broken.pdf"), Format::Pdf).unwrap_err().to_string();
            assert!(error.contains("broken.pdf") && error.contains(expected), "{error}");
        }
    }
}

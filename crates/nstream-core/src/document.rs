//! Loading YAML: multi-document files, folders and standard input, turned into typed resources
//! with every problem located by file, document, line and column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::distillation::Distillation;
use crate::knowledge_base::KnowledgeBase;
use crate::locate::FieldPositions;
use crate::patterns;
use crate::spec::{API_VERSION, BaseModel, EmbeddingModel, MegaModel};
use crate::validate::{Check, Problem, quote};

/// The kinds nstream serves.
pub const KINDS: [&str; 5] = ["MegaModel", "BaseModel", "EmbeddingModel", "KnowledgeBase", "Distillation"];

/// The top-level fields of a resource.
const TOP_LEVEL_FIELDS: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

/// The fields of `metadata` (Kubernetes' ObjectMeta); k8s-openapi ignores unknown ones, so a typo
/// such as `namepsace` would otherwise pass silently.
const METADATA_FIELDS: [&str; 15] = [
    "name",
    "namespace",
    "labels",
    "annotations",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "finalizers",
    "ownerReferences",
    "managedFields",
    "selfLink",
];

/// One of the five nstream resources.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelResource {
    /// A hosted foundation model.
    MegaModel(MegaModel),
    /// A causal language model.
    BaseModel(BaseModel),
    /// A sentence-embedding model.
    EmbeddingModel(EmbeddingModel),
    /// A knowledge base: documents embedded by an EmbeddingModel.
    KnowledgeBase(KnowledgeBase),
    /// A distillation: a teacher's answers, a student fine-tuned on them and evaluated.
    Distillation(Distillation),
}

impl ModelResource {
    /// The kind, as in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MegaModel(_) => "MegaModel",
            Self::BaseModel(_) => "BaseModel",
            Self::EmbeddingModel(_) => "EmbeddingModel",
            Self::KnowledgeBase(_) => "KnowledgeBase",
            Self::Distillation(_) => "Distillation",
        }
    }

    /// The object metadata.
    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Self::MegaModel(model) => &model.metadata,
            Self::BaseModel(model) => &model.metadata,
            Self::EmbeddingModel(model) => &model.metadata,
            Self::KnowledgeBase(knowledge_base) => &knowledge_base.metadata,
            Self::Distillation(distillation) => &distillation.metadata,
        }
    }

    /// `metadata.name`, which is also the name clients route requests by.
    pub fn name(&self) -> Option<&str> {
        self.metadata().name.as_deref()
    }

    /// Every problem of the resource: metadata and spec.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = metadata_problems(self.metadata());
        problems.extend(match self {
            Self::MegaModel(model) => model.spec.problems("spec"),
            Self::BaseModel(model) => model.spec.problems("spec"),
            Self::EmbeddingModel(model) => model.spec.problems("spec"),
            Self::KnowledgeBase(knowledge_base) => knowledge_base.spec.problems("spec"),
            Self::Distillation(distillation) => distillation.spec.problems("spec"),
        });
        problems
    }

    /// The resource as YAML.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        match self {
            Self::MegaModel(model) => serde_yaml::to_string(model),
            Self::BaseModel(model) => serde_yaml::to_string(model),
            Self::EmbeddingModel(model) => serde_yaml::to_string(model),
            Self::KnowledgeBase(knowledge_base) => serde_yaml::to_string(knowledge_base),
            Self::Distillation(distillation) => serde_yaml::to_string(distillation),
        }
    }
}

fn metadata_problems(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Vec<Problem> {
    let mut problems = Vec::new();
    match metadata.name.as_deref() {
        None => problems.push(Problem::new("metadata.name", "no name", "a name such as all-minilm-l6-v2")),
        Some(name) if name.len() > 63 || !patterns::DNS_LABEL.is_match(name) => problems.push(Problem::new(
            "metadata.name",
            quote(name),
            "a DNS-1035 label (it names a Service): lower-case letters, digits and `-`, starting with a letter, at most 63 characters",
        )),
        Some(_) => {}
    }
    if let Some(namespace) = metadata.namespace.as_deref()
        && (namespace.len() > 63 || !patterns::NAMESPACE.is_match(namespace))
    {
        problems.push(Problem::new(
            "metadata.namespace",
            quote(namespace),
            "a DNS-1123 label: lower-case letters, digits and `-`, at most 63 characters",
        ));
    }
    problems
}

/// Where a document came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// The file, or `-` for standard input.
    pub file: String,
    /// The document's position in the file, from 1.
    pub document: usize,
    /// The line the document starts on, from 1.
    pub line: usize,
}

/// A problem in a document, located as precisely as the YAML allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Line in the file, from 1.
    pub line: Option<usize>,
    /// Column in the line, from 1.
    pub column: Option<usize>,
    /// Field path, such as `spec.baseModelServingTemplate.resourceRequest.cpu`.
    pub path: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

/// What became of one document.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// An nstream resource, valid when it has no diagnostics.
    Resource(Box<ModelResource>),
    /// A document of another API (a Secret, a Namespace) that nstream leaves alone.
    Foreign {
        /// Its `apiVersion`.
        api_version: String,
        /// Its `kind`.
        kind: String,
    },
    /// An nstream document that could not be read into a resource.
    Unreadable {
        /// Its `kind`, when it has one.
        kind: Option<String>,
        /// Its `metadata.name`, when it has one.
        name: Option<String>,
    },
}

/// One document of a file, with everything found wrong in it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedDocument {
    /// Where it came from.
    pub origin: Origin,
    /// What it is.
    pub outcome: Outcome,
    /// Its problems; empty when it is valid.
    pub diagnostics: Vec<Diagnostic>,
}

impl LoadedDocument {
    /// The resource, if the document is a valid nstream resource.
    pub fn valid_resource(&self) -> Option<&ModelResource> {
        match &self.outcome {
            Outcome::Resource(resource) if self.diagnostics.is_empty() => Some(resource),
            _ => None,
        }
    }

    /// A label for messages: `BaseModel/llama3-8b-instruct` or `document 2`.
    pub fn label(&self) -> String {
        match &self.outcome {
            Outcome::Resource(resource) => format!("{}/{}", resource.kind(), resource.name().unwrap_or("<unnamed>")),
            Outcome::Foreign { kind, .. } => kind.clone(),
            Outcome::Unreadable { kind: Some(kind), name } => {
                format!("{kind}/{}", name.as_deref().unwrap_or("<unnamed>"))
            }
            Outcome::Unreadable { kind: None, .. } => format!("document {}", self.origin.document),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) if !self.message.starts_with(path.as_str()) => write!(formatter, "{path}: {}", self.message),
            _ => formatter.write_str(&self.message),
        }
    }
}

/// Why files could not be read at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause (shown in the message, so not also a `source()`).
        cause: std::io::Error,
    },
    /// A folder holds no YAML file.
    #[error("{0} holds no .yaml or .yml file")]
    EmptyFolder(PathBuf),
}

/// Reads a file, or every `.yaml`/`.yml` file under a folder (recursively, sorted by path).
pub fn load_path(path: &Path) -> Result<Vec<LoadedDocument>, LoadError> {
    let io_error = |cause| LoadError::Io { path: path.to_path_buf(), cause };
    if path.is_dir() {
        let mut files = Vec::new();
        collect_yaml_files(path, &mut files)?;
        if files.is_empty() {
            return Err(LoadError::EmptyFolder(path.to_path_buf()));
        }
        files.sort();
        let mut documents = Vec::new();
        for file in files {
            documents.extend(load_path(&file)?);
        }
        Ok(documents)
    } else {
        let bytes = std::fs::read(path).map_err(io_error)?;
        Ok(parse_bytes(&bytes, &path.display().to_string()))
    }
}

fn collect_yaml_files(folder: &Path, files: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let entries = std::fs::read_dir(folder).map_err(|cause| LoadError::Io { path: folder.to_path_buf(), cause })?;
    for entry in entries {
        let path = entry.map_err(|cause| LoadError::Io { path: folder.to_path_buf(), cause })?.path();
        if path.is_dir() {
            collect_yaml_files(&path, files)?;
        } else if path.extension().is_some_and(|extension| extension == "yaml" || extension == "yml") {
            files.push(path);
        }
    }
    Ok(())
}

/// Parses the bytes of a file; text that is not UTF-8 is one diagnostic, not a panic.
pub fn parse_bytes(bytes: &[u8], file: &str) -> Vec<LoadedDocument> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_str(text, file),
        Err(error) => {
            let line = bytes[..error.valid_up_to()].iter().filter(|byte| **byte == b'\n').count() + 1;
            vec![LoadedDocument {
                origin: Origin { file: file.to_string(), document: 1, line: 1 },
                outcome: Outcome::Unreadable { kind: None, name: None },
                diagnostics: vec![Diagnostic {
                    line: Some(line),
                    column: None,
                    path: None,
                    message: format!("the file is not UTF-8 text (invalid byte at offset {})", error.valid_up_to()),
                }],
            }]
        }
    }
}

/// Splits a YAML stream into documents: (first line from 1, text). A `---` or `...` at column 0
/// always separates documents, since block content is indented.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut documents = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") || bare == "...";
        if is_marker {
            documents.push((start, std::mem::take(&mut current)));
            start = index + 2;
            // `--- {inline: doc}` keeps its content, in its columns.
            if let Some(rest) = bare.strip_prefix("---").filter(|rest| !rest.trim().is_empty()) {
                current.push_str("   ");
                current.push_str(rest);
                current.push('\n');
                start = index + 1;
            }
        } else {
            current.push_str(line);
        }
    }
    documents.push((start, current));
    documents
        .into_iter()
        .filter(|(_, text)| text.lines().any(|line| !line.trim().is_empty() && !line.trim_start().starts_with('#')))
        .collect()
}

/// Parses a YAML stream of any number of documents.
pub fn parse_str(text: &str, file: &str) -> Vec<LoadedDocument> {
    split_documents(text)
        .into_iter()
        .enumerate()
        .map(|(index, (line, document))| {
            let origin = Origin { file: file.to_string(), document: index + 1, line };
            parse_document(&document, origin)
        })
        .collect()
}

fn parse_document(text: &str, origin: Origin) -> LoadedDocument {
    let offset = origin.line - 1;
    let mut diagnostics = Vec::new();
    let positions = FieldPositions::new(text);
    let located = |path: &str, message: String| {
        let position = positions.locate(path);
        Diagnostic {
            line: position.map(|(line, _)| line + offset),
            column: position.map(|(_, column)| column),
            path: Some(path.to_string()),
            message,
        }
    };
    let unreadable = |origin: Origin, diagnostics: Vec<Diagnostic>| LoadedDocument {
        origin,
        outcome: Outcome::Unreadable { kind: None, name: None },
        diagnostics,
    };

    let mut value: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(value) => value,
        Err(error) => return unreadable(origin, vec![yaml_diagnostic(&error, offset)]),
    };
    // serde_yaml does not apply merge keys (`<<: *defaults`) when it deserialises a type, and
    // kubectl does: a document with merges is merged, then read again from its merged text.
    let unmerged = value.clone();
    if let Err(error) = value.apply_merge() {
        let mut diagnostic = yaml_diagnostic(&error, offset);
        diagnostic.line = diagnostic.line.or(Some(origin.line));
        return unreadable(origin, vec![diagnostic]);
    }
    let merged_text = (value != unmerged).then(|| serde_yaml::to_string(&value).unwrap_or_default());
    let typed_text = merged_text.as_deref().unwrap_or(text);
    let Some(mapping) = value.as_mapping() else {
        let message = "a document must be a mapping with apiVersion, kind, metadata and spec".to_string();
        let line = Some(origin.line);
        return unreadable(origin, vec![Diagnostic { line, column: Some(1), path: None, message }]);
    };
    let field = |name: &str| mapping.get(name).and_then(serde_yaml::Value::as_str).map(str::to_string);
    let api_version = field("apiVersion");
    let kind = field("kind");
    let ours_by_version = api_version.as_deref().is_some_and(|version| version.starts_with("llm.nstream"));
    let ours_by_kind = kind.as_deref().is_some_and(|kind| suggestion(kind, &KINDS).is_some());
    if !ours_by_version
        && !ours_by_kind
        && let (Some(api_version), Some(kind)) = (api_version.clone(), kind.clone())
    {
        return LoadedDocument { origin, outcome: Outcome::Foreign { api_version, kind }, diagnostics };
    }
    match api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            diagnostics.push(located("apiVersion", format!("found {}, expected {API_VERSION}", quote(other))))
        }
        None => diagnostics.push(located("apiVersion", format!("missing, expected apiVersion: {API_VERSION}"))),
    }
    for key in mapping.keys() {
        let key = key.as_str().unwrap_or_default();
        if !TOP_LEVEL_FIELDS.contains(&key) {
            diagnostics.push(located(key, unknown_field_message(key, &TOP_LEVEL_FIELDS)));
        }
    }
    if let Some(metadata) = mapping.get("metadata").and_then(serde_yaml::Value::as_mapping) {
        for key in metadata.keys() {
            let key = key.as_str().unwrap_or_default();
            if !METADATA_FIELDS.contains(&key) {
                diagnostics.push(located(&format!("metadata.{key}"), unknown_field_message(key, &METADATA_FIELDS)));
            }
        }
    }
    let typed = match kind.as_deref() {
        Some("MegaModel") => serde_yaml::from_str::<MegaModel>(typed_text).map(ModelResource::MegaModel),
        Some("BaseModel") => serde_yaml::from_str::<BaseModel>(typed_text).map(ModelResource::BaseModel),
        Some("EmbeddingModel") => serde_yaml::from_str::<EmbeddingModel>(typed_text).map(ModelResource::EmbeddingModel),
        Some("KnowledgeBase") => serde_yaml::from_str::<KnowledgeBase>(typed_text).map(ModelResource::KnowledgeBase),
        Some("Distillation") => serde_yaml::from_str::<Distillation>(typed_text).map(ModelResource::Distillation),
        other => {
            let found = other.map_or_else(|| "no kind".to_string(), quote);
            let mut message = format!("found {found}, expected one of {}", KINDS.join(", "));
            if let Some(close) = other.and_then(|kind| suggestion(kind, &KINDS)) {
                message.push_str(&format!(" (did you mean `{close}`?)"));
            }
            diagnostics.push(located("kind", message));
            let name = document_name(mapping);
            return LoadedDocument {
                origin,
                outcome: Outcome::Unreadable { kind: other.map(str::to_string), name },
                diagnostics,
            };
        }
    };
    match typed {
        Ok(resource) => {
            for problem in resource.problems() {
                diagnostics
                    .push(located(&problem.path, format!("found {}, expected {}", problem.found, problem.expected)));
            }
            LoadedDocument { origin, outcome: Outcome::Resource(Box::new(resource)), diagnostics }
        }
        Err(error) => {
            let mut diagnostic = yaml_diagnostic(&error, offset);
            if merged_text.is_some() {
                // The error's position is in the merged text: locate its path in this one (an
                // unknown field at the field itself, which may be the `<<` that brought it in).
                let unknown =
                    diagnostic.message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next());
                let path = match (diagnostic.path.as_deref(), unknown) {
                    (Some(path), Some(field)) => Some(format!("{path}.{field}")),
                    (None, Some(field)) => Some(field.to_string()),
                    (path, None) => path.map(str::to_string),
                };
                let position = path.and_then(|path| positions.locate(&path));
                diagnostic.line = Some(position.map_or(origin.line, |(line, _)| line + offset));
                diagnostic.column = position.map(|(_, column)| column);
            }
            diagnostics.push(diagnostic);
            LoadedDocument { origin, outcome: Outcome::Unreadable { kind, name: document_name(mapping) }, diagnostics }
        }
    }
}

fn document_name(mapping: &serde_yaml::Mapping) -> Option<String> {
    mapping.get("metadata")?.get("name")?.as_str().map(str::to_string)
}

/// A serde_yaml error as a diagnostic: its path, its position, and a "did you mean" for unknown
/// fields and variants.
fn yaml_diagnostic(error: &serde_yaml::Error, offset: usize) -> Diagnostic {
    let mut message = error.to_string();
    // serde_yaml appends " at line L column C"; the position is reported in its own fields.
    if let Some(index) = message.rfind(" at line ") {
        message.truncate(index);
    }
    let (path, detail) = match message.split_once(": ") {
        Some((path, detail)) if !path.contains(' ') => (Some(path.to_string()), detail.to_string()),
        _ => (None, message.clone()),
    };
    let mut detail = detail;
    if let Some(hint) = did_you_mean(&detail) {
        detail.push_str(&format!(" (did you mean `{hint}`?)"));
    }
    let location = error.location();
    Diagnostic {
        line: location.as_ref().map(|location| location.line() + offset),
        column: location.as_ref().map(serde_yaml::Location::column),
        path,
        message: detail,
    }
}

/// For "unknown field `x`, expected one of `a`, `b`": the closest expected name.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `").or_else(|| message.strip_prefix("unknown variant `"))?;
    let (found, expected) = rest.split_once('`')?;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    suggestion(found, &candidates).map(str::to_string)
}

fn unknown_field_message(key: &str, known: &[&str]) -> String {
    let mut message = format!("unknown field `{key}`, expected one of {}", known.join(", "));
    if let Some(close) = suggestion(key, known) {
        message.push_str(&format!(" (did you mean `{close}`?)"));
    }
    message
}

/// The candidate closest to `found`, when it is close enough to be a typo.
pub fn suggestion<'a>(found: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let found_lower = found.to_lowercase();
    candidates
        .iter()
        .map(|candidate| (*candidate, strsim::normalized_damerau_levenshtein(&found_lower, &candidate.to_lowercase())))
        .filter(|(_, score)| *score >= 0.7)
        .max_by(|left, right| left.1.total_cmp(&right.1))
        .map(|(candidate, _)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_skips_empty_ones() {
        let text = "# comment\n---\na: 1\n---\n# only a comment\n---\nb: 2\n...\n";
        let documents = split_documents(text);
        assert_eq!(documents.len(), 2);
        assert_eq!(documents[0], (3, "a: 1\n".to_string()));
        assert_eq!(documents[1].0, 7);
    }

    #[test]
    fn inline_documents_keep_their_columns() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n--- {apiVersion: llm.nstream.ai/v1, kind: BaseModel, metadata: {name: b}, bogus: 1}\n";
        let documents = parse_str(text, "-");
        let diagnostic = documents[1].diagnostics.iter().find(|diagnostic| diagnostic.path.as_deref() == Some("bogus"));
        let diagnostic = diagnostic.unwrap_or_else(|| panic!("{:?}", documents[1].diagnostics));
        assert_eq!((diagnostic.line, diagnostic.column), (Some(4), Some(75)));
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggestion("hfModelID", &["hfModelId", "modelProvider"]), Some("hfModelId"));
        assert_eq!(suggestion("replica", &["replicas", "resourceLimit"]), Some("replicas"));
        assert_eq!(suggestion("zzz", &["replicas"]), None);
    }

    #[test]
    fn foreign_documents_are_left_alone() {
        let documents = parse_str("apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n", "-");
        assert!(matches!(documents[0].outcome, Outcome::Foreign { .. }));
        assert!(documents[0].diagnostics.is_empty());
    }

    #[test]
    fn non_utf8_is_a_diagnostic() {
        let documents = parse_bytes(b"kind: \xff\n", "bad.yaml");
        assert_eq!(documents.len(), 1);
        assert!(documents[0].diagnostics[0].message.contains("UTF-8"));
    }
}

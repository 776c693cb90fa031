//! `nstream kb`: index files into a KnowledgeBase, search it, list and remove its documents.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use nstream_core::{KnowledgeBase, LoadedDocument, ModelResource};
use nstream_kb::{Collection, Filter, JsonlOptions, SearchRequest, Store};
use nstream_providers::{LoadOptions, SecretLookup, default_data_dir, embedding_model_of, load_model};

/// Arguments of `nstream kb`.
#[derive(Args, Debug)]
pub struct KbArgs {
    #[command(subcommand)]
    pub command: KbCommand,
}

/// The `kb` subcommands.
#[derive(Subcommand, Debug)]
pub enum KbCommand {
    /// Chunk, embed and store files (text, markdown, HTML, JSONL, PDF); unchanged files are skipped, so
    /// an interrupted run resumes when run again.
    Index(IndexArgs),
    /// The passages nearest to a query.
    Search(SearchArgs),
    /// The documents of a KnowledgeBase (or, with -f alone, the KnowledgeBases of a file).
    Ls(LsArgs),
    /// Remove documents by id.
    Rm(RmArgs),
}

/// Which KnowledgeBase.
#[derive(Args, Debug)]
pub struct KbTarget {
    /// A YAML file holding one KnowledgeBase and its EmbeddingModel, or the name of a
    /// KnowledgeBase of the file given with -f.
    #[arg(long, value_name = "FILE|NAME", env = "NSTREAM_KB")]
    pub kb: Option<String>,
    /// The YAML file (or folder) of resources, when --kb is a name.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Where embedded stores live (relative `store.embedded.path`s are under it).
    #[arg(long, value_name = "DIR", env = "NSTREAM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// Arguments of `nstream kb index`.
#[derive(Args, Debug)]
pub struct IndexArgs {
    #[command(flatten)]
    pub target: KbTarget,
    /// Files or folders (walked recursively for .txt, .md, .html, .jsonl and .pdf files).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The field of JSONL lines that holds the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Chunks embedded and committed together.
    #[arg(long, default_value_t = nstream_kb::DEFAULT_BATCH_CHUNKS as u32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_chunks: u32,
    /// Threads of the embedding model (all cores when omitted).
    #[arg(long, env = "NSTREAM_THREADS")]
    pub threads: Option<usize>,
    /// Output format of the summary.
    #[arg(short = 'o', long = "output-format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Arguments of `nstream kb search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    pub target: KbTarget,
    /// The query.
    #[arg(value_name = "QUERY")]
    pub query: String,
    /// How many results (1 to 100); the KnowledgeBase's default when omitted.
    #[arg(short = 'n', long)]
    pub max_results: Option<u32>,
    /// A metadata filter as JSON, in OpenAI's shape: {"type":"eq","key":"lang","value":"en"}.
    #[arg(long, value_name = "JSON")]
    pub filter: Option<String>,
    /// Drop results below this cosine similarity.
    #[arg(long)]
    pub score_threshold: Option<f32>,
    /// Threads of the embedding model.
    #[arg(long, env = "NSTREAM_THREADS")]
    pub threads: Option<usize>,
    /// Output format.
    #[arg(short = 'o', long = "output-format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Arguments of `nstream kb ls`.
#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub target: KbTarget,
    /// Output format.
    #[arg(short = 'o', long = "output-format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Arguments of `nstream kb rm`.
#[derive(Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    pub target: KbTarget,
    /// Document ids, as `nstream kb ls` shows them.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,
}

/// The resources of the file and the KnowledgeBase picked.
struct Picked {
    resources: Vec<ModelResource>,
    knowledge_base: KnowledgeBase,
    data_dir: PathBuf,
}

fn load_resources(file: &Path) -> anyhow::Result<Vec<ModelResource>> {
    let documents = nstream_core::load_path(file)?;
    if let Some(bad) = documents.iter().find(|document| !document.diagnostics.is_empty()) {
        let diagnostic = &bad.diagnostics[0];
        let line = diagnostic.line.unwrap_or(bad.origin.line);
        bail!(
            "{}:{line}: {}: {diagnostic} (run `nstream validate -f {}`)",
            bad.origin.file,
            bad.label(),
            file.display()
        );
    }
    Ok(documents.iter().filter_map(LoadedDocument::valid_resource).cloned().collect())
}

fn knowledge_bases(resources: &[ModelResource]) -> Vec<&KnowledgeBase> {
    resources
        .iter()
        .filter_map(|resource| match resource {
            ModelResource::KnowledgeBase(knowledge_base) => Some(knowledge_base),
            _ => None,
        })
        .collect()
}

fn pick(target: &KbTarget) -> anyhow::Result<Picked> {
    let data_dir = target.data_dir.clone().unwrap_or_else(default_data_dir);
    let (file, name) = match (&target.kb, &target.file) {
        (Some(kb), None) => (PathBuf::from(kb), None),
        (Some(kb), Some(file)) => (file.clone(), Some(kb.as_str())),
        (None, Some(file)) => (file.clone(), None),
        (None, None) => bail!("--kb is required: a YAML file holding a KnowledgeBase, or its name with -f FILE"),
    };
    if !file.exists() {
        match name {
            None => bail!(
                "--kb {}: no such file; to pick a KnowledgeBase by name, give its file with -f FILE",
                file.display()
            ),
            Some(_) => bail!("-f {}: no such file", file.display()),
        }
    }
    let resources = load_resources(&file)?;
    let candidates: Vec<&KnowledgeBase> = knowledge_bases(&resources)
        .into_iter()
        .filter(|knowledge_base| name.is_none_or(|name| knowledge_base.metadata.name.as_deref() == Some(name)))
        .collect();
    let knowledge_base = match candidates.as_slice() {
        [one] => (*one).clone(),
        [] => bail!(
            "{} holds no KnowledgeBase{}",
            file.display(),
            name.map(|name| format!(" named {name}")).unwrap_or_default()
        ),
        many => bail!(
            "{} holds several KnowledgeBases ({}); pick one with --kb NAME -f {}",
            file.display(),
            many.iter()
                .filter_map(|knowledge_base| knowledge_base.metadata.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
            file.display()
        ),
    };
    Ok(Picked { resources, knowledge_base, data_dir })
}

/// Loads the KnowledgeBase's EmbeddingModel in this process and opens the KnowledgeBase.
async fn open(picked: &Picked, threads: Option<usize>) -> anyhow::Result<Collection> {
    let model = embedding_model_of(&picked.knowledge_base, &picked.resources)?;
    let mut options = LoadOptions::default();
    options.embed.threads = threads;
    let resource = ModelResource::EmbeddingModel(model.clone());
    let loaded = tokio::task::spawn_blocking(move || load_model(&resource, &options, &SecretLookup::from_env(), None))
        .await
        .context("loading the EmbeddingModel")??;
    let collection = nstream_providers::open_knowledge_base(
        &picked.knowledge_base,
        &model,
        loaded.backend,
        &picked.data_dir,
        &SecretLookup::from_env(),
    )
    .await?;
    Ok(collection)
}

async fn open_store(picked: &Picked) -> anyhow::Result<Arc<dyn Store>> {
    Ok(nstream_providers::open_store(&picked.knowledge_base, &picked.data_dir, &SecretLookup::from_env()).await?)
}

/// Runs a `kb` subcommand.
pub fn run(args: &KbArgs) -> anyhow::Result<ExitCode> {
    super::init_logging(nstream_core::cli::LogFormat::Text)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match &args.command {
            KbCommand::Index(args) => index(args).await,
            KbCommand::Search(args) => search(args).await,
            KbCommand::Ls(args) => ls(args).await,
            KbCommand::Rm(args) => rm(args).await,
        }
    })
}

fn relative_id(path: &Path) -> String {
    let text = path.display().to_string();
    text.strip_prefix("./").map(str::to_string).unwrap_or(text)
}

async fn index(args: &IndexArgs) -> anyhow::Result<ExitCode> {
    let picked = pick(&args.target)?;
    let collection = open(&picked, args.threads).await?.with_batch_chunks(args.batch_chunks as usize);
    let (files, mut problems) = nstream_kb::source::collect_files(&args.paths);
    let options = JsonlOptions::default().with_text_field(&args.text_field);
    let mut documents = Vec::new();
    for file in &files {
        match nstream_kb::source::read_file(file, &relative_id(file), &options) {
            Ok(read) => {
                documents.extend(read.documents);
                problems.extend(read.problems);
            }
            Err(error) => problems.push(error),
        }
    }
    for problem in &problems {
        eprintln!("warning: skipped {problem}");
    }
    let bar = indicatif::ProgressBar::new(documents.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} documents, {msg} chunks, {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut progress = |progress: &nstream_kb::IndexProgress| {
        bar.set_position(progress.done as u64);
        bar.set_message(progress.chunks.to_string());
        tracing::debug!(done = progress.done, total = progress.total, chunks = progress.chunks, "committed");
    };
    let report = collection.index(documents, &mut progress).await?;
    bar.finish_and_clear();
    match args.output {
        OutputFormat::Json => {
            let skipped: Vec<String> = problems.iter().map(ToString::to_string).collect();
            let summary = serde_json::json!({
                "knowledge_base": collection.name(),
                "indexed": report.indexed,
                "unchanged": report.unchanged,
                "chunks": report.chunks,
                "skipped": skipped,
            });
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        OutputFormat::Text => println!(
            "{}: indexed {} documents ({} chunks), {} unchanged, {} skipped",
            collection.name(),
            report.indexed,
            report.chunks,
            report.unchanged,
            problems.len()
        ),
    }
    Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn search(args: &SearchArgs) -> anyhow::Result<ExitCode> {
    let filter = args
        .filter
        .as_deref()
        .map(|text| {
            let value: serde_json::Value = serde_json::from_str(text).context("--filter is not JSON")?;
            Filter::parse(&value, "--filter").map_err(anyhow::Error::from)
        })
        .transpose()?;
    let picked = pick(&args.target)?;
    let collection = open(&picked, args.threads).await?;
    let mut request = SearchRequest::new(&args.query);
    request.max_results = args.max_results;
    request.filter = filter;
    request.score_threshold = args.score_threshold;
    let hits = collection.search(&request).await?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&hits)?),
        OutputFormat::Text => {
            for hit in &hits {
                let text: String = hit.text.split_whitespace().collect::<Vec<_>>().join(" ");
                let short: String = text.chars().take(160).collect();
                println!("{:.3}  {}#{}  {short}", hit.score, hit.document_id, hit.chunk_index);
            }
            if hits.is_empty() {
                eprintln!("no results");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn ls(args: &LsArgs) -> anyhow::Result<ExitCode> {
    if args.target.kb.is_none() {
        let Some(file) = &args.target.file else {
            bail!("--kb FILE|NAME or -f FILE is required");
        };
        let resources = load_resources(file)?;
        let data_dir = args.target.data_dir.clone().unwrap_or_else(default_data_dir);
        let mut rows = Vec::new();
        for knowledge_base in knowledge_bases(&resources) {
            let store = nstream_providers::open_store(knowledge_base, &data_dir, &SecretLookup::from_env()).await?;
            let stats = store.stats().await?;
            rows.push(serde_json::json!({
                "name": knowledge_base.metadata.name,
                "embedding_model": knowledge_base.spec.embedding_model,
                "store": store.describe(),
                "documents": stats.documents,
                "chunks": stats.chunks,
            }));
        }
        match args.output {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            OutputFormat::Text => {
                for row in rows {
                    println!(
                        "{}\t{} documents\t{} chunks\t{}",
                        row["name"].as_str().unwrap_or_default(),
                        row["documents"],
                        row["chunks"],
                        row["store"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let picked = pick(&args.target)?;
    let store = open_store(&picked).await?;
    let documents = store.documents().await?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&documents)?),
        OutputFormat::Text => {
            for document in &documents {
                println!("{}\t{} chunks\t{} bytes", document.id, document.chunk_count, document.bytes);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn rm(args: &RmArgs) -> anyhow::Result<ExitCode> {
    let picked = pick(&args.target)?;
    let store = open_store(&picked).await?;
    let mut missing = Vec::new();
    for id in &args.ids {
        if store.delete(id).await? {
            println!("removed {id}");
        } else {
            missing.push(id.clone());
        }
    }
    if !missing.is_empty() {
        bail!("no such document: {} (see `nstream kb ls`)", missing.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

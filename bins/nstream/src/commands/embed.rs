//! `nstream embed`: embeddings from the command line.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use nstream_backend::{EmbeddingRequest, Input};
use nstream_core::ModelResource;
use nstream_providers::{LoadOptions, LoadedModel, SecretLookup, load_embedding_repo, load_model};

/// Arguments of `nstream embed`.
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// A YAML file holding an EmbeddingModel, or a hub repository id such as
    /// sentence-transformers/all-MiniLM-L6-v2.
    #[arg(short, long, value_name = "FILE|REPO")]
    pub model: String,
    /// Which EmbeddingModel of the file, when it holds several.
    #[arg(long)]
    pub name: Option<String>,
    /// What to print: cosine similarities (the default with two texts or more), vectors, or a JSON
    /// document with both.
    #[arg(short = 'o', long = "output-format", alias = "output", value_enum)]
    pub output: Option<EmbedOutput>,
    /// The texts to embed.
    #[arg(required = true, value_name = "TEXT")]
    pub texts: Vec<String>,
}

/// What `nstream embed` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmbedOutput {
    /// A matrix of cosine similarities.
    Similarity,
    /// One vector per line.
    Vectors,
    /// `{"model", "vectors", "similarity", "usage"}`.
    Json,
}

fn load(args: &EmbedArgs) -> anyhow::Result<LoadedModel> {
    let options = LoadOptions::default();
    if Path::new(&args.model).exists() {
        let resource = super::model_file::pick(&args.model, args.name.as_deref(), "EmbeddingModel", |resource| {
            matches!(resource, ModelResource::EmbeddingModel(_))
        })?;
        Ok(load_model(&resource, &options, &SecretLookup::from_env(), None)?)
    } else if nstream_core::patterns::HF_REPO_ID.is_match(&args.model) {
        Ok(load_embedding_repo(&args.model, &options)?)
    } else {
        bail!("--model {:?} is neither a file nor a hub repository id (org/name)", args.model)
    }
}

fn cosine(left: &[f32], right: &[f32]) -> f32 {
    let dot: f32 = left.iter().zip(right).map(|(a, b)| a * b).sum();
    let norm = |vector: &[f32]| vector.iter().map(|value| value * value).sum::<f32>().sqrt();
    let denominator = norm(left) * norm(right);
    if denominator == 0.0 { 0.0 } else { dot / denominator }
}

/// Embeds the texts and prints the result.
pub fn run(args: &EmbedArgs) -> anyhow::Result<ExitCode> {
    let model = load(args)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let request = EmbeddingRequest::new(&model.name, Input::TextBatch(args.texts.clone()));
    // Backends take requests as valid (ModelBackend's contract): the caller checks them.
    request.validate()?;
    let response = runtime.block_on(model.backend.embed(request)).context("embedding failed")?;
    let vectors: Vec<Vec<f32>> = response.data.into_iter().map(|item| item.embedding).collect();
    let similarity: Vec<Vec<f32>> =
        vectors.iter().map(|left| vectors.iter().map(|right| cosine(left, right)).collect()).collect();
    let output = args.output.unwrap_or(if vectors.len() > 1 { EmbedOutput::Similarity } else { EmbedOutput::Vectors });
    match output {
        EmbedOutput::Vectors => {
            for vector in &vectors {
                println!("{}", serde_json::to_string(vector)?);
            }
        }
        EmbedOutput::Similarity => {
            for (index, text) in args.texts.iter().enumerate() {
                let row: Vec<String> = similarity[index].iter().map(|value| format!("{value:6.3}")).collect();
                let label: String = text.chars().take(40).collect();
                println!("{} [{index}] {label}", row.join(" "));
            }
        }
        EmbedOutput::Json => {
            let document = serde_json::json!({
                "model": model.name,
                "vectors": vectors,
                "similarity": similarity,
                "usage": response.usage,
            });
            println!("{}", serde_json::to_string_pretty(&document)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

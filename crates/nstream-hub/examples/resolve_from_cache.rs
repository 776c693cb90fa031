//! Resolving a model's files from the Hugging Face cache, as a loader in another program would.
//!
//! Reads the cache the official clients lay out (`HF_HOME`, `HF_HUB_CACHE` honoured) and prints
//! the weight format it detects and the local paths of the weights, `config.json` and the
//! tokenizer. Offline on purpose: a file missing from the cache is an error naming the fix
//! (drop `with_offline(true)` and the same calls download it). `scripts/offline-models.sh` fills
//! the cache with the default model.
//!
//! `cargo run -p nstream-hub --example resolve_from_cache -- sentence-transformers/all-MiniLM-L6-v2`

use nstream_hub::{Hub, ModelSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repo_id = std::env::args().nth(1).unwrap_or_else(|| "sentence-transformers/all-MiniLM-L6-v2".to_owned());
    let hub = Hub::from_env().with_offline(true).with_progress(false);
    let source = ModelSource::new(repo_id);
    println!("cache: {}", hub.cache_dir().display());
    println!("cached files: {}", hub.list_cached_files(&source)?.join(", "));

    let model = hub.resolve_model(&source)?;
    println!("format: {:?}", model.format);
    for weights in &model.weights {
        println!("weights: {}", weights.display());
    }
    let show = |name: &str, path: &Option<std::path::PathBuf>| match path {
        Some(path) => println!("{name}: {}", path.display()),
        None => println!("{name}: (none in the repo)"),
    };
    show("config", &model.config);
    show("tokenizer", &model.tokenizer);
    // Files outside the usual set (a sentence-transformers pooling config) by name.
    show("pooling", &hub.resolve_optional(&source, "1_Pooling/config.json")?);
    Ok(())
}

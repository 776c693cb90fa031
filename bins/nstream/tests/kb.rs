//! `nstream kb` as a user runs it, with all-MiniLM-L6-v2 from the offline cache: index, search,
//! ls, rm; kill -9 during indexing and run again (every document exactly once); bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn model_cached() -> bool {
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|home| PathBuf::from(home).join("hub")))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/huggingface/hub"));
    let cached = hub.join("models--sentence-transformers--all-MiniLM-L6-v2").is_dir();
    if !cached {
        eprintln!("SKIPPED: all-MiniLM-L6-v2 is not in the hub cache; run scripts/offline-models.sh");
    }
    cached
}

fn nstream(arguments: &[&str], environment: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nstream"));
    command.args(arguments).env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "warn");
    for (name, value) in environment {
        // An empty value means "not set at all".
        if value.is_empty() {
            command.env_remove(name);
        } else {
            command.env(name, value);
        }
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

/// A file with MiniLM and a KnowledgeBase whose embedded store is `store`.
fn write_model_file(folder: &Path, store: &Path) -> PathBuf {
    let file = folder.join("kb.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: llm.nstream.ai/v1\nkind: EmbeddingModel\nmetadata: {{name: minilm}}\nspec:\n  embeddingModelName: all-MiniLM-L6-v2\n  embeddingModelServingInfo: {{hfModelId: sentence-transformers/all-MiniLM-L6-v2, modelProvider: HUGGINGFACE}}\n---\napiVersion: llm.nstream.ai/v1\nkind: KnowledgeBase\nmetadata: {{name: notes}}\nspec:\n  embeddingModel: minilm\n  chunking: {{maxTokens: 48, overlapTokens: 8}}\n  store:\n    embedded: {{path: {}}}\n",
            store.display()
        ),
    )
    .unwrap();
    file
}

const TOPICS: [&str; 8] = [
    "the harbour ferry timetable changes in winter",
    "feeding a sourdough starter twice a day",
    "configuring a reverse proxy with TLS certificates",
    "pruning apple trees in late winter",
    "the rules of a chess tournament tie-break",
    "repairing a bicycle puncture on the road",
    "migrating a PostgreSQL database to a new major version",
    "planting tomatoes after the last frost",
];

/// `count` small text files, each on one topic.
fn write_corpus(folder: &Path, count: usize) -> PathBuf {
    let corpus = folder.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for index in 0..count {
        let topic = TOPICS[index % TOPICS.len()];
        std::fs::write(
            corpus.join(format!("note-{index:04}.txt")),
            format!("Note {index} is about {topic}.\n\nIt repeats that {topic}, in note number {index}.\n"),
        )
        .unwrap();
    }
    corpus
}

fn listed_ids(file: &Path) -> Vec<String> {
    let output = nstream(&["kb", "ls", "--kb", file.to_str().unwrap(), "-o", "json"], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let documents: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    documents.as_array().unwrap().iter().map(|document| document["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn index_search_ls_rm_and_bad_files_are_skipped() {
    if !model_cached() {
        return;
    }
    let folder = tempfile::tempdir().unwrap();
    let file = write_model_file(folder.path(), &folder.path().join("store"));
    let corpus = write_corpus(folder.path(), 16);
    std::fs::write(corpus.join("broken.md"), b"\xff\xfe not utf-8").unwrap();
    std::fs::write(
        corpus.join("lines.jsonl"),
        "{\"text\": \"tide tables for the harbour\", \"lang\": \"en\"}\nnot json\n",
    )
    .unwrap();
    let kb = file.to_str().unwrap();
    let output = nstream(&["kb", "index", "--kb", kb, corpus.to_str().unwrap()], &[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "unreadable files make the exit code 1: {stderr}");
    assert!(stderr.contains("broken.md: not UTF-8"), "{stderr}");
    assert!(stderr.contains("lines.jsonl:2: invalid JSON"), "{stderr}");
    assert!(text(&output.stdout).contains("indexed 17 documents"), "{}", text(&output.stdout));
    assert_eq!(listed_ids(&file).len(), 17);

    let output = nstream(&["kb", "search", "--kb", kb, "-n", "3", "-o", "json", "how do I fix a flat tyre"], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let hits: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(hits.as_array().unwrap().len(), 3);
    assert!(hits[0]["text"].as_str().unwrap().contains("bicycle puncture"), "{hits:#}");

    let removed = listed_ids(&file).into_iter().find(|id| id.ends_with("note-0005.txt")).unwrap();
    let output = nstream(&["kb", "rm", "--kb", kb, &removed], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(!listed_ids(&file).contains(&removed));
    let output = nstream(&["kb", "rm", "--kb", kb, &removed], &[]);
    assert!(text(&output.stderr).contains("no such document"), "{}", text(&output.stderr));

    // Bad searches: clear errors naming the field.
    let output = nstream(&["kb", "search", "--kb", kb, "  "], &[]);
    assert!(text(&output.stderr).contains("query: expected a non-empty query"), "{}", text(&output.stderr));
    let output = nstream(&["kb", "search", "--kb", kb, "-n", "10000", "tides"], &[]);
    assert!(text(&output.stderr).contains("max_num_results: found 10000"), "{}", text(&output.stderr));
    let output = nstream(&["kb", "search", "--kb", kb, "--filter", "{\"type\":\"eq\",\"key\":\"lang\"}", "tides"], &[]);
    assert!(text(&output.stderr).contains("--filter.value"), "{}", text(&output.stderr));
}

#[test]
fn kill_9_during_indexing_then_again_leaves_every_document_exactly_once() {
    if !model_cached() {
        return;
    }
    let folder = tempfile::tempdir().unwrap();
    let file = write_model_file(folder.path(), &folder.path().join("store"));
    let total = 1200;
    let corpus = write_corpus(folder.path(), total);
    let kb = file.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nstream"))
        .args(["kb", "index", "--kb", kb, "--batch-chunks", "8", "--threads", "1", corpus.to_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some batches are committed.
    let started = Instant::now();
    let mut committed = 0;
    while committed == 0 && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(100));
        if folder.path().join("store").join("data.mdb").exists() {
            committed = listed_ids(&file).len();
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = listed_ids(&file).len();
    eprintln!("{after_kill} of {total} documents committed before kill -9");
    assert!(after_kill > 0, "nothing was committed within two minutes");

    let output = nstream(&["kb", "index", "--kb", kb, "-o", "json", corpus.to_str().unwrap()], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["unchanged"].as_u64(), Some(after_kill as u64), "{report}");
    assert_eq!(report["indexed"].as_u64(), Some((total - after_kill) as u64), "{report}");
    let mut ids = listed_ids(&file);
    assert_eq!(ids.len(), total);
    ids.dedup();
    assert_eq!(ids.len(), total, "every document exactly once");
    let output = nstream(&["kb", "ls", "-f", kb, "-o", "json"], &[]);
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary[0]["documents"].as_u64(), Some(total as u64));
    assert_eq!(summary[0]["chunks"].as_u64(), Some(total as u64), "one chunk per note, no orphans: {summary}");
}

#[test]
fn bad_stores_are_clear_errors() {
    let folder = tempfile::tempdir().unwrap();
    let not_a_folder = folder.path().join("file");
    std::fs::write(&not_a_folder, "x").unwrap();
    let file = write_model_file(folder.path(), &not_a_folder);
    let output = nstream(&["kb", "ls", "--kb", file.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("KnowledgeBase/notes") && stderr.contains("is a file"), "{stderr}");

    let postgres = folder.path().join("pg.yaml");
    std::fs::write(
        &postgres,
        "apiVersion: llm.nstream.ai/v1\nkind: KnowledgeBase\nmetadata: {name: pgkb}\nspec:\n  embeddingModel: minilm\n  store:\n    postgres: {connectionSecretRef: {name: pg, key: url}}\n",
    )
    .unwrap();
    let output = nstream(
        &["kb", "ls", "--kb", postgres.to_str().unwrap()],
        &[("NSTREAM_SECRET_PG_URL", "postgres://u:hunter2@127.0.0.1:1/db")],
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains("cannot connect to PostgreSQL at 127.0.0.1:1/db"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let output = nstream(&["kb", "ls", "--kb", postgres.to_str().unwrap()], &[("NSTREAM_SECRET_PG_URL", "")]);
    assert!(text(&output.stderr).contains("secret pg/url"), "{}", text(&output.stderr));
}

//! Generation runs against the local test provider (feature `test-server`): faults, exactly-once
//! accounting, duplicates, retries of failures, schema checks, the budget stop and the rate limit.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nstream_backend::ModelBackend;
use nstream_core::{ModelResource, SecretString};
use nstream_hosted::{HostedBackend, HostedOptions};
use nstream_pipeline::key::hash_json;
use nstream_pipeline::testing::{TestProvider, TestProviderConfig, expected_answer};
use nstream_pipeline::{ModelInfo, OpenMode, Price, ProgressMode, Settings, Stop, generate};
use serde_json::{Value, json};

/// The hosted backend of a MegaModel on the test provider, as `nstream generate` builds it: one
/// call per attempt (no retries of its own), no client-side limits.
fn backend(provider: &TestProvider, timeout: Duration) -> (Arc<dyn ModelBackend>, ModelInfo) {
    let documents = nstream_core::parse_str(&provider.megamodel_yaml("mega"), "test.yaml");
    let resource = documents[0].valid_resource().expect("a valid MegaModel").clone();
    let ModelResource::MegaModel(model) = &resource else { panic!("not a MegaModel") };
    let options = HostedOptions::default().with_max_retries(0).with_timeout(timeout);
    let backend = HostedBackend::new("mega", &model.spec, SecretString::new("sk-test-pipeline-0123456789"), options)
        .expect("backend");
    (backend, ModelInfo::from_resource(&resource))
}

fn write_lines(path: &Path, lines: impl IntoIterator<Item = String>) {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(path, text).expect("write input");
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("read output")
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

fn settings(folder: &Path, input: &str) -> Settings {
    let mut settings = Settings::new(folder.join(input), folder.join("train.jsonl"));
    settings.progress = ProgressMode::Quiet;
    settings.initial_backoff = Duration::from_millis(5);
    settings.max_backoff = Duration::from_millis(50);
    settings.concurrency = 32;
    settings
}

fn question(index: usize) -> String {
    format!("What is fact number {index} about the river {}?", index % 17)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_inputs_through_faults_give_exactly_one_record_each() {
    let provider = TestProvider::start(TestProviderConfig {
        latency: Duration::from_millis(2),
        rate_limited_percent: 8,
        server_error_percent: 8,
        slow_percent: 4,
        malformed_percent: 5,
        always_failing_percent: 1,
        max_faults_per_prompt: 2,
        slow_delay: Duration::from_millis(150),
        retry_after_ms: 10,
        seed: 7,
    })
    .await
    .expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    write_lines(
        &folder.path().join("in.jsonl"),
        (0..2000).map(|index| json!({"id": format!("q-{index}"), "question": question(index)}).to_string()),
    );
    let (model, info) = backend(&provider, Duration::from_secs(5));
    let mut settings = settings(folder.path(), "in.jsonl");
    settings.template = Some(("q.j2".into(), "Q: {{ question }}".into()));
    settings.system = Some("Be brief.".into());
    settings.max_attempts = 4;
    let started = std::time::Instant::now();
    let summary = generate(Arc::clone(&model), info.clone(), settings.clone()).await.expect("run");
    let elapsed = started.elapsed();
    println!("2,000 inputs with faults: {elapsed:?}, {summary:?}, faults {:?}", provider.faults());

    assert_eq!(summary.stop, Stop::Complete);
    assert_eq!((summary.inputs, summary.pending), (2000, 0));
    assert_eq!(summary.answered + summary.failed, 2000, "one record per input");
    let rows = read_jsonl(&summary.files.output);
    let provenance = read_jsonl(&summary.files.provenance);
    let failures = read_jsonl(&summary.files.failures);
    assert_eq!(rows.len(), summary.answered);
    assert_eq!(provenance.len(), rows.len());
    assert_eq!(failures.len(), summary.failed);
    assert!(summary.failed > 0 && summary.failed < 60, "about 1% always fail: {}", summary.failed);

    // No duplicate, and every input is traceable: ids, lines and hashes point back at it.
    let mut seen = HashSet::new();
    for (row, record) in rows.iter().zip(&provenance) {
        let id = record["input"]["id"].as_str().expect("id").to_owned();
        let index: usize = id.trim_start_matches("q-").parse().expect("index");
        assert_eq!(record["input"]["line"], json!(index + 1));
        assert_eq!(record["input"]["hash"], json!(hash_json(&json!({"id": id, "question": question(index)}))));
        let messages = row["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0], json!({"role": "system", "content": "Be brief."}));
        let prompt = format!("Q: {}", question(index));
        assert_eq!(messages[1], json!({"role": "user", "content": prompt}));
        assert_eq!(messages[2], json!({"role": "assistant", "content": expected_answer(&prompt)}));
        assert_eq!(record["model"]["provider"], "OpenAI");
        assert!(record["provider_request_id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")));
        assert!(record["usage"]["total_tokens"].as_u64().is_some_and(|tokens| tokens > 0));
        assert!(record["cost_usd"].as_f64().is_some_and(|cost| cost > 0.0), "gpt-4o-mini has a built-in price");
        assert_eq!(record["finish_reason"], "stop");
        assert!(seen.insert(id), "duplicate row");
    }
    for failure in &failures {
        let id = failure["input"]["id"].as_str().expect("id").to_owned();
        assert_eq!(failure["error"]["kind"], "upstream_error", "{failure}");
        assert_eq!(failure["provenance"]["attempts"], 4);
        assert!(seen.insert(id), "an input both answered and failed, or failed twice");
    }
    assert_eq!(seen.len(), 2000);

    // Upstream: no prompt more often than its attempts allow; failures used them all.
    let counts = provider.counts();
    assert_eq!(counts.len(), 2000);
    assert!(counts.values().all(|count| *count <= 4), "max {:?}", counts.values().max());
    let faults = provider.faults();
    for kind in ["rate_limited", "server_error", "slow", "malformed", "always_failing"] {
        assert!(faults.get(kind).copied().unwrap_or(0) > 0, "no {kind} fault was injected: {faults:?}");
    }
    assert!(summary.rate_limited > 0 && summary.transient_errors > 0);
    assert_eq!(summary.requests, counts.values().map(|count| u64::from(*count)).sum::<u64>());

    // Running again sends nothing and writes the same file.
    let before = std::fs::read(&summary.files.output).expect("output");
    let mut again = settings.clone();
    again.mode = OpenMode::Resume;
    let second = generate(model, info, again).await.expect("rerun");
    assert_eq!(second.requests, 0);
    assert_eq!(second.skipped_done, summary.answered);
    assert_eq!(std::fs::read(&second.files.output).expect("output"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_generated_once_and_failures_can_be_retried() {
    // Every prompt gets 500 three times, then answers.
    let provider = TestProvider::start(TestProviderConfig {
        server_error_percent: 100,
        max_faults_per_prompt: 3,
        ..TestProviderConfig::default()
    })
    .await
    .expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    write_lines(&folder.path().join("in.txt"), ["alpha".into(), "beta".into(), "alpha".into(), "gamma".into()]);
    let (model, info) = backend(&provider, Duration::from_secs(5));
    let mut settings = settings(folder.path(), "in.txt");
    settings.max_attempts = 2;
    let first = generate(Arc::clone(&model), info.clone(), settings.clone()).await.expect("first run");
    assert_eq!((first.inputs, first.unique_items, first.answered, first.failed), (4, 3, 0, 4));
    assert!(provider.counts().values().all(|count| *count == 2), "{:?}", provider.counts());

    // Without --resume the journal is protected.
    let error = generate(Arc::clone(&model), info.clone(), settings.clone()).await.expect_err("journal exists");
    assert!(error.to_string().contains("--resume"), "{error}");
    // A plain resume keeps the recorded failures and sends nothing.
    settings.mode = OpenMode::Resume;
    let resumed = generate(Arc::clone(&model), info.clone(), settings.clone()).await.expect("resume");
    assert_eq!((resumed.requests, resumed.failed), (0, 4));
    // --retry-failed gives each a fresh budget of two: the fourth request answers.
    settings.retry_failed = true;
    let retried = generate(model, info, settings).await.expect("retry failed");
    assert_eq!((retried.answered, retried.failed, retried.requests), (4, 0, 6));
    assert_eq!(provider.counts()["alpha"], 4, "the duplicate line was not sent on its own");
    let provenance = read_jsonl(&retried.files.provenance);
    assert_eq!(provenance[2]["input"]["line"], 3);
    assert_eq!(provenance[2]["input"]["duplicate_of_line"], 1);
    assert_eq!(provenance[0]["key"], provenance[2]["key"]);
    let rows = read_jsonl(&retried.files.output);
    assert_eq!(rows[0], rows[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_failing_the_schema_are_retried_then_recorded() {
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    write_lines(
        &folder.path().join("in.jsonl"),
        [json!({"prompt": "short"}).to_string(), json!({"prompt": "a much longer prompt"}).to_string()],
    );
    let (model, info) = backend(&provider, Duration::from_secs(5));
    let mut settings = settings(folder.path(), "in.jsonl");
    // The provider answers {"answer": ..., "length": len(prompt)}: the long prompt never fits.
    settings.schema = Some(json!({
        "type": "object", "required": ["answer", "length"],
        "properties": {"length": {"type": "integer", "maximum": 10}}
    }));
    settings.invalid_answer_retries = 1;
    let summary = generate(model, info, settings).await.expect("run");
    assert_eq!((summary.answered, summary.failed, summary.invalid_answers), (1, 1, 2));
    let rows = read_jsonl(&summary.files.output);
    let answer: Value = serde_json::from_str(rows[0]["messages"][1]["content"].as_str().expect("text")).expect("JSON");
    assert_eq!(answer["length"], 5);
    let failures = read_jsonl(&summary.files.failures);
    assert_eq!(failures[0]["error"]["kind"], "invalid_answer");
    assert!(failures[0]["error"]["message"].as_str().expect("message").contains("answer/length"), "{}", failures[0]);
    assert_eq!(provider.counts()["a much longer prompt"], 2, "one attempt and one retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_stops_new_items_and_a_resume_finishes() {
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    write_lines(&folder.path().join("in.txt"), (0..40).map(question));
    let (model, info) = backend(&provider, Duration::from_secs(5));
    let mut settings = settings(folder.path(), "in.txt");
    // $1 per thousand tokens either way; each item estimates ~20 prompt + 16 completion tokens.
    settings.prices.insert("gpt-4o-mini", Price { input: 1000.0, output: 1000.0 });
    settings.parameters.max_tokens = Some(16);
    settings.concurrency = 4;
    settings.max_cost = Some(0.5);
    let stopped = generate(Arc::clone(&model), info.clone(), settings.clone()).await.expect("run");
    assert_eq!(stopped.stop, Stop::Budget);
    assert!(stopped.answered > 0 && stopped.pending > 0, "{stopped:?}");
    let spent = stopped.total_cost_usd.expect("priced");
    assert!(spent <= 0.5, "spent {spent}");
    settings.max_cost = Some(100.0);
    settings.mode = OpenMode::Resume;
    let finished = generate(model, info, settings).await.expect("resume");
    assert_eq!((finished.stop, finished.answered, finished.pending), (Stop::Complete, 40, 0));
    assert_eq!(finished.generated_now as usize, 40 - stopped.answered);
    assert!(provider.counts().values().all(|count| *count == 1));
}

/// Rate behaviour: 600 RPM against a provider with a fixed 50 ms latency, for about 30 seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpm_limit_is_sustained_and_never_exceeded() {
    const RPM: u32 = 600;
    const REQUESTS: usize = 300;
    let provider =
        TestProvider::start(TestProviderConfig { latency: Duration::from_millis(50), ..TestProviderConfig::default() })
            .await
            .expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    write_lines(&folder.path().join("in.txt"), (0..REQUESTS).map(question));
    let (model, info) = backend(&provider, Duration::from_secs(5));
    let mut settings = settings(folder.path(), "in.txt");
    settings.requests_per_minute = Some(RPM);
    settings.concurrency = 16;
    let summary = generate(model, info, settings).await.expect("run");
    assert_eq!(summary.answered, REQUESTS);
    let arrivals = provider.arrivals();
    assert_eq!(arrivals.len(), REQUESTS);
    let span = (arrivals[REQUESTS - 1] - arrivals[0]).as_secs_f64();
    let sustained = (REQUESTS - 1) as f64 / span * 60.0;
    // Never above: the most requests the provider saw in any 10-second window (Azure enforces
    // RPM/6 per 10 s), and the rate over the whole run.
    let most_in = |window: Duration| {
        (0..arrivals.len())
            .map(|start| arrivals[start..].iter().take_while(|time| **time - arrivals[start] < window).count())
            .max()
            .unwrap_or(0)
    };
    let per_10s = most_in(Duration::from_secs(10));
    println!(
        "RPM {RPM}: sustained {sustained:.1}/min ({:.1}%), most in 10 s {per_10s}, run {:.1}s",
        sustained / f64::from(RPM) * 100.0,
        summary.elapsed_seconds
    );
    assert!(sustained >= 0.95 * f64::from(RPM), "sustained only {sustained:.1} requests per minute");
    assert!(sustained <= f64::from(RPM) * 1.001, "above the limit: {sustained:.1} per minute");
    assert!(per_10s <= (RPM / 6) as usize, "{per_10s} requests in 10 seconds");
    let counts: HashMap<String, u32> = provider.counts();
    assert!(counts.values().all(|count| *count == 1));
}

/// The TPM limit: the estimate of each request (prompt characters / 4 + 4 per message, plus
/// max_tokens, as the gateway counts Azure quota) summed over any 10-second window stays within
/// TPM / 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tpm_limit_holds_over_every_window() {
    const TPM: u32 = 60_000;
    const MAX_TOKENS: u64 = 100;
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    write_lines(&folder.path().join("in.txt"), (0..120).map(question));
    let (model, info) = backend(&provider, Duration::from_secs(5));
    let mut settings = settings(folder.path(), "in.txt");
    settings.tokens_per_minute = Some(TPM);
    settings.parameters.max_tokens = Some(MAX_TOKENS as u32);
    let summary = generate(model, info, settings).await.expect("run");
    assert_eq!(summary.answered, 120);
    // Each request is estimated at no less than the shortest prompt's estimate, so no 10-second
    // window may hold more than TPM/6 divided by that many requests.
    let least = (0..120).map(|index| (question(index).len() as u64).div_ceil(4) + 4 + MAX_TOKENS).min().unwrap_or(1);
    let arrivals = provider.arrivals();
    let window = Duration::from_secs(10);
    let most = (0..arrivals.len())
        .map(|start| arrivals[start..].iter().take_while(|time| **time - arrivals[start] < window).count())
        .max()
        .unwrap_or(0) as u64;
    println!("TPM {TPM}: at most {most} requests of >= {least} tokens in 10 s, run {:.1}s", summary.elapsed_seconds);
    assert!(most * least <= u64::from(TPM / 6), "{most} requests in 10 s");
    assert!(summary.elapsed_seconds >= 10.0, "120 requests of ~118 tokens need two windows");
}

/// An Azure OpenAI MegaModel through the same provider (it answers any path): the deployment
/// and api-version reach the provenance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_megamodel_generates_with_its_deployment_in_provenance() {
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    let endpoint = provider.url.trim_end_matches("/v1");
    let yaml = format!(
        "apiVersion: llm.nstream.ai/v1\nkind: MegaModel\nmetadata:\n  name: azure-mega\nspec:\n  modelProvider: AzureOpenAI\n  modelTemplate:\n    azureOpenAI:\n      apiVersion: 2024-10-21\n      apikey: azure-test-key-0123456789\n      deployment: gpt-4o-prod\n      endpoint: {endpoint}\n"
    );
    let documents = nstream_core::parse_str(&yaml, "azure.yaml");
    let resource = documents[0].valid_resource().expect("valid").clone();
    let ModelResource::MegaModel(model) = &resource else { panic!("not a MegaModel") };
    let options = HostedOptions::default().with_max_retries(0);
    let backend: Arc<dyn ModelBackend> =
        HostedBackend::new("azure-mega", &model.spec, SecretString::new("azure-test-key-0123456789"), options)
            .expect("backend");
    let folder = tempfile::tempdir().expect("dir");
    write_lines(&folder.path().join("in.txt"), (0..10).map(question));
    let summary =
        generate(backend, ModelInfo::from_resource(&resource), settings(folder.path(), "in.txt")).await.expect("run");
    assert_eq!((summary.answered, summary.failed), (10, 0));
    let provenance = read_jsonl(&summary.files.provenance);
    assert_eq!(provenance[0]["model"]["provider"], "AzureOpenAI");
    assert_eq!(provenance[0]["model"]["deployment"], "gpt-4o-prod");
    assert_eq!(provenance[0]["model"]["api_version"], "2024-10-21");
    assert_eq!(provenance[0]["price_entry"], "gpt-4o", "priced by the deployment's name");
    let journal = std::fs::read_to_string(&summary.files.journal).expect("journal");
    assert!(!journal.contains("azure-test-key"), "the key stays out of the journal");
}

//! The README's first command on a machine that cannot reach the Hugging Face hub, as a user runs
//! it: `nstream up -f examples/quickstart.yaml` on the cache scripts/offline-models.sh made, with
//! HF_HUB_OFFLINE unset. Every other test sets HF_HUB_OFFLINE=1; these do not, which is how the
//! quickstart once died on a fresh machine while every test passed.
//!
//! The hub is made unreachable three ways: HF_ENDPOINT on a closed local port, HF_ENDPOINT on a
//! local port that accepts connections and never answers, and no HF_ENDPOINT at all (the real
//! hub: unreachable on machines without internet, reachable elsewhere; both must serve).

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use nstream_e2e::{Binary, CHAT_MODEL, EMBEDDING_MODEL, Server, binary_path, quickstart_file, run_command};

/// The log line that says, once, that the hub was unreachable and the cache is used.
const CACHE_WARNING: &str = "the Hugging Face hub cannot be reached";

/// `nstream up -f examples/quickstart.yaml --port 0` online (HF_HUB_OFFLINE removed), with
/// HF_ENDPOINT set to `endpoint` or, for `None`, left as the user's shell has it (unset).
fn quickstart_online(endpoint: Option<&str>) -> anyhow::Result<Command> {
    let mut command = Command::new(binary_path(Binary::Cli)?);
    command.arg("up").arg("-f").arg(quickstart_file()).args(["--port", "0"]);
    command.env_remove("HF_HUB_OFFLINE").env_remove("HF_HUB_ETAG_TIMEOUT");
    match endpoint {
        Some(endpoint) => command.env("HF_ENDPOINT", endpoint),
        None => command.env_remove("HF_ENDPOINT"),
    };
    Ok(command)
}

fn closed_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Both quickstart models answer: an embedding of the right length and a chat completion.
async fn both_models_answer(server: &Server) {
    let embedding =
        server.embed(&serde_json::json!({"model": EMBEDDING_MODEL, "input": "offline"})).await.expect("embed");
    assert_eq!(embedding.status(), 200);
    let body: serde_json::Value = embedding.json().await.expect("json");
    assert_eq!(body["data"][0]["embedding"].as_array().map(Vec::len), Some(nstream_e2e::DIMENSION));

    let chat = server
        .client()
        .post(server.url("/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
        }))
        .send()
        .await
        .expect("chat");
    assert_eq!(chat.status(), 200);
    let body: serde_json::Value = chat.json().await.expect("json");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!content.is_empty(), "an answer: {body}");
}

#[tokio::test]
async fn quickstart_serves_with_the_hub_on_a_closed_port() {
    let server = Server::spawn(quickstart_online(Some(&closed_endpoint())).expect("command")).await.expect("serves");
    both_models_answer(&server).await;
    let logs = server.logs();
    assert_eq!(logs.matches(CACHE_WARNING).count(), 1, "one warning that the cache was used:\n{logs}");
}

#[tokio::test]
async fn quickstart_serves_with_a_hub_that_never_answers_in_bounded_time() {
    // Bound and listening, never accepted or answered: connections complete and then hang.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let started = Instant::now();
    let server = Server::spawn(quickstart_online(Some(&endpoint)).expect("command")).await.expect("serves");
    let startup = started.elapsed();
    both_models_answer(&server).await;
    // One 10 s timeout (HF_HUB_ETAG_TIMEOUT's default), then the cache; not one per file.
    assert!(startup < Duration::from_secs(40), "startup took {startup:?}:\n{}", server.logs());
    assert_eq!(server.logs().matches(CACHE_WARNING).count(), 1, "{}", server.logs());
    drop(listener);
}

#[tokio::test]
async fn quickstart_serves_on_the_untouched_user_path() {
    // No HF_ENDPOINT, no HF_HUB_OFFLINE: exactly the README's command. Without internet the real
    // hub is unreachable and the cache serves; with internet the hub lists the files and the
    // cached ones are still used.
    let server = Server::spawn(quickstart_online(None).expect("command")).await.expect("serves");
    both_models_answer(&server).await;
}

#[test]
fn an_uncached_model_with_the_hub_unreachable_fails_with_one_clear_line() {
    let folder = tempfile::tempdir().expect("tempdir");
    let file = folder.path().join("missing.yaml");
    std::fs::write(
        &file,
        "apiVersion: llm.nstream.ai/v1\nkind: BaseModel\nmetadata:\n  name: missing\nspec:\n  baseModelName: missing\n  \
         baseModelServingInfo:\n    hfModelId: nstream-tests/not-in-any-cache-GGUF\n    modelProvider: HUGGINGFACE\n    \
         modelFile: model.Q4_1.gguf\n",
    )
    .expect("write");
    let endpoint = closed_endpoint();
    let mut command = Command::new(binary_path(Binary::Cli).expect("binary"));
    command.arg("up").arg("-f").arg(&file).args(["--port", "0"]);
    command.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", &endpoint);
    let output = run_command(command, Duration::from_secs(60)).expect("runs");

    assert!(!output.status.success(), "it must fail: {output:?}");
    let errors: Vec<&str> = output.stderr.lines().filter(|line| line.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{}", output.stderr);
    let line = errors[0];
    for expected in [
        "BaseModel/missing",
        "nstream-tests/not-in-any-cache-GGUF",
        "the file list",
        &format!("the hub at {endpoint} cannot be reached"),
        "HF_TOKEN",
        "scripts/offline-models.sh",
        "check the network",
    ] {
        assert!(line.contains(expected), "{expected:?} missing from: {line}");
    }
    assert!(!line.contains("\"\""), "no empty file name: {line}");
    // The cause is printed once, not once per link of the error chain.
    assert_eq!(line.matches("cannot be reached").count(), 1, "{line}");
}

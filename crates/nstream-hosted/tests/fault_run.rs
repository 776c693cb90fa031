//! The fault run: 1,000 requests through one backend against a provider that answers 30% of calls
//! with 429 (random, small retry hints of each kind) and 5% with 500. Every request must complete
//! or fail with a clear error after its retry budget, no request may reach the provider more often
//! than its retries allow (and never again after it succeeded), and the provider must never see
//! more requests in a window than the configured rate allows.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use common::{Reply, backend, openai_completion, openai_spec, respond};
use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, Role};
use nstream_backend::{BackendError, ChatCompletionRequest, ModelBackend};
use nstream_hosted::HostedOptions;
use serde_json::{Value, json};

const REQUESTS: usize = 1000;
const MAX_RETRIES: u32 = 8;
/// 24,000 RPM over 1-second windows: 400 requests per second.
const REQUESTS_PER_MINUTE: u32 = 24_000;
const WINDOW: Duration = Duration::from_secs(1);
const PER_WINDOW: usize = 400;

#[derive(Default)]
struct Ledger {
    /// Per request id: the outcomes the provider gave, in order (200, 429 or 500).
    answers: HashMap<String, Vec<u16>>,
    arrivals: Vec<Instant>,
    rng: Option<fastrand::Rng>,
}

async fn flaky_provider(State(ledger): State<Arc<Mutex<Ledger>>>, body: axum::body::Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = request["user"].as_str().unwrap_or("missing").to_owned();
    let reply = {
        let mut ledger = ledger.lock().expect("lock");
        ledger.arrivals.push(Instant::now());
        let rng = ledger.rng.get_or_insert_with(|| fastrand::Rng::with_seed(7));
        let roll = rng.u32(0..100);
        let (status, reply) = if roll < 30 {
            let reply = Reply::json(
                429,
                json!({"error": {"code": "429", "message": "Requests have exceeded the call rate limit"}}),
            );
            let reply = match rng.u32(0..3) {
                0 => reply.header("retry-after-ms", rng.u32(1..20).to_string()),
                1 => reply.header("retry-after", "0"),
                _ => reply
                    .header("x-ratelimit-remaining-requests", "0")
                    .header("x-ratelimit-reset-requests", format!("{}ms", rng.u32(1..20))),
            };
            (429, reply)
        } else if roll < 35 {
            (
                500,
                Reply::json(
                    500,
                    json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error"}}),
                ),
            )
        } else {
            (200, Reply::json(200, openai_completion(&id)))
        };
        ledger.answers.entry(id).or_default().push(status);
        reply
    };
    respond(reply).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_through_429s_and_500s() {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let app = Router::new().fallback(flaky_provider).with_state(Arc::clone(&ledger));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let options = HostedOptions::default()
        .with_timeout(Duration::from_secs(30))
        .with_max_retries(MAX_RETRIES)
        .with_backoff(Duration::from_millis(2), Duration::from_millis(20))
        .with_max_total_wait(Duration::from_secs(20))
        .with_rate_limits(Some(REQUESTS_PER_MINUTE), None)
        .with_rate_limit_window(WINDOW);
    let backend = backend(&openai_spec(&url), options);

    let started = Instant::now();
    let outcomes: Vec<(String, Result<String, BackendError>)> = futures_util::stream::iter(0..REQUESTS)
        .map(|index| {
            let backend = Arc::clone(&backend);
            async move {
                let id = format!("req-{index}");
                let request = ChatCompletionRequest {
                    user: Some(id.clone()),
                    ..ChatCompletionRequest::new("mega", vec![ChatMessage::new(Role::User, "hi")])
                };
                let outcome = backend
                    .chat(request)
                    .await
                    .map(|response| response.choices[0].message.content.clone().unwrap_or_default());
                (id, outcome)
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let elapsed = started.elapsed();

    let ledger = ledger.lock().expect("lock");
    let mut succeeded = 0;
    for (id, outcome) in &outcomes {
        let answers = ledger.answers.get(id).unwrap_or_else(|| panic!("{id} never reached the provider"));
        assert!(answers.len() <= MAX_RETRIES as usize + 1, "{id} was sent {} times", answers.len());
        let (last, before) = answers.split_last().expect("at least one answer");
        assert!(before.iter().all(|status| *status != 200), "{id} was sent again after it succeeded: {answers:?}");
        match outcome {
            Ok(content) => {
                succeeded += 1;
                assert_eq!(*last, 200, "{id}");
                assert_eq!(content, id, "{id} got another request's answer");
            }
            Err(error) => {
                // Only the retry budget may end a request here, and the error says so.
                assert_eq!(answers.len(), MAX_RETRIES as usize + 1, "{id} gave up early: {error}");
                let message = error.to_string();
                assert!(message.contains("after 9 attempts"), "{id}: unclear error {message}");
                assert!(matches!(error, BackendError::Upstream { status: 429 | 500, .. }), "{id}: {error:?}");
            }
        }
    }
    let attempts: usize = ledger.answers.values().map(Vec::len).sum();
    assert_eq!(attempts, ledger.arrivals.len());
    assert!(succeeded >= REQUESTS - 5, "only {succeeded} of {REQUESTS} succeeded");

    // The provider never saw more than the window's quota. Arrivals are stamped by the server, a
    // little after the limiter admitted them, so the window checked is a little shorter.
    let mut arrivals = ledger.arrivals.clone();
    arrivals.sort();
    let checked = WINDOW - Duration::from_millis(150);
    let busiest = (0..arrivals.len())
        .map(|start| arrivals[start..].iter().take_while(|time| time.duration_since(arrivals[start]) < checked).count())
        .max()
        .unwrap_or(0);
    assert!(busiest <= PER_WINDOW, "{busiest} requests within {checked:?}; the limit is {PER_WINDOW} per {WINDOW:?}");
    // And the limiter did throttle: the attempts needed at least this many full windows.
    let minimum = WINDOW * u32::try_from(attempts / PER_WINDOW).expect("small");
    assert!(elapsed >= minimum, "{attempts} attempts in {elapsed:?}");
    // Over the whole run (counting its last, partial window as whole) the rate is within the RPM.
    let per_minute = attempts as f64 / (elapsed + WINDOW).as_secs_f64() * 60.0;
    assert!(per_minute <= f64::from(REQUESTS_PER_MINUTE), "measured {per_minute:.0} requests per minute");
    eprintln!("{REQUESTS} requests, {attempts} attempts, {succeeded} succeeded, busiest window {busiest}, {elapsed:?}");
}

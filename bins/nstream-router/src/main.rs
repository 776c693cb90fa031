//! `nstream-router`: one OpenAI endpoint for every model of a cluster. Watches the models and
//! their EndpointSlices through the in-cluster service account or `KUBECONFIG`, or, with
//! `--static-route`, routes to fixed addresses without a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use nstream_core::cli::{LogFormat, VersionInfo, exit_code, init_logging, parse_arguments, run_on_runtime};
use nstream_router::cluster::{Scaler, UpstreamKeys};
use nstream_router::metrics::Metrics;
use nstream_router::table::{EndpointRegistry, RouteTable};
use nstream_router::{RouterSettings, RouterState, discovery};
use nstream_server::{KeyRing, KeySources};

/// The exit codes, for `--help` (docs/cli.md lists those of every binary).
const EXIT_CODES: &str = "\
Exit codes:
  0  stopped by SIGINT/SIGTERM after the requests in flight finished
  2  error: bad usage or settings (an invalid keys file, --static-route), the address in use,
     or no cluster to connect to";

/// Route OpenAI requests to the cluster's nstream models by `model`.
#[derive(Parser, Debug)]
#[command(name = "nstream-router", about, after_help = EXIT_CODES)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "NSTREAM_ROUTER_ADDRESS", default_value = "0.0.0.0:8080")]
    address: SocketAddr,
    /// The callers' keys (the servers' keys file: names, keys, per-key models and rates). Unset:
    /// every caller is let in (logged as a warning).
    #[arg(long, env = "NSTREAM_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Route only the models of these namespaces (repeatable, or comma-separated), each watched
    /// on its own; every namespace when unset.
    #[arg(long = "watch-namespace", env = "NSTREAM_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// A fixed route MODEL=http://HOST:PORT (repeatable; several for one model are balanced), for
    /// benchmarks and single-host use: no cluster is read, no upstream key is sent, nothing is scaled.
    #[arg(long = "static-route", env = "NSTREAM_STATIC_ROUTES", value_delimiter = ',')]
    static_routes: Vec<String>,
    /// Seconds a request waits for a model with no Ready server (scaled to zero, or starting)
    /// before a 503 with Retry-After.
    #[arg(long, env = "NSTREAM_HOLD_TIMEOUT_SECONDS", default_value_t = 120.0)]
    hold_timeout_seconds: f64,
    /// Requests that may wait per model; more get a 503 at once (0: none waits).
    #[arg(long, env = "NSTREAM_HOLD_QUEUE_SIZE", default_value_t = 100)]
    hold_queue_size: usize,
    /// Retry-After of the 503 answers, in seconds.
    #[arg(long, env = "NSTREAM_RETRY_AFTER_SECONDS", default_value_t = 5)]
    retry_after_seconds: u64,
    /// The largest request body accepted, in bytes (413 beyond); the servers' default.
    #[arg(long, env = "NSTREAM_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Seconds a server's API key is used before its Secret is read again (a refused key is read
    /// again at once).
    #[arg(long, env = "NSTREAM_KEY_REFRESH_SECONDS", default_value_t = 60)]
    key_refresh_seconds: u64,
    /// Seconds between two scale-from-zero attempts of one model.
    #[arg(long, env = "NSTREAM_WAKE_INTERVAL_SECONDS", default_value_t = 5)]
    wake_interval_seconds: u64,
    /// Seconds /ready fails before the listener closes on SIGTERM, so that Services stop sending.
    #[arg(long, env = "NSTREAM_DRAIN_SECONDS", default_value_t = 5.0)]
    drain_seconds: f64,
    /// Log as JSON lines.
    #[arg(long, env = "NSTREAM_LOG_JSON")]
    log_json: bool,
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("{flag} {value} is not a number of seconds >= 0"))
}

fn main() -> std::process::ExitCode {
    let cli: Cli = parse_arguments(&VersionInfo::new(env!("CARGO_PKG_VERSION"), env!("NSTREAM_GIT_COMMIT")));
    exit_code(run_on_runtime(run(cli)))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(if cli.log_json { LogFormat::Json } else { LogFormat::Text }, "info,kube=warn")?;
    let mut settings = RouterSettings::default();
    settings.hold_timeout = seconds("--hold-timeout-seconds", cli.hold_timeout_seconds)?;
    settings.hold_queue_size = cli.hold_queue_size;
    settings.retry_after_seconds = cli.retry_after_seconds.max(1);
    if let Some(bytes) = cli.max_body_bytes {
        settings.max_body_bytes = bytes;
    }
    let drain = seconds("--drain-seconds", cli.drain_seconds)?;
    let keys = match &cli.api_keys_file {
        Some(path) => {
            let mut sources = KeySources::default();
            sources.keys_file = Some(path.clone());
            let ring = KeyRing::load(sources).context("loading --api-keys-file")?;
            tracing::info!(keys = ?ring.key_names(), "callers need one of these keys");
            Some(ring)
        }
        None => {
            tracing::warn!(
                "no --api-keys-file: EVERY CALLER IS LET IN and may use every model; set one before exposing the router"
            );
            None
        }
    };
    let metrics = Arc::new(Metrics::default());
    let state = if cli.static_routes.is_empty() {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        let table_metrics = Arc::clone(&metrics);
        let discovery = discovery::discover(&client, &cli.watch_namespaces, move |table: &RouteTable| {
            let counts: Vec<(String, usize)> =
                table.routes().map(|route| (route.qualified_name(), route.endpoints.len())).collect();
            table_metrics.set_ready_endpoints(&counts);
        });
        RouterState::new(
            settings,
            discovery.table,
            discovery.synced,
            keys,
            Some(UpstreamKeys::new(client.clone(), Duration::from_secs(cli.key_refresh_seconds))),
            Some(Scaler::new(client, Duration::from_secs(cli.wake_interval_seconds.max(1)))),
            metrics,
        )
    } else {
        let table = discovery::static_table(&cli.static_routes, &mut EndpointRegistry::default())?;
        tracing::info!(routes = ?cli.static_routes, "static routes: no cluster is read");
        let (_, table) = tokio::sync::watch::channel(Arc::new(table));
        let (_, synced) = tokio::sync::watch::channel(true);
        RouterState::new(settings, table, synced, keys, None, None, metrics)
    };
    let listener =
        tokio::net::TcpListener::bind(cli.address).await.with_context(|| format!("listening on {}", cli.address))?;
    tracing::info!(address = %listener.local_addr()?, "nstream-router listening");
    nstream_router::serve(listener, state, nstream_server::shutdown_signal(), drain).await?;
    tracing::info!("stopped");
    Ok(())
}

//! The model's worker thread: a bounded queue in, token-budget batches, replies on oneshots.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use nstream_hub::{Hub, ModelSource};
use tokio::sync::{mpsc, oneshot};

use crate::batching::{BatchLimits, plan_batches};
use crate::engine::{EmbedInput, Embedder, EncodedInput, InputEncoder, ModelInfo};
use crate::error::{Error, Result};

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (candle's gemm kernels on a rayon pool).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

/// The dtype of weights and activations. Pooling and outputs are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats (the CPU default).
    F32,
    /// IEEE half precision (the CUDA default).
    F16,
    /// bfloat16.
    BF16,
}

/// How to load and serve an embedding model.
///
/// Start from [`EmbedOptions::default`] (the CPU) or [`EmbedOptions::for_cuda`] and change what
/// you need with the `with_*` methods; options will be added, so the struct is
/// `#[non_exhaustive]`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EmbedOptions {
    /// Where the model runs.
    pub device: DeviceSpec,
    /// The dtype; `None` picks f32 on CPU and f16 on CUDA.
    pub dtype: Option<Precision>,
    /// Most padded tokens (batch size × longest input) in one forward pass.
    pub max_batch_tokens: usize,
    /// Most inputs in one forward pass.
    pub max_batch_requests: usize,
    /// Most requests waiting for the worker; more are refused with [`Error::Overloaded`].
    pub queue_capacity: usize,
    /// Most inputs in one request.
    pub max_inputs_per_request: usize,
    /// CPU threads for the model (a pool of its own); `None` uses rayon's default
    /// (`RAYON_NUM_THREADS`, else the cores available).
    pub threads: Option<usize>,
}

impl EmbedOptions {
    /// Batching for a GPU: large batches keep it busy (text-embeddings-inference's defaults).
    pub fn for_cuda(ordinal: usize) -> Self {
        Self { device: DeviceSpec::Cuda(ordinal), max_batch_tokens: 16_384, max_batch_requests: 128, ..Self::default() }
    }

    /// Runs the model on this device.
    pub fn with_device(mut self, device: DeviceSpec) -> Self {
        self.device = device;
        self
    }

    /// Loads the weights in this precision.
    pub fn with_dtype(mut self, dtype: Precision) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Puts at most this many padded tokens in one forward pass.
    pub fn with_max_batch_tokens(mut self, tokens: usize) -> Self {
        self.max_batch_tokens = tokens;
        self
    }

    /// Puts at most this many inputs in one forward pass.
    pub fn with_max_batch_requests(mut self, requests: usize) -> Self {
        self.max_batch_requests = requests;
        self
    }

    /// Lets at most this many requests wait for the worker.
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// Accepts at most this many inputs in one request.
    pub fn with_max_inputs_per_request(mut self, inputs: usize) -> Self {
        self.max_inputs_per_request = inputs;
        self
    }

    /// Uses this many CPU threads for the model.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }
}

/// CPU-tuned: on a few cores small batches win, because padding costs more than per-batch
/// overhead (docs/benchmarks.md has the measurement behind these defaults).
impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            dtype: None,
            max_batch_tokens: 2048,
            max_batch_requests: 16,
            queue_capacity: 256,
            max_inputs_per_request: 2048,
            threads: None,
        }
    }
}

/// Counters the server can export (read them with [`EmbedMetrics::snapshot`]); all monotonic
/// except `queue_depth`.
#[derive(Debug, Default)]
pub struct EmbedMetrics {
    /// Requests waiting in the queue or being embedded now.
    pub queue_depth: AtomicU64,
    /// Requests accepted.
    pub requests_total: AtomicU64,
    /// Requests refused because the queue was full.
    pub overloaded_total: AtomicU64,
    /// Inputs embedded.
    pub inputs_total: AtomicU64,
    /// Inputs truncated at the maximum length.
    pub truncated_total: AtomicU64,
    /// Forward passes run.
    pub batches_total: AtomicU64,
    /// Real tokens embedded.
    pub tokens_total: AtomicU64,
    /// Tokens computed including padding (batch size × longest input, summed).
    pub padded_tokens_total: AtomicU64,
    /// Time spent in forward passes, in microseconds.
    pub forward_micros_total: AtomicU64,
}

/// A copy of [`EmbedMetrics`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// See [`EmbedMetrics::queue_depth`].
    pub queue_depth: u64,
    /// See [`EmbedMetrics::requests_total`].
    pub requests_total: u64,
    /// See [`EmbedMetrics::overloaded_total`].
    pub overloaded_total: u64,
    /// See [`EmbedMetrics::inputs_total`].
    pub inputs_total: u64,
    /// See [`EmbedMetrics::truncated_total`].
    pub truncated_total: u64,
    /// See [`EmbedMetrics::batches_total`].
    pub batches_total: u64,
    /// See [`EmbedMetrics::tokens_total`].
    pub tokens_total: u64,
    /// See [`EmbedMetrics::padded_tokens_total`].
    pub padded_tokens_total: u64,
    /// See [`EmbedMetrics::forward_micros_total`].
    pub forward_micros_total: u64,
}

impl EmbedMetrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            queue_depth: read(&self.queue_depth),
            requests_total: read(&self.requests_total),
            overloaded_total: read(&self.overloaded_total),
            inputs_total: read(&self.inputs_total),
            truncated_total: read(&self.truncated_total),
            batches_total: read(&self.batches_total),
            tokens_total: read(&self.tokens_total),
            padded_tokens_total: read(&self.padded_tokens_total),
            forward_micros_total: read(&self.forward_micros_total),
        }
    }
}

/// One forward pass, as reported to an observer (e.g. to feed Prometheus histograms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchStats {
    /// Inputs in the batch.
    pub size: usize,
    /// Real tokens.
    pub tokens: usize,
    /// Tokens including padding.
    pub padded_tokens: usize,
    /// Time of the forward pass.
    pub duration: Duration,
}

/// A callback run on the worker thread after each batch; keep it cheap.
pub type BatchObserver = Arc<dyn Fn(&BatchStats) + Send + Sync>;

/// The answer to one request.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbedOutput {
    /// One vector per input, in input order.
    pub embeddings: Vec<Vec<f32>>,
    /// Tokens actually used (after truncation), summed over the inputs.
    pub prompt_tokens: usize,
    /// Per input, whether it was truncated.
    pub truncated: Vec<bool>,
}

struct Job {
    inputs: Vec<EncodedInput>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
    /// The submitting request's span: the worker logs the job's work inside it.
    span: tracing::Span,
}

/// Requests with at most this many bytes of text are tokenized on the calling (async) thread.
const INLINE_TOKENIZE_BYTES: usize = 2048;

/// Bytes of text in `inputs` (token arrays count as none).
fn inputs_text_bytes(inputs: &[EmbedInput]) -> usize {
    inputs
        .iter()
        .map(|input| match input {
            EmbedInput::Text(text) => text.len(),
            EmbedInput::Tokens(_) => 0,
        })
        .sum()
}

/// An embedding model served by its own worker thread.
///
/// Requests are tokenized on the caller's side (small ones on the async thread, larger ones on
/// the blocking pool), queued on a bounded channel and answered over
/// oneshot channels. The worker drains everything queued, sorts it by length, cuts it into
/// batches by token budget ([`plan_batches`]) and runs one forward pass per batch. Dropping the
/// backend stops the worker once the queue is empty.
///
/// Each job carries the caller's tracing span: the worker logs a job's answer or failure inside
/// it, and each batch's span follows from the spans of the requests it serves.
pub struct EmbeddingBackend {
    name: String,
    sender: mpsc::Sender<Job>,
    encoder: InputEncoder,
    metrics: Arc<EmbedMetrics>,
    max_inputs_per_request: usize,
    last_batch_micros: Arc<AtomicU64>,
}

impl std::fmt::Debug for EmbeddingBackend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EmbeddingBackend").field("name", &self.name).field("info", self.info()).finish()
    }
}

impl EmbeddingBackend {
    /// Loads the model (blocking: call it from `spawn_blocking` or before the runtime starts) and
    /// starts its worker thread.
    pub fn load(name: impl Into<String>, source: &ModelSource, options: EmbedOptions) -> Result<Arc<Self>> {
        Self::load_with(name, &Hub::from_env(), source, options, None)
    }

    /// As [`EmbeddingBackend::load`], with an explicit hub and an optional batch observer.
    pub fn load_with(
        name: impl Into<String>,
        hub: &Hub,
        source: &ModelSource,
        options: EmbedOptions,
        observer: Option<BatchObserver>,
    ) -> Result<Arc<Self>> {
        let name = name.into();
        let device = match options.device {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(ordinal) => Device::new_cuda(ordinal)?,
        };
        let dtype = match (options.dtype, options.device) {
            (Some(Precision::F32), _) | (None, DeviceSpec::Cpu) => DType::F32,
            (Some(Precision::F16), _) | (None, DeviceSpec::Cuda(_)) => DType::F16,
            (Some(Precision::BF16), _) => DType::BF16,
        };
        // The model's own pool, also without `threads` (rayon's default size then): the worker
        // thread runs inside it, so a product's work split uses the worker and the pool's other
        // threads, never one more thread than the pool holds. (Called from outside a pool, the
        // split ran on the worker plus every thread of rayon's global pool: on 2 cores, 3 busy
        // or spinning threads, measured 83% against 89% of the cores doing work while indexing.)
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads.map_or(0, |threads| threads.max(1)))
            .thread_name({
                // `embed-<model>-<n>`: the worker runs on the first, so what it logs names the model.
                let name = name.clone();
                move |index| format!("embed-{name}-{index}")
            })
            .build()
            .map_err(|error| Error::Inference(format!("cannot start the thread pool: {error}")))?;
        let embedder = pool.install(|| Embedder::load(hub, source, &device, dtype))?;
        Ok(Self::start(name, embedder, options, Some(pool), observer))
    }

    /// Starts the worker thread for an already loaded [`Embedder`].
    pub fn start(
        name: impl Into<String>,
        embedder: Embedder,
        options: EmbedOptions,
        pool: Option<rayon::ThreadPool>,
        observer: Option<BatchObserver>,
    ) -> Arc<Self> {
        let name = name.into();
        let (sender, receiver) = mpsc::channel(options.queue_capacity.max(1));
        let metrics = Arc::new(EmbedMetrics::default());
        let last_batch_micros = Arc::new(AtomicU64::new(0));
        let encoder = embedder.input_encoder();
        let padding_free = embedder.is_padding_free();
        let worker = Worker {
            embedder,
            receiver,
            limits: BatchLimits::new(options.max_batch_tokens, options.max_batch_requests)
                .with_padding_free(padding_free),
            metrics: Arc::clone(&metrics),
            last_batch_micros: Arc::clone(&last_batch_micros),
            observer,
        };
        let spawned = std::thread::Builder::new().name(format!("embed-{name}")).spawn(move || match pool {
            Some(pool) => pool.install(|| worker.run()),
            None => worker.run(),
        });
        if let Err(error) = spawned {
            // The receiver was moved into the failed closure and dropped: every request will get
            // `WorkerStopped`, which is the truthful answer.
            tracing::error!(%error, model = %name, "cannot start the embedding worker thread");
        }
        Arc::new(Self {
            name,
            sender,
            encoder,
            metrics,
            max_inputs_per_request: options.max_inputs_per_request.max(1),
            last_batch_micros,
        })
    }

    /// The name the model is served under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the model is (dimension, maximum length, pooling).
    pub fn info(&self) -> &ModelInfo {
        self.encoder.info()
    }

    /// Whether the worker thread still takes requests.
    pub fn is_running(&self) -> bool {
        !self.sender.is_closed()
    }

    /// The live counters.
    pub fn metrics(&self) -> &Arc<EmbedMetrics> {
        &self.metrics
    }

    /// Embeds `inputs` in order. With `truncate` false, an input over the maximum length is an
    /// error instead of being cut. Tokenization runs on a blocking thread when a tokio runtime is
    /// present; the forward pass always runs on the model's worker thread. The queue slot is
    /// taken before tokenisation: with the queue full, the request is refused
    /// ([`Error::Overloaded`]) before any work is spent on it.
    pub async fn embed(&self, inputs: Vec<EmbedInput>, truncate: bool) -> Result<EmbedOutput> {
        if inputs.is_empty() {
            return Err(Error::InvalidInput { index: 0, message: "no input was given".into() });
        }
        if inputs.len() > self.max_inputs_per_request {
            return Err(Error::InvalidInput {
                index: self.max_inputs_per_request,
                message: format!("a request holds at most {} inputs", self.max_inputs_per_request),
            });
        }
        let permit = match self.sender.clone().try_reserve_owned() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.overloaded_total.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Overloaded { retry_after: self.retry_after() });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::WorkerStopped),
        };
        let text_bytes = inputs_text_bytes(&inputs);
        let encoder = self.encoder.clone();
        let encode = move || -> Result<Vec<EncodedInput>> {
            inputs.iter().enumerate().map(|(index, input)| encoder.encode(input, truncate, index)).collect()
        };
        // A few sentences tokenize in microseconds, less than the hop to the blocking pool and
        // back; larger requests go there so that they do not hold up the async threads.
        let encoded = match tokio::runtime::Handle::try_current() {
            Ok(handle) if text_bytes > INLINE_TOKENIZE_BYTES => {
                handle.spawn_blocking(encode).await.map_err(|_| Error::WorkerStopped)??
            }
            _ => encode()?,
        };
        let prompt_tokens = encoded.iter().map(|input| input.ids.len()).sum();
        let truncated: Vec<bool> = encoded.iter().map(|input| input.truncated).collect();
        let (reply, answer) = oneshot::channel();
        // Counted before sending so the worker's decrement can never come first.
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        self.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
        permit.send(Job { inputs: encoded, reply, span: tracing::Span::current() });
        let embeddings = answer.await.map_err(|_| Error::WorkerStopped)??;
        Ok(EmbedOutput { embeddings, prompt_tokens, truncated })
    }

    /// Embeds already encoded inputs (see [`Embedder::encode`]) on the worker thread.
    pub async fn embed_encoded(&self, inputs: Vec<EncodedInput>) -> Result<Vec<Vec<f32>>> {
        let (reply, answer) = oneshot::channel();
        match self.sender.try_send(Job { inputs, reply, span: tracing::Span::current() }) {
            Ok(()) => {
                self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
                self.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.overloaded_total.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Overloaded { retry_after: self.retry_after() });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::WorkerStopped),
        }
        answer.await.map_err(|_| Error::WorkerStopped)?
    }

    /// A Retry-After hint: the queue's depth times the last batch's duration, 1 to 30 seconds.
    fn retry_after(&self) -> Duration {
        let depth = self.metrics.queue_depth.load(Ordering::Relaxed);
        let micros = self.last_batch_micros.load(Ordering::Relaxed);
        Duration::from_micros(depth.saturating_mul(micros)).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}

struct Worker {
    embedder: Embedder,
    receiver: mpsc::Receiver<Job>,
    limits: BatchLimits,
    metrics: Arc<EmbedMetrics>,
    last_batch_micros: Arc<AtomicU64>,
    observer: Option<BatchObserver>,
}

impl Worker {
    fn run(mut self) {
        while let Some(first) = self.receiver.blocking_recv() {
            let mut jobs = vec![first];
            while let Ok(job) = self.receiver.try_recv() {
                jobs.push(job);
            }
            self.serve(jobs);
        }
        tracing::debug!("embedding worker stopped: every sender is gone");
    }

    /// Runs every input of `jobs` in token-budget batches and answers each job.
    fn serve(&self, jobs: Vec<Job>) {
        let job_count = jobs.len() as u64;
        // Jobs whose caller has gone (request cancelled) are answered by nobody: skip their work.
        let (live, gone): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|job| !job.reply.is_closed());
        drop(gone);
        let items: Vec<(usize, usize)> = live
            .iter()
            .enumerate()
            .flat_map(|(job, entry)| (0..entry.inputs.len()).map(move |input| (job, input)))
            .collect();
        let lengths: Vec<usize> = items.iter().map(|&(job, input)| live[job].inputs[input].ids.len()).collect();

        let mut results: Vec<Result<Vec<Option<Vec<f32>>>>> =
            live.iter().map(|job| Ok(vec![None; job.inputs.len()])).collect();
        for batch in plan_batches(&lengths, self.limits) {
            let inputs: Vec<&EncodedInput> =
                batch.iter().map(|&item| &live[items[item].0].inputs[items[item].1]).collect();
            // The batch's own span, linked to the span of every request it serves.
            let batch_span = tracing::debug_span!("embed_batch", inputs = inputs.len());
            let mut batch_jobs: Vec<usize> = batch.iter().map(|&item| items[item].0).collect();
            batch_jobs.sort_unstable();
            batch_jobs.dedup();
            for &job in &batch_jobs {
                batch_span.follows_from(&live[job].span);
            }
            match batch_span.in_scope(|| self.run_batch(&inputs)) {
                Ok(vectors) => {
                    for (&item, vector) in batch.iter().zip(vectors) {
                        let (job, input) = items[item];
                        if let Ok(slots) = &mut results[job] {
                            slots[input] = Some(vector);
                        }
                    }
                }
                Err(error) => {
                    for &job in &batch_jobs {
                        live[job].span.in_scope(|| tracing::error!(%error, "embedding batch failed"));
                    }
                    let message = error.to_string();
                    for &item in &batch {
                        results[items[item].0] = Err(Error::Inference(message.clone()));
                    }
                }
            }
        }
        // Before replying, so a caller that got its answer never sees its own job still queued.
        self.metrics.queue_depth.fetch_sub(job_count, Ordering::Relaxed);
        for (job, result) in live.into_iter().zip(results) {
            let answer = result.and_then(|slots| {
                slots
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| Error::Inference("an input was left out of every batch".into()))
            });
            let _entered = job.span.enter();
            if let Ok(vectors) = &answer {
                self.metrics.inputs_total.fetch_add(vectors.len() as u64, Ordering::Relaxed);
                let truncated = job.inputs.iter().filter(|input| input.truncated).count();
                self.metrics.truncated_total.fetch_add(truncated as u64, Ordering::Relaxed);
                tracing::debug!(inputs = vectors.len(), truncated, "embedding job answered");
            }
            // The caller may have gone meanwhile; nothing to do then.
            let _ = job.reply.send(answer);
        }
    }

    fn run_batch(&self, inputs: &[&EncodedInput]) -> Result<Vec<Vec<f32>>> {
        let started = Instant::now();
        // A panic inside candle must not kill the worker and strand every later request.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.embedder.embed_batch(inputs)))
            .unwrap_or_else(|_| Err(Error::Inference("the forward pass panicked".into())));
        let duration = started.elapsed();
        let tokens: usize = inputs.iter().map(|input| input.ids.len()).sum();
        // A padding-free encoder computes no padding rows.
        let padded_tokens = if self.limits.padding_free {
            tokens
        } else {
            inputs.len() * inputs.iter().map(|input| input.ids.len()).max().unwrap_or(0)
        };
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.last_batch_micros.store(micros, Ordering::Relaxed);
        self.metrics.batches_total.fetch_add(1, Ordering::Relaxed);
        self.metrics.tokens_total.fetch_add(tokens as u64, Ordering::Relaxed);
        self.metrics.padded_tokens_total.fetch_add(padded_tokens as u64, Ordering::Relaxed);
        self.metrics.forward_micros_total.fetch_add(micros, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer(&BatchStats { size: inputs.len(), tokens, padded_tokens, duration });
        }
        result
    }
}

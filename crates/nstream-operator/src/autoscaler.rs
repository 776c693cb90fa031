//! The autoscaler: scales each BaseModel and EmbeddingModel with `maxReplicas` on the load its
//! servers report, through the resource's scale subresource (what `kubectl scale` and an HPA
//! write too).
//!
//! Every [`AutoscalerSettings::interval`], for each such resource: list its pods, scrape each
//! Ready pod's `/metrics` (`nstream_server_requests_in_flight`, which counts the requests
//! waiting for the model too), and [`Recommender::decide`]:
//!
//! - `recommended = ceil(load / targetRequestsPerReplica)` within `[minReplicas, maxReplicas]`
//!   (0 when idle with `minReplicas: 0`);
//! - more than the current replicas: scale up at once;
//! - fewer: scale down to the highest recommendation of the last `scaleDownDelaySeconds`, once
//!   the autoscaler has watched that long since the replicas last changed by another hand (the
//!   router scaling a model from zero, `kubectl scale`, an operator restart); HPA's
//!   stabilisation window;
//! - while pods exist but none can be scraped (starting, loading weights), hold.
//!
//! When a HorizontalPodAutoscaler targets the resource, the autoscaler writes nothing and says so
//! in `status.autoscaler`. Only the leader runs it ([`crate::run`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Client, ResourceExt};
use nstream_core::{AutoscalerStatus, Autoscaling, BaseModel, EmbeddingModel};

use crate::controller::Context;
use crate::desired;
use crate::model::{ServedResource, api_key_secret_name};

/// The field manager of the autoscaler's writes (`status.autoscaler`, the scale subresource),
/// apart from the controller's so that neither removes what the other set.
pub const AUTOSCALER_FIELD_MANAGER: &str = "nstream-operator-autoscaler";

/// The gauge the autoscaler sums over a resource's Ready pods.
pub const LOAD_METRIC: &str = "nstream_server_requests_in_flight";

/// How the autoscaler runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoscalerSettings {
    /// Time between two decisions (and two scrapes of every pod).
    pub interval: Duration,
    /// How long one pod's `/metrics` may take to answer.
    pub scrape_timeout: Duration,
}

impl Default for AutoscalerSettings {
    fn default() -> Self {
        Self { interval: Duration::from_secs(5), scrape_timeout: Duration::from_secs(2) }
    }
}

/// What the autoscaler saw of one resource at one tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The replicas the spec asks for now (the scale subresource's `spec.replicas`).
    pub current_replicas: i32,
    /// Requests in flight summed over the pods that answered the scrape; `None` when pods
    /// exist but none answered (starting, loading weights, unreachable).
    pub load: Option<u64>,
    /// The HorizontalPodAutoscaler that targets the resource, if one does.
    pub hpa: Option<String>,
}

/// Why the autoscaler decided what it did (`status.autoscaler.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// More replicas, at once.
    ScaledUp,
    /// Fewer replicas, after the delay.
    ScaledDown,
    /// The replicas fit the load.
    Stable,
    /// The load asks for fewer replicas, but not for long enough yet.
    ScaleDownDelayed,
    /// Pods exist but none could be scraped: holding.
    LoadUnknown,
    /// An HPA owns the scale: the autoscaler writes nothing.
    HorizontalPodAutoscaler,
}

impl Reason {
    /// The reason as status and Events write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaledUp => "ScaledUp",
            Self::ScaledDown => "ScaledDown",
            Self::Stable => "Stable",
            Self::ScaleDownDelayed => "ScaleDownDelayed",
            Self::LoadUnknown => "LoadUnknown",
            Self::HorizontalPodAutoscaler => "HorizontalPodAutoscaler",
        }
    }
}

/// One decision of [`Recommender::decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The replicas wanted now (what the scale should be after this tick).
    pub desired: i32,
    /// What the load alone asks for, within the bounds.
    pub recommended: i32,
    /// `Some(replicas)` when the scale must be written.
    pub scale_to: Option<i32>,
    /// Why.
    pub reason: Reason,
    /// Why, in a sentence.
    pub message: String,
}

/// The memory of one resource's autoscaling: recent recommendations and when the replicas last
/// changed by another hand. Pure: [`Recommender::decide`] is tested with made-up observations.
#[derive(Clone, Debug, Default)]
pub struct Recommender {
    /// Recommendations of the last delay, oldest first.
    window: VecDeque<(Instant, i32)>,
    /// Since when the autoscaler has watched the replicas unchanged by another hand.
    watching_since: Option<Instant>,
    /// The replicas seen at the previous decision.
    last_seen: Option<i32>,
    /// The replicas the autoscaler last wrote.
    last_written: Option<i32>,
}

impl Recommender {
    /// Decides from `observation` under `bounds` at `now` (monotonic), remembering the
    /// recommendation for later decisions.
    pub fn decide(&mut self, bounds: &Autoscaling, observation: &Observation, now: Instant) -> Decision {
        let current = observation.current_replicas;
        if let Some(hpa) = &observation.hpa {
            // The HPA's writes are "another hand": start afresh if it ever goes away.
            *self = Self::default();
            return Decision {
                desired: current,
                recommended: current,
                scale_to: None,
                reason: Reason::HorizontalPodAutoscaler,
                message: format!(
                    "the HorizontalPodAutoscaler {hpa} targets this resource: it owns the scale, the operator writes none"
                ),
            };
        }
        // A change the autoscaler did not make (the router scaling from zero, `kubectl scale`)
        // or a first look: give it a whole delay before scaling down.
        if self.last_seen != Some(current) && self.last_written != Some(current) {
            self.watching_since = Some(now);
            self.window.clear();
        }
        self.last_seen = Some(current);
        let delay = bounds.scale_down_delay;
        let (recommended, load_text) = match observation.load {
            Some(load) => {
                let target = u64::try_from(bounds.target_requests_per_replica.max(1)).unwrap_or(1);
                let wanted = i32::try_from(load.div_ceil(target)).unwrap_or(i32::MAX);
                (
                    wanted.clamp(bounds.min_replicas, bounds.max_replicas),
                    format!("{load} requests in flight at a target of {target} per replica"),
                )
            }
            None if current <= 0 => (bounds.min_replicas, "no pods".to_owned()),
            None => {
                let hold = current.clamp(bounds.min_replicas, bounds.max_replicas);
                if hold == current {
                    self.remember(now, hold, delay);
                    return Decision {
                        desired: current,
                        recommended: hold,
                        scale_to: None,
                        reason: Reason::LoadUnknown,
                        message: "no Ready pod answered its /metrics yet: holding".to_owned(),
                    };
                }
                (hold, "load unknown".to_owned())
            }
        };
        self.remember(now, recommended, delay);
        let bounds_text = format!("[{}, {}]", bounds.min_replicas, bounds.max_replicas);
        if recommended > current {
            return self.scale(
                recommended,
                recommended,
                Reason::ScaledUp,
                format!("{load_text} ask for {recommended} replicas within {bounds_text}: scaled up from {current}"),
            );
        }
        if recommended == current {
            return Decision {
                desired: current,
                recommended,
                scale_to: None,
                reason: Reason::Stable,
                message: format!("{load_text} ask for {recommended} replicas within {bounds_text}"),
            };
        }
        // Fewer: the highest recommendation of the last delay, once watched that long.
        let watched = self.watching_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        let highest = self.window.iter().map(|(_, replicas)| *replicas).max().unwrap_or(recommended);
        let above_max = current > bounds.max_replicas;
        if above_max || (watched >= delay && highest < current) {
            let to = if above_max { highest.min(bounds.max_replicas) } else { highest };
            return self.scale(
                to,
                recommended,
                Reason::ScaledDown,
                format!(
                    "{load_text} asked for at most {to} replicas over the last {}s: scaled down from {current}",
                    delay.as_secs()
                ),
            );
        }
        let wait = delay.saturating_sub(watched);
        let message = if highest >= current {
            format!(
                "{load_text} ask for {recommended} replicas; keeping {current} until no higher demand for {}s (scaleDownDelaySeconds)",
                delay.as_secs()
            )
        } else {
            format!(
                "{load_text} ask for {recommended} replicas; keeping {current} for {}s more (scaleDownDelaySeconds since the last outside change)",
                wait.as_secs()
            )
        };
        Decision { desired: current, recommended, scale_to: None, reason: Reason::ScaleDownDelayed, message }
    }

    fn remember(&mut self, now: Instant, recommended: i32, delay: Duration) {
        self.window.push_back((now, recommended));
        while self.window.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > delay) {
            self.window.pop_front();
        }
    }

    fn scale(&mut self, to: i32, recommended: i32, reason: Reason, message: String) -> Decision {
        self.last_written = Some(to);
        self.last_seen = Some(to);
        Decision { desired: to, recommended, scale_to: Some(to), reason, message }
    }

    /// The write of `decision.scale_to` failed: forget it, so the next look sees the truth.
    pub fn write_failed(&mut self) {
        self.last_written = None;
        self.last_seen = None;
    }
}

/// The sum of [`LOAD_METRIC`] in a Prometheus/OpenMetrics text; `None` when it is absent.
pub fn load_from_metrics(text: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(LOAD_METRIC) else { continue };
        // The bare name or a label set, then the value (not `_total` or another longer name).
        let rest = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once('}').map_or("", |(_, after)| after),
            None => rest,
        };
        let Some(value) = rest.strip_prefix(' ').and_then(|value| value.split_whitespace().next()) else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if value.is_finite() && value >= 0.0 {
            // A gauge of whole requests.
            *total.get_or_insert(0) += value.round() as u64;
        }
    }
    total
}

/// Whether a pod is Ready and has an address.
fn ready_address(pod: &Pod) -> Option<&str> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready =
        status.conditions.as_ref()?.iter().any(|condition| condition.type_ == "Ready" && condition.status == "True");
    ready.then_some(status.pod_ip.as_deref()?).filter(|ip| !ip.is_empty())
}

/// The autoscaler's state over every resource, by `kind/namespace/name`.
pub struct Autoscaler {
    context: Arc<Context>,
    settings: AutoscalerSettings,
    http: reqwest::Client,
    recommenders: HashMap<String, Recommender>,
}

impl Autoscaler {
    /// An autoscaler over `context`'s cluster and settings.
    pub fn new(context: Arc<Context>, settings: AutoscalerSettings) -> Self {
        let http = reqwest::Client::builder()
            .timeout(settings.scrape_timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { context, settings, http, recommenders: HashMap::new() }
    }

    /// Decides for every autoscaled resource every interval until `stop` completes.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tracing::info!(interval = ?self.settings.interval, "autoscaler running");
        let mut ticks = tokio::time::interval(self.settings.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            self.tick::<BaseModel>().await;
            self.tick::<EmbeddingModel>().await;
        }
    }

    /// One decision for every autoscaled resource of kind `K`.
    async fn tick<K: ServedResource>(&mut self) {
        let client = self.context.client.clone();
        let namespaces = self.context.settings.watch_namespaces.clone();
        let apis: Vec<Api<K>> = if namespaces.is_empty() {
            vec![Api::all(client.clone())]
        } else {
            namespaces.iter().map(|namespace| Api::namespaced(client.clone(), namespace)).collect()
        };
        let mut seen = Vec::new();
        for api in apis {
            let objects = match api.list(&ListParams::default()).await {
                Ok(list) => list.items,
                Err(error) => {
                    tracing::warn!(kind = K::KIND.as_str(), error = %error, "autoscaler: listing resources failed");
                    continue;
                }
            };
            for object in objects {
                let served = object.served();
                let Some(bounds) = served.template.autoscaling() else {
                    if object.model_status().is_some_and(|status| status.autoscaler.is_some()) {
                        self.forget_status(&object).await;
                    }
                    continue;
                };
                if object.meta().deletion_timestamp.is_some() || !served.problems.is_empty() {
                    continue;
                }
                let key = format!("{}/{}/{}", K::KIND.as_str(), served.namespace, served.name);
                seen.push(key.clone());
                if let Err(error) = self.decide_for(&object, &bounds, &key).await {
                    tracing::warn!(
                        kind = K::KIND.as_str(),
                        namespace = %served.namespace,
                        name = %served.name,
                        error = %error,
                        "autoscaler: no decision this time"
                    );
                }
            }
        }
        let prefix = format!("{}/", K::KIND.as_str());
        self.recommenders.retain(|key, _| !key.starts_with(&prefix) || seen.contains(key));
    }

    async fn decide_for<K: ServedResource>(
        &mut self,
        object: &K,
        bounds: &Autoscaling,
        key: &str,
    ) -> Result<(), kube::Error> {
        let client = self.context.client.clone();
        let served = object.served();
        let namespace = served.namespace.as_str();
        let current = served.template.replicas.count().unwrap_or(0);
        let hpa = self.owning_hpa::<K>(&client, namespace, &served.name).await?;
        let load = if hpa.is_some() { None } else { self.load(&client, &served).await? };
        let observation = Observation { current_replicas: current, load, hpa };
        let decision =
            self.recommenders.entry(key.to_owned()).or_default().decide(bounds, &observation, Instant::now());
        let api = Api::<K>::namespaced(client.clone(), namespace);
        let previous = object.model_status().and_then(|status| status.autoscaler.clone());
        let mut last_scale_time = previous.as_ref().and_then(|status| status.last_scale_time.clone());
        if let Some(to) = decision.scale_to {
            let params = PatchParams { field_manager: Some(AUTOSCALER_FIELD_MANAGER.into()), ..PatchParams::default() };
            let patch = serde_json::json!({ "spec": { "replicas": to } });
            if let Err(error) = api.patch_scale(&served.name, &params, &Patch::Merge(&patch)).await {
                if let Some(recommender) = self.recommenders.get_mut(key) {
                    recommender.write_failed();
                }
                return Err(error);
            }
            self.context.metrics.wrote(K::KIND.as_str(), "scale");
            tracing::info!(
                namespace,
                name = %served.name,
                from = current,
                to,
                reason = decision.reason.as_str(),
                message = %decision.message,
                "autoscaled"
            );
            last_scale_time = Some(Time(Timestamp::now()));
            let event = Event {
                type_: EventType::Normal,
                reason: decision.reason.as_str().into(),
                note: Some(decision.message.clone()),
                action: "Scale".into(),
                secondary: None,
            };
            if let Err(error) = self.context.recorder.publish(&event, &object.object_ref(&())).await {
                tracing::warn!(error = %error, "publishing an event failed");
            }
        }
        let status = AutoscalerStatus {
            desired_replicas: Some(decision.desired),
            recommended_replicas: Some(decision.recommended),
            current_load: observation.load.map(|load| i64::try_from(load).unwrap_or(i64::MAX)),
            reason: decision.reason.as_str().into(),
            message: decision.message,
            last_scale_time,
        };
        if previous.as_ref() != Some(&status) {
            let patch = serde_json::json!({
                "apiVersion": nstream_core::spec::API_VERSION,
                "kind": K::KIND.as_str(),
                "status": { "autoscaler": status },
            });
            let params = PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force();
            api.patch_status(&served.name, &params, &Patch::Apply(&patch)).await?;
            self.context.metrics.wrote(K::KIND.as_str(), "status");
        }
        Ok(())
    }

    /// Autoscaling was turned off: applying an empty status under the autoscaler's field
    /// manager gives up its fields, so the API server removes `status.autoscaler`.
    async fn forget_status<K: ServedResource>(&self, object: &K) {
        let served = object.served();
        let api = Api::<K>::namespaced(self.context.client.clone(), &served.namespace);
        let patch = serde_json::json!({
            "apiVersion": nstream_core::spec::API_VERSION,
            "kind": K::KIND.as_str(),
            "status": {},
        });
        let params = PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force();
        if let Err(error) = api.patch_status(&served.name, &params, &Patch::Apply(&patch)).await {
            tracing::warn!(name = %served.name, error = %error, "autoscaler: clearing its status failed");
        }
    }

    /// The name of an autoscaling/v2 HPA whose `scaleTargetRef` is this resource.
    async fn owning_hpa<K: ServedResource>(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<Option<String>, kube::Error> {
        let hpas =
            Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), namespace).list(&ListParams::default()).await?;
        let group = nstream_core::spec::API_VERSION.split('/').next().unwrap_or_default();
        Ok(hpas
            .items
            .into_iter()
            .find(|hpa| {
                hpa.spec.as_ref().is_some_and(|spec| {
                    let target = &spec.scale_target_ref;
                    target.kind == K::KIND.as_str()
                        && target.name == name
                        && target.api_version.as_deref().is_none_or(|version| version.split('/').next() == Some(group))
                })
            })
            .map(|hpa| hpa.name_any()))
    }

    /// Requests in flight over the resource's Ready pods: `None` when pods exist but none
    /// answered, `Some(0)` when there are no pods.
    async fn load(&self, client: &Client, served: &crate::model::Served) -> Result<Option<u64>, kube::Error> {
        let pods = Api::<Pod>::namespaced(client.clone(), &served.namespace)
            .list(&ListParams::default().labels(&desired::selector_string(served)))
            .await?;
        let live: Vec<&Pod> = pods.items.iter().filter(|pod| pod.metadata.deletion_timestamp.is_none()).collect();
        if live.is_empty() {
            return Ok(Some(0));
        }
        let key = self.api_key(client, served).await;
        let port = self.context.settings.server_port;
        let scrapes = live.iter().filter_map(|pod| ready_address(pod)).map(|address| {
            let url = if address.contains(':') {
                format!("http://[{address}]:{port}/metrics")
            } else {
                format!("http://{address}:{port}/metrics")
            };
            let mut request = self.http.get(url);
            if let Some(key) = &key {
                request = request.bearer_auth(key);
            }
            async move {
                let response = request.send().await.ok()?.error_for_status().ok()?;
                load_from_metrics(&response.text().await.ok()?)
            }
        });
        let loads: Vec<u64> = futures_util::future::join_all(scrapes).await.into_iter().flatten().collect();
        Ok(if loads.is_empty() { None } else { Some(loads.iter().sum()) })
    }

    /// The resource's API key, for servers run with `--metrics-require-key`.
    async fn api_key(&self, client: &Client, served: &crate::model::Served) -> Option<String> {
        let secrets = Api::<Secret>::namespaced(client.clone(), &served.namespace);
        let secret = secrets.get_opt(&api_key_secret_name(served.kind, &served.name)).await.ok()??;
        let bytes = secret.data?.remove(desired::API_KEY_DATA_KEY)?;
        String::from_utf8(bytes.0).ok().map(|key| key.trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(min: i32, max: i32, target: i32, delay_seconds: u64) -> Autoscaling {
        Autoscaling {
            min_replicas: min,
            max_replicas: max,
            target_requests_per_replica: target,
            scale_down_delay: Duration::from_secs(delay_seconds),
        }
    }

    fn seen(current: i32, load: Option<u64>) -> Observation {
        Observation { current_replicas: current, load, hpa: None }
    }

    #[test]
    fn scales_up_at_once_to_the_load_over_the_target_within_the_bounds() {
        let start = Instant::now();
        let mut recommender = Recommender::default();
        let decision = recommender.decide(&bounds(1, 3, 2, 30), &seen(1, Some(5)), start);
        assert_eq!((decision.scale_to, decision.reason), (Some(3), Reason::ScaledUp), "{decision:?}");
        // 5 / 2 rounds up to 3; 9 / 2 would be 5, clamped to 3.
        let mut recommender = Recommender::default();
        let decision = recommender.decide(&bounds(1, 3, 2, 30), &seen(1, Some(9)), start);
        assert_eq!(decision.scale_to, Some(3));
        assert_eq!(decision.recommended, 3);
        let mut recommender = Recommender::default();
        let decision = recommender.decide(&bounds(1, 4, 2, 30), &seen(1, Some(3)), start);
        assert_eq!(decision.scale_to, Some(2), "{decision:?}");
    }

    #[test]
    fn scales_down_only_after_a_whole_delay_of_lower_demand() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let policy = bounds(1, 3, 1, 5);
        let mut recommender = Recommender::default();
        assert_eq!(recommender.decide(&policy, &seen(1, Some(3)), at(0)).scale_to, Some(3));
        // Load gone: nothing for 5 s.
        for second in 1..=5 {
            let decision = recommender.decide(&policy, &seen(3, Some(0)), at(second));
            assert_eq!(decision.scale_to, None, "second {second}: {decision:?}");
            assert_eq!(decision.reason, Reason::ScaleDownDelayed);
            assert_eq!(decision.desired, 3);
            assert_eq!(decision.recommended, 1);
        }
        let decision = recommender.decide(&policy, &seen(3, Some(0)), at(6));
        assert_eq!((decision.scale_to, decision.reason), (Some(1), Reason::ScaledDown), "{decision:?}");
        assert_eq!(recommender.decide(&policy, &seen(1, Some(0)), at(7)).reason, Reason::Stable);
    }

    #[test]
    fn a_burst_inside_the_window_keeps_the_highest_demand() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let policy = bounds(1, 4, 1, 10);
        let mut recommender = Recommender::default();
        assert_eq!(recommender.decide(&policy, &seen(1, Some(4)), at(0)).scale_to, Some(4));
        recommender.decide(&policy, &seen(4, Some(0)), at(5));
        recommender.decide(&policy, &seen(4, Some(2)), at(8));
        // At 11 the 4 of second 0 left the window; the 2 of second 8 is still in it.
        let decision = recommender.decide(&policy, &seen(4, Some(0)), at(11));
        assert_eq!(decision.scale_to, Some(2), "{decision:?}");
        let decision = recommender.decide(&policy, &seen(2, Some(0)), at(17));
        assert_eq!(decision.scale_to, None, "{decision:?}");
        let decision = recommender.decide(&policy, &seen(2, Some(0)), at(19));
        assert_eq!(decision.scale_to, Some(1), "{decision:?}");
    }

    #[test]
    fn clamps_to_the_bounds_and_never_goes_below_min() {
        let start = Instant::now();
        let policy = bounds(2, 3, 1, 0);
        let mut recommender = Recommender::default();
        // Idle, no delay: min, not zero.
        let decision = recommender.decide(&policy, &seen(3, Some(0)), start);
        assert_eq!(decision.scale_to, Some(2), "{decision:?}");
        // Below min (a user's `kubectl scale`): back up at once.
        let decision = recommender.decide(&policy, &seen(1, Some(0)), start + Duration::from_secs(1));
        assert_eq!((decision.scale_to, decision.reason), (Some(2), Reason::ScaledUp), "{decision:?}");
        // Above max: down to max at once, whatever the delay.
        let mut recommender = Recommender::default();
        let decision = recommender.decide(&bounds(1, 3, 1, 300), &seen(7, Some(10)), start);
        assert_eq!((decision.scale_to, decision.reason), (Some(3), Reason::ScaledDown), "{decision:?}");
    }

    #[test]
    fn scales_to_zero_when_idle_and_waits_after_the_router_scaled_up() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let policy = bounds(0, 2, 4, 5);
        let mut recommender = Recommender::default();
        recommender.decide(&policy, &seen(1, Some(0)), at(0));
        let decision = recommender.decide(&policy, &seen(1, Some(0)), at(6));
        assert_eq!(decision.scale_to, Some(0), "{decision:?}");
        // At zero with no pods: stays there.
        let decision = recommender.decide(&policy, &seen(0, Some(0)), at(7));
        assert_eq!((decision.scale_to, decision.reason), (None, Reason::Stable), "{decision:?}");
        // The router scales to 1 at second 10; its pod loads its weights (not scrapable), then
        // answers with no load left: no scale down before 10 + 5.
        let decision = recommender.decide(&policy, &seen(1, None), at(10));
        assert_eq!((decision.scale_to, decision.reason), (None, Reason::LoadUnknown), "{decision:?}");
        for second in 11..=15 {
            let decision = recommender.decide(&policy, &seen(1, Some(0)), at(second));
            assert_eq!(decision.scale_to, None, "second {second}: {decision:?}");
        }
        assert_eq!(recommender.decide(&policy, &seen(1, Some(0)), at(16)).scale_to, Some(0));
    }

    #[test]
    fn an_outside_change_restarts_the_delay() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let policy = bounds(1, 5, 1, 5);
        let mut recommender = Recommender::default();
        recommender.decide(&policy, &seen(2, Some(2)), at(0));
        // Someone scales to 4 at second 10 while the load asks for 2.
        let decision = recommender.decide(&policy, &seen(4, Some(2)), at(10));
        assert_eq!(decision.scale_to, None, "{decision:?}");
        assert_eq!(recommender.decide(&policy, &seen(4, Some(2)), at(14)).scale_to, None);
        assert_eq!(recommender.decide(&policy, &seen(4, Some(2)), at(15)).scale_to, Some(2));
    }

    #[test]
    fn stands_back_when_an_hpa_owns_the_scale() {
        let mut recommender = Recommender::default();
        let observation = Observation { current_replicas: 1, load: Some(100), hpa: Some("llm".into()) };
        let decision = recommender.decide(&bounds(1, 3, 1, 0), &observation, Instant::now());
        assert_eq!((decision.scale_to, decision.reason), (None, Reason::HorizontalPodAutoscaler), "{decision:?}");
        assert!(decision.message.contains("llm"), "{}", decision.message);
    }

    #[test]
    fn holds_while_no_pod_can_be_scraped() {
        let mut recommender = Recommender::default();
        let decision = recommender.decide(&bounds(1, 3, 1, 0), &seen(2, None), Instant::now());
        assert_eq!((decision.scale_to, decision.reason), (None, Reason::LoadUnknown), "{decision:?}");
    }

    #[test]
    fn reads_the_in_flight_gauge_only() {
        let text = "# TYPE nstream_server_requests_in_flight gauge\n\
                    nstream_server_requests_in_flight 3\n\
                    nstream_server_requests_in_flight_other 50\n\
                    nstream_server_requests_waiting{model=\"m\"} 2\n# EOF\n";
        assert_eq!(load_from_metrics(text), Some(3));
        assert_eq!(load_from_metrics("nstream_server_requests_total 4\n"), None);
        assert_eq!(load_from_metrics("nstream_server_requests_in_flight{a=\"b\"} 2\n"), Some(2));
    }
}

//! The Kubernetes operator of nstream: each MegaModel, BaseModel and EmbeddingModel becomes an
//! `nstream-server` Deployment and Service, behind an API key of its own and a NetworkPolicy,
//! with a status that tells the truth.
//!
//! Desired objects are pure functions ([`desired`]), status is derived from the Deployment's and
//! the pods' real state ([`health`]), and [`controller`] applies them with server-side apply
//! under one field manager. [`run`] adds leader election ([`leader`]) and graceful shutdown.
//! MegaModels also get a live check of their provider ([`provider`]), run in the background with
//! nstream-hosted's client. The leader also runs the [`autoscaler`], which scales BaseModels and
//! EmbeddingModels with `maxReplicas` on their servers' load through the scale subresource.
//! Distillations run as one Job per stage over a claim ([`distillation`]), ending with the adapter
//! on the student BaseModel. KnowledgeBases get server Deployments of their own, with their
//! EmbeddingModel in process and a claim for an embedded store ([`knowledge_base`]).

pub mod autoscaler;
pub mod controller;
pub mod desired;
pub mod distillation;
pub mod error;
pub mod health;
pub mod knowledge_base;
pub mod leader;
pub mod metrics;
pub mod model;
mod namespaces;
pub mod provider;
pub mod settings;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod reconcile_tests;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use nstream_core::{BaseModel, EmbeddingModel, MegaModel};
use tokio::sync::watch;

pub use controller::Context;
pub use error::{Error, Result};
pub use metrics::Metrics;
pub use model::{ModelKind, ServedResource};
pub use settings::{ModelCache, OperatorSettings};

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaderSettings {
    /// The namespace of the Lease (the operator's own).
    pub namespace: String,
    /// The Lease's name.
    pub lease_name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
}

/// How [`run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `stop` fired: the controllers finished their reconciles and the Lease was released.
    Stopped,
    /// Another replica took the Lease, or it could not be renewed: the process should exit
    /// (non-zero) so that it restarts as a standby.
    LostLeadership,
}

fn stopped(mut stop: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    let (done, waiter) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
        let _ = done.send(());
    });
    async move {
        let _ = waiter.await;
    }
}

/// The autoscaler, unless its interval is zero (then it waits for `stop` alone).
async fn autoscale(context: Arc<Context>, stop: impl Future<Output = ()>) {
    let interval = context.settings.autoscale_interval;
    if interval.is_zero() {
        stop.await;
        return;
    }
    let settings = autoscaler::AutoscalerSettings { interval, ..autoscaler::AutoscalerSettings::default() };
    autoscaler::Autoscaler::new(context, settings).run(stop).await;
}

/// Runs the controllers until `stop` becomes `true` (graceful shutdown) or leadership is
/// lost. With `leader` set, waits for the Lease first and releases it at the end.
pub async fn run(
    client: Client,
    settings: OperatorSettings,
    metrics: Arc<Metrics>,
    leader: Option<LeaderSettings>,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let election = leader.as_ref().map(|leader| {
        leader::LeaderElection::new(
            Api::<Lease>::namespaced(client.clone(), &leader.namespace),
            leader.lease_name.clone(),
            leader.identity.clone(),
            leader.lease_duration,
        )
    });
    // A standby is ready: it serves health and waits.
    metrics.set_ready(true);
    if let Some(election) = &election {
        tracing::info!(identity = election.identity(), "waiting for the leader Lease");
        if !election.acquire(Duration::from_secs(2), &mut stop).await {
            return Outcome::Stopped;
        }
        tracing::info!(identity = election.identity(), "leading");
    }
    metrics.leader.set(1);

    // Controllers stop on `stop` or on lost leadership.
    let (halt_sender, halt) = watch::channel(false);
    let keeper = election.clone().map(|election| {
        let mut stop = stop.clone();
        let halt_sender = halt_sender.clone();
        tokio::spawn(async move {
            let kept = election.keep(&mut stop).await;
            let _ = halt_sender.send(true);
            kept
        })
    });
    let forward = {
        let mut stop = stop.clone();
        let halt_sender = halt_sender.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
            let _ = halt_sender.send(true);
        })
    };

    let instance = leader.as_ref().map(|leader| leader.identity.clone());
    let context = Arc::new(Context::new(client, settings, metrics.clone(), instance));
    tokio::join!(
        controller::run::<MegaModel>(context.clone(), stopped(halt.clone())),
        controller::run::<BaseModel>(context.clone(), stopped(halt.clone())),
        controller::run::<EmbeddingModel>(context.clone(), stopped(halt.clone())),
        distillation::run(context.clone(), stopped(halt.clone())),
        knowledge_base::run(context.clone(), stopped(halt.clone())),
        autoscale(context.clone(), stopped(halt.clone())),
    );
    forward.abort();
    metrics.leader.set(0);
    let kept = match keeper {
        Some(keeper) => keeper.await.unwrap_or(false),
        None => true,
    };
    if !kept {
        return Outcome::LostLeadership;
    }
    if let Some(election) = &election {
        if let Err(error) = election.release().await {
            tracing::warn!(error = %error, "releasing the Lease failed; a standby takes over when it expires");
        } else {
            tracing::info!("released the leader Lease");
        }
    }
    Outcome::Stopped
}

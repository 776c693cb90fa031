//! Picking one model out of a YAML file for the commands that talk to a single model.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use nstream_core::{MegaModelLimits, ModelResource};

/// The one resource of `file` that `accept` takes, narrowed by `name` when the file holds several.
pub fn pick(
    file: &str,
    name: Option<&str>,
    what: &str,
    accept: impl Fn(&ModelResource) -> bool,
) -> anyhow::Result<ModelResource> {
    let documents = nstream_core::load_path(Path::new(file))?;
    if let Some(bad) = documents.iter().find(|document| !document.diagnostics.is_empty()) {
        bail!("{file} is invalid: {} (run `nstream validate -f {file}`)", bad.diagnostics[0]);
    }
    let candidates: Vec<&ModelResource> = documents
        .iter()
        .filter_map(|document| document.valid_resource())
        .filter(|resource| accept(resource))
        .filter(|resource| name.is_none_or(|name| resource.name() == Some(name)))
        .collect();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("{file} holds no {what}{}", name.map(|name| format!(" named {name}")).unwrap_or_default()),
        many => bail!(
            "{file} holds several ({}); pick one with --name",
            many.iter().filter_map(|resource| resource.name()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A MegaModel's own limits, taken over by the pipeline (`generate`, `eval`).
#[derive(Debug, Default, Clone, Copy)]
pub struct PipelineLimits {
    /// The MegaModel's requests per minute.
    pub requests_per_minute: Option<u32>,
    /// The MegaModel's tokens per minute.
    pub tokens_per_minute: Option<u32>,
    /// Its retries plus the first attempt.
    pub max_attempts: Option<u32>,
}

/// The pipeline owns retries and limits, so it sees (and journals) every request: a MegaModel's
/// hosted client is set to make exactly one call per attempt, with no pacing of its own, and the
/// limits it had are returned for the pipeline to apply. Other kinds are left alone.
pub fn hand_limits_to_pipeline(resource: &mut ModelResource, timeout: Duration) -> PipelineLimits {
    let ModelResource::MegaModel(model) = resource else { return PipelineLimits::default() };
    let limits = model.spec.limits.get_or_insert_with(MegaModelLimits::default);
    let taken = PipelineLimits {
        requests_per_minute: limits.requests_per_minute,
        tokens_per_minute: limits.tokens_per_minute,
        max_attempts: limits.max_retries.map(|retries| retries.saturating_add(1)),
    };
    limits.requests_per_minute = None;
    limits.tokens_per_minute = None;
    limits.max_retries = Some(0);
    limits.timeout_seconds = Some(u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX));
    taken
}

//! Picking one model out of a YAML file for the commands that talk to a single model.

use std::path::Path;

use anyhow::bail;
use nstream_core::ModelResource;

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

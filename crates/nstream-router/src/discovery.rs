//! Where the routing table comes from: the cluster (reflectors on the three model kinds and on
//! the EndpointSlices of their Services) or static routes given on the command line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use nstream_core::{BaseModel, EmbeddingModel, HubModelSpec, MegaModel};
use nstream_operator::ModelKind;
use nstream_operator::model::{api_key_secret_name, object_name};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use crate::RouterError;
use crate::table::{EndpointRegistry, ModelRoute, ResourceRef, RouteTable, SecretLocation};

/// The label the EndpointSlice controller puts on each slice: the Service's name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A model resource as the table needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelObject {
    /// Which kind.
    pub kind: ModelKind,
    /// Its namespace.
    pub namespace: String,
    /// Its `metadata.name`: the name its server answers to.
    pub name: String,
    /// The names of its adapters (a BaseModel's `baseModelServingInfo.adapters[].name`), served by
    /// the same pods.
    pub adapters: Vec<String>,
    /// The scale's replicas (`None` for a MegaModel, which has no scale subresource).
    pub replicas: Option<i32>,
}

impl ModelObject {
    fn hub(kind: ModelKind, metadata: &kube::api::ObjectMeta, spec: &impl HubModelSpec) -> Self {
        Self {
            kind,
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone().unwrap_or_default(),
            adapters: spec.serving_info().adapters.iter().flatten().map(|adapter| adapter.name.clone()).collect(),
            replicas: spec.serving_template().replicas.count(),
        }
    }

    /// The view of a BaseModel.
    pub fn of_base_model(model: &BaseModel) -> Self {
        Self::hub(ModelKind::BaseModel, &model.metadata, &model.spec)
    }

    /// The view of an EmbeddingModel.
    pub fn of_embedding_model(model: &EmbeddingModel) -> Self {
        Self::hub(ModelKind::EmbeddingModel, &model.metadata, &model.spec)
    }

    /// The view of a MegaModel (one gateway pod, not scaled by the router).
    pub fn of_mega_model(model: &MegaModel) -> Self {
        Self {
            kind: ModelKind::MegaModel,
            namespace: model.metadata.namespace.clone().unwrap_or_default(),
            name: model.metadata.name.clone().unwrap_or_default(),
            adapters: Vec::new(),
            replicas: None,
        }
    }
}

/// The Ready addresses (`ip:port`) of each Service, by `(namespace, service)`, from EndpointSlices.
/// An endpoint counts when its `ready` condition is true or unset (the API's "unknown means
/// ready") and it is not terminating; the port is the slice's first.
pub fn ready_addresses<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> HashMap<(String, String), Vec<String>> {
    let mut addresses: HashMap<(String, String), Vec<String>> = HashMap::new();
    for slice in slices {
        let Some(service) = slice.metadata.labels.as_ref().and_then(|labels| labels.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let Some(port) = slice.ports.iter().flatten().find_map(|port| port.port) else { continue };
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let entry = addresses.entry((namespace, service.clone())).or_default();
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|conditions| conditions.ready).unwrap_or(true);
            let terminating = conditions.and_then(|conditions| conditions.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for address in &endpoint.addresses {
                let authority =
                    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") };
                if !entry.contains(&authority) {
                    entry.push(authority);
                }
            }
        }
    }
    for list in addresses.values_mut() {
        list.sort();
    }
    addresses
}

/// The table for `models` and their Services' Ready addresses. Each model's Service is
/// `<prefix>-<name>` (the operator's [`object_name`]); its upstream key is in
/// `<prefix>-<name>-api-key`. A BaseModel's adapters route to the BaseModel's pods.
pub fn build_table(
    models: &[ModelObject],
    addresses: &HashMap<(String, String), Vec<String>>,
    registry: &mut EndpointRegistry,
) -> RouteTable {
    let mut routes = Vec::new();
    for model in models {
        let service = object_name(model.kind, &model.name);
        let ready = addresses.get(&(model.namespace.clone(), service)).map(Vec::as_slice).unwrap_or_default();
        let resource = ResourceRef { kind: model.kind, namespace: model.namespace.clone(), name: model.name.clone() };
        let key =
            SecretLocation { namespace: model.namespace.clone(), name: api_key_secret_name(model.kind, &model.name) };
        let names = std::iter::once((model.name.clone(), None))
            .chain(model.adapters.iter().map(|adapter| (adapter.clone(), Some(model.name.clone()))));
        for (served_name, parent) in names {
            routes.push(ModelRoute {
                namespace: model.namespace.clone(),
                served_name,
                parent,
                resource: Some(resource.clone()),
                replicas: model.replicas,
                endpoints: ready.iter().map(|authority| registry.get(authority)).collect(),
                upstream_key: Some(key.clone()),
            });
        }
    }
    let table = RouteTable::new(routes);
    registry.retain_used(&table);
    table
}

/// A table of static routes, `MODEL=URL` (`http://host:port`, repeatable for several endpoints
/// of one model), for benchmarks and single-host use: no cluster, no upstream key, no scaling.
pub fn static_table(routes: &[String], registry: &mut EndpointRegistry) -> Result<RouteTable, RouterError> {
    let mut by_model: Vec<(String, Vec<String>)> = Vec::new();
    for text in routes {
        let invalid =
            |problem: &str| RouterError::InvalidStaticRoute { route: text.clone(), problem: problem.to_owned() };
        let (model, url) = text.split_once('=').ok_or_else(|| invalid("expected MODEL=http://HOST:PORT"))?;
        let model = model.trim();
        if model.is_empty() {
            return Err(invalid("the model name is empty"));
        }
        let authority = url
            .trim()
            .strip_prefix("http://")
            .ok_or_else(|| invalid("the URL must start with http:// (the router speaks plain HTTP to servers)"))?
            .trim_end_matches('/');
        let authority = authority.strip_suffix("/v1").unwrap_or(authority);
        if authority.is_empty() || authority.contains('/') || authority.parse::<axum::http::uri::Authority>().is_err() {
            return Err(invalid("expected http://HOST:PORT (optionally ending in /v1)"));
        }
        match by_model.iter_mut().find(|(known, _)| known == model) {
            Some((_, endpoints)) => endpoints.push(authority.to_owned()),
            None => by_model.push((model.to_owned(), vec![authority.to_owned()])),
        }
    }
    Ok(RouteTable::new(by_model.into_iter().map(|(model, authorities)| ModelRoute {
        namespace: String::new(),
        served_name: model,
        parent: None,
        resource: None,
        replicas: None,
        endpoints: authorities.iter().map(|authority| registry.get(authority)).collect(),
        upstream_key: None,
    })))
}

/// The cluster's routing table, kept current by background tasks.
pub struct Discovery {
    /// The table, replaced at each change.
    pub table: watch::Receiver<Arc<RouteTable>>,
    /// True once every watch has listed its objects.
    pub synced: watch::Receiver<bool>,
}

struct Stores {
    mega: Vec<Store<MegaModel>>,
    base: Vec<Store<BaseModel>>,
    embedding: Vec<Store<EmbeddingModel>>,
    slices: Vec<Store<EndpointSlice>>,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Starts one reflector for `K` in `namespace` (every namespace when `None`); each event wakes
/// `changed`.
fn reflect<K>(client: &Client, namespace: Option<&str>, config: watcher::Config, changed: Arc<Notify>) -> Store<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api::<K>(client, namespace), config).default_backoff());
    let kind = K::kind(&()).to_string();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                tracing::warn!(kind, %error, "watch failed; retrying");
            }
            changed.notify_one();
        }
    });
    store
}

/// Watches the three model kinds and the EndpointSlices of `namespaces` (every namespace when
/// empty) and publishes a new table at each change. `on_table` sees each new table (metrics).
pub fn discover(
    client: &Client,
    namespaces: &[String],
    on_table: impl Fn(&RouteTable) + Send + Sync + 'static,
) -> Discovery {
    let changed = Arc::new(Notify::new());
    let scopes: Vec<Option<&str>> =
        if namespaces.is_empty() { vec![None] } else { namespaces.iter().map(|name| Some(name.as_str())).collect() };
    let slices_config = watcher::Config::default().labels(SERVICE_NAME_LABEL);
    let stores = Stores {
        mega: scopes.iter().map(|scope| reflect(client, *scope, watcher::Config::default(), changed.clone())).collect(),
        base: scopes.iter().map(|scope| reflect(client, *scope, watcher::Config::default(), changed.clone())).collect(),
        embedding: scopes
            .iter()
            .map(|scope| reflect(client, *scope, watcher::Config::default(), changed.clone()))
            .collect(),
        slices: scopes.iter().map(|scope| reflect(client, *scope, slices_config.clone(), changed.clone())).collect(),
    };
    let (table_sender, table) = watch::channel(Arc::new(RouteTable::default()));
    let (synced_sender, synced) = watch::channel(false);
    tokio::spawn(async move {
        let waits = stores
            .mega
            .iter()
            .map(|store| Box::pin(store.wait_until_ready()) as std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>>)
            .chain(stores.base.iter().map(|store| Box::pin(store.wait_until_ready()) as _))
            .chain(stores.embedding.iter().map(|store| Box::pin(store.wait_until_ready()) as _))
            .chain(stores.slices.iter().map(|store| Box::pin(store.wait_until_ready()) as _));
        if futures_util::future::join_all(waits).await.iter().any(Result::is_err) {
            tracing::error!("a watch stopped before listing its objects");
            return;
        }
        let registry = Mutex::new(EndpointRegistry::default());
        loop {
            let table = {
                let models: Vec<ModelObject> = stores
                    .mega
                    .iter()
                    .flat_map(Store::state)
                    .map(|model| ModelObject::of_mega_model(&model))
                    .chain(stores.base.iter().flat_map(Store::state).map(|model| ModelObject::of_base_model(&model)))
                    .chain(
                        stores
                            .embedding
                            .iter()
                            .flat_map(Store::state)
                            .map(|model| ModelObject::of_embedding_model(&model)),
                    )
                    .collect();
                let slices: Vec<Arc<EndpointSlice>> = stores.slices.iter().flat_map(Store::state).collect();
                let addresses = ready_addresses(slices.iter().map(Arc::as_ref));
                build_table(&models, &addresses, &mut registry.lock().unwrap_or_else(PoisonError::into_inner))
            };
            on_table(&table);
            table_sender.send_replace(Arc::new(table));
            if !*synced_sender.borrow() {
                tracing::info!("caches synced: routing");
                synced_sender.send_replace(true);
            }
            changed.notified().await;
            if table_sender.is_closed() {
                return;
            }
        }
    });
    Discovery { table, synced }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    use super::*;

    fn slice(namespace: &str, service: &str, endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: endpoints
                .iter()
                .map(|(address, ready)| SliceEndpoint {
                    addresses: vec![(*address).to_owned()],
                    conditions: Some(EndpointConditions { ready: *ready, ..EndpointConditions::default() }),
                    ..SliceEndpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort { port: Some(8080), name: Some("http".into()), ..EndpointPort::default() }]),
        }
    }

    #[test]
    fn models_route_to_their_services_ready_pods_and_adapters_to_their_base() {
        let slices = [
            slice("a", "em-minilm", &[("127.0.0.2", Some(true)), ("127.0.0.3", Some(false))]),
            slice("a", "bm-smollm", &[("127.0.0.4", None)]),
            slice("b", "em-minilm", &[("127.0.0.5", Some(true))]),
        ];
        let models = [
            ModelObject {
                kind: ModelKind::EmbeddingModel,
                namespace: "a".into(),
                name: "minilm".into(),
                adapters: vec![],
                replicas: Some(2),
            },
            ModelObject {
                kind: ModelKind::BaseModel,
                namespace: "a".into(),
                name: "smollm".into(),
                adapters: vec!["smollm-support".into()],
                replicas: Some(1),
            },
            ModelObject {
                kind: ModelKind::BaseModel,
                namespace: "a".into(),
                name: "asleep".into(),
                adapters: vec![],
                replicas: Some(0),
            },
        ];
        let mut registry = EndpointRegistry::default();
        let table = build_table(&models, &ready_addresses(&slices), &mut registry);
        let all = |_: &ModelRoute| true;
        let minilm = table.resolve("minilm", all).expect("minilm");
        let authorities: Vec<&str> = minilm.endpoints.iter().map(|endpoint| endpoint.authority()).collect();
        assert_eq!(authorities, ["127.0.0.2:8080"], "only the ready pod of its own namespace");
        assert_eq!(minilm.upstream_key.as_ref().expect("key").name, "em-minilm-api-key");
        let adapter = table.resolve("smollm-support", all).expect("the adapter");
        assert_eq!(adapter.endpoints[0].authority(), "127.0.0.4:8080", "unset ready counts as ready");
        assert_eq!(adapter.parent.as_deref(), Some("smollm"));
        assert_eq!(adapter.upstream_key.as_ref().expect("key").name, "bm-smollm-api-key");
        assert!(table.resolve("asleep", all).expect("listed").wants_wake());
    }

    #[test]
    fn static_routes_are_checked() {
        let mut registry = EndpointRegistry::default();
        let table =
            static_table(&["m=http://127.0.0.1:9000".into(), "m=http://127.0.0.1:9001/v1".into()], &mut registry)
                .expect("valid");
        assert_eq!(table.resolve("m", |_: &ModelRoute| true).expect("m").endpoints.len(), 2);
        for bad in ["m", "=http://x:1", "m=https://x:1", "m=http://x:1/other", "m=http://"] {
            let error = static_table(&[bad.into()], &mut registry).expect_err(bad).to_string();
            assert!(error.contains("--static-route"), "{error}");
        }
    }
}

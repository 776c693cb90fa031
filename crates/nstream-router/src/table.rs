//! The routing table: which models exist, under which names, and which endpoints serve them.
//! Rebuilt as a whole from the watched objects at each change and published through a
//! `tokio::sync::watch`, so a request reads one consistent snapshot.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nstream_operator::ModelKind;

/// One server address (`ip:port`) and the requests the router has in flight to it.
///
/// The same `Arc` is kept across table rebuilds (see [`EndpointRegistry`]), so the in-flight
/// count survives an EndpointSlice update.
#[derive(Debug)]
pub struct Endpoint {
    authority: String,
    in_flight: AtomicUsize,
}

impl Endpoint {
    /// An endpoint at `authority` (`host:port`) with nothing in flight.
    pub fn new(authority: impl Into<String>) -> Self {
        Self { authority: authority.into(), in_flight: AtomicUsize::new(0) }
    }

    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Requests in flight to this endpoint now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request until the guard is dropped (when the answer's body ends).
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { endpoint: Arc::clone(self) }
    }
}

/// A request in flight to an [`Endpoint`]; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
}

impl InFlight {
    /// The endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps one [`Endpoint`] per address across rebuilds, and forgets addresses no longer used.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    known: HashMap<String, Arc<Endpoint>>,
}

impl EndpointRegistry {
    /// The endpoint of `authority`, the same one as in the previous table when it was there.
    pub fn get(&mut self, authority: &str) -> Arc<Endpoint> {
        Arc::clone(self.known.entry(authority.to_owned()).or_insert_with(|| Arc::new(Endpoint::new(authority))))
    }

    /// Drops the addresses that `table` does not use (requests in flight keep their own `Arc`).
    pub fn retain_used(&mut self, table: &RouteTable) {
        let used: std::collections::HashSet<&str> =
            table.routes().flat_map(|route| route.endpoints.iter().map(|endpoint| endpoint.authority())).collect();
        self.known.retain(|authority, _| used.contains(authority.as_str()));
    }
}

/// Where the upstream key of a route is: the Secret `<object>-api-key` in the model's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretLocation {
    /// The namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
}

/// The resource a route belongs to, for scaling it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceRef {
    /// Which kind.
    pub kind: ModelKind,
    /// Its namespace.
    pub namespace: String,
    /// Its `metadata.name`.
    pub name: String,
}

/// One model the router can route to.
#[derive(Debug)]
pub struct ModelRoute {
    /// The namespace of the resource; empty for a static route.
    pub namespace: String,
    /// The name the server answers to: the resource's `metadata.name`, or an adapter's `name`.
    pub served_name: String,
    /// For an adapter, the BaseModel's served name (`parent` in `/v1/models`).
    pub parent: Option<String>,
    /// The resource serving it; `None` for a static route (never scaled).
    pub resource: Option<ResourceRef>,
    /// The resource's `spec.<prefix>ServingTemplate.replicas` (what the scale subresource reads);
    /// `None` when the kind has no scale subresource or for a static route.
    pub replicas: Option<i32>,
    /// The Ready endpoints.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Where the key the server requires is; `None`: send none.
    pub upstream_key: Option<SecretLocation>,
}

impl ModelRoute {
    /// `namespace/served_name`, or the served name alone for a static route: always accepted as
    /// `model`, and the label of the router's metrics.
    pub fn qualified_name(&self) -> String {
        if self.namespace.is_empty() {
            self.served_name.clone()
        } else {
            format!("{}/{}", self.namespace, self.served_name)
        }
    }

    /// Whether a request can be forwarded now.
    pub fn is_ready(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Whether the router should scale the resource from zero to one: it has no Ready endpoint and
    /// its scale reads 0. Never when the scale is above 0 (the autoscaler or a person owns it).
    pub fn wants_wake(&self) -> bool {
        self.endpoints.is_empty() && self.replicas == Some(0) && self.resource.is_some()
    }
}

/// Why a `model` does not resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// No such model (or none the key may use): 404 `model_not_found`.
    NotFound,
    /// The bare name is served in several namespaces the key may use: the qualified names.
    Ambiguous(Vec<String>),
}

impl fmt::Display for Unresolved {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => formatter.write_str("no such model"),
            Self::Ambiguous(names) => write!(formatter, "ambiguous: name one of {}", names.join(", ")),
        }
    }
}

/// Every model, by qualified name, with an index of bare names.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: BTreeMap<String, Arc<ModelRoute>>,
    by_bare_name: HashMap<String, Vec<String>>,
}

impl RouteTable {
    /// A table of `routes`; a later route with the same qualified name replaces an earlier one.
    pub fn new(routes: impl IntoIterator<Item = ModelRoute>) -> Self {
        let mut table = Self::default();
        for route in routes {
            table.routes.insert(route.qualified_name(), Arc::new(route));
        }
        for (qualified, route) in &table.routes {
            table.by_bare_name.entry(route.served_name.clone()).or_default().push(qualified.clone());
        }
        table
    }

    /// Every route, by qualified name.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<ModelRoute>> {
        self.routes.values()
    }

    /// The route of a qualified name, as [`ModelRoute::qualified_name`] writes it.
    pub fn get(&self, qualified: &str) -> Option<Arc<ModelRoute>> {
        self.routes.get(qualified).cloned()
    }

    /// The route a request's `model` names, among those `allowed` accepts (a key's models; see
    /// [`RouteTable::names_of`]).
    ///
    /// `namespace/name` is always accepted; a bare name when exactly one allowed route answers
    /// to it. A bare name served in several namespaces is ambiguous unless the caller may use only
    /// one of them.
    pub fn resolve(&self, model: &str, allowed: impl Fn(&ModelRoute) -> bool) -> Result<Arc<ModelRoute>, Unresolved> {
        if let Some(candidates) = self.by_bare_name.get(model) {
            let usable: Vec<&Arc<ModelRoute>> = candidates
                .iter()
                .filter_map(|qualified| self.routes.get(qualified))
                .filter(|route| allowed(route))
                .collect();
            match usable.as_slice() {
                [route] => return Ok(Arc::clone(route)),
                [] => {}
                several => {
                    return Err(Unresolved::Ambiguous(several.iter().map(|route| route.qualified_name()).collect()));
                }
            }
        }
        match self.routes.get(model) {
            Some(route) if model.contains('/') && allowed(route) => Ok(Arc::clone(route)),
            _ => Err(Unresolved::NotFound),
        }
    }

    /// The name `/v1/models` shows for `route`: the bare name when no other route shares it,
    /// else the qualified one.
    pub fn display_name(&self, route: &ModelRoute) -> String {
        match self.by_bare_name.get(&route.served_name) {
            Some(names) if names.len() == 1 => route.served_name.clone(),
            _ => route.qualified_name(),
        }
    }

    /// The names a key's `models` list may use for `route`: the bare and the qualified name.
    pub fn names_of(route: &ModelRoute) -> [String; 2] {
        [route.served_name.clone(), route.qualified_name()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(namespace: &str, name: &str, endpoints: usize) -> ModelRoute {
        ModelRoute {
            namespace: namespace.into(),
            served_name: name.into(),
            parent: None,
            resource: Some(ResourceRef {
                kind: ModelKind::EmbeddingModel,
                namespace: namespace.into(),
                name: name.into(),
            }),
            replicas: Some(endpoints as i32),
            endpoints: (0..endpoints)
                .map(|index| Arc::new(Endpoint::new(format!("127.0.0.{}:8080", index + 1))))
                .collect(),
            upstream_key: None,
        }
    }

    #[test]
    fn a_bare_name_resolves_when_unique_and_a_qualified_name_always() {
        let table = RouteTable::new([route("a", "minilm", 1), route("b", "minilm", 1), route("a", "smollm", 1)]);
        let all = |_: &ModelRoute| true;
        assert_eq!(table.resolve("smollm", all).expect("unique").qualified_name(), "a/smollm");
        assert_eq!(table.resolve("b/minilm", all).expect("qualified").namespace, "b");
        assert_eq!(
            table.resolve("minilm", all).expect_err("two namespaces"),
            Unresolved::Ambiguous(vec!["a/minilm".into(), "b/minilm".into()])
        );
        assert_eq!(table.resolve("nothing", all).expect_err("unknown"), Unresolved::NotFound);
        assert_eq!(table.resolve("c/minilm", all).expect_err("wrong namespace"), Unresolved::NotFound);
        assert_eq!(table.display_name(&route("a", "minilm", 1)), "a/minilm");
        assert_eq!(table.display_name(&route("a", "smollm", 1)), "smollm");
    }

    #[test]
    fn a_key_limited_to_one_namespace_resolves_the_bare_name_there() {
        let table = RouteTable::new([route("a", "minilm", 1), route("b", "minilm", 1)]);
        let only_b = |route: &ModelRoute| route.namespace == "b";
        assert_eq!(table.resolve("minilm", only_b).expect("one allowed").namespace, "b");
        assert_eq!(table.resolve("a/minilm", only_b).expect_err("not allowed"), Unresolved::NotFound);
    }

    #[test]
    fn only_a_route_at_zero_replicas_without_endpoints_wants_waking() {
        assert!(route("a", "x", 0).wants_wake());
        let mut starting = route("a", "x", 0);
        starting.replicas = Some(1);
        assert!(!starting.wants_wake(), "a scale above 0 belongs to the autoscaler");
        assert!(!route("a", "x", 1).wants_wake());
        let mut static_route = route("", "x", 0);
        static_route.resource = None;
        assert!(!static_route.wants_wake());
    }

    #[test]
    fn endpoints_keep_their_counts_across_rebuilds() {
        let mut registry = EndpointRegistry::default();
        let first = registry.get("127.0.0.2:8080");
        let guard = first.start();
        let again = registry.get("127.0.0.2:8080");
        assert_eq!(again.in_flight(), 1);
        drop(guard);
        assert_eq!(again.in_flight(), 0);
        registry.retain_used(&RouteTable::default());
        assert_eq!(registry.get("127.0.0.2:8080").in_flight(), 0);
    }
}

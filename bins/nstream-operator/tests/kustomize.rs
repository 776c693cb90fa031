//! `kubectl kustomize` renders what `kubectl apply -k deploy/` installs, and an overlay's `images:`
//! entries set the operator's image and the server images it gives the pods it creates.
//!
//! Needs `kubectl` (with its built-in kustomize, 1.14 or later) on PATH, or NSTREAM_KUBECTL naming
//! it; NSTREAM_SKIP_KUBECTL=1 skips these tests, saying so.

mod support;

use std::collections::BTreeSet;
use std::path::{Component, Path};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use nstream_operator::settings::OperatorSettings;
use support::repo_root;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `kubectl kustomize FOLDER`, as parsed documents; `None` when skipped.
fn render(folder: &Path) -> Option<Vec<serde_yaml::Value>> {
    if std::env::var_os("NSTREAM_SKIP_KUBECTL").is_some_and(|value| value == "1") {
        eprintln!("NSTREAM_SKIP_KUBECTL=1: kustomize rendering not tested");
        return None;
    }
    let kubectl = std::env::var("NSTREAM_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let output = Command::new(&kubectl).arg("kustomize").arg(folder).output().unwrap_or_else(|error| {
        panic!("running `{kubectl} kustomize`: {error}; install kubectl or set NSTREAM_SKIP_KUBECTL=1")
    });
    assert!(
        output.status.success(),
        "`{kubectl} kustomize {}` failed: {}",
        folder.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("kustomize prints UTF-8");
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|document| serde::Deserialize::deserialize(document).expect("kustomize prints YAML objects"))
            .collect(),
    )
}

/// (kind, name) of each object.
fn identities<'a>(documents: impl IntoIterator<Item = &'a serde_yaml::Value>) -> BTreeSet<(String, String)> {
    documents
        .into_iter()
        .map(|document| {
            let field = |value: &serde_yaml::Value| value.as_str().expect("a string").to_string();
            (field(&document["kind"]), field(&document["metadata"]["name"]))
        })
        .collect()
}

/// The operator's container: its image and its server images (NSTREAM_SERVER_IMAGE, _CUDA).
fn operator_images(documents: &[serde_yaml::Value]) -> (String, String, String) {
    let deployments: Vec<Deployment> = documents
        .iter()
        .filter(|document| document["kind"] == "Deployment" && document["metadata"]["name"] == "nstream-operator")
        .map(|document| serde_yaml::from_value(document.clone()).expect("a Deployment"))
        .collect();
    assert_eq!(deployments.len(), 1, "one Deployment (the operator's) is rendered");
    let pod = deployments[0].spec.as_ref().and_then(|spec| spec.template.spec.as_ref()).expect("a pod template");
    let container = &pod.containers[0];
    let env = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|variable| variable.name == name)
            .and_then(|variable| variable.value.clone())
            .unwrap_or_else(|| panic!("the operator container has no {name}"))
    };
    (
        container.image.clone().expect("the operator's image"),
        env("NSTREAM_SERVER_IMAGE"),
        env("NSTREAM_SERVER_IMAGE_CUDA"),
    )
}

/// A path from `from` to `to` (both absolute) made of `..` and `to`'s components: kustomize only
/// takes relative paths to other kustomizations.
fn relative(from: &Path, to: &Path) -> std::path::PathBuf {
    let ups = from.components().filter(|component| matches!(component, Component::Normal(_))).count();
    let mut path: std::path::PathBuf = std::iter::repeat_n("..", ups).collect();
    path.extend(to.components().filter(|component| matches!(component, Component::Normal(_))));
    path
}

#[test]
fn deploy_renders_every_manifest_with_this_versions_images() {
    let root = repo_root();
    let Some(documents) = render(&root.join("deploy")) else { return };

    // Every object of deploy/crds and deploy/operator, and nothing else.
    let mut expected = Vec::new();
    for folder in ["deploy/crds", "deploy/operator", "deploy/router"] {
        for entry in std::fs::read_dir(root.join(folder)).expect("deploy folder") {
            let text = std::fs::read_to_string(entry.expect("entry").path()).expect("manifest");
            for document in serde_yaml::Deserializer::from_str(&text) {
                expected.push(serde::Deserialize::deserialize(document).expect("a YAML manifest"));
            }
        }
    }
    assert_eq!(identities(&documents), identities(&expected));

    // The shipped images are this version's, and the server images agree with the operator's own
    // defaults (what it uses when the variables are unset).
    let defaults = OperatorSettings::default();
    let (operator, server, server_cuda) = operator_images(&documents);
    assert_eq!(operator, format!("ghcr.io/nstream-ai/nstream-operator:{VERSION}"));
    assert_eq!(server, defaults.server_image);
    assert_eq!(server_cuda, defaults.server_image_cuda);
    assert_eq!(server, format!("ghcr.io/nstream-ai/nstream-server:{VERSION}"));
    assert_eq!(server_cuda, format!("ghcr.io/nstream-ai/nstream-server-cuda:{VERSION}"));
}

#[test]
fn an_overlay_sets_the_server_images_one_by_one() {
    let root = repo_root();
    let overlay = tempfile::Builder::new().prefix("nstream-kustomize-").tempdir().expect("temporary folder");
    let base = relative(overlay.path(), &root.join("deploy"));
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "resources:\n  - {}\nimages:\n  - name: ghcr.io/nstream-ai/nstream-server\n    newName: registry.example/team/server\n    newTag: 2.0.0-rc1\n  - name: ghcr.io/nstream-ai/nstream-server-cuda\n    newName: registry.example/team/server-cuda\n    digest: {digest}\n",
            base.display()
        ),
    )
    .expect("writing the overlay");
    let Some(documents) = render(overlay.path()) else { return };
    let (operator, server, server_cuda) = operator_images(&documents);
    assert_eq!(server, "registry.example/team/server:2.0.0-rc1");
    assert_eq!(server_cuda, format!("registry.example/team/server-cuda@{digest}"));
    assert_eq!(operator, format!("ghcr.io/nstream-ai/nstream-operator:{VERSION}"), "only the named images change");
}

#[test]
fn the_local_images_example_points_at_the_images_the_script_builds() {
    let Some(documents) = render(&repo_root().join("examples/overlays/local-images")) else { return };
    let (operator, server, server_cuda) = operator_images(&documents);
    // scripts/images.sh build tags localhost/NAME:VERSION.
    assert_eq!(operator, format!("localhost/nstream-operator:{VERSION}"));
    assert_eq!(server, format!("localhost/nstream-server:{VERSION}"));
    assert_eq!(server_cuda, format!("ghcr.io/nstream-ai/nstream-server-cuda:{VERSION}"), "no local CUDA image");
}

/// Every (apiGroup, resource, verb) an RBAC role of `kind` named `name` grants (in `namespace`
/// for a Role).
fn grants(
    documents: &[serde_yaml::Value],
    kind: &str,
    name: &str,
    namespace: Option<&str>,
) -> Option<BTreeSet<(String, String, String)>> {
    let role = documents.iter().find(|document| {
        document["kind"] == kind
            && document["metadata"]["name"] == name
            && document["metadata"]["namespace"].as_str() == namespace
    })?;
    let strings = |value: &serde_yaml::Value| -> Vec<String> {
        value.as_sequence().into_iter().flatten().filter_map(|item| item.as_str().map(String::from)).collect()
    };
    let mut grants = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    grants.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    Some(grants)
}

#[test]
fn the_cluster_wide_install_never_lists_or_watches_secrets() {
    let Some(documents) = render(&repo_root().join("deploy")) else { return };
    let grants = grants(&documents, "ClusterRole", "nstream-operator", None).expect("the operator's ClusterRole");
    for (group, resource, verb) in &grants {
        let secrets = group.is_empty() && (resource == "secrets" || resource == "*");
        assert!(
            !(secrets && ["list", "watch", "*"].contains(&verb.as_str())),
            "the ClusterRole grants {verb} on {resource}: every Secret of the cluster"
        );
    }
    assert!(grants.contains(&(String::new(), "secrets".into(), "get".into())), "referenced Secrets are read");
}

/// `NSTREAM_WATCH_NAMESPACES` of the first container of the Deployment `name`.
fn watched_namespaces(documents: &[serde_yaml::Value], name: &str) -> String {
    let deployment = documents
        .iter()
        .find(|document| document["kind"] == "Deployment" && document["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Deployment {name}"));
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap_or_else(|| panic!("the Deployment {name} sets no environment"))
        .iter()
        .find(|variable| variable["name"] == "NSTREAM_WATCH_NAMESPACES")
        .and_then(|variable| variable["value"].as_str())
        .unwrap_or_else(|| panic!("NSTREAM_WATCH_NAMESPACES is not set on {name}"))
        .to_string()
}

#[test]
fn the_namespaced_overlay_has_a_role_per_watched_namespace_and_no_cluster_role() {
    let root = repo_root();
    let Some(cluster_wide) = render(&root.join("deploy")) else { return };
    let Some(documents) = render(&root.join("examples/overlays/namespaced")) else { return };
    let kinds: BTreeSet<String> =
        documents.iter().map(|document| document["kind"].as_str().expect("a kind").to_string()).collect();
    assert!(!kinds.contains("ClusterRole") && !kinds.contains("ClusterRoleBinding"), "{kinds:?}");

    let watched = watched_namespaces(&documents, "nstream-operator");
    let watched: Vec<&str> = watched.split(',').map(str::trim).collect();
    assert!(!watched.is_empty() && watched.iter().all(|namespace| !namespace.is_empty()), "{watched:?}");
    // The router routes the namespaces the operator reconciles, no more.
    let routed = watched_namespaces(&documents, "nstream-router");
    assert_eq!(routed.split(',').map(str::trim).collect::<Vec<_>>(), watched, "the router's namespaces");

    // The Role grants what the ClusterRole grants, plus list and watch on Secrets, in its
    // namespace only: the two cannot drift apart.
    let mut expected = grants(&cluster_wide, "ClusterRole", "nstream-operator", None).expect("the ClusterRole");
    for verb in ["list", "watch"] {
        expected.insert((String::new(), "secrets".into(), verb.into()));
    }
    for namespace in &watched {
        let role = grants(&documents, "Role", "nstream-operator", Some(namespace))
            .unwrap_or_else(|| panic!("no Role nstream-operator in the watched namespace {namespace}"));
        assert_eq!(role, expected, "the Role in {namespace}");
        let binding = documents
            .iter()
            .find(|document| {
                document["kind"] == "RoleBinding"
                    && document["metadata"]["name"] == "nstream-operator"
                    && document["metadata"]["namespace"] == *namespace
            })
            .unwrap_or_else(|| panic!("no RoleBinding nstream-operator in {namespace}"));
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(binding["roleRef"]["name"], "nstream-operator");
        assert_eq!(binding["subjects"][0]["name"], "nstream-operator");
        assert_eq!(binding["subjects"][0]["namespace"], "nstream-system");
    }
    // The router's Role grants what its ClusterRole grants, in each watched namespace.
    let router = grants(&cluster_wide, "ClusterRole", "nstream-router", None).expect("the router's ClusterRole");
    for namespace in &watched {
        let role = grants(&documents, "Role", "nstream-router", Some(namespace))
            .unwrap_or_else(|| panic!("no Role nstream-router in the watched namespace {namespace}"));
        assert_eq!(role, router, "the router's Role in {namespace}");
        let binding = documents
            .iter()
            .find(|document| {
                document["kind"] == "RoleBinding"
                    && document["metadata"]["name"] == "nstream-router"
                    && document["metadata"]["namespace"] == *namespace
            })
            .unwrap_or_else(|| panic!("no RoleBinding nstream-router in {namespace}"));
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(binding["roleRef"]["name"], "nstream-router");
        assert_eq!(binding["subjects"][0]["name"], "nstream-router");
        assert_eq!(binding["subjects"][0]["namespace"], "nstream-system");
    }
    // Every Role of the overlay is the leader Lease's or a watched namespace's.
    for document in documents.iter().filter(|document| document["kind"] == "Role") {
        let namespace = document["metadata"]["namespace"].as_str().expect("a namespace");
        assert!(namespace == "nstream-system" || watched.contains(&namespace), "a Role in {namespace}");
    }
}

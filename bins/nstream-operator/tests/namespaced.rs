//! The namespace-scoped install (examples/overlays/namespaced) on a real control plane with RBAC:
//! the operator runs with its ServiceAccount holding only the overlay's Roles (no ClusterRole),
//! reconciles the watched namespace, and leaves every other namespace alone.
//!
//! Needs the testbed (scripts/testbed.sh) and `kubectl` for `kubectl kustomize`, as the kustomize
//! tests do (NSTREAM_SKIP_KUBECTL=1 skips this test, saying so).

mod support;

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, ListParams};
use nstream_core::EmbeddingModel;
use support::*;

const MINUTE: Duration = Duration::from_secs(60);

/// The objects `kubectl kustomize examples/overlays/namespaced` renders; `None` when skipped.
fn namespaced_overlay() -> Option<Vec<DynamicObject>> {
    if std::env::var_os("NSTREAM_SKIP_KUBECTL").is_some_and(|value| value == "1") {
        eprintln!("NSTREAM_SKIP_KUBECTL=1: the namespaced install is not tested");
        return None;
    }
    let kubectl = std::env::var("NSTREAM_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(repo_root().join("examples/overlays/namespaced"))
        .output()
        .unwrap_or_else(|error| panic!("running `{kubectl} kustomize`: {error}"));
    assert!(output.status.success(), "kustomize failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|document| serde::Deserialize::deserialize(document).expect("a Kubernetes object"))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_the_roles_of_the_namespaced_overlay_the_operator_reconciles_its_namespace_only() {
    let Some(objects) = namespaced_overlay() else { return };
    // The operator runs with the overlay's ServiceAccount ("models", the namespace it watches, is
    // one of the overlay's objects).
    let overlay_credentials = async |testbed: &Testbed, admin: &kube::Client| {
        for object in objects {
            let what = format!(
                "{} {}",
                object.types.as_ref().map(|types| types.kind.as_str()).unwrap_or(""),
                object.name_any()
            );
            apply_object(admin, object).await.unwrap_or_else(|error| panic!("applying {what}: {error}"));
        }
        namespace(admin, "elsewhere").await;
        let kubeconfig = service_account_kubeconfig(
            admin,
            &testbed.kubeconfig,
            "nstream-system",
            "nstream-operator",
            testbed.path(),
        )
        .await;

        // The ServiceAccount really holds no cluster-wide grant: RBAC refuses it elsewhere.
        let operator_client = client_for(&kubeconfig).await;
        let refused =
            Api::<EmbeddingModel>::namespaced(operator_client.clone(), "elsewhere").list(&ListParams::default()).await;
        assert!(matches!(&refused, Err(kube::Error::Api(status)) if status.code == 403), "{refused:?}");
        let refused = Api::<Secret>::all(operator_client).list(&ListParams::default()).await;
        assert!(matches!(&refused, Err(kube::Error::Api(status)) if status.code == 403), "{refused:?}");
        kubeconfig
    };
    let mut setup = OperatorTestbed::start_with_credentials(
        OperatorSettings::new("namespaced").watch_namespace("models"),
        overlay_credentials,
    )
    .await;
    let admin = setup.client.clone();
    let watched_model = embedding_model("watched").replicas(1).to_string();
    apply_yaml(&admin, "models", &watched_model).await.expect("the watched resource");
    let ignored_model = embedding_model("ignored").replicas(1).to_string();
    apply_yaml(&admin, "elsewhere", &ignored_model).await.expect("the other resource");

    let watched = Api::<EmbeddingModel>::namespaced(admin.clone(), "models");
    eventually("the watched resource gets a Deployment and a status", MINUTE, || async {
        let deployment = Api::<Deployment>::namespaced(admin.clone(), "models").get_opt("em-watched").await.ok()??;
        let status = watched.get("watched").await.ok()?.status?;
        (deployment.metadata.name.is_some() && !status.conditions.is_empty()).then_some(())
    })
    .await;

    // Three resyncs later (--resync-seconds 5), nothing was made for the other namespace.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let ignored = Api::<EmbeddingModel>::namespaced(admin.clone(), "elsewhere").get("ignored").await.expect("exists");
    assert!(ignored.status.is_none(), "a resource outside the watched namespace got a status: {:?}", ignored.status);
    let deployments = Api::<Deployment>::namespaced(admin.clone(), "elsewhere").list(&ListParams::default()).await;
    assert!(deployments.expect("listing").items.is_empty(), "a Deployment was made outside the watched namespace");
    let log = setup.operator.log_text();
    assert!(!log.contains("forbidden"), "the operator asked for more than its Roles grant:\n{log}");

    let exit = setup.operator.terminate();
    assert!(exit.success(), "the operator exited with {exit}:\n{}", setup.operator.log_text());
}

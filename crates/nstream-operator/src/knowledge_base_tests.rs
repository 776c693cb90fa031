//! The desired objects of a KnowledgeBase: what its servers are made of, for each store.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Volume};
use nstream_core::{EmbeddingModel, KnowledgeBase, ModelResource};

use super::*;
use crate::fixtures::{HubModelFixture, settings};

fn knowledge_base(name: &str, spec: &str) -> KnowledgeBase {
    let mut knowledge_base: KnowledgeBase = serde_yaml::from_str(&format!(
        "apiVersion: llm.nstream.ai/v1\nkind: KnowledgeBase\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    ))
    .expect("a KnowledgeBase");
    knowledge_base.metadata.namespace = Some("models".into());
    knowledge_base.metadata.uid = Some(format!("uid-kb-{name}"));
    knowledge_base.metadata.generation = Some(1);
    knowledge_base
}

fn embedded(name: &str) -> KnowledgeBase {
    knowledge_base(name, "  embeddingModel: minilm\n")
}

fn postgres(name: &str, secret: &str, key: &str) -> KnowledgeBase {
    knowledge_base(
        name,
        &format!(
            "  embeddingModel: minilm\n  store:\n    postgres: {{connectionSecretRef: {{name: {secret}, key: {key}}}}}\n"
        ),
    )
}

fn planned(knowledge_base: &KnowledgeBase, model: &EmbeddingModel) -> Plan {
    plan(knowledge_base, model).expect("a valid plan")
}

fn container(deployment: &Deployment) -> &Container {
    &deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
}

fn volume<'a>(deployment: &'a Deployment, name: &str) -> Option<&'a Volume> {
    deployment.spec.as_ref()?.template.spec.as_ref()?.volumes.as_ref()?.iter().find(|volume| volume.name == name)
}

fn mount_path(deployment: &Deployment, volume: &str) -> Option<String> {
    container(deployment)
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.name == volume)
        .map(|mount| mount.mount_path.clone())
}

fn env(deployment: &Deployment, name: &str) -> Option<String> {
    container(deployment).env.iter().flatten().find(|var| var.name == name).and_then(|var| var.value.clone())
}

#[test]
fn an_embedded_store_runs_one_replica_with_recreate_on_an_owned_claim_at_the_data_dir() {
    let model = EmbeddingModel::test("minilm").with_replicas(3);
    let plan = planned(&embedded("docs"), &model);
    let deployment = deployment(&plan, &settings(), None);
    assert_eq!(deployment.metadata.name.as_deref(), Some("kb-docs"));
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1), "one writer, whatever the EmbeddingModel asks");
    let strategy = spec.strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("Recreate"));
    assert!(strategy.rolling_update.is_none(), "Recreate takes no rollingUpdate");
    let data = volume(&deployment, DATA_VOLUME).expect("the data volume");
    assert_eq!(data.persistent_volume_claim.as_ref().map(|claim| claim.claim_name.as_str()), Some("kb-docs-data"));
    assert_eq!(mount_path(&deployment, DATA_VOLUME).as_deref(), Some(DATA_DIR));
    assert_eq!(env(&deployment, "NSTREAM_DATA_DIR").as_deref(), Some(DATA_DIR));

    let claim = claim(&plan).expect("a claim for the embedded store");
    assert_eq!(claim.metadata.name.as_deref(), Some("kb-docs-data"));
    let owner = &claim.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("KnowledgeBase", "uid-kb-docs", Some(true))
    );
    let claim_spec = claim.spec.as_ref().unwrap();
    assert_eq!(claim_spec.access_modes.as_deref(), Some(&["ReadWriteOnce".to_string()][..]));
    let size = claim_spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0.clone();
    assert_eq!(size, DEFAULT_CLAIM_SIZE);
    assert_eq!(claim_spec.storage_class_name, None, "the cluster's default class");

    let limited = replicas_limited(&plan).expect("the EmbeddingModel asked for 3");
    assert!(limited.contains("3 replicas") && limited.contains("postgres"), "{limited}");
    let single = planned(&embedded("docs"), &EmbeddingModel::test("minilm"));
    assert_eq!(replicas_limited(&single), None, "nothing limited when one replica is asked");
}

#[test]
fn the_claim_takes_the_size_and_class_of_the_spec() {
    let knowledge_base = knowledge_base(
        "docs",
        "  embeddingModel: minilm\n  store: {embedded: {size: 2Gi, storageClassName: fast-ssd}}\n",
    );
    let claim = claim(&planned(&knowledge_base, &EmbeddingModel::test("minilm"))).unwrap();
    let spec = claim.spec.unwrap();
    assert_eq!(spec.resources.unwrap().requests.unwrap()["storage"].0, "2Gi");
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast-ssd"));
}

#[test]
fn the_model_file_holds_the_embedding_model_then_the_knowledge_base_and_loads() {
    let model = EmbeddingModel::test("minilm").with_replicas(2);
    let plan = planned(&embedded("docs"), &model);
    let config_map = config_map(&plan);
    assert_eq!(config_map.metadata.name.as_deref(), Some("kb-docs"));
    let file = &config_map.data.as_ref().unwrap()[desired::MODEL_FILE_KEY];
    let documents = nstream_core::parse_str(file, "model.yaml");
    let resources: Vec<&ModelResource> = documents.iter().filter_map(|document| document.valid_resource()).collect();
    assert_eq!(resources.len(), 2, "two valid documents: {documents:?}\n{file}");
    assert!(
        matches!(resources[0], ModelResource::EmbeddingModel(model) if model.metadata.name.as_deref() == Some("minilm"))
    );
    assert!(matches!(resources[1], ModelResource::KnowledgeBase(kb) if kb.spec.embedding_model == "minilm"));
    assert!(!file.contains("replicas"), "scaling fields stay out of the file, so a scale rolls nothing:\n{file}");

    // A spec change rolls the pods: the config hash follows the file.
    let hash = |plan: &Plan| {
        deployment(plan, &settings(), None).spec.unwrap().template.metadata.unwrap().annotations.unwrap()
            [desired::CONFIG_HASH_ANNOTATION]
            .clone()
    };
    let rechunked =
        knowledge_base("docs", "  embeddingModel: minilm\n  chunking: {maxTokens: 128, overlapTokens: 16}\n");
    assert_eq!(hash(&plan), desired::content_hash(file.as_bytes()));
    assert_ne!(hash(&plan), hash(&planned(&rechunked, &model)));
}

#[test]
fn an_inline_hub_token_is_read_from_the_embedding_models_secret_and_never_written_out() {
    let model = EmbeddingModel::test("minilm").with_inline_token("hf_very_secret_token");
    let plan = planned(&embedded("docs"), &model);
    assert!(!plan.model_file.contains("hf_very_secret_token"), "{}", plan.model_file);
    assert!(plan.model_file.contains("em-minilm-credentials"), "{}", plan.model_file);
    let deployment = deployment(&plan, &settings(), Some("abc"));
    let credentials = volume(&deployment, "credentials").expect("the token's Secret is mounted");
    assert_eq!(
        credentials.secret.as_ref().and_then(|secret| secret.secret_name.as_deref()),
        Some("em-minilm-credentials")
    );
    assert!(!serde_json::to_string(&deployment).unwrap().contains("hf_very_secret_token"));
    assert!(!format!("{plan:?}").contains("hf_very_secret_token"), "Debug redacts the token");
}

#[test]
fn a_postgres_store_mounts_its_secret_keeps_rolling_updates_and_follows_the_models_replicas() {
    let model = EmbeddingModel::test("minilm").with_replicas(3);
    let plan = planned(&postgres("docs", "pg", "url"), &model);
    assert_eq!(claim(&plan), None, "no claim for postgres");
    assert_eq!(replicas_limited(&plan), None);
    let deployment = deployment(&plan, &settings(), None);
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.strategy.as_ref().unwrap().type_.as_deref(), Some("RollingUpdate"));
    let secret = volume(&deployment, "postgres").and_then(|volume| volume.secret.as_ref()).expect("the URL's Secret");
    assert_eq!(secret.secret_name.as_deref(), Some("pg"));
    assert_eq!(secret.items.as_ref().unwrap()[0].key, "url");
    // secrets/<name>/<key> under the working directory: what NSTREAM_SECRETS_DIR=secrets reads.
    assert_eq!(mount_path(&deployment, "postgres").as_deref(), Some("/nstream/secrets/pg"));
    let data = volume(&deployment, DATA_VOLUME).unwrap();
    assert!(data.empty_dir.is_some() && data.persistent_volume_claim.is_none(), "{data:?}");

    let scaled_to_zero = EmbeddingModel::test("minilm").with_replicas(0);
    let spec = deployment_of(&postgres("docs", "pg", "url"), &scaled_to_zero);
    assert_eq!(spec.spec.unwrap().replicas, Some(1), "a KnowledgeBase is not scaled to zero with its model");
}

fn deployment_of(knowledge_base: &KnowledgeBase, model: &EmbeddingModel) -> Deployment {
    deployment(&planned(knowledge_base, model), &settings(), None)
}

#[test]
fn one_secret_holding_the_token_and_the_url_is_one_volume_with_both_keys() {
    let model = EmbeddingModel::test("minilm").with_token_from("shared", "token");
    let deployment = deployment_of(&postgres("docs", "shared", "url"), &model);
    assert!(volume(&deployment, "postgres").is_none(), "no second mount at the same path");
    let keys: Vec<String> = volume(&deployment, "credentials")
        .and_then(|volume| volume.secret.as_ref())
        .and_then(|secret| secret.items.clone())
        .unwrap()
        .into_iter()
        .map(|item| item.key)
        .collect();
    assert_eq!(keys, ["token", "url"]);
    let plan = planned(&postgres("docs", "shared", "url"), &model);
    assert_eq!(
        read_secrets(&plan),
        [("shared".to_string(), "token".to_string()), ("shared".to_string(), "url".to_string())]
    );
}

#[test]
fn store_paths_outside_the_data_dir_and_bad_sizes_are_refused_with_their_field() {
    let outside = knowledge_base("docs", "  embeddingModel: minilm\n  store: {embedded: {path: /srv/docs}}\n");
    let problems = problems(&outside);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("spec.store.embedded.path") && problems[0].contains(DATA_DIR), "{problems:?}");
    assert!(plan(&outside, &EmbeddingModel::test("minilm")).is_err());

    for path in ["/var/lib/nstream/docs", "docs", "kb/docs"] {
        let inside =
            knowledge_base("docs", &format!("  embeddingModel: minilm\n  store: {{embedded: {{path: {path}}}}}\n"));
        assert_eq!(super::problems(&inside), Vec::<String>::new(), "{path}");
    }
    let sibling = knowledge_base("docs", "  embeddingModel: minilm\n  store: {embedded: {path: /var/lib/nstreamer}}\n");
    assert_eq!(super::problems(&sibling).len(), 1, "a sibling folder is not under the data dir");

    let bad_size = knowledge_base("docs", "  embeddingModel: minilm\n  store: {embedded: {size: lots}}\n");
    let problems = super::problems(&bad_size);
    assert!(problems.iter().any(|problem| problem.starts_with("spec.store.embedded.size")), "{problems:?}");
}

#[test]
fn an_invalid_embedding_model_blocks_the_knowledge_base_naming_it() {
    let mut model = EmbeddingModel::test("minilm");
    model.spec.embedding_model_serving_template.replicas = Replicas::Text("three".into());
    let error = plan(&embedded("docs"), &model).expect_err("an invalid model");
    assert!(error.contains("EmbeddingModel minilm"), "{error}");
}

#[test]
fn knowledge_base_objects_are_named_and_labelled_as_their_kind() {
    let plan = planned(&embedded("docs"), &EmbeddingModel::test("minilm"));
    assert_eq!(object_name(ModelKind::KnowledgeBase, "docs"), "kb-docs");
    let labels = desired::labels(&plan.served);
    assert_eq!(labels[desired::KIND_LABEL], "KnowledgeBase");
    assert_eq!(labels["app.kubernetes.io/component"], "knowledge-base");
    let service = desired::service(&plan.served, &settings());
    assert_eq!(service.metadata.name.as_deref(), Some("kb-docs"));
    assert_eq!(desired::endpoint(&plan.served, &settings()), "http://kb-docs.models.svc.cluster.local/v1");
}

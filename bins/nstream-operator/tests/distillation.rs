//! A Distillation on the real control plane (scripts/testbed.sh), its pods run by the stand-in
//! kubelet (tests/support/kubelet.rs): the teacher is examples/distill/teacher.py (a real HTTP
//! server speaking OpenAI's API) behind the MegaModel's gateway pod (a real `nstream-server`);
//! the student is SmolLM2 from the offline cache. The operator runs the stages as Jobs, one after
//! the other (`nstream distill --stage ...`, the real binary); the generate pod is killed with
//! SIGKILL half-way, the Job controller starts another, and it resumes from the journal on the
//! claim without asking the teacher again. The status carries each stage, the scores, and the
//! adapter ends on the student BaseModel, whose Deployment mounts the claim. Deleting the Distillation
//! with `dataPolicy: Delete` removes its Jobs and its claim.
//!
//! The cluster's DNS is not there: the Jobs reach the gateway pod through
//! `NSTREAM_DISTILL_TEACHER_ENDPOINT`, set by the test to the pod's address (on a cluster the
//! distill file's endpoint, the gateway's Service, is used).

#[path = "support/distill_demo.rs"]
mod distill_demo;
mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use distill_demo::{Teacher, demo_inputs, non_blank_lines, reduced_demo_file};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use nstream_core::{BaseModel, Distillation, StagePhase};
use support::kubelet::{KubeletOptions, StandInPod};
use support::*;

const MINUTE: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "distill";
const INPUTS: usize = 12;
/// The claim the operator makes for the Distillation `orders`.
const CLAIM: &str = "distill-orders";

/// The teacher's key Secret, the MegaModel of the teacher on `teacher_port`, and the student
/// BaseModel `smollm2`: one YAML document each.
fn resources(teacher_port: u16) -> Vec<String> {
    let key = r#"
apiVersion: v1
kind: Secret
metadata:
  name: teacher-key
  labels: {llm.nstream.ai/provider-credentials: "true"}
stringData: {apikey: local-teacher}
"#;
    let teacher = format!(
        r#"
apiVersion: llm.nstream.ai/v1
kind: MegaModel
metadata:
  name: order-teacher
spec:
  modelProvider: OpenAI
  modelTemplate:
    openAI:
      endpoint: http://127.0.0.1:{teacher_port}/v1
      model: order-teacher
      apikeySecretRef: {{name: teacher-key, key: apikey}}
"#
    );
    let student = smollm2_base_model("smollm2").replicas(1).serving_template(r#"resourceLimit: {cpu: "1"}"#);
    vec![key.to_string(), teacher, student.to_string()]
}

/// The demo's Distillation (examples/distill/distill.yaml), reduced: 12 inputs from a ConfigMap,
/// one teacher request at a time, three training steps with a checkpoint after each.
fn distillation() -> String {
    let demo = reduced_demo_file();
    let spec = demo.split("kind: Distillation\n").nth(1).expect("the demo's Distillation");
    let reduced = format!("apiVersion: llm.nstream.ai/v1\nkind: Distillation\n{spec}")
        .replace("  student: smollm2-135m-instruct\n", "  student: smollm2\n")
        .replace("    dataset: orders.jsonl\n", "    dataset: orders.jsonl\n    datasetConfigMap: orders-inputs\n")
        .replace("  split:\n    heldOut: 0.2\n", "  split:\n    heldOut: 0.25\n")
        .replace("    scorers: [json, exact]\n", "    scorers: [json, exact]\n    bootstrap: 10\n")
        .replace("  output: ../../runs/distill-orders\n", "  storage: {dataPolicy: Delete}\n");
    for expected in ["maxSteps: 3", "datasetConfigMap", "dataPolicy: Delete", "student: smollm2\n", "bootstrap: 10"] {
        assert!(reduced.contains(expected), "the demo file changed ({expected}): {reduced}");
    }
    reduced
}

fn inputs_config_map() -> String {
    let inputs = demo_inputs(INPUTS);
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "orders-inputs"},
        "data": {"orders.jsonl": inputs.join("\n") + "\n"},
    })
    .to_string()
}

async fn status_of(client: &Client) -> Option<nstream_core::DistillationStatus> {
    Api::<Distillation>::namespaced(client.clone(), NAMESPACE).get_opt("orders").await.ok().flatten()?.status
}

/// SIGKILL to the process running in the pod's folder (found by its working directory: the
/// kubelet keeps its process ids to itself), as a node losing the pod would.
fn kill_pod_process(pod: &StandInPod) -> bool {
    let mut killed = false;
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        let in_pod = std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&pod.folder));
        if in_pod && pid != std::process::id() as i32 {
            killed |=
                Command::new("kill").args(["-KILL", &pid.to_string()]).status().is_ok_and(|status| status.success());
        }
    }
    killed
}

fn created(job: &Job) -> Option<k8s_openapi::jiff::Timestamp> {
    job.metadata.creation_timestamp.as_ref().map(|time| time.0)
}

fn completed(job: &Job) -> Option<k8s_openapi::jiff::Timestamp> {
    job.status.as_ref()?.completion_time.as_ref().map(|time| time.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_distillation_runs_its_stages_as_jobs_resumes_a_killed_one_and_attaches_the_adapter() {
    assert_model_cached(SMOL_LM);
    let started = Instant::now();
    // The operator runs with the ServiceAccount of deploy/operator, so the run proves that its
    // RBAC is enough for Distillations.
    let setup = OperatorTestbed::start_with_credentials(
        OperatorSettings::new("distill")
            .watch_namespace(NAMESPACE)
            .serve_locally()
            .arguments(&["--provider-check-interval-seconds", "0"]),
        operator_service_account_kubeconfig,
    )
    .await;
    let client = setup.client.clone();
    let teacher = Teacher::start(setup.path(), 0.3);
    // The gateway runs; the student's server is not needed by the stages (they load the student
    // themselves), so its pods are left unrun.
    let gateways =
        setup.kubelet(NAMESPACE, "app.kubernetes.io/instance=mm-order-teacher", KubeletOptions::new(setup.path()));
    for document in resources(teacher.port).into_iter().chain([inputs_config_map()]) {
        apply_yaml(&client, NAMESPACE, &document).await.unwrap_or_else(|error| panic!("{error}: {document}"));
    }
    let gateway: SocketAddr = gateways.wait_ready(1, 2 * MINUTE).await[0].address;
    let jobs = setup.kubelet(
        NAMESPACE,
        "app.kubernetes.io/name=nstream-distill",
        KubeletOptions::new(setup.path()).env("NSTREAM_DISTILL_TEACHER_ENDPOINT", &format!("http://{gateway}/v1")),
    );
    apply_yaml(&client, NAMESPACE, &distillation()).await.expect("the Distillation applies");

    // Half-way through generate, the pod's process dies: the Job starts another pod, which
    // resumes from the journal on the claim.
    let journal = jobs.claim_folder(CLAIM).join("runs/orders/generate/answers.journal");
    let first = eventually("the generate pod has recorded a few answers", 2 * MINUTE, || async {
        let pod =
            jobs.pods().into_iter().find(|pod| pod.name.starts_with("distill-orders-generate-") && pod.running)?;
        (non_blank_lines(&journal) >= 6).then_some(pod)
    })
    .await;
    assert!(teacher.requests() < INPUTS, "the kill came after generate ({} requests)", teacher.requests());
    assert!(kill_pod_process(&first), "no process of {} to kill", first.name);
    let failed = jobs.wait_finished(&first.name, MINUTE).await;
    assert_eq!(failed.phase, "Failed");

    let generated = eventually("stage generate succeeded", 3 * MINUTE, || async {
        let status = status_of(&client).await?;
        status.stage("generate").filter(|stage| stage.phase == StagePhase::Succeeded).cloned()
    })
    .await;
    // A request in flight when the pod died was answered but not recorded, and is asked again:
    // at most one, with one request at a time. Every recorded answer is never asked again.
    let requests = teacher.requests();
    assert!((INPUTS..=INPUTS + 1).contains(&requests), "the teacher answered {requests} requests for {INPUTS} inputs");
    assert_eq!(generated.attempts, Some(2), "{generated:?}");
    let progress = generated.progress.clone().unwrap_or_default();
    assert!(progress.starts_with(&format!("{INPUTS}/{INPUTS} inputs answered")), "{progress}");

    let status = eventually("the Distillation succeeded", 6 * MINUTE, || async {
        let status = status_of(&client).await?;
        if status.stage.as_deref() == Some("Failed") {
            panic!("the Distillation failed: {status:?}\n{}", jobs.describe());
        }
        (status.stage.as_deref() == Some("Succeeded")).then_some(status)
    })
    .await;
    eprintln!("distillation done {:.0} s after the start: {status:#?}", started.elapsed().as_secs_f64());

    // The stages ran in order, each Job created after the one before it completed.
    let all_jobs = Api::<Job>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels("llm.nstream.ai/distillation=orders"))
        .await
        .expect("the Jobs")
        .items;
    let job = |stage: &str| {
        all_jobs
            .iter()
            .find(|job| job.labels().get("llm.nstream.ai/stage").map(String::as_str) == Some(stage))
            .unwrap_or_else(|| panic!("no {stage} Job"))
    };
    assert!(created(job("finetune")) >= completed(job("generate")), "finetune started before generate ended");
    assert!(created(job("eval")) >= completed(job("finetune")), "eval started before finetune ended");
    for name in ["generate", "finetune", "eval"] {
        let stage = status.stage(name).expect("the stage in status");
        assert_eq!(stage.phase, StagePhase::Succeeded, "{stage:?}");
        assert!(stage.start_time.is_some() && stage.completion_time.is_some(), "{stage:?}");
    }
    let finetune = status.stage("finetune").and_then(|stage| stage.progress.clone()).unwrap_or_default();
    assert!(finetune.starts_with("step 3/3"), "{finetune}");

    // The scores: the teacher is its own reference; the student and the base are scored too.
    assert_eq!(status.scores.len(), 3, "{:?}", status.scores);
    let teacher_score = status.scores.iter().find(|score| score.role == "teacher").expect("the teacher's score");
    assert_eq!((teacher_score.metric.as_str(), teacher_score.score), ("json_exact", 1.0));
    let student_score = status.scores.iter().find(|score| score.role == "student").expect("the student's score");
    assert_eq!(student_score.model, "orders-student");
    assert_eq!(status.score, Some(format!("json_exact {:.1}%", student_score.score * 100.0)));
    assert!(status.condition("Ready").is_some_and(|condition| condition.status == "True"));
    assert_eq!(status.adapter.as_deref(), Some("orders-student"));

    // The adapter is on the student, under the operator's own field manager, and served.
    let student = Api::<BaseModel>::namespaced(client.clone(), NAMESPACE).get("smollm2").await.expect("the student");
    assert_eq!(student.annotations().get("llm.nstream.ai/adapters-claim").map(String::as_str), Some(CLAIM));
    let adapters = student.spec.base_model_serving_info.adapters.clone().unwrap_or_default();
    assert_eq!(adapters.len(), 1, "{adapters:?}");
    assert_eq!(
        (adapters[0].name.as_str(), adapters[0].hf_model_id.as_str()),
        ("orders-student", "/adapters/runs/orders/student")
    );
    assert!(
        student.managed_fields().iter().any(|entry| entry.manager.as_deref() == Some("nstream-operator-distillation")),
        "{:?}",
        student.managed_fields()
    );
    // The student's Deployment rolls with the claim mounted read-only where the adapter's path
    // points. (Its server is not run here: the stand-in kubelet does not rewrite the absolute
    // paths inside the model file; docs/adapters.md's mechanism serves it on a cluster.)
    let deployment =
        // Three minutes: on a loaded 2-core machine the student's reconcile can sit in its
        // per-object backoff when the adapter lands (one local run missed a one-minute wait).
        eventually("the student's Deployment mounts the claim", 3 * MINUTE, || async {
            let deployment =
                Api::<Deployment>::namespaced(client.clone(), NAMESPACE).get_opt("bm-smollm2").await.ok()??;
            let pod = deployment.spec.as_ref()?.template.spec.clone()?;
            let mounted =
                pod.volumes.iter().flatten().any(|volume| {
                    volume.persistent_volume_claim.as_ref().is_some_and(|claim| claim.claim_name == CLAIM)
                }) && pod.containers[0].volume_mounts.iter().flatten().any(|mount| mount.mount_path == "/adapters");
            mounted.then_some(deployment)
        })
        .await;
    let model_file =
        deployment.spec.and_then(|spec| spec.template.metadata?.annotations?.remove("llm.nstream.ai/config-hash"));
    assert!(model_file.is_some(), "the pods carry the model file's hash, so the new adapter rolls them");

    // Deleting it stops its Jobs and, with dataPolicy: Delete, deletes the claim.
    let distillations = Api::<Distillation>::namespaced(client.clone(), NAMESPACE);
    distillations.delete("orders", &DeleteParams::default()).await.expect("deleting the Distillation");
    eventually("the Distillation is gone", MINUTE, || async {
        distillations.get_opt("orders").await.ok().and_then(|found| found.is_none().then_some(()))
    })
    .await;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NAMESPACE);
    // Still mounted by the student's pod, the claim waits in Terminating (pvc-protection).
    let claim = claims.get_opt(CLAIM).await.expect("the claim");
    assert!(claim.is_none_or(|claim| claim.metadata.deletion_timestamp.is_some()), "the claim was not deleted");
    eventually("the Jobs are gone", MINUTE, || async {
        let left = Api::<Job>::namespaced(client.clone(), NAMESPACE)
            .list(&ListParams::default().labels("llm.nstream.ai/distillation=orders"))
            .await
            .ok()?;
        left.items.iter().all(|job| job.metadata.deletion_timestamp.is_some()).then_some(())
    })
    .await;
    eprintln!("test done in {:.0} s", started.elapsed().as_secs_f64());
}

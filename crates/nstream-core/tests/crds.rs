//! The CRDs: the checked-in copies under deploy/crds/ are what the code generates, and every
//! schema is structural, as the API server requires.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use nstream_core::crd;
use serde_json::Value;

#[test]
fn deploy_crds_match_the_code() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
    for (definition, name) in crd::crds().iter().zip(crd::CRD_FILE_NAMES) {
        let generated = crd::crd_yaml(definition).unwrap();
        let checked_in = std::fs::read_to_string(folder.join(name)).unwrap_or_default();
        assert!(
            generated == checked_in,
            "deploy/crds/{name} is stale: run `cargo run -p nstream -- crds --output-dir deploy/crds`"
        );
    }
}

#[test]
fn printed_crds_deserialise_as_custom_resource_definitions() {
    let yaml = crd::crds_yaml().unwrap();
    let mut kinds = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&yaml) {
        let definition: CustomResourceDefinition = serde::Deserialize::deserialize(document).unwrap();
        assert_eq!(definition.spec.group, "llm.nstream.ai");
        assert_eq!(definition.spec.scope, "Namespaced");
        let version = &definition.spec.versions[0];
        assert_eq!(version.name, "v1");
        assert!(version.served && version.storage);
        assert!(version.subresources.as_ref().and_then(|resources| resources.status.as_ref()).is_some());
        let columns: Vec<&str> =
            version.additional_printer_columns.iter().flatten().map(|column| column.name.as_str()).collect();
        assert!(columns.contains(&"Ready") && columns.contains(&"Age"), "{columns:?}");
        assert!(!definition.spec.names.short_names.clone().unwrap_or_default().is_empty());
        let schema =
            serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        assert_structural(&schema, "openAPIV3Schema");
        kinds.push(definition.spec.names.kind);
    }
    assert_eq!(kinds, ["MegaModel", "BaseModel", "EmbeddingModel", "KnowledgeBase", "Distillation"]);
}

/// The rules of a structural schema that a generator can get wrong: every node has a type (or
/// is int-or-string / preserves unknown fields), `anyOf`/`oneOf`/`allOf` items carry no type or
/// description, and `additionalProperties` never sits beside `properties`.
fn assert_structural(schema: &Value, path: &str) {
    let object = schema.as_object().unwrap_or_else(|| panic!("{path} is not an object"));
    let typed = object.contains_key("type")
        || object.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || object.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    assert!(typed, "{path} has no type: {schema}");
    assert!(!(object.contains_key("properties") && object.contains_key("additionalProperties")), "{path}");
    for keyword in ["anyOf", "oneOf", "allOf"] {
        for item in object.get(keyword).and_then(Value::as_array).into_iter().flatten() {
            let item = item.as_object().unwrap();
            for forbidden in ["type", "description", "default", "nullable", "properties", "items"] {
                assert!(!item.contains_key(forbidden), "{path}.{keyword} item has {forbidden}");
            }
        }
    }
    if let Some(properties) = object.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            assert_structural(property, &format!("{path}.{name}"));
        }
    }
    if let Some(items) = object.get("items") {
        assert_structural(items, &format!("{path}[]"));
    }
    if let Some(Value::Object(additional)) = object.get("additionalProperties") {
        assert_structural(&Value::Object(additional.clone()), &format!("{path}{{}}"));
    }
}

#[test]
fn cross_field_rules_are_in_the_schema_for_the_api_server() {
    let yaml = crd::crds_yaml().unwrap();
    assert!(yaml.contains("has(self.apikey) != has(self.apikeySecretRef)"));
    assert!(yaml.contains("quantity(string(self.resourceRequest.cpu)).compareTo"));
    assert!(yaml.contains("(self.modelProvider == 'AzureOpenAI') == has(self.modelTemplate.azureOpenAI)"));
    assert!(yaml.contains("isInteger()"));
}

/// The providers' templates of the MegaModel CRD's schema.
const MEGA_MODEL_TEMPLATES: [&str; 3] = ["azureOpenAI", "openAI", "anthropic"];

/// The schema of `spec.modelTemplate`'s properties in the MegaModel CRD: one entry per template.
fn mega_model_template_schemas() -> Value {
    let definitions = crd::crds();
    let mega = definitions.iter().find(|definition| definition.spec.names.kind == "MegaModel").unwrap();
    let schema = serde_json::to_value(&mega.spec.versions[0].schema).unwrap();
    schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["modelTemplate"]["properties"].clone()
}

/// The CEL rules (`x-kubernetes-validations`) of one template's schema; none when it has none.
fn validation_rules(template_schema: &Value) -> Vec<Value> {
    template_schema["x-kubernetes-validations"].as_array().cloned().unwrap_or_default()
}

#[test]
fn inline_mega_model_keys_are_refused_by_the_api_server_with_a_pointer_to_secret_refs() {
    let templates = mega_model_template_schemas();
    for template in MEGA_MODEL_TEMPLATES {
        let rules = validation_rules(&templates[template]);
        let refusal = rules.iter().find(|rule| rule["rule"] == "!has(self.apikey)");
        let message = refusal.and_then(|rule| rule["message"].as_str()).unwrap_or_default();
        assert!(message.contains("apikeySecretRef"), "{template}: {rules:?}");
        assert!(message.contains("llm.nstream.ai/provider-credentials=true"), "{template}: {message}");
    }
}

#[test]
fn plain_http_mega_model_endpoints_are_refused_by_the_api_server_as_by_validate() {
    let templates = mega_model_template_schemas();
    for template in MEGA_MODEL_TEMPLATES {
        let rules = validation_rules(&templates[template]);
        let refusal = rules.iter().find(|rule| rule["rule"] == nstream_core::validate::PLAIN_HTTP_CEL_RULE);
        let refusal = refusal.unwrap_or_else(|| panic!("{template}: no plain-http rule in {rules:?}"));
        assert_eq!(refusal["fieldPath"], ".endpoint", "{template}");
        assert!(refusal["message"].as_str().is_some_and(|message| message.contains("https://")), "{refusal}");
        // CEL's cost estimate needs a bounded string.
        assert_eq!(templates[template]["properties"]["endpoint"]["maxLength"], 2048, "{template}");
    }
}

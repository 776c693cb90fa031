//! Validation that helps: every problem of a resource at once, each with its field path, what
//! was found and what was expected.

use std::cmp::Ordering;
use std::fmt;

use serde::Serialize;
use validator::{Validate, ValidationErrors, ValidationErrorsKind};

use crate::patterns;
use crate::quantity::ResourceQuantity;
use crate::replicas::Replicas;
use crate::secret::SecretString;
use crate::spec::{
    ApiKeyFields, BaseModelSpec, EmbeddingModelSpec, HubModelSpec, MegaModelSpec, ProviderTemplate, Resources,
    ServingInfo, ServingTemplate,
};

/// One thing wrong with a resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Where, as a field path from the document root: `spec.baseModelServingTemplate.replicas`.
    pub path: String,
    /// What is there (never the value of a secret).
    pub found: String,
    /// What would be accepted.
    pub expected: String,
}

impl Problem {
    /// A problem at a path.
    pub fn new(path: impl Into<String>, found: impl Into<String>, expected: impl Into<String>) -> Self {
        Self { path: path.into(), found: found.into(), expected: expected.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: found {}, expected {}", self.path, self.found, self.expected)
    }
}

/// Resources (or parts of them) that can list their problems.
pub trait Check {
    /// Every problem, with paths under `prefix` (such as `spec`).
    fn problems(&self, prefix: &str) -> Vec<Problem>;
}

/// Field names as they appear in YAML: the validator crate reports Rust names.
fn yaml_field_name(rust_name: &str) -> String {
    match rust_name {
        "azure_open_ai" => return "azureOpenAI".to_string(),
        "open_ai" => return "openAI".to_string(),
        _ => {}
    }
    let mut name = String::with_capacity(rust_name.len());
    let mut upper_next = false;
    for character in rust_name.chars() {
        if character == '_' {
            upper_next = true;
        } else if upper_next {
            name.push(character.to_ascii_uppercase());
            upper_next = false;
        } else {
            name.push(character);
        }
    }
    name
}

/// What a validator rule expects, in words.
fn expectation(path: &str, error: &validator::ValidationError) -> String {
    let parameter = |name: &str| error.params.get(name).map(|value| value.to_string());
    match error.code.as_ref() {
        "length" => match (parameter("min"), parameter("max")) {
            (Some(min), Some(max)) => format!("between {min} and {max} characters"),
            (Some(min), None) => format!("at least {min} characters"),
            (None, Some(max)) => format!("at most {max} characters"),
            (None, None) => "a different length".to_string(),
        },
        "range" => {
            let low = parameter("min")
                .map(|min| format!("at least {min}"))
                .or_else(|| parameter("exclusive_min").map(|min| format!("greater than {min}")));
            let high = parameter("max")
                .map(|max| format!("at most {max}"))
                .or_else(|| parameter("exclusive_max").map(|max| format!("less than {max}")));
            match (parameter("min"), parameter("max"), low, high) {
                (Some(min), Some(max), _, _) => format!("a number from {min} to {max}"),
                (_, _, Some(low), Some(high)) => format!("a number {low} and {high}"),
                (_, _, Some(bound), None) | (_, _, None, Some(bound)) => format!("a number {bound}"),
                _ => "a number in range".to_string(),
            }
        }
        "url" => "an http:// or https:// URL".to_string(),
        "regex" => {
            let field = path.rsplit('.').next().unwrap_or(path);
            match field {
                "hfModelId" => {
                    "a Hugging Face repository id `org/name`, such as sentence-transformers/all-MiniLM-L6-v2, \
                                or a local directory (/abs/path, ./rel/path)"
                        .to_string()
                }
                "apiVersion" => "an Azure OpenAI api-version such as 2023-10-01-preview or 2024-10-21".to_string(),
                "deployment" => "an Azure deployment name: letters, digits, `.`, `_`, `-`, at most 64".to_string(),
                "anthropicVersion" => "a date such as 2023-06-01".to_string(),
                "revision" => "a branch, tag or commit without spaces".to_string(),
                "name" => format!("a Kubernetes resource name matching {}", patterns::DNS_SUBDOMAIN_PATTERN),
                "key" => format!("a Secret key matching {}", patterns::SECRET_KEY_PATTERN),
                "embeddingModel" => "the metadata.name of an EmbeddingModel (a DNS-1035 label)".to_string(),
                "table" => format!("a lower-case table name matching {}", crate::knowledge_base::TABLE_NAME_PATTERN),
                _ => "text without leading or trailing whitespace".to_string(),
            }
        }
        other => format!("a value that passes `{other}`"),
    }
}

/// How to show a found value: quoted, shortened; never for secret fields.
fn describe_found(path: &str, value: Option<&serde_json::Value>) -> String {
    let field = path.rsplit('.').next().unwrap_or(path);
    if matches!(field, "apikey" | "modelProviderToken") {
        return "a secret value (not shown)".to_string();
    }
    match value {
        Some(serde_json::Value::String(text)) => quote(text),
        Some(other) => other.to_string(),
        None => "an invalid value".to_string(),
    }
}

/// A found text, quoted and cut to a readable length.
pub(crate) fn quote(text: &str) -> String {
    const LIMIT: usize = 80;
    if text.chars().count() > LIMIT {
        let cut: String = text.chars().take(LIMIT).collect();
        format!("{cut:?}…")
    } else {
        format!("{text:?}")
    }
}

/// Flattens the validator crate's nested errors into problems with YAML paths.
fn collect(errors: &ValidationErrors, prefix: &str, problems: &mut Vec<Problem>) {
    for (field, kind) in errors.errors() {
        let path = format!("{prefix}.{}", yaml_field_name(field));
        match kind {
            ValidationErrorsKind::Field(field_errors) => {
                for error in field_errors {
                    let found = describe_found(&path, error.params.get("value"));
                    problems.push(Problem::new(&path, found, expectation(&path, error)));
                }
            }
            ValidationErrorsKind::Struct(nested) => collect(nested, &path, problems),
            ValidationErrorsKind::List(items) => {
                for (index, nested) in items {
                    collect(nested, &format!("{path}[{index}]"), problems);
                }
            }
        }
    }
}

/// Field-rule problems from the validator derive.
pub(crate) fn field_rules(value: &impl Validate, prefix: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Err(errors) = value.validate() {
        collect(&errors, prefix, &mut problems);
    }
    problems
}

fn check_secret(secret: Option<&SecretString>, path: &str, problems: &mut Vec<Problem>) {
    if let Some(shape) = secret.and_then(SecretString::shape_problem) {
        problems.push(Problem::new(path, shape, "the secret exactly, without surrounding whitespace"));
    }
}

fn check_api_key(template: &dyn ApiKeyFields, path: &str, problems: &mut Vec<Problem>) {
    match (template.apikey(), template.apikey_secret_ref()) {
        (Some(_), Some(_)) => problems.push(Problem::new(
            path,
            "both apikey and apikeySecretRef",
            "exactly one of apikey and apikeySecretRef",
        )),
        (None, None) => problems.push(Problem::new(
            format!("{path}.apikey"),
            "no key",
            "apikey, or apikeySecretRef naming a Secret and key",
        )),
        _ => {}
    }
    check_secret(template.apikey(), &format!("{path}.apikey"), problems);
}

impl Check for MegaModelSpec {
    fn problems(&self, prefix: &str) -> Vec<Problem> {
        let mut problems = field_rules(self, prefix);
        let template_path = format!("{prefix}.modelTemplate");
        let wanted = self.model_provider.template_field();
        let present = self.model_template.present();
        if !present.contains(&wanted) {
            problems.push(Problem::new(
                format!("{template_path}.{wanted}"),
                if present.is_empty() { "no template".to_string() } else { format!("only {}", present.join(", ")) },
                format!("the {wanted} template, because modelProvider is {}", self.model_provider.as_str()),
            ));
        }
        for other in present.iter().filter(|field| **field != wanted) {
            problems.push(Problem::new(
                format!("{template_path}.{other}"),
                format!("the {other} template set too"),
                format!("only the {wanted} template, because modelProvider is {}", self.model_provider.as_str()),
            ));
        }
        let template = &self.model_template;
        let keyed: [(Option<&dyn ApiKeyFields>, &str); 3] = [
            (template.azure_open_ai.as_ref().map(|t| t as &dyn ApiKeyFields), "azureOpenAI"),
            (template.open_ai.as_ref().map(|t| t as &dyn ApiKeyFields), "openAI"),
            (template.anthropic.as_ref().map(|t| t as &dyn ApiKeyFields), "anthropic"),
        ];
        for (fields, name) in keyed {
            if let Some(fields) = fields {
                check_api_key(fields, &format!("{template_path}.{name}"), &mut problems);
            }
        }
        if let Some(ProviderTemplate::AzureOpenAI(azure)) = self.provider_template()
            && azure.endpoint.contains("/openai/deployments/")
        {
            problems.push(Problem::new(
                format!("{template_path}.azureOpenAI.endpoint"),
                quote(&azure.endpoint),
                "the resource endpoint only (https://NAME.openai.azure.com); the deployment goes in `deployment`",
            ));
        }
        let endpoints = [
            ("azureOpenAI", template.azure_open_ai.as_ref().map(|azure| azure.endpoint.as_str())),
            ("openAI", template.open_ai.as_ref().and_then(|open_ai| open_ai.endpoint.as_deref())),
            ("anthropic", template.anthropic.as_ref().and_then(|claude| claude.endpoint.as_deref())),
        ];
        for (name, endpoint) in endpoints {
            if let Some(endpoint) = endpoint
                && plain_http_refused(endpoint)
            {
                problems.push(Problem::new(
                    format!("{template_path}.{name}.endpoint"),
                    format!("{} (plain http:// sends the API key unencrypted)", quote(endpoint)),
                    PLAIN_HTTP_EXPECTED,
                ));
            }
        }
        problems
    }
}

/// What an endpoint refused by [`plain_http_refused`] should be instead.
pub const PLAIN_HTTP_EXPECTED: &str = "an https:// URL; http:// only for loopback (localhost, 127.0.0.0/8, [::1]) or \
     cluster-local names (a single-label Service name such as `proxy`, NAME.NAMESPACE.svc, *.svc.cluster.local, \
     *.cluster.local)";

/// The CRD's CEL rule (on each provider template) that refuses what [`plain_http_refused`] refuses,
/// so a cluster's API server enforces it too: a plain `http://` endpoint's host (after any
/// `user@`, before any port) must be loopback (`127.0.0.0/8`, `[::1]`, `localhost`), under `.svc`
/// or `.cluster.local`, or a single DNS-1035 label. One regular expression over the endpoint
/// itself, whose `maxLength` bounds CEL's cost estimate (the `url()` functions' results have no
/// size, which puts a rule using them far over the API server's budget). `[.]` is a literal dot.
pub const PLAIN_HTTP_CEL_RULE: &str = concat!(
    r"!has(self.endpoint) || !self.endpoint.startsWith('http://') || self.endpoint.matches(",
    r"r'(?is)^http://([^/?#\\]*@)?",
    r"(127([.](25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}|\[(::1|0:0:0:0:0:0:0:1)\]",
    r"|([a-z0-9-]+[.])+(svc|cluster[.]local)|[a-z][a-z0-9-]*)",
    r"[.]?(:[^/?#\\@]*)?([/?#\\].*)?$')",
);

/// The API server's message when [`PLAIN_HTTP_CEL_RULE`] refuses an endpoint.
pub const PLAIN_HTTP_CEL_MESSAGE: &str = "plain http:// sends the API key unencrypted: expected an https:// URL; \
     http:// only for loopback (localhost, 127.0.0.0/8, [::1]) or cluster-local names (a single-label Service name \
     such as `proxy`, NAME.NAMESPACE.svc, *.svc.cluster.local, *.cluster.local)";

/// Whether `endpoint` is a plain `http://` URL to a host outside this machine and the cluster, to
/// which a provider client would send the API key unencrypted. `https://` URLs, and text that is
/// not an http URL at all (the `url` rule reports that), are not refused here.
///
/// Allowed over http: loopback (`localhost`, `127.0.0.0/8`, `[::1]`), names under `.svc`,
/// `.svc.cluster.local` or `.cluster.local`, and single-label names (`http://proxy:8080`): inside a
/// pod those resolve to a Service of its own namespace first, and no public host has a
/// single-label name. A single label must be a DNS-1035 label (starting with a letter), so a
/// number such as `http://134744072` (which URL parsers read as an IPv4 address) is refused.
/// Hosts with any character outside `a-z 0-9 . -` (percent escapes, Unicode) are refused.
pub fn plain_http_refused(endpoint: &str) -> bool {
    let trimmed = endpoint.trim();
    let Some(scheme_end) = trimmed.find("://") else { return false };
    if !trimmed[..scheme_end].eq_ignore_ascii_case("http") {
        return false;
    }
    let rest = &trimmed[scheme_end + 3..];
    let authority = rest.split(['/', '?', '#', '\\']).next().unwrap_or_default();
    // Credentials before the last `@` are no part of the host.
    let host_and_port = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(bracketed) = host_and_port.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((address, _)) => return !address.parse::<std::net::Ipv6Addr>().is_ok_and(|ip| ip.is_loopback()),
            None => return true,
        }
    } else {
        host_and_port.split(':').next().unwrap_or_default()
    };
    !plain_http_host_allowed(host)
}

/// Whether a host name or IPv4 address (as written in a URL, without brackets or port) may be
/// reached over plain http: see [`plain_http_refused`]. IPv6 addresses: only `::1`, written bare.
pub fn plain_http_host_allowed(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    if let Ok(address) = host.parse::<std::net::Ipv4Addr>() {
        return address.is_loopback();
    }
    if let Ok(address) = host.parse::<std::net::Ipv6Addr>() {
        return address.is_loopback();
    }
    let plain = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        });
    if !plain {
        return false;
    }
    if host == "localhost" {
        return true;
    }
    if [".svc", ".svc.cluster.local", ".cluster.local"].iter().any(|suffix| host.ends_with(suffix)) {
        return true;
    }
    // A single DNS-1035 label: a Service of the pod's namespace.
    !host.contains('.') && host.starts_with(|character: char| character.is_ascii_lowercase())
}

fn check_serving_info(info: &ServingInfo, path: &str, problems: &mut Vec<Problem>) {
    if info.model_provider_token.is_some() && info.model_provider_token_secret_ref.is_some() {
        problems.push(Problem::new(
            path,
            "both modelProviderToken and modelProviderTokenSecretRef",
            "at most one of modelProviderToken and modelProviderTokenSecretRef",
        ));
    }
    check_secret(info.model_provider_token.as_ref(), &format!("{path}.modelProviderToken"), problems);
}

/// Checks one quantity: that it parses and is within bounds for its resource. Returns whether it
/// is valid.
fn check_quantity(name: &str, quantity: &ResourceQuantity, path: &str, problems: &mut Vec<Problem>) -> bool {
    let expected = match name {
        "gpu" => "a whole number of GPUs, such as 1",
        "memory" => "a positive Kubernetes quantity of bytes, such as 512Mi or 24Gi",
        _ => "a positive Kubernetes quantity of cores, such as 500m or 8",
    };
    match quantity.amount() {
        Err(error) => {
            problems.push(Problem::new(path, format!("{} ({error})", quote(quantity.as_str())), expected));
            false
        }
        Ok(amount) => {
            let bad = match name {
                "gpu" => amount.as_whole().is_none_or(|count| count < 0),
                _ => !amount.is_positive(),
            };
            if bad {
                problems.push(Problem::new(path, quote(quantity.as_str()), expected));
            }
            !bad
        }
    }
}

fn resource_fields(resources: &Resources) -> [(&'static str, Option<&ResourceQuantity>); 3] {
    [("cpu", resources.cpu.as_ref()), ("memory", resources.memory.as_ref()), ("gpu", resources.gpu.as_ref())]
}

fn check_serving_template(template: &ServingTemplate, path: &str, problems: &mut Vec<Problem>) {
    match (&template.replicas, template.replicas.count()) {
        (_, None) => problems.push(Problem::new(
            format!("{path}.replicas"),
            quote(&template.replicas.to_string()),
            "a whole number of replicas from 0 to 2147483647, such as `replicas: 1`",
        )),
        // A quoted count reads fine here, but the CRD declares an integer (the scale subresource
        // needs one) and the API server refuses a string: one verdict everywhere, so refuse it.
        (Replicas::Text(text), Some(count)) => problems.push(Problem::new(
            format!("{path}.replicas"),
            format!("the string {} (quoted)", quote(text)),
            format!("an integer without quotes, `replicas: {count}` (Kubernetes refuses a string here)"),
        )),
        (Replicas::Number(_), Some(_)) => {}
    }
    check_autoscaling(template, path, problems);
    let mut all_valid = true;
    for (section, resources) in
        [("resourceLimit", &template.resource_limit), ("resourceRequest", &template.resource_request)]
    {
        if let Some(resources) = resources {
            for (name, quantity) in resource_fields(resources) {
                if let Some(quantity) = quantity {
                    all_valid &= check_quantity(name, quantity, &format!("{path}.{section}.{name}"), problems);
                }
            }
        }
    }
    // Comparing is only meaningful once every quantity is valid; otherwise it repeats a problem.
    if let (true, Some(limit), Some(request)) = (all_valid, &template.resource_limit, &template.resource_request) {
        for ((name, limit), (_, request)) in resource_fields(limit).into_iter().zip(resource_fields(request)) {
            if let (Some(limit), Some(request)) = (limit, request)
                && request.compare(limit) == Some(Ordering::Greater)
            {
                problems.push(Problem::new(
                    format!("{path}.resourceRequest.{name}"),
                    format!("{} above resourceLimit.{name} {}", quote(request.as_str()), quote(limit.as_str())),
                    format!("a request at most its limit ({})", limit.as_str()),
                ));
            }
        }
    }
}

/// The autoscaling fields: each in range, `minReplicas <= maxReplicas`, and none without
/// `maxReplicas` (which turns autoscaling on; the others alone would be silently ignored).
/// `replicas` outside `[minReplicas, maxReplicas]` is not a problem: it is the starting count,
/// clamped by the autoscaler (refusing it would also refuse a `kubectl scale` beyond the bounds
/// half-way through, since the API server checks the scale subresource's writes too).
fn check_autoscaling(template: &ServingTemplate, path: &str, problems: &mut Vec<Problem>) {
    let fields = [
        ("minReplicas", template.min_replicas, 0, "a whole number of replicas, 0 or more (0 scales to zero when idle)"),
        ("maxReplicas", template.max_replicas, 1, "a whole number of replicas, 1 or more"),
        (
            "targetRequestsPerReplica",
            template.target_requests_per_replica,
            1,
            "a whole number of requests per replica, 1 or more, such as `targetRequestsPerReplica: 16`",
        ),
        ("scaleDownDelaySeconds", template.scale_down_delay_seconds, 0, "a whole number of seconds, 0 or more"),
    ];
    let mut in_range = true;
    for (name, value, least, expected) in fields {
        if let Some(value) = value
            && value < least
        {
            in_range = false;
            problems.push(Problem::new(format!("{path}.{name}"), value.to_string(), expected));
        }
    }
    if let (true, Some(min), Some(max)) = (in_range, template.min_replicas, template.max_replicas)
        && min > max
    {
        problems.push(Problem::new(
            format!("{path}.minReplicas"),
            format!("{min}, above maxReplicas {max}"),
            format!("at most maxReplicas ({max})"),
        ));
    }
    if template.max_replicas.is_none() {
        let orphans = [
            ("minReplicas", template.min_replicas.is_some()),
            ("targetRequestsPerReplica", template.target_requests_per_replica.is_some()),
            ("scaleDownDelaySeconds", template.scale_down_delay_seconds.is_some()),
        ];
        for (name, set) in orphans {
            if set {
                problems.push(Problem::new(
                    format!("{path}.{name}"),
                    "set without maxReplicas",
                    "maxReplicas too: autoscaling is on only when maxReplicas is set (without it `replicas` is a fixed size)",
                ));
            }
        }
    }
}

/// The problems of a BaseModel or EmbeddingModel spec: its field rules, its serving info and
/// its serving template.
fn hub_model_problems<S: HubModelSpec + Validate>(spec: &S, prefix: &str) -> Vec<Problem> {
    let mut problems = field_rules(spec, prefix);
    let fields = S::FIELD_PREFIX;
    check_serving_info(spec.serving_info(), &format!("{prefix}.{fields}ServingInfo"), &mut problems);
    check_serving_template(spec.serving_template(), &format!("{prefix}.{fields}ServingTemplate"), &mut problems);
    problems
}

/// Adapter names are model ids: unique, and not the base's own name. (Whether an adapter was
/// trained on this base is checked when it is loaded: its matrices must fit the base's weights,
/// an error naming the layer and module; a `base_model_name_or_path` that names another
/// repository is only a warning then, since a GGUF base usually lives in another repository than
/// the checkpoint the adapter names.)
fn check_adapters(spec: &BaseModelSpec, prefix: &str, problems: &mut Vec<Problem>) {
    let Some(adapters) = &spec.base_model_serving_info.adapters else { return };
    for (index, adapter) in adapters.iter().enumerate() {
        let path = format!("{prefix}.baseModelServingInfo.adapters[{index}].name");
        if adapter.name == spec.base_model_name {
            problems.push(Problem::new(path, quote(&adapter.name), "a name other than baseModelName"));
        } else if let Some(first) = adapters[..index].iter().position(|other| other.name == adapter.name) {
            problems.push(Problem::new(
                path,
                format!("{} again", quote(&adapter.name)),
                format!("a name unique among the adapters (adapters[{first}] has it)"),
            ));
        }
    }
}

impl Check for BaseModelSpec {
    fn problems(&self, prefix: &str) -> Vec<Problem> {
        let mut problems = hub_model_problems(self, prefix);
        check_adapters(self, prefix, &mut problems);
        problems
    }
}

impl Check for EmbeddingModelSpec {
    fn problems(&self, prefix: &str) -> Vec<Problem> {
        let mut problems = hub_model_problems(self, prefix);
        if self.embedding_model_serving_info.adapters.is_some() {
            problems.push(Problem::new(
                format!("{prefix}.embeddingModelServingInfo.adapters"),
                "a list of adapters",
                "no adapters (LoRA adapters are served over BaseModels only)",
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_names_become_yaml_names() {
        assert_eq!(yaml_field_name("base_model_serving_template"), "baseModelServingTemplate");
        assert_eq!(yaml_field_name("hf_model_id"), "hfModelId");
        assert_eq!(yaml_field_name("azure_open_ai"), "azureOpenAI");
        assert_eq!(yaml_field_name("apikey"), "apikey");
        assert_eq!(yaml_field_name("hfModelId"), "hfModelId");
    }

    #[test]
    fn secrets_are_never_described() {
        let value = serde_json::Value::String("sk-123".into());
        assert_eq!(describe_found("spec.x.apikey", Some(&value)), "a secret value (not shown)");
        assert_eq!(describe_found("spec.x.model", Some(&value)), "\"sk-123\"");
    }

    #[test]
    fn long_values_are_cut() {
        let long = "x".repeat(200);
        assert!(quote(&long).chars().count() < 90);
    }
}

#[cfg(test)]
mod plain_http_tests {
    use super::*;

    /// Endpoints a provider client may call over plain http, and endpoints it must refuse.
    const PLAIN_HTTP_ALLOWED: [&str; 12] = [
        "https://api.openai.com/v1",
        "http://127.0.0.1:8080/v1",
        "http://127.8.9.10",
        "HTTP://LOCALHOST:1234",
        "http://localhost./v1",
        "http://[::1]:8000/v1",
        "http://proxy:8080",
        "http://vllm.models.svc:8000/v1",
        "http://vllm.models.svc.cluster.local/v1",
        "http://gateway.cluster.local",
        "http://user:pass@127.0.0.1:9/x",
        "not a url",
    ];
    const PLAIN_HTTP_REFUSED: [&str; 15] = [
        "http://api.openai.com/v1",
        "http://10.0.0.5:8000/v1",
        "http://192.168.1.20",
        "http://[2001:db8::1]:80/",
        "http://[::ffff:8.8.8.8]/",
        "http://134744072/v1",
        "http://0x08080808/",
        "http://evil.com%2esvc/",
        "http://127.0.0.1@evil.com/",
        "http://127.0.0.1:80@evil.com/",
        "http://evil.com\\@127.0.0.1/",
        "http://svc.evil.com",
        "http://127.0.0.256/",
        "http://[::1",
        "http://",
    ];

    #[test]
    fn plain_http_is_refused_outside_loopback_and_the_cluster() {
        for allowed in PLAIN_HTTP_ALLOWED {
            assert!(!plain_http_refused(allowed), "{allowed} should be allowed");
        }
        for refused in PLAIN_HTTP_REFUSED {
            assert!(plain_http_refused(refused), "{refused} should be refused");
        }
    }

    /// The CRD's CEL rule decides as [`plain_http_refused`] does: its regular expression (RE2, as
    /// the API server runs it; the `regex` crate reads this one the same way) on every endpoint
    /// of the lists that starts with `http://` (the schema's pattern refuses other spellings).
    #[test]
    fn the_crd_rule_refuses_what_validation_refuses() {
        let rule = PLAIN_HTTP_CEL_RULE;
        let start = rule.find("matches(r'").expect("a raw-string regex") + "matches(r'".len();
        let end = rule.rfind("')").expect("its end");
        let expression = regex::Regex::new(&rule[start..end]).expect("the rule's regex compiles");
        let endpoints = PLAIN_HTTP_ALLOWED.iter().chain(&PLAIN_HTTP_REFUSED);
        for endpoint in endpoints.filter(|endpoint| endpoint.starts_with("http://")) {
            assert_eq!(!expression.is_match(endpoint), plain_http_refused(endpoint), "{endpoint}");
        }
    }
}

#[cfg(test)]
mod autoscaling_tests {
    use super::*;

    fn problems_of(template: &ServingTemplate) -> Vec<String> {
        let mut problems = Vec::new();
        check_autoscaling(template, "spec.t", &mut problems);
        problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn bounds_are_checked_and_defaulted() {
        let fixed = ServingTemplate::default();
        assert_eq!(fixed.autoscaling(), None);
        assert!(problems_of(&fixed).is_empty());

        let on = ServingTemplate { max_replicas: Some(4), ..ServingTemplate::default() };
        let bounds = on.autoscaling().expect("on with maxReplicas");
        assert_eq!((bounds.min_replicas, bounds.max_replicas, bounds.target_requests_per_replica), (1, 4, 16));
        assert_eq!(bounds.scale_down_delay, std::time::Duration::from_secs(30));
        assert!(problems_of(&on).is_empty());

        let inverted = ServingTemplate { min_replicas: Some(5), ..on.clone() };
        assert_eq!(
            problems_of(&inverted),
            ["spec.t.minReplicas: found 5, above maxReplicas 4, expected at most maxReplicas (4)"]
        );
        let negative = ServingTemplate { min_replicas: Some(-1), scale_down_delay_seconds: Some(-3), ..on.clone() };
        let found = problems_of(&negative);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("spec.t.minReplicas: found -1"), "{found:?}");
        assert!(found[1].starts_with("spec.t.scaleDownDelaySeconds: found -3"), "{found:?}");
        let orphan = ServingTemplate { target_requests_per_replica: Some(2), ..ServingTemplate::default() };
        let found = problems_of(&orphan);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("targetRequestsPerReplica: found set without maxReplicas"), "{found:?}");
    }
}

//! The Hugging Face PEFT LoRA adapter format, one module for both sides: training writes it
//! (nstream-tune) and serving will read it, so neither parses it on its own.
//!
//! An adapter is a folder with `adapter_config.json` ([`LoraConfig`]: `peft_type: LORA`, `r`,
//! `lora_alpha`, `target_modules`, `task_type: CAUSAL_LM`...) and `adapter_model.safetensors`
//! whose tensors are named as `peft` saves them for a Llama-family causal LM:
//! `base_model.model.model.layers.{N}.self_attn.q_proj.lora_A.weight` (shape `(r, in)`) and
//! `...lora_B.weight` (shape `(out, r)`). The update of a target weight `W` (shape `(out, in)`)
//! is `W + scale * B A` with `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA).
//!
//! This crate has no tensor library: tensors are plain f32 arrays ([`Tensor`]), so that a serving
//! crate can take the format without taking a training stack.

mod error;
pub mod tensors;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use error::{Error, Result};
pub use tensors::Tensor;

/// The adapter's configuration file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The file `nstream finetune` writes beside an adapter naming the exact base it was trained on.
pub const BASE_RECORD_FILE: &str = "base_model.json";

/// `base_model.json`: the base an adapter was trained on, as `nstream finetune` records it
/// (nstream-tune's `Provenance`). Serving prefers it to `base_model_name_or_path` because it
/// also names the GGUF file of a GGUF base.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BaseRecord {
    /// The Hugging Face repository (`org/name`), when known.
    #[serde(default)]
    pub repo_id: Option<String>,
    /// The revision asked for (`main` when none).
    #[serde(default)]
    pub revision: Option<String>,
    /// `safetensors` or `gguf`.
    #[serde(default)]
    pub format: String,
    /// The weight files, relative to the repository (the GGUF file for a GGUF base).
    #[serde(default)]
    pub files: Vec<String>,
}

impl BaseRecord {
    /// Reads `folder/base_model.json`; `None` when the folder has none.
    pub fn read(folder: &Path) -> Result<Option<Self>> {
        let path = folder.join(BASE_RECORD_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|cause| error::io(&path, cause))?;
        let record = serde_json::from_str(&text)
            .map_err(|error| error::invalid(&path, format!("not a base model record: {error}")))?;
        Ok(Some(record))
    }

    /// The GGUF file of a GGUF base.
    pub fn gguf_file(&self) -> Option<&str> {
        (self.format == "gguf").then(|| self.files.first().map(String::as_str)).flatten()
    }
}

/// A linear layer of a Llama-family block that LoRA can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
}

impl Module {
    /// Every module, in block order.
    pub const ALL: [Module; 7] = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
    ];

    /// The name PEFT's `target_modules` uses (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Module::QProj => "q_proj",
            Module::KProj => "k_proj",
            Module::VProj => "v_proj",
            Module::OProj => "o_proj",
            Module::GateProj => "gate_proj",
            Module::UpProj => "up_proj",
            Module::DownProj => "down_proj",
        }
    }

    /// The path inside a block (`self_attn.q_proj`), as in the Hugging Face weight names.
    pub fn path(self) -> &'static str {
        match self {
            Module::QProj => "self_attn.q_proj",
            Module::KProj => "self_attn.k_proj",
            Module::VProj => "self_attn.v_proj",
            Module::OProj => "self_attn.o_proj",
            Module::GateProj => "mlp.gate_proj",
            Module::UpProj => "mlp.up_proj",
            Module::DownProj => "mlp.down_proj",
        }
    }

    /// The module named `name` (`q_proj`), if it is one.
    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|module| module.name() == name)
    }

    /// Parses a list of module names (`q_proj,v_proj`, or `all-linear` for every one), naming
    /// the valid ones when a name is unknown.
    pub fn parse_list(names: &[String]) -> std::result::Result<Vec<Module>, String> {
        let mut modules = Vec::new();
        for name in names.iter().map(|name| name.trim()).filter(|name| !name.is_empty()) {
            if name == "all-linear" {
                return Ok(Module::ALL.to_vec());
            }
            let module = Module::from_name(name).ok_or_else(|| {
                format!(
                    "unknown target module `{name}` (expected some of {} or all-linear)",
                    Module::ALL.map(Module::name).join(", ")
                )
            })?;
            if !modules.contains(&module) {
                modules.push(module);
            }
        }
        if modules.is_empty() {
            return Err("no target module given".into());
        }
        modules.sort();
        Ok(modules)
    }
}

/// Which of the two LoRA matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `lora_A`, shape `(r, in)`.
    A,
    /// `lora_B`, shape `(out, r)`.
    B,
}

/// The PEFT name of a LoRA tensor of a Llama-family causal LM:
/// `base_model.model.model.layers.{layer}.{path}.lora_{A|B}.weight`.
pub fn tensor_name(layer: usize, module: Module, part: Part) -> String {
    let part = match part {
        Part::A => "A",
        Part::B => "B",
    };
    format!("base_model.model.model.layers.{layer}.{}.lora_{part}.weight", module.path())
}

/// Splits a PEFT tensor name back into `(layer, module, part)`.
pub fn parse_tensor_name(name: &str) -> Option<(usize, Module, Part)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let mut rest = rest.strip_suffix(".weight")?;
    // `peft` may keep the adapter name in the key (`lora_A.default.weight`) in some versions.
    if let Some(without) = rest.strip_suffix(".default") {
        rest = without;
    }
    let (path, part) = rest.rsplit_once('.')?;
    let part = match part {
        "lora_A" => Part::A,
        "lora_B" => Part::B,
        _ => return None,
    };
    let module = Module::ALL.into_iter().find(|module| module.path() == path)?;
    Some((layer, module, part))
}

/// `adapter_config.json` of a LoRA adapter, with PEFT's field names. Fields nstream does not use
/// keep PEFT's defaults so that `peft` loads the file unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LoraConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM` here.
    pub task_type: String,
    /// The rank.
    pub r: usize,
    /// The scale numerator.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// The adapted modules (`q_proj`...).
    pub target_modules: Vec<String>,
    /// `none`: biases are not trained.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// rsLoRA: scale `lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The Hugging Face repository of the base model.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision, when not `main`.
    #[serde(default)]
    pub revision: Option<String>,
    /// PEFT's flag for adapters loaded for inference.
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    /// Weights stored `(in, out)` (GPT-2's Conv1D); always false for Llama.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// PEFT's initialisation (`true`: Kaiming-uniform A, zero B).
    #[serde(default = "default_true")]
    pub init_lora_weights: bool,
    /// Modules trained in full beside the adapter (none here).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// DoRA (not implemented here: must be false).
    #[serde(default)]
    pub use_dora: bool,
}

fn default_bias() -> String {
    "none".into()
}

fn default_true() -> bool {
    true
}

impl LoraConfig {
    /// A configuration for a causal LM with rank `r`, `lora_alpha` and the target modules.
    pub fn new(r: usize, lora_alpha: f64, target_modules: &[Module]) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: target_modules.iter().map(|module| module.name().to_owned()).collect(),
            bias: default_bias(),
            use_rslora: false,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: true,
            fan_in_fan_out: false,
            init_lora_weights: true,
            modules_to_save: None,
            use_dora: false,
        }
    }

    /// Sets the dropout on the adapter's input during training.
    pub fn with_dropout(mut self, lora_dropout: f64) -> Self {
        self.lora_dropout = lora_dropout;
        self
    }

    /// Scales by `lora_alpha / sqrt(r)` (rsLoRA) instead of `lora_alpha / r`.
    pub fn with_rslora(mut self, use_rslora: bool) -> Self {
        self.use_rslora = use_rslora;
        self
    }

    /// Records the base model's repository and its revision (`None`: `main`).
    pub fn with_base_model(mut self, repo_id: impl Into<String>, revision: Option<String>) -> Self {
        self.base_model_name_or_path = Some(repo_id.into());
        self.revision = revision;
        self
    }

    /// The factor of `B A`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        let rank = self.r.max(1) as f64;
        if self.use_rslora { self.lora_alpha / rank.sqrt() } else { self.lora_alpha / rank }
    }

    /// The target modules this crate knows (an error names an unknown one).
    pub fn modules(&self) -> std::result::Result<Vec<Module>, String> {
        Module::parse_list(&self.target_modules)
    }
}

/// The two matrices of one adapted module.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// `lora_A`, shape `(r, in)`.
    pub a: Tensor,
    /// `lora_B`, shape `(out, r)`.
    pub b: Tensor,
}

/// A LoRA adapter: its configuration and its matrices by `(layer, module)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// `adapter_config.json`.
    pub config: LoraConfig,
    /// The matrices.
    pub pairs: BTreeMap<(usize, Module), LoraPair>,
}

impl Adapter {
    /// The tensors with their PEFT names.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut tensors = BTreeMap::new();
        for (&(layer, module), pair) in &self.pairs {
            tensors.insert(tensor_name(layer, module, Part::A), pair.a.clone());
            tensors.insert(tensor_name(layer, module, Part::B), pair.b.clone());
        }
        tensors
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `folder` (each file
    /// atomically).
    pub fn write(&self, folder: &Path) -> Result<()> {
        let config_path = folder.join(CONFIG_FILE);
        let json = serde_json::to_string_pretty(&self.config)
            .map_err(|error| error::invalid(&config_path, format!("cannot serialise: {error}")))?;
        let metadata = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
        tensors::write(&folder.join(WEIGHTS_FILE), &self.named_tensors(), Some(metadata))?;
        tensors::write_atomically(&config_path, format!("{json}\n").as_bytes())
    }

    /// Reads `adapter_config.json` alone, checking that it is a LoRA adapter this crate can
    /// apply.
    pub fn read_config(folder: &Path) -> Result<LoraConfig> {
        let config_path = folder.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|cause| error::io(&config_path, cause))?;
        let config: LoraConfig = serde_json::from_str(&text)
            .map_err(|error| error::invalid(&config_path, format!("not a LoRA adapter config: {error}")))?;
        let unsupported = |message: String| Error::Unsupported { path: config_path.display().to_string(), message };
        if config.peft_type != "LORA" {
            return Err(unsupported(format!("peft_type {:?} (only LORA)", config.peft_type)));
        }
        if config.use_dora || config.fan_in_fan_out || config.bias != "none" {
            return Err(unsupported("DoRA, fan_in_fan_out or trained biases".into()));
        }
        if config.r == 0 {
            return Err(error::invalid(&config_path, "r must be at least 1"));
        }
        config.modules().map_err(|message| error::invalid(&config_path, message))?;
        Ok(config)
    }

    /// Reads an adapter folder, checking that it is a LoRA adapter this crate can apply and that
    /// every pair has matching ranks.
    pub fn read(folder: &Path) -> Result<Self> {
        let config = Self::read_config(folder)?;
        let weights_path = folder.join(WEIGHTS_FILE);
        let (tensors, _) = tensors::read(&weights_path)?;
        let mut halves: BTreeMap<(usize, Module), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, tensor) in tensors {
            let (layer, module, part) = parse_tensor_name(&name)
                .ok_or_else(|| error::invalid(&weights_path, format!("unexpected tensor `{name}`")))?;
            if tensor.shape.len() != 2 {
                return Err(error::invalid(&weights_path, format!("tensor `{name}` is not a matrix")));
            }
            let entry = halves.entry((layer, module)).or_default();
            match part {
                Part::A => entry.0 = Some(tensor),
                Part::B => entry.1 = Some(tensor),
            }
        }
        let mut pairs = BTreeMap::new();
        for ((layer, module), halves) in halves {
            let (Some(a), Some(b)) = halves else {
                return Err(error::invalid(
                    &weights_path,
                    format!("layer {layer} {} lacks lora_A or lora_B", module.name()),
                ));
            };
            if a.shape[0] != config.r || b.shape[1] != config.r {
                return Err(error::invalid(
                    &weights_path,
                    format!(
                        "layer {layer} {}: shapes {:?} and {:?} do not have rank {}",
                        module.name(),
                        a.shape,
                        b.shape,
                        config.r
                    ),
                ));
            }
            pairs.insert((layer, module), LoraPair { a, b });
        }
        Ok(Self { config, pairs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_peft_s_and_parse_back() {
        let name = tensor_name(3, Module::QProj, Part::A);
        assert_eq!(name, "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight");
        assert_eq!(parse_tensor_name(&name), Some((3, Module::QProj, Part::A)));
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.11.mlp.down_proj.lora_B.weight"),
            Some((11, Module::DownProj, Part::B))
        );
        assert_eq!(parse_tensor_name("model.layers.0.mlp.down_proj.weight"), None);
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.2.self_attn.v_proj.lora_B.default.weight"),
            Some((2, Module::VProj, Part::B))
        );
    }

    #[test]
    fn module_lists_parse_and_unknown_names_are_refused() {
        let names = ["v_proj".to_owned(), " q_proj".to_owned(), "q_proj".to_owned()];
        assert_eq!(Module::parse_list(&names).unwrap(), vec![Module::QProj, Module::VProj]);
        assert_eq!(Module::parse_list(&["all-linear".to_owned()]).unwrap().len(), 7);
        let error = Module::parse_list(&["qkv_proj".to_owned()]).unwrap_err();
        assert!(error.contains("unknown target module `qkv_proj`") && error.contains("down_proj"), "{error}");
        assert!(Module::parse_list(&[]).is_err());
    }

    #[test]
    fn scale_is_alpha_over_r_or_over_sqrt_r() {
        let mut config = LoraConfig::new(16, 32.0, &[Module::QProj]);
        assert_eq!(config.scale(), 2.0);
        config.use_rslora = true;
        assert_eq!(config.scale(), 8.0);
    }

    #[test]
    fn an_adapter_round_trips_and_its_config_has_peft_s_fields() {
        let folder = tempfile::tempdir().unwrap();
        let mut config = LoraConfig::new(2, 4.0, &[Module::QProj, Module::DownProj]);
        config.base_model_name_or_path = Some("org/model".into());
        let pair = |out: usize, input: usize| LoraPair {
            a: Tensor::new(vec![2, input], (0..2 * input).map(|value| value as f32 * 0.5).collect()),
            b: Tensor::new(vec![out, 2], (0..2 * out).map(|value| -(value as f32)).collect()),
        };
        let mut pairs = BTreeMap::new();
        pairs.insert((0, Module::QProj), pair(4, 4));
        pairs.insert((1, Module::DownProj), pair(4, 8));
        let adapter = Adapter { config, pairs };
        adapter.write(folder.path()).unwrap();
        assert_eq!(Adapter::read(folder.path()).unwrap(), adapter);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.path().join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["task_type"], "CAUSAL_LM");
        assert_eq!(json["bias"], "none");
        assert_eq!(json["target_modules"], serde_json::json!(["q_proj", "down_proj"]));
        assert_eq!(json["base_model_name_or_path"], "org/model");
    }

    #[test]
    fn a_config_of_another_method_is_refused() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(
            folder.path().join(CONFIG_FILE),
            r#"{"peft_type":"IA3","task_type":"CAUSAL_LM","r":1,"lora_alpha":1,"target_modules":["q_proj"]}"#,
        )
        .unwrap();
        let error = Adapter::read(folder.path()).unwrap_err().to_string();
        assert!(error.contains("peft_type \"IA3\""), "{error}");
    }
}

//! The model's description: `config.json` (BERT) and the sentence-transformers files
//! (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`), plus the
//! `model_max_length` of `tokenizer_config.json`, where sentence-transformers 6 keeps the maximum
//! length.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::pooling::Pooling;

/// The activation of the feed-forward layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// GELU with erf, as PyTorch's default.
    Gelu,
    /// GELU with the tanh approximation.
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluApproximate,
    /// ReLU.
    Relu,
}

/// The fields of a BERT `config.json` that the encoder needs.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    /// `bert` for the models supported.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size (token ids must be below it).
    pub vocab_size: usize,
    /// Width of the hidden states (the embedding dimension).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub hidden_act: HiddenAct,
    /// Size of the position table: the longest input the weights allow.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Only `absolute` is supported.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Parses and checks a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|error| invalid("config.json", error))?;
        if let Some(model_type) = &config.model_type
            && model_type != "bert"
        {
            return Err(Error::Unsupported(format!(
                "model_type {model_type:?}: nstream-embed runs BERT-family encoders (model_type \"bert\")"
            )));
        }
        if let Some(kind) = &config.position_embedding_type
            && kind != "absolute"
        {
            return Err(Error::Unsupported(format!("position_embedding_type {kind:?}")));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(Error::InvalidModel {
                file: "config.json".into(),
                message: format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    config.hidden_size, config.num_attention_heads
                ),
            });
        }
        if config.max_position_embeddings < 2 || config.type_vocab_size == 0 {
            return Err(Error::InvalidModel {
                file: "config.json".into(),
                message: "max_position_embeddings must be at least 2 and type_vocab_size at least 1".into(),
            });
        }
        Ok(config)
    }
}

/// How the sentence-transformers pipeline turns token states into one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentenceLayout {
    /// The pooling mode.
    pub pooling: Pooling,
    /// Whether a `Normalize` module follows pooling (unit-length vectors).
    pub normalize: bool,
    /// The longest input in tokens, special tokens included; longer inputs are truncated.
    pub max_seq_length: usize,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    /// sentence-transformers 6 writes one key: a mode name, or a list of them to concatenate.
    #[serde(default)]
    pooling_mode: Option<serde_json::Value>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// The texts of the optional sentence-transformers and tokenizer files (`None`: the file is absent).
#[derive(Clone, Copy, Debug, Default)]
pub struct SentenceFiles<'a> {
    /// `modules.json`.
    pub modules: Option<&'a str>,
    /// The pooling module's `config.json` (`1_Pooling/config.json` normally).
    pub pooling: Option<&'a str>,
    /// `sentence_bert_config.json`.
    pub sentence_bert: Option<&'a str>,
    /// `tokenizer_config.json` (its `model_max_length` is the maximum length when
    /// `sentence_bert_config.json` gives none, as sentence-transformers 6 saves models).
    pub tokenizer_config: Option<&'a str>,
}

impl SentenceLayout {
    /// The pooling module's folder named by `modules.json` (`1_Pooling` normally), if any.
    pub fn pooling_path(modules_json: Option<&str>) -> Result<Option<String>> {
        let Some(text) = modules_json else { return Ok(None) };
        let modules: Vec<Module> = serde_json::from_str(text).map_err(|error| invalid("modules.json", error))?;
        Ok(modules.into_iter().find(|m| m.kind.ends_with(".Pooling")).map(|m| m.path))
    }

    /// Reads the layout from the texts of the sentence-transformers files (each optional). Without
    /// a pooling config the pooling is mean, as sentence-transformers does for a plain transformers
    /// model. The maximum length is `sentence_bert_config.json`'s `max_seq_length`, else
    /// `tokenizer_config.json`'s `model_max_length`, capped by `max_positions` (what the weights
    /// allow).
    pub fn from_files(files: &SentenceFiles<'_>, max_positions: usize) -> Result<Self> {
        let normalize = match files.modules {
            Some(text) => {
                let modules: Vec<Module> =
                    serde_json::from_str(text).map_err(|error| invalid("modules.json", error))?;
                if let Some(other) = modules.iter().find(|m| {
                    !m.kind.ends_with(".Transformer")
                        && !m.kind.ends_with(".Pooling")
                        && !m.kind.ends_with(".Normalize")
                }) {
                    return Err(Error::Unsupported(format!(
                        "sentence-transformers module {} (only Transformer, Pooling and Normalize are supported)",
                        other.kind
                    )));
                }
                modules.iter().any(|m| m.kind.ends_with(".Normalize"))
            }
            None => false,
        };
        let pooling = match files.pooling {
            Some(text) => {
                let config: PoolingConfig =
                    serde_json::from_str(text).map_err(|error| invalid("1_Pooling/config.json", error))?;
                pooling_mode(&config)?
            }
            None => Pooling::Mean,
        };
        let configured = match files.sentence_bert {
            Some(text) => {
                serde_json::from_str::<SentenceBertConfig>(text)
                    .map_err(|error| invalid("sentence_bert_config.json", error))?
                    .max_seq_length
            }
            None => None,
        };
        let configured = match (configured, files.tokenizer_config) {
            (None, Some(text)) => tokenizer_max_length(text)?,
            (configured, _) => configured,
        };
        let max_seq_length = configured.unwrap_or(max_positions).min(max_positions);
        if max_seq_length < 2 {
            return Err(Error::InvalidModel {
                file: "sentence_bert_config.json".into(),
                message: format!("max_seq_length {max_seq_length} leaves no room for a token"),
            });
        }
        Ok(Self { pooling, normalize, max_seq_length })
    }
}

/// `tokenizer_config.json`'s `model_max_length`; `None` when absent or when it is transformers'
/// "no limit" sentinel (about 1e30, which no integer type holds).
fn tokenizer_max_length(text: &str) -> Result<Option<usize>> {
    let config: serde_json::Value =
        serde_json::from_str(text).map_err(|error| invalid("tokenizer_config.json", error))?;
    Ok(config.get("model_max_length").and_then(serde_json::Value::as_u64).and_then(|n| usize::try_from(n).ok()))
}

/// A mode name of sentence-transformers 6's `pooling_mode`.
fn named_pooling_mode(name: &str) -> Result<Pooling> {
    match name {
        "cls" => Ok(Pooling::Cls),
        "mean" => Ok(Pooling::Mean),
        "max" => Ok(Pooling::Max),
        "mean_sqrt_len_tokens" => Ok(Pooling::MeanSqrtLen),
        "lasttoken" => Ok(Pooling::LastToken),
        "weightedmean" => Err(Error::Unsupported("weighted-mean pooling".into())),
        other => Err(Error::InvalidModel {
            file: "1_Pooling/config.json".into(),
            message: format!(
                "pooling_mode {other:?} is not one of cls, mean, max, mean_sqrt_len_tokens, weightedmean, lasttoken"
            ),
        }),
    }
}

fn pooling_mode(config: &PoolingConfig) -> Result<Pooling> {
    match &config.pooling_mode {
        None => {}
        Some(serde_json::Value::String(name)) => return named_pooling_mode(name),
        Some(serde_json::Value::Array(names)) if names.len() == 1 && names[0].is_string() => {
            return named_pooling_mode(names[0].as_str().unwrap_or_default());
        }
        Some(serde_json::Value::Array(names)) if names.len() > 1 => {
            return Err(Error::Unsupported(format!("several pooling modes concatenated ({names:?})")));
        }
        Some(other) => {
            return Err(Error::InvalidModel {
                file: "1_Pooling/config.json".into(),
                message: format!("pooling_mode must be a mode name or a list of one, not {other}"),
            });
        }
    }
    let modes = [
        (config.pooling_mode_cls_token, Pooling::Cls),
        (config.pooling_mode_mean_tokens, Pooling::Mean),
        (config.pooling_mode_max_tokens, Pooling::Max),
        (config.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
        (config.pooling_mode_lasttoken, Pooling::LastToken),
    ];
    if config.pooling_mode_weightedmean_tokens {
        return Err(Error::Unsupported("weighted-mean pooling".into()));
    }
    let chosen: Vec<Pooling> = modes.iter().filter(|(on, _)| *on).map(|(_, mode)| *mode).collect();
    match chosen.as_slice() {
        [mode] => Ok(*mode),
        [] => Err(Error::InvalidModel {
            file: "1_Pooling/config.json".into(),
            message: "no pooling mode is enabled".into(),
        }),
        _ => Err(Error::Unsupported(format!("several pooling modes concatenated ({chosen:?})"))),
    }
}

fn invalid(file: &str, error: impl std::fmt::Display) -> Error {
    Error::InvalidModel { file: file.to_owned(), message: error.to_string() }
}

/// Reads a whole text file, with the repo path in the error.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|cause| Error::Io { path: path.display().to_string(), cause })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES: &str = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
        {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
        {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#;

    fn pooling(field: &str) -> String {
        format!(r#"{{"word_embedding_dimension":384,"{field}":true}}"#)
    }

    #[test]
    fn minilm_layout() {
        let pooling = pooling("pooling_mode_mean_tokens");
        let files = SentenceFiles {
            modules: Some(MODULES),
            pooling: Some(&pooling),
            sentence_bert: Some(r#"{"max_seq_length":256,"do_lower_case":false}"#),
            tokenizer_config: Some(r#"{"model_max_length":512}"#),
        };
        let layout = SentenceLayout::from_files(&files, 512).expect("layout");
        assert_eq!(layout, SentenceLayout { pooling: Pooling::Mean, normalize: true, max_seq_length: 256 });
        assert_eq!(SentenceLayout::pooling_path(Some(MODULES)).expect("path").as_deref(), Some("1_Pooling"));
    }

    #[test]
    fn each_pooling_mode() {
        for (field, mode) in [
            ("pooling_mode_cls_token", Pooling::Cls),
            ("pooling_mode_max_tokens", Pooling::Max),
            ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
            ("pooling_mode_lasttoken", Pooling::LastToken),
        ] {
            let pooling = pooling(field);
            let files = SentenceFiles { pooling: Some(&pooling), ..SentenceFiles::default() };
            let layout = SentenceLayout::from_files(&files, 512).expect("layout");
            assert_eq!(layout.pooling, mode);
            assert!(!layout.normalize);
            assert_eq!(layout.max_seq_length, 512);
        }
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let with_pooling = |pooling| SentenceFiles { pooling: Some(pooling), ..SentenceFiles::default() };
        let with_modules = |modules| SentenceFiles { modules: Some(modules), ..SentenceFiles::default() };
        assert!(SentenceLayout::from_files(&with_pooling("{}"), 512).is_err());
        let both = r#"{"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":true}"#;
        assert!(SentenceLayout::from_files(&with_pooling(both), 512).is_err());
        let dense = r#"[{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#;
        assert!(SentenceLayout::from_files(&with_modules(dense), 512).is_err());
        assert!(SentenceLayout::from_files(&with_modules("not json"), 512).is_err());
        for bad in [r#"{"pooling_mode":"median"}"#, r#"{"pooling_mode":["cls","mean"]}"#, r#"{"pooling_mode":3}"#] {
            let error = SentenceLayout::from_files(&with_pooling(bad), 512).expect_err(bad);
            assert!(error.to_string().contains("pooling"), "{error}");
        }
        assert!(matches!(
            SentenceLayout::from_files(&with_pooling(r#"{"pooling_mode":"weightedmean"}"#), 512),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn sentence_transformers_6_pooling_mode_names() {
        for (name, mode) in [
            ("cls", Pooling::Cls),
            ("mean", Pooling::Mean),
            ("max", Pooling::Max),
            ("mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
            ("lasttoken", Pooling::LastToken),
        ] {
            for text in [
                format!(r#"{{"embedding_dimension":32,"pooling_mode":"{name}","include_prompt":true}}"#),
                format!(r#"{{"pooling_mode":["{name}"]}}"#),
            ] {
                let files = SentenceFiles { pooling: Some(&text), ..SentenceFiles::default() };
                assert_eq!(SentenceLayout::from_files(&files, 512).expect("layout").pooling, mode, "{text}");
            }
        }
    }

    #[test]
    fn max_length_is_capped_by_positions() {
        let files = SentenceFiles { sentence_bert: Some(r#"{"max_seq_length":8192}"#), ..SentenceFiles::default() };
        assert_eq!(SentenceLayout::from_files(&files, 512).expect("layout").max_seq_length, 512);
    }

    #[test]
    fn max_length_falls_back_to_the_tokenizer_config() {
        // sentence-transformers 6 writes no max_seq_length; the tokenizer's model_max_length holds it.
        let modern = SentenceFiles {
            sentence_bert: Some(r#"{"transformer_task":"feature-extraction"}"#),
            tokenizer_config: Some(r#"{"model_max_length":64}"#),
            ..SentenceFiles::default()
        };
        assert_eq!(SentenceLayout::from_files(&modern, 512).expect("layout").max_seq_length, 64);
        // sentence_bert_config.json wins when it has a value; transformers' 1e30 sentinel means none.
        let both = SentenceFiles { sentence_bert: Some(r#"{"max_seq_length":128}"#), ..modern };
        assert_eq!(SentenceLayout::from_files(&both, 512).expect("layout").max_seq_length, 128);
        let sentinel =
            SentenceFiles { tokenizer_config: Some(r#"{"model_max_length":1e30}"#), ..SentenceFiles::default() };
        assert_eq!(SentenceLayout::from_files(&sentinel, 512).expect("layout").max_seq_length, 512);
    }

    #[test]
    fn bert_config_checks() {
        let good = r#"{"model_type":"bert","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":16,"hidden_act":"gelu","max_position_embeddings":16}"#;
        assert!(BertConfig::from_json(good).is_ok());
        assert!(BertConfig::from_json(&good.replace("\"bert\"", "\"llama\"")).is_err());
        assert!(
            BertConfig::from_json(&good.replace("\"num_attention_heads\":2", "\"num_attention_heads\":3")).is_err()
        );
        assert!(BertConfig::from_json(&good.replace("\"gelu\"", "\"gelu_new\"")).is_ok());
        assert!(BertConfig::from_json("[]").is_err());
    }
}

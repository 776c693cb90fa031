//! The model's description: `config.json` (BERT) and the sentence-transformers files
//! (`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`).

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

impl SentenceLayout {
    /// The pooling module's folder named by `modules.json` (`1_Pooling` normally), if any.
    pub fn pooling_path(modules_json: Option<&str>) -> Result<Option<String>> {
        let Some(text) = modules_json else { return Ok(None) };
        let modules: Vec<Module> = serde_json::from_str(text).map_err(|error| invalid("modules.json", error))?;
        Ok(modules.into_iter().find(|m| m.kind.ends_with(".Pooling")).map(|m| m.path))
    }

    /// Reads the layout from the texts of `modules.json`, the pooling config and
    /// `sentence_bert_config.json` (each optional). Without a pooling config the pooling is mean,
    /// as sentence-transformers does for a plain transformers model. `max_positions` caps the length.
    pub fn from_files(
        modules_json: Option<&str>,
        pooling_json: Option<&str>,
        sentence_bert_json: Option<&str>,
        max_positions: usize,
    ) -> Result<Self> {
        let normalize = match modules_json {
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
        let pooling = match pooling_json {
            Some(text) => {
                let config: PoolingConfig =
                    serde_json::from_str(text).map_err(|error| invalid("1_Pooling/config.json", error))?;
                pooling_mode(&config)?
            }
            None => Pooling::Mean,
        };
        let configured = match sentence_bert_json {
            Some(text) => {
                serde_json::from_str::<SentenceBertConfig>(text)
                    .map_err(|error| invalid("sentence_bert_config.json", error))?
                    .max_seq_length
            }
            None => None,
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

fn pooling_mode(config: &PoolingConfig) -> Result<Pooling> {
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
        let layout = SentenceLayout::from_files(
            Some(MODULES),
            Some(&pooling("pooling_mode_mean_tokens")),
            Some(r#"{"max_seq_length":256,"do_lower_case":false}"#),
            512,
        )
        .expect("layout");
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
            let layout = SentenceLayout::from_files(None, Some(&pooling(field)), None, 512).expect("layout");
            assert_eq!(layout.pooling, mode);
            assert!(!layout.normalize);
            assert_eq!(layout.max_seq_length, 512);
        }
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        assert!(SentenceLayout::from_files(None, Some("{}"), None, 512).is_err());
        let both = r#"{"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":true}"#;
        assert!(SentenceLayout::from_files(None, Some(both), None, 512).is_err());
        let dense = r#"[{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#;
        assert!(SentenceLayout::from_files(Some(dense), None, None, 512).is_err());
        assert!(SentenceLayout::from_files(Some("not json"), None, None, 512).is_err());
    }

    #[test]
    fn max_length_is_capped_by_positions() {
        let layout = SentenceLayout::from_files(None, None, Some(r#"{"max_seq_length":8192}"#), 512).expect("layout");
        assert_eq!(layout.max_seq_length, 512);
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

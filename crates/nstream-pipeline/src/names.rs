//! The names of the pipeline's choices (`jsonl`, `json`, `bar`...) as text: `FromStr` and
//! `Display`, so a command line (clap's `value_parser`) or a config file takes them without the
//! library knowing clap, and the names are written once.

use crate::error::Error;
use crate::input::InputFormat;
use crate::progress::ProgressMode;
use crate::validate::AnswerFormat;

macro_rules! named_choices {
    ($type:ident, $setting:literal { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $type {
            /// Every name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// The name, as the command line spells it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }

        impl std::str::FromStr for $type {
            type Err = Error;

            fn from_str(text: &str) -> Result<Self, Error> {
                match text {
                    $($name => Ok(Self::$variant),)*
                    _ => Err(Error::InvalidSetting {
                        setting: $setting,
                        reason: format!("`{text}` is not one of: {}", Self::NAMES.join(", ")),
                    }),
                }
            }
        }

        impl std::fmt::Display for $type {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(self.as_str())
            }
        }
    };
}

named_choices!(InputFormat, "input-format" { Jsonl => "jsonl", Csv => "csv", Text => "text" });
named_choices!(AnswerFormat, "format" { Text => "text", Json => "json" });
named_choices!(ProgressMode, "progress" { Auto => "auto", Bar => "bar", Lines => "lines", Quiet => "quiet" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_and_others_are_refused_with_the_choices() {
        for name in InputFormat::NAMES.iter().chain(AnswerFormat::NAMES).chain(ProgressMode::NAMES) {
            let parsed = [
                name.parse::<InputFormat>().map(|value| value.to_string()),
                name.parse::<AnswerFormat>().map(|value| value.to_string()),
                name.parse::<ProgressMode>().map(|value| value.to_string()),
            ];
            assert!(parsed.iter().any(|value| value.as_ref().is_ok_and(|value| value == name)), "{name}");
        }
        let error = "yaml".parse::<InputFormat>().expect_err("not a format");
        assert_eq!(error.to_string(), "invalid setting `input-format`: `yaml` is not one of: jsonl, csv, text");
    }

    #[test]
    fn names_match_the_serde_names_of_the_config_file() {
        for format in [InputFormat::Jsonl, InputFormat::Csv, InputFormat::Text] {
            assert_eq!(serde_json::to_value(format).expect("serialises"), format.as_str());
        }
        for mode in [ProgressMode::Auto, ProgressMode::Bar, ProgressMode::Lines, ProgressMode::Quiet] {
            let parsed: ProgressMode = serde_json::from_value(serde_json::json!(mode.as_str())).expect("parses");
            assert_eq!(parsed, mode);
        }
    }
}

//! The replica count of a serving template. The specification's template shows it quoted
//! (`"1"`), but the CRD declares an integer (the scale subresource needs one) and the API server
//! refuses a string, so validation reports a quoted count with its fix (`replicas: 1`).

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A replica count as written: an integer, or a string that validation reports.
///
/// A string is read rather than refused by the parser so that validation can name the field, its
/// line and the fix; [`Replicas::count`] reads the number either way.
#[derive(Clone, PartialEq, Eq)]
pub enum Replicas {
    /// Written as a YAML/JSON integer.
    Number(i64),
    /// Written as a string, as the specification's example does; invalid (see the module docs).
    Text(String),
}

impl Replicas {
    /// The number of replicas, when the value is a non-negative whole number that fits an `i32`
    /// (what a Deployment accepts).
    pub fn count(&self) -> Option<i32> {
        let value = match self {
            Self::Number(number) => *number,
            Self::Text(text) => {
                let trimmed = text.trim();
                if trimmed.is_empty() || !trimmed.bytes().all(|byte| byte.is_ascii_digit()) {
                    return None;
                }
                trimmed.parse().ok()?
            }
        };
        i32::try_from(value).ok().filter(|count| *count >= 0)
    }
}

impl Default for Replicas {
    fn default() -> Self {
        Self::Number(1)
    }
}

impl From<i32> for Replicas {
    fn from(count: i32) -> Self {
        Self::Number(i64::from(count))
    }
}

impl fmt::Debug for Replicas {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(number) => write!(formatter, "{number}"),
            Self::Text(text) => write!(formatter, "{text:?}"),
        }
    }
}

impl fmt::Display for Replicas {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(number) => write!(formatter, "{number}"),
            Self::Text(text) => formatter.write_str(text),
        }
    }
}

impl Serialize for Replicas {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Number(number) => serializer.serialize_i64(*number),
            Self::Text(text) => serializer.serialize_str(text),
        }
    }
}

impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ReplicasVisitor;

        impl serde::de::Visitor<'_> for ReplicasVisitor {
            type Value = Replicas;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a whole number of replicas, such as 1")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(Replicas::Text(value.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Self::Value, E> {
                Ok(Replicas::Number(value))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Self::Value, E> {
                i64::try_from(value)
                    .map(Replicas::Number)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(value), &self))
            }
        }

        deserializer.deserialize_any(ReplicasVisitor)
    }
}

impl JsonSchema for Replicas {
    fn schema_name() -> Cow<'static, str> {
        "Replicas".into()
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        // On a cluster the scale subresource (`kubectl scale`, HPAs) reads this field as an int64, and
        // the API server rejects a quoted number there; validation refuses one locally too.
        json_schema!({
            "description": "Number of server replicas: an integer, written without quotes (`kubectl scale` sets it).",
            "type": "integer",
            "format": "int32",
            "minimum": 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_quoted_and_bare_numbers() {
        let bare: Replicas = serde_yaml::from_str("1").unwrap();
        let quoted: Replicas = serde_yaml::from_str("\"1\"").unwrap();
        assert_eq!(bare.count(), Some(1));
        assert_eq!(quoted.count(), Some(1));
        assert_eq!(serde_yaml::to_string(&quoted).unwrap().trim(), "'1'");
    }

    #[test]
    fn rejects_what_is_not_a_count() {
        for text in ["-1", "one", "", "1.5", "99999999999"] {
            assert_eq!(Replicas::Text(text.to_string()).count(), None, "{text}");
        }
        assert_eq!(Replicas::Number(-1).count(), None);
        assert!(serde_yaml::from_str::<Replicas>("1.5").is_err());
        assert!(serde_yaml::from_str::<Replicas>("[1]").is_err());
    }
}

//! Metadata filters in the shape of OpenAI's vector-store search `filters`: comparisons
//! (`eq`, `ne`, `gt`, `gte`, `lt`, `lte`, `in`, `nin`) and compounds (`and`, `or`).

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Comparison {
    /// Equal.
    Eq,
    /// Not equal (also true when the key is missing).
    Ne,
    /// Greater than (numbers, or strings in byte order).
    Gt,
    /// Greater than or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Equal to one of a list.
    In,
    /// Equal to none of a list (also true when the key is missing).
    Nin,
}

impl Comparison {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "eq" => Self::Eq,
            "ne" => Self::Ne,
            "gt" => Self::Gt,
            "gte" => Self::Gte,
            "lt" => Self::Lt,
            "lte" => Self::Lte,
            "in" => Self::In,
            "nin" => Self::Nin,
            _ => return None,
        })
    }

    /// The name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eq => "eq",
            Self::Ne => "ne",
            Self::Gt => "gt",
            Self::Gte => "gte",
            Self::Lt => "lt",
            Self::Lte => "lte",
            Self::In => "in",
            Self::Nin => "nin",
        }
    }
}

/// A metadata filter.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Filter {
    /// `key <op> value`.
    Compare {
        /// The operator.
        operator: Comparison,
        /// The metadata key.
        key: String,
        /// A string, number or boolean; a list of them for `in`/`nin`.
        value: Value,
    },
    /// Every filter holds.
    And(Vec<Filter>),
    /// Some filter holds.
    Or(Vec<Filter>),
}

const TYPES: &str = "eq, ne, gt, gte, lt, lte, in, nin, and, or";

impl Filter {
    /// `key == value`.
    pub fn eq(key: impl Into<String>, value: impl Into<Value>) -> Self {
        Self::Compare { operator: Comparison::Eq, key: key.into(), value: value.into() }
    }

    /// Reads a filter from JSON; errors name the field path under `path` (such as `filters`).
    pub fn parse(value: &Value, path: &str) -> Result<Self> {
        Self::parse_at(value, path, 0)
    }

    fn parse_at(value: &Value, path: &str, depth: usize) -> Result<Self> {
        if depth > 8 {
            return Err(Error::invalid(path, "filters nest at most 8 levels deep"));
        }
        let Value::Object(object) = value else {
            return Err(Error::invalid(path, "expected an object with `type`"));
        };
        let kind = object
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid(format!("{path}.type"), format!("expected one of {TYPES}")))?;
        match kind {
            "and" | "or" => {
                let Some(Value::Array(items)) = object.get("filters") else {
                    return Err(Error::invalid(format!("{path}.filters"), "expected a list of filters"));
                };
                if items.is_empty() {
                    return Err(Error::invalid(format!("{path}.filters"), "expected at least one filter"));
                }
                let filters = items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| Self::parse_at(item, &format!("{path}.filters[{index}]"), depth + 1))
                    .collect::<Result<Vec<_>>>()?;
                Ok(if kind == "and" { Self::And(filters) } else { Self::Or(filters) })
            }
            other => {
                let operator = Comparison::parse(other).ok_or_else(|| {
                    Error::invalid(format!("{path}.type"), format!("found {other:?}, expected one of {TYPES}"))
                })?;
                let key = object
                    .get("key")
                    .and_then(Value::as_str)
                    .filter(|key| !key.is_empty())
                    .ok_or_else(|| Error::invalid(format!("{path}.key"), "expected a non-empty metadata key"))?;
                let value = object
                    .get("value")
                    .ok_or_else(|| Error::invalid(format!("{path}.value"), "expected a value to compare with"))?;
                let scalar = |value: &Value| matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_));
                let valid = match operator {
                    Comparison::In | Comparison::Nin => {
                        value.as_array().is_some_and(|items| !items.is_empty() && items.iter().all(scalar))
                    }
                    _ => scalar(value),
                };
                if !valid {
                    let expected = match operator {
                        Comparison::In | Comparison::Nin => "a non-empty list of strings, numbers or booleans",
                        _ => "a string, number or boolean",
                    };
                    return Err(Error::invalid(format!("{path}.value"), format!("expected {expected}")));
                }
                Ok(Self::Compare { operator, key: key.to_string(), value: value.clone() })
            }
        }
    }

    /// Whether a chunk's metadata passes.
    pub fn matches(&self, metadata: &Map<String, Value>) -> bool {
        match self {
            Self::And(filters) => filters.iter().all(|filter| filter.matches(metadata)),
            Self::Or(filters) => filters.iter().any(|filter| filter.matches(metadata)),
            Self::Compare { operator, key, value } => {
                let found = metadata.get(key);
                match operator {
                    Comparison::Eq => found.is_some_and(|found| same(found, value)),
                    Comparison::Ne => !found.is_some_and(|found| same(found, value)),
                    Comparison::In => found.is_some_and(|found| list(value).any(|item| same(found, item))),
                    Comparison::Nin => !found.is_some_and(|found| list(value).any(|item| same(found, item))),
                    Comparison::Gt | Comparison::Gte | Comparison::Lt | Comparison::Lte => {
                        let Some(ordering) = found.and_then(|found| order(found, value)) else { return false };
                        match operator {
                            Comparison::Gt => ordering.is_gt(),
                            Comparison::Gte => ordering.is_ge(),
                            Comparison::Lt => ordering.is_lt(),
                            _ => ordering.is_le(),
                        }
                    }
                }
            }
        }
    }
}

fn list(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

/// Equality with numbers compared as numbers (1 == 1.0).
fn same(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => left.as_f64() == right.as_f64(),
        _ => left == right,
    }
}

fn order(left: &Value, right: &Value) -> Option<std::cmp::Ordering> {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => left.as_f64()?.partial_cmp(&right.as_f64()?),
        (Value::String(left), Value::String(right)) => Some(left.as_str().cmp(right.as_str())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn metadata(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn comparisons_and_compounds() {
        let filter = Filter::parse(
            &json!({"type": "and", "filters": [
                {"type": "eq", "key": "lang", "value": "en"},
                {"type": "or", "filters": [
                    {"type": "gte", "key": "year", "value": 2020},
                    {"type": "in", "key": "tag", "value": ["faq", "howto"]}
                ]}
            ]}),
            "filters",
        )
        .unwrap();
        assert!(filter.matches(&metadata(json!({"lang": "en", "year": 2021.0}))));
        assert!(filter.matches(&metadata(json!({"lang": "en", "year": 1999, "tag": "faq"}))));
        assert!(!filter.matches(&metadata(json!({"lang": "en", "year": 1999}))));
        assert!(!filter.matches(&metadata(json!({"lang": "fr", "year": 2021}))));
        let ne = Filter::parse(&json!({"type": "ne", "key": "lang", "value": "en"}), "f").unwrap();
        assert!(ne.matches(&metadata(json!({}))));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"type": "eq", "key": "a"}), "filters.value"),
            (json!({"type": "like", "key": "a", "value": 1}), "filters.type"),
            (json!({"type": "and", "filters": [{"type": "eq", "value": 1}]}), "filters.filters[0].key"),
            (json!({"type": "in", "key": "a", "value": 3}), "filters.value"),
            (json!({"type": "or", "filters": []}), "filters.filters"),
            (json!([1]), "filters"),
        ];
        for (value, field) in cases {
            match Filter::parse(&value, "filters") {
                Err(Error::InvalidRequest { field: found, .. }) => assert_eq!(found, field, "{value}"),
                other => panic!("{value}: {other:?}"),
            }
        }
    }
}

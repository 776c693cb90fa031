//! Kubernetes resource quantities (`500m`, `8`, `24Gi`, `1e3`): a spec field type that accepts a
//! string or a number, and an exact parser used to compare requests with limits.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Nano-units per unit: quantities are held exactly, as Kubernetes does, down to `1n`.
const NANOS_PER_UNIT: i128 = 1_000_000_000;

/// Why a text is not a Kubernetes quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantityError {
    /// The text is empty.
    #[error("the value is empty")]
    Empty,
    /// The number part is missing or malformed.
    #[error("`{0}` does not start with a number")]
    MissingNumber(String),
    /// The suffix after the number is not one Kubernetes knows.
    #[error(
        "`{suffix}` is not a quantity suffix (use n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or an exponent such as e3)"
    )]
    UnknownSuffix {
        /// The suffix as written.
        suffix: String,
    },
    /// The value does not fit the range this parser holds exactly.
    #[error("the value is too large")]
    TooLarge,
}

/// A parsed quantity: an exact amount in nano-units (`1` = 1_000_000_000, `500m` = 500_000_000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount {
    nanos: i128,
}

impl Amount {
    /// The amount in nano-units.
    pub fn nanos(self) -> i128 {
        self.nanos
    }

    /// The amount in thousandths, rounded up (CPU millicores), as Kubernetes rounds.
    pub fn millis_ceil(self) -> i128 {
        self.nanos.div_euclid(1_000_000) + i128::from(self.nanos.rem_euclid(1_000_000) != 0)
    }

    /// The whole number this amount is, if it is one (bytes of memory, a count of GPUs).
    pub fn as_whole(self) -> Option<i128> {
        (self.nanos % NANOS_PER_UNIT == 0).then_some(self.nanos / NANOS_PER_UNIT)
    }

    /// Whether the amount is above zero.
    pub fn is_positive(self) -> bool {
        self.nanos > 0
    }
}

/// Parses a Kubernetes quantity exactly (the grammar of `k8s.io/apimachinery`'s
/// `resource.Quantity`: a signed decimal number followed by a binary SI suffix, a decimal SI
/// suffix, or a decimal exponent). Fractions below one nano-unit round up, as Kubernetes does.
pub fn parse_quantity(text: &str) -> Result<Amount, QuantityError> {
    if text.is_empty() {
        return Err(QuantityError::Empty);
    }
    let bytes = text.as_bytes();
    let mut position = 0;
    let negative = match bytes.first() {
        Some(b'-') => {
            position += 1;
            true
        }
        Some(b'+') => {
            position += 1;
            false
        }
        _ => false,
    };
    let integer_start = position;
    while position < bytes.len() && bytes[position].is_ascii_digit() {
        position += 1;
    }
    let integer_digits = &text[integer_start..position];
    let mut fraction_digits = "";
    if position < bytes.len() && bytes[position] == b'.' {
        position += 1;
        let fraction_start = position;
        while position < bytes.len() && bytes[position].is_ascii_digit() {
            position += 1;
        }
        fraction_digits = &text[fraction_start..position];
    }
    if integer_digits.is_empty() && fraction_digits.is_empty() {
        return Err(QuantityError::MissingNumber(text.to_string()));
    }
    let suffix = &text[position..];
    let (binary_power, decimal_exponent) = parse_suffix(suffix)?;

    // value = digits × 10^(decimal_exponent − fraction length) × 2^binary_power, in nano-units.
    let digits = format!("{integer_digits}{fraction_digits}");
    let digits = digits.trim_start_matches('0');
    // More significant digits than an i128 can hold is out of range whatever the exponent.
    if digits.len() > 36 {
        return Err(QuantityError::TooLarge);
    }
    let mantissa: i128 = if digits.is_empty() { 0 } else { digits.parse().map_err(|_| QuantityError::TooLarge)? };
    let fraction_length = i64::try_from(fraction_digits.len()).map_err(|_| QuantityError::TooLarge)?;
    let exponent = decimal_exponent
        .checked_add(9)
        .and_then(|exponent| exponent.checked_sub(fraction_length))
        .ok_or(QuantityError::TooLarge)?;
    let mut nanos = mantissa
        .checked_mul(1_i128.checked_shl(binary_power).ok_or(QuantityError::TooLarge)?)
        .ok_or(QuantityError::TooLarge)?;
    if exponent >= 0 {
        let scale = u32::try_from(exponent).map_err(|_| QuantityError::TooLarge)?;
        let factor = 10_i128.checked_pow(scale).ok_or(QuantityError::TooLarge)?;
        if nanos != 0 {
            nanos = nanos.checked_mul(factor).ok_or(QuantityError::TooLarge)?;
        }
    } else {
        let scale = u32::try_from(-exponent).unwrap_or(u32::MAX);
        nanos = match 10_i128.checked_pow(scale) {
            // Round up: a request of 0.1n is still something.
            Some(divisor) => nanos / divisor + i128::from(nanos % divisor != 0),
            None => i128::from(nanos != 0),
        };
    }
    Ok(Amount { nanos: if negative { -nanos } else { nanos } })
}

/// Splits a suffix into (power of two, power of ten).
fn parse_suffix(suffix: &str) -> Result<(u32, i64), QuantityError> {
    let decimal = |exponent| Ok((0, exponent));
    match suffix {
        "" => decimal(0),
        "n" => decimal(-9),
        "u" => decimal(-6),
        "m" => decimal(-3),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => Ok((10, 0)),
        "Mi" => Ok((20, 0)),
        "Gi" => Ok((30, 0)),
        "Ti" => Ok((40, 0)),
        "Pi" => Ok((50, 0)),
        "Ei" => Ok((60, 0)),
        _ => {
            let unknown = || QuantityError::UnknownSuffix { suffix: suffix.to_string() };
            let exponent = suffix.strip_prefix(['e', 'E']).ok_or_else(unknown)?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
                return Err(unknown());
            }
            exponent.parse::<i64>().map(|value| (0, value)).map_err(|_| unknown())
        }
    }
}

/// A resource amount in a spec (`cpu`, `memory`, `gpu`).
///
/// YAML users write `8`, `"8"`, `0.5`, `500m` or `24Gi`; all are accepted and kept as the
/// Kubernetes [`Quantity`] text they denote. The text is checked by validation (so every problem
/// in a file is reported at once), not while parsing.
#[derive(Clone, PartialEq)]
pub struct ResourceQuantity(pub Quantity);

impl ResourceQuantity {
    /// Wraps a quantity text.
    pub fn new(text: impl Into<String>) -> Self {
        Self(Quantity(text.into()))
    }

    /// The quantity as written.
    pub fn as_str(&self) -> &str {
        &self.0.0
    }

    /// The exact amount, or why the text is not a quantity.
    pub fn amount(&self) -> Result<Amount, QuantityError> {
        parse_quantity(self.as_str())
    }

    /// Compares two quantities by amount; `None` when either does not parse.
    pub fn compare(&self, other: &Self) -> Option<Ordering> {
        Some(self.amount().ok()?.cmp(&other.amount().ok()?))
    }
}

impl fmt::Debug for ResourceQuantity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:?}", self.as_str())
    }
}

impl fmt::Display for ResourceQuantity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl From<&str> for ResourceQuantity {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl Serialize for ResourceQuantity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ResourceQuantity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QuantityVisitor;

        impl serde::de::Visitor<'_> for QuantityVisitor {
            type Value = ResourceQuantity;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a Kubernetes quantity such as 2, 500m or 24Gi")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(ResourceQuantity::new(value))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Self::Value, E> {
                Ok(ResourceQuantity::new(value.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Self::Value, E> {
                Ok(ResourceQuantity::new(value.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Self::Value, E> {
                if value.is_finite() {
                    Ok(ResourceQuantity::new(value.to_string()))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(value), &self))
                }
            }
        }

        deserializer.deserialize_any(QuantityVisitor)
    }
}

impl JsonSchema for ResourceQuantity {
    fn schema_name() -> Cow<'static, str> {
        "ResourceQuantity".into()
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A Kubernetes quantity, as a string or a number: 2, 500m, 0.5, 24Gi.",
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nanos(text: &str) -> i128 {
        parse_quantity(text).unwrap().nanos()
    }

    #[test]
    fn parses_the_forms_kubernetes_users_write() {
        assert_eq!(nanos("8"), 8 * NANOS_PER_UNIT);
        assert_eq!(nanos("500m"), NANOS_PER_UNIT / 2);
        assert_eq!(nanos("0.5"), NANOS_PER_UNIT / 2);
        assert_eq!(nanos(".5"), NANOS_PER_UNIT / 2);
        assert_eq!(nanos("1."), NANOS_PER_UNIT);
        assert_eq!(nanos("24Gi"), 24 * (1 << 30) * NANOS_PER_UNIT);
        assert_eq!(nanos("1k"), 1000 * NANOS_PER_UNIT);
        assert_eq!(nanos("1e3"), 1000 * NANOS_PER_UNIT);
        assert_eq!(nanos("1E3"), 1000 * NANOS_PER_UNIT);
        assert_eq!(nanos("1E"), 10_i128.pow(18) * NANOS_PER_UNIT);
        assert_eq!(nanos("1.5Gi"), 3 * (1 << 29) * NANOS_PER_UNIT);
        assert_eq!(nanos("-1"), -NANOS_PER_UNIT);
        assert_eq!(nanos("+1"), NANOS_PER_UNIT);
        assert_eq!(nanos("1n"), 1);
        assert_eq!(nanos("0"), 0);
        assert_eq!(nanos("0Gi"), 0);
    }

    #[test]
    fn rounds_up_below_a_nano_unit() {
        assert_eq!(nanos("0.1n"), 1);
        assert_eq!(nanos("1e-10"), 1);
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        assert_eq!(parse_quantity(""), Err(QuantityError::Empty));
        for bad in ["abc", "Gi", ".", "-", "1 Gi", "1gi", "1GB", "1e", "1e+", "1.2.3", "1Kii", "0x10"] {
            assert!(parse_quantity(bad).is_err(), "{bad} should not parse");
        }
        assert_eq!(parse_quantity("1e40"), Err(QuantityError::TooLarge));
        assert_eq!(parse_quantity("99999999999999999999999999999Ei"), Err(QuantityError::TooLarge));
    }

    #[test]
    fn millis_and_whole_numbers() {
        let amount = parse_quantity("1500m").unwrap();
        assert_eq!(amount.millis_ceil(), 1500);
        assert_eq!(amount.as_whole(), None);
        assert_eq!(parse_quantity("2").unwrap().as_whole(), Some(2));
        assert_eq!(parse_quantity("1n").unwrap().millis_ceil(), 1);
    }

    #[test]
    fn accepts_numbers_and_strings_in_yaml() {
        let from_number: ResourceQuantity = serde_yaml::from_str("8").unwrap();
        let from_string: ResourceQuantity = serde_yaml::from_str("\"8\"").unwrap();
        let from_float: ResourceQuantity = serde_yaml::from_str("0.5").unwrap();
        assert_eq!(from_number, from_string);
        assert_eq!(from_float.amount().unwrap().nanos(), NANOS_PER_UNIT / 2);
        assert!(serde_yaml::from_str::<ResourceQuantity>("[1]").is_err());
    }

    const BINARY: [(&str, u32); 6] = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40), ("Pi", 50), ("Ei", 60)];
    const DECIMAL: [(&str, i64); 9] =
        [("n", -9), ("u", -6), ("m", -3), ("", 0), ("k", 3), ("M", 6), ("G", 9), ("T", 12), ("P", 15)];

    proptest! {
        #[test]
        fn binary_suffixes_multiply_exactly(value in 0_i64..1_000_000, index in 0_usize..6) {
            let (suffix, power) = BINARY[index];
            let expected = i128::from(value) * (1_i128 << power) * NANOS_PER_UNIT;
            prop_assert_eq!(nanos(&format!("{value}{suffix}")), expected);
        }

        #[test]
        fn decimal_suffix_equals_exponent(value in 0_i64..1_000_000, index in 0_usize..9) {
            let (suffix, exponent) = DECIMAL[index];
            prop_assert_eq!(nanos(&format!("{value}{suffix}")), nanos(&format!("{value}e{exponent}")));
        }

        #[test]
        fn order_follows_the_number(first in 0_u32..100_000, second in 0_u32..100_000) {
            let left = parse_quantity(&format!("{first}m")).unwrap();
            let right = parse_quantity(&format!("{second}m")).unwrap();
            prop_assert_eq!(left.cmp(&right), first.cmp(&second));
        }

        #[test]
        fn decimal_text_matches_millis(whole in 0_u32..10_000, fraction in 0_u32..1000) {
            let text = format!("{whole}.{fraction:03}");
            prop_assert_eq!(parse_quantity(&text).unwrap().millis_ceil(), i128::from(whole) * 1000 + i128::from(fraction));
        }

        #[test]
        fn never_panics(text in "\\PC{0,24}") {
            let _ = parse_quantity(&text);
        }

        #[test]
        fn never_panics_on_quantity_like_text(text in "[-+]?[0-9.]{0,40}([eE][-+]?[0-9]{0,8}|[numkMGTPE]i?)?") {
            let _ = parse_quantity(&text);
        }
    }
}

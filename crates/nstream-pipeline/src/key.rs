//! Content hashes: canonical JSON (object keys sorted at every depth) through SHA-256.
//!
//! serde_json keeps object keys in insertion order when any crate of the build enables its
//! `preserve_order` feature, so hashing `to_string()` output would make a key depend on the order
//! of fields in an input line. [`canonical_json`] sorts them itself.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The JSON text of `value` with object keys sorted at every depth and no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|left, right| left.0.cmp(right.0));
            out.push('{');
            for (position, (key, value)) in entries.into_iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Lower-case hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    let digest = Sha256::digest(bytes.as_ref());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// SHA-256 of the canonical JSON of `value`.
pub fn hash_json(value: &Value) -> String {
    sha256_hex(canonical_json(value))
}

/// The key of one item: a hash of the model's identity, the template, the generation parameters
/// and the input record. Two records with the same key are generated once.
pub fn item_key(model_fingerprint: &str, template_hash: &str, parameters_hash: &str, input_hash: &str) -> String {
    sha256_hex(format!("nstream-generate/v1\n{model_fingerprint}\n{template_hash}\n{parameters_hash}\n{input_hash}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn canonical_json_ignores_key_order_but_not_values() {
        let left = json!({"b": 1, "a": {"y": [1, 2], "x": "é"}});
        let right: Value = serde_json::from_str(r#"{"a":{"x":"é","y":[1,2]},"b":1}"#).expect("json");
        assert_eq!(canonical_json(&left), r#"{"a":{"x":"é","y":[1,2]},"b":1}"#);
        assert_eq!(hash_json(&left), hash_json(&right));
        assert_ne!(hash_json(&left), hash_json(&json!({"b": 2, "a": {"y": [1, 2], "x": "é"}})));
        assert_ne!(hash_json(&json!([1, 2])), hash_json(&json!([2, 1])));
    }

    #[test]
    fn every_part_of_the_key_matters() {
        let base = item_key("m", "t", "p", "i");
        assert_eq!(base.len(), 64);
        for other in [item_key("m2", "t", "p", "i"), item_key("m", "t2", "p", "i"), item_key("m", "t", "p2", "i")] {
            assert_ne!(base, other);
        }
        assert_ne!(base, item_key("m", "t", "p", "i2"));
        // Separators keep parts from sliding into each other.
        assert_ne!(item_key("ab", "c", "p", "i"), item_key("a", "bc", "p", "i"));
    }
}

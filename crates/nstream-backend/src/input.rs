//! The `input` of embeddings and the `prompt` of legacy completions: text or token ids, one or many.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// One or many inputs, as text or as pre-tokenised ids, in the four shapes OpenAI accepts.
///
/// Deserialisation is hand-written rather than `#[serde(untagged)]` so that a bad value gets a
/// message saying what *is* accepted, an empty array is rejected, and mixed arrays
/// (`["a", 1]`) name the offending element, instead of serde's "did not match any variant".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Input {
    /// `"input": "hello"`.
    Text(String),
    /// `"input": ["hello", "world"]`.
    TextBatch(Vec<String>),
    /// `"input": [101, 7592, 102]`: one pre-tokenised sequence.
    Tokens(Vec<u32>),
    /// `"input": [[101, 102], [101, 7592, 102]]`: several pre-tokenised sequences.
    TokenBatch(Vec<Vec<u32>>),
}

/// One input after flattening an [`Input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputItem<'a> {
    /// A text to tokenise.
    Text(&'a str),
    /// Token ids to use as they are.
    Tokens(&'a [u32]),
}

impl Input {
    /// How many separate inputs (and so output vectors or prompts) this holds.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(_) | Self::Tokens(_) => 1,
            Self::TextBatch(texts) => texts.len(),
            Self::TokenBatch(batches) => batches.len(),
        }
    }

    /// Whether there are no inputs. Deserialisation rejects empty arrays, so this is true only
    /// for values built in code.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The inputs one by one, in request order (which is the order of the response's `index`).
    pub fn items(&self) -> Vec<InputItem<'_>> {
        match self {
            Self::Text(text) => vec![InputItem::Text(text)],
            Self::TextBatch(texts) => texts.iter().map(|text| InputItem::Text(text)).collect(),
            Self::Tokens(tokens) => vec![InputItem::Tokens(tokens)],
            Self::TokenBatch(batches) => batches.iter().map(|tokens| InputItem::Tokens(tokens)).collect(),
        }
    }

    /// Rejects empty strings and empty token sequences, naming the element (`input[3]`).
    ///
    /// Kept out of deserialisation because a completion `prompt` of `""` is legal while an
    /// embedding `input` of `""` is not; each request's `validate()` decides.
    pub fn reject_empty_items(&self, field: &str) -> crate::Result<()> {
        let many = matches!(self, Self::TextBatch(_) | Self::TokenBatch(_));
        for (index, item) in self.items().into_iter().enumerate() {
            let empty = match item {
                InputItem::Text(text) => text.is_empty(),
                InputItem::Tokens(tokens) => tokens.is_empty(),
            };
            if empty {
                let param = if many { format!("{field}[{index}]") } else { field.to_owned() };
                return Err(crate::BackendError::invalid_param(param.clone(), format!("`{param}` must not be empty")));
            }
        }
        Ok(())
    }
}

const EXPECTED: &str = "a string, an array of strings, an array of token ids, or an array of arrays of token ids";

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InputVisitor)
    }
}

struct InputVisitor;

impl<'de> Visitor<'de> for InputVisitor {
    type Value = Input;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(EXPECTED)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Input, E> {
        Ok(Input::Text(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Input, E> {
        Ok(Input::Text(value))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<Input, A::Error> {
        let first = match sequence.next_element::<Element>()? {
            Some(element) => element,
            None => return Err(de::Error::custom("must not be an empty array")),
        };
        // The first element fixes the shape; every later one must match it.
        let mut input = match first {
            Element::Text(text) => Input::TextBatch(vec![text]),
            Element::Token(token) => Input::Tokens(vec![token]),
            Element::Tokens(tokens) => Input::TokenBatch(vec![tokens]),
        };
        let mut index = 1usize;
        while let Some(element) = sequence.next_element::<Element>()? {
            match (&mut input, element) {
                (Input::TextBatch(texts), Element::Text(text)) => texts.push(text),
                (Input::Tokens(tokens), Element::Token(token)) => tokens.push(token),
                (Input::TokenBatch(batches), Element::Tokens(tokens)) => batches.push(tokens),
                (_, element) => {
                    return Err(de::Error::custom(format!(
                        "element {index} is {} but element 0 is {}; an array must hold only strings, only token ids, or only arrays of token ids",
                        element.describe(),
                        describe_shape(&input),
                    )));
                }
            }
            index += 1;
        }
        Ok(input)
    }
}

fn describe_shape(input: &Input) -> &'static str {
    match input {
        Input::Text(_) | Input::TextBatch(_) => "a string",
        Input::Tokens(_) => "a token id",
        Input::TokenBatch(_) => "an array of token ids",
    }
}

/// One element of an input array.
enum Element {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

impl Element {
    fn describe(&self) -> &'static str {
        match self {
            Self::Text(_) => "a string",
            Self::Token(_) => "a token id",
            Self::Tokens(_) => "an array of token ids",
        }
    }
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ElementVisitor)
    }
}

struct ElementVisitor;

fn token_from_u64<E: de::Error>(value: u64) -> Result<u32, E> {
    u32::try_from(value).map_err(|_| E::custom(format!("token id {value} is out of range (0..=4294967295)")))
}

impl<'de> Visitor<'de> for ElementVisitor {
    type Value = Element;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a string, a token id (non-negative integer) or an array of token ids")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Element, E> {
        Ok(Element::Text(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Element, E> {
        Ok(Element::Text(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Element, E> {
        token_from_u64(value).map(Element::Token)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Element, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(E::custom(format!("token id {value} is negative; token ids are non-negative integers"))),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<Element, A::Error> {
        let mut tokens = Vec::with_capacity(sequence.size_hint().unwrap_or(0).min(8192));
        while let Some(token) = sequence.next_element::<TokenId>()? {
            tokens.push(token.0);
        }
        if tokens.is_empty() {
            return Err(de::Error::custom("must not contain an empty array of token ids"));
        }
        Ok(Element::Tokens(tokens))
    }
}

/// A token id inside a nested array, with a clear message for negatives and non-integers.
struct TokenId(u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TokenIdVisitor;
        impl Visitor<'_> for TokenIdVisitor {
            type Value = TokenId;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a token id (non-negative integer)")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<TokenId, E> {
                token_from_u64(value).map(TokenId)
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<TokenId, E> {
                match u64::try_from(value) {
                    Ok(value) => self.visit_u64(value),
                    Err(_) => {
                        Err(E::custom(format!("token id {value} is negative; token ids are non-negative integers")))
                    }
                }
            }
        }
        deserializer.deserialize_any(TokenIdVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Input, String> {
        serde_json::from_str(json).map_err(|error| error.to_string())
    }

    #[test]
    fn accepts_the_four_openai_shapes() {
        assert_eq!(parse(r#""hello""#), Ok(Input::Text("hello".into())));
        assert_eq!(parse(r#"["a","b"]"#), Ok(Input::TextBatch(vec!["a".into(), "b".into()])));
        assert_eq!(parse("[1,2,3]"), Ok(Input::Tokens(vec![1, 2, 3])));
        assert_eq!(parse("[[1,2],[3]]"), Ok(Input::TokenBatch(vec![vec![1, 2], vec![3]])));
    }

    #[test]
    fn serialises_back_to_the_same_json() {
        for json in [r#""hello""#, r#"["a","b"]"#, "[1,2,3]", "[[1,2],[3]]"] {
            let input = parse(json).expect("valid input");
            assert_eq!(serde_json::to_string(&input).expect("serialises"), json);
        }
    }

    #[test]
    fn rejects_empty_arrays_with_a_clear_message() {
        assert!(parse("[]").unwrap_err().contains("must not be an empty array"));
        assert!(parse("[[1],[]]").unwrap_err().contains("empty array of token ids"));
    }

    #[test]
    fn rejects_mixed_arrays_naming_the_element() {
        let message = parse(r#"["a", 1]"#).unwrap_err();
        assert!(message.contains("element 1 is a token id"), "{message}");
    }

    #[test]
    fn rejects_wrong_types_saying_what_is_accepted() {
        let message = parse("42").unwrap_err();
        assert!(message.contains("an array of strings"), "{message}");
        assert!(parse("[-1]").unwrap_err().contains("negative"));
        assert!(parse("[4294967296]").unwrap_err().contains("out of range"));
        assert!(parse("[1.5]").is_err());
        assert!(parse("[true]").is_err());
        assert!(parse(r#"{"text":"a"}"#).is_err());
    }

    #[test]
    fn empty_items_are_reported_by_index() {
        let input = Input::TextBatch(vec!["a".into(), String::new()]);
        let error = input.reject_empty_items("input").unwrap_err();
        assert_eq!(error.param(), Some("input[1]"));
        assert!(Input::Text(String::new()).reject_empty_items("input").is_err());
        assert!(Input::Text("a".into()).reject_empty_items("input").is_ok());
        assert_eq!(Input::TokenBatch(vec![vec![1], vec![2], vec![3]]).len(), 3);
    }
}

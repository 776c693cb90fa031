//! Where a field path such as `spec.baseModelServingInfo.adapters[1].name` stands in a YAML
//! document, read from the events of a YAML parser with source spans (granit-parser, the parser
//! kube's own YAML support is built on), so block and flow collections, list items, quoted keys
//! and aliases are all located the same way.
//!
//! A path names the key of a mapping entry (`spec.replicas` points at `replicas:`) and the start
//! of a list item (`adapters[1]` points at the item after its `- `). Paths that run through an
//! alias are located at the alias use: for `resourceRequest: *limits`, the problem
//! `spec.…resourceRequest.cpu` points at `resourceRequest`, the line that brings the anchored
//! values into this place. The anchored block may be valid where it is defined and wrong only
//! where it is reused, and the alias is the line to look at. Likewise a key that a merge
//! (`<<: *defaults`) brings in points at the `<<` entry.

use std::collections::HashMap;

use granit_parser::{Event, Parser, Span};

/// A line and a column, both from 1; columns count characters.
pub type Position = (usize, usize);

/// The position of every key and list item of one YAML document, by field path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPositions {
    positions: HashMap<String, Position>,
}

/// What the parser is inside of.
enum Frame {
    /// A mapping at `path` (`None` inside a complex key, which no field path can name).
    Mapping { path: Option<String>, state: EntryState },
    /// A sequence at `path`, and the index of its next item.
    Sequence { path: Option<String>, next: usize },
}

/// Where a mapping is between its keys and values.
enum EntryState {
    /// The next node is a key.
    Key,
    /// The next node is the value of this key (`None`: a key that is not a plain string).
    Value(Option<String>),
}

/// The path of a mapping entry or list item below `parent`.
fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

fn position(span: &Span) -> Position {
    (span.start.line(), span.start.col() + 1)
}

impl FieldPositions {
    /// Reads the first document of `text`. A syntax error ends the reading, keeping what came
    /// before it (the syntax error itself is reported by the deserialiser, with its position).
    pub fn new(text: &str) -> Self {
        let mut positions = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut root_seen = false;
        for next in Parser::new_from_str(text) {
            let Ok((event, span)) = next else { break };
            let is_collection = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
            let is_node = is_collection || matches!(event, Event::Scalar(..) | Event::Alias(..));
            match event {
                Event::DocumentEnd if root_seen => break,
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                _ if is_node => {
                    // The path of this node, and whether it is a key.
                    let path: Option<String> = match stack.last_mut() {
                        None => {
                            root_seen = true;
                            Some(String::new())
                        }
                        Some(Frame::Sequence { path, next }) => {
                            let item = path.as_ref().map(|path| format!("{path}[{next}]"));
                            *next += 1;
                            if let Some(item) = &item {
                                positions.entry(item.clone()).or_insert(position(&span));
                            }
                            item
                        }
                        Some(Frame::Mapping { path, state }) => match state {
                            EntryState::Key => {
                                let key = match (&event, path.as_ref()) {
                                    (Event::Scalar(key, ..), Some(parent)) => {
                                        let key = child(parent, key);
                                        // The first of repeated keys (the deserialiser refuses them).
                                        positions.entry(key.clone()).or_insert(position(&span));
                                        Some(key)
                                    }
                                    _ => None,
                                };
                                *state = EntryState::Value(key);
                                if is_collection {
                                    // A complex key: its insides have no field path.
                                    stack.push(if matches!(event, Event::MappingStart(..)) {
                                        Frame::Mapping { path: None, state: EntryState::Key }
                                    } else {
                                        Frame::Sequence { path: None, next: 0 }
                                    });
                                }
                                continue;
                            }
                            EntryState::Value(key) => {
                                let key = key.take();
                                *state = EntryState::Key;
                                key
                            }
                        },
                    };
                    match event {
                        Event::MappingStart(..) => stack.push(Frame::Mapping { path, state: EntryState::Key }),
                        Event::SequenceStart(..) => stack.push(Frame::Sequence { path, next: 0 }),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Self { positions }
    }

    /// The position of `path`, or of the deepest part of it that the document holds (a field the
    /// document lacks points at its parent; a field that came through an alias at the alias use;
    /// a field that a merge brought in at the `<<` entry). `None` when not even the first part is
    /// there.
    pub fn locate(&self, path: &str) -> Option<Position> {
        let mut prefix = path;
        loop {
            if let Some(position) = self.positions.get(prefix) {
                return Some(*position);
            }
            let boundary = prefix.rfind(['.', '[']);
            let parent = boundary.map_or("", |boundary| &prefix[..boundary]);
            let is_key = boundary.is_none_or(|boundary| prefix[boundary..].starts_with('.'));
            if is_key && let Some(position) = self.positions.get(&child(parent, "<<")) {
                return Some(*position);
            }
            prefix = &prefix[..boundary?];
        }
    }
}

/// The position (from 1, relative to `text`) of `path` in the first document of `text`, or of
/// the deepest part of it that is there; see [`FieldPositions::locate`].
pub fn locate(text: &str, path: &str) -> Option<Position> {
    FieldPositions::new(text).locate(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_block_paths() {
        let text = "spec:\n  a:\n    cpu: 1\n  b:\n    cpu: 2\n";
        assert_eq!(locate(text, "spec.b.cpu"), Some((5, 5)));
        assert_eq!(locate(text, "spec.a.cpu"), Some((3, 5)));
        assert_eq!(locate(text, "spec.c"), Some((1, 1)));
        assert_eq!(locate(text, "other"), None);
    }

    #[test]
    fn locates_fields_of_flow_maps() {
        let text = "spec:\n  limits: {cpu: \"8\", memory: 24Gi}\n";
        assert_eq!(locate(text, "spec.limits.memory"), Some((2, 22)));
        assert_eq!(locate(text, "spec.limits.cpu"), Some((2, 12)));
    }

    #[test]
    fn locates_list_items_by_index() {
        let text = "adapters:\n  - name: a\n    id: x\n  - name: b\n    id: y\nflow: [{name: c}, {name: d}]\n";
        assert_eq!(locate(text, "adapters[1].name"), Some((4, 5)));
        assert_eq!(locate(text, "adapters[0].id"), Some((3, 5)));
        assert_eq!(locate(text, "flow[1].name"), Some((6, 20)));
        assert_eq!(locate(text, "adapters[2].name"), Some((1, 1)));
    }

    #[test]
    fn aliases_and_merges_point_at_their_use() {
        let text = "limits: &limits\n  cpu: 1\nrequest: *limits\nbase: &base {a: 1}\nmerged:\n  <<: *base\n  b: 2\n";
        assert_eq!(locate(text, "request.cpu"), Some((3, 1)));
        assert_eq!(locate(text, "limits.cpu"), Some((2, 3)));
        assert_eq!(locate(text, "merged.a"), Some((6, 3)));
        assert_eq!(locate(text, "merged.b"), Some((7, 3)));
    }

    #[test]
    fn quoted_keys_complex_keys_and_syntax_errors() {
        let text = "\"spec\":\n  ? [a, b]\n  : 1\n  'cpu': 2\n";
        assert_eq!(locate(text, "spec.cpu"), Some((4, 3)));
        let broken = "spec:\n  cpu: 1\n bad: [\n";
        assert_eq!(locate(broken, "spec.cpu"), Some((2, 3)));
    }
}

//! An incremental server-sent events parser (the WHATWG `text/event-stream` rules that OpenAI,
//! Azure and Anthropic streams follow): `event:` and `data:` fields, multi-line data joined by
//! `\n`, comments (`:`), `\n`, `\r\n` or `\r` line ends, events dispatched on a blank line.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `message` when absent.
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

/// Feeds bytes in, takes events out. Holds at most one unfinished line and one unfinished event.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    /// The previous chunk ended in `\r`: a `\n` starting the next one belongs to it.
    after_carriage_return: bool,
}

impl SseParser {
    /// Parses a chunk of the body, returning the events it completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in bytes {
            if self.after_carriage_return {
                self.after_carriage_return = false;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\n' | b'\r' => {
                    self.after_carriage_return = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.process_line(&line) {
                        events.push(event);
                    }
                }
                _ => self.line.push(byte),
            }
        }
        events
    }

    /// Whether bytes of an unfinished event are pending (a stream that ends now was cut).
    pub fn has_pending(&self) -> bool {
        !self.line.is_empty() || self.data.is_some()
    }

    fn process_line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            return data.map(|data| SseEvent { event: event.unwrap_or_else(|| "message".to_owned()), data });
        }
        if line.first() == Some(&b':') {
            return None;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: &str, data: &str) -> SseEvent {
        SseEvent { event: event.to_owned(), data: data.to_owned() }
    }

    #[test]
    fn parses_events_split_anywhere() {
        let body = b"event: ping\ndata: {}\n\n: comment\ndata: a\ndata: b\n\nevent:x\r\ndata:y\r\n\r\ndata: [DONE]\r\r";
        let expected = vec![event("ping", "{}"), event("message", "a\nb"), event("x", "y"), event("message", "[DONE]")];
        for split in 0..body.len() {
            let mut parser = SseParser::default();
            let mut events = parser.push(&body[..split]);
            events.extend(parser.push(&body[split..]));
            assert_eq!(events, expected, "split at {split}");
            assert!(!parser.has_pending());
        }
    }

    #[test]
    fn reports_a_cut_event_and_ignores_events_without_data() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"event: ping\n\ndata: {\"partial").is_empty());
        assert!(parser.has_pending());
        assert_eq!(parser.push(&[0xff, b'\n', b'\n']).len(), 1);
    }
}

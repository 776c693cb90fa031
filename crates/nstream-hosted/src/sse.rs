//! An incremental server-sent events parser (the WHATWG `text/event-stream` rules that OpenAI,
//! Azure and Anthropic streams follow): `event:` and `data:` fields, multi-line data joined by
//! `\n`, comments (`:`), `\n`, `\r\n` or `\r` line ends, events dispatched on a blank line.
//!
//! Memory is bounded: an event (its name, its data and the line being read) longer than
//! [`SseParser::max_event_bytes`] is dropped whole, without buffering the rest of it, and counted
//! in [`SseParser::oversized_events`], so a stream that never sends a line end cannot grow a
//! buffer without limit.

/// The default cap on one event: far above any real chunk of a chat completion.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `message` when absent.
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

/// Feeds bytes in, takes events out. Holds at most one unfinished line and one unfinished event,
/// together at most [`SseParser::max_event_bytes`] (plus one line end).
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    /// The previous chunk ended in `\r`: a `\n` starting the next one belongs to it.
    after_carriage_return: bool,
    max_event_bytes: usize,
    /// An oversized event is being skipped until the blank line that ends it.
    skipping: bool,
    /// While skipping: whether the current line has no bytes yet (so a line end ends the event).
    skipped_line_empty: bool,
    oversized_events: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseParser {
    /// A parser that drops events longer than `max_event_bytes` (at least one byte is allowed).
    pub fn with_max_event_bytes(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            event: None,
            data: None,
            after_carriage_return: false,
            max_event_bytes: max_event_bytes.max(1),
            skipping: false,
            skipped_line_empty: true,
            oversized_events: 0,
        }
    }

    /// The cap on one event's bytes (name, data and the line being read).
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// How many events were dropped so far for exceeding [`SseParser::max_event_bytes`]; counted
    /// as soon as the cap is crossed, before the event's end arrives.
    pub fn oversized_events(&self) -> u64 {
        self.oversized_events
    }

    fn event_bytes(&self) -> usize {
        self.line.len() + self.event.as_ref().map_or(0, String::len) + self.data.as_ref().map_or(0, String::len)
    }

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
                    if self.skipping {
                        // A blank line ends the oversized event; parsing resumes after it.
                        self.skipping = !self.skipped_line_empty;
                        self.skipped_line_empty = true;
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.process_line(&line) {
                        events.push(event);
                    }
                }
                _ if self.skipping => self.skipped_line_empty = false,
                _ => {
                    self.line.push(byte);
                    if self.event_bytes() > self.max_event_bytes {
                        self.oversized_events += 1;
                        self.skipping = true;
                        self.skipped_line_empty = false;
                        self.line = Vec::new();
                        self.event = None;
                        self.data = None;
                    }
                }
            }
        }
        events
    }

    /// Whether bytes of an unfinished event are pending (a stream that ends now was cut).
    pub fn has_pending(&self) -> bool {
        !self.line.is_empty() || self.data.is_some() || self.skipping
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
    fn an_oversized_event_is_dropped_whole_and_counted_without_growing_a_buffer() {
        let mut parser = SseParser::with_max_event_bytes(64);
        assert_eq!(parser.max_event_bytes(), 64);
        // An endless line: fed in pieces, it never grows the parser past the cap.
        assert!(parser.push(b"data: ").is_empty());
        for _ in 0..1000 {
            assert!(parser.push(&[b'x'; 100]).is_empty());
            assert!(parser.event_bytes() <= 64);
        }
        assert_eq!(parser.oversized_events(), 1);
        assert!(parser.has_pending());
        // Many short lines adding up past the cap are one oversized event too.
        let mut lines = SseParser::with_max_event_bytes(64);
        for _ in 0..20 {
            assert!(lines.push(b"data: 0123456789\n").is_empty());
        }
        assert_eq!(lines.oversized_events(), 1);
        // Its blank line ends it; the next event parses normally.
        assert_eq!(lines.push(b"\r\ndata: ok\n\n"), vec![event("message", "ok")]);
        assert!(!lines.has_pending());
        assert_eq!(parser.push(b"\n\nevent: e\ndata: y\n\n"), vec![event("e", "y")]);
        assert_eq!(parser.oversized_events(), 1);
    }

    #[test]
    fn reports_a_cut_event_and_ignores_events_without_data() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"event: ping\n\ndata: {\"partial").is_empty());
        assert!(parser.has_pending());
        assert_eq!(parser.push(&[0xff, b'\n', b'\n']).len(), 1);
    }
}

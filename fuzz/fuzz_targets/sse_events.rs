//! A server-sent events body (OpenAI, Azure, Anthropic streams), fed whole and then one byte at
//! a time: both must give the same events. Once with the default cap on an event's bytes, once
//! with a small cap (from the first byte) so the skipping of oversized events is exercised too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nstream_hosted::sse::SseParser;

fn same_events_whole_and_chunked(data: &[u8], parser: impl Fn() -> SseParser) {
    let mut whole = parser();
    let events = whole.push(data);
    let mut split = parser();
    let mut chunked = Vec::new();
    for byte in data.chunks(1) {
        chunked.extend(split.push(byte));
    }
    assert_eq!(events, chunked, "chunking changed the events");
    assert_eq!(whole.has_pending(), split.has_pending());
    assert_eq!(whole.oversized_events(), split.oversized_events());
}

fuzz_target!(|data: &[u8]| {
    same_events_whole_and_chunked(data, SseParser::default);
    if let Some((&cap, rest)) = data.split_first() {
        same_events_whole_and_chunked(rest, || SseParser::with_max_event_bytes(usize::from(cap)));
    }
});

//! Calls into libraries that panic on malformed input instead of returning an error.

/// Runs `call`, turning a panic into its message: for calls into libraries that panic on
/// malformed input (the tokenizers crate does on some `tokenizer.json` files, found by fuzzing),
/// so that the input fails, not the thread serving it. The panic hook still logs it.
pub fn catch_panic<T>(call: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|message| (*message).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::catch_panic;

    #[test]
    fn a_panic_becomes_its_message_and_a_value_passes_through() {
        assert_eq!(catch_panic(|| 7), Ok(7));
        let index = 3;
        assert_eq!(
            catch_panic(|| [1, 2][index]),
            Err("index out of bounds: the len is 2 but the index is 3".to_owned())
        );
        assert_eq!(catch_panic(|| -> () { panic!("plain") }), Err("plain".to_owned()));
    }
}

//! Batching decisions, as text-embeddings-inference makes them: by token budget, sorted by length.

/// Limits of one forward pass.
///
/// `#[non_exhaustive]`: build it with [`BatchLimits::new`] and the `with_*` methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchLimits {
    /// Most padded tokens in one batch: batch size × longest sequence.
    pub max_batch_tokens: usize,
    /// Most inputs in one batch.
    pub max_batch_requests: usize,
    /// Whether the encoder packs a batch's sequences without padding (nstream's BERT CPU
    /// kernels): a batch then costs its real tokens, and `max_batch_tokens` counts those.
    pub padding_free: bool,
}

impl BatchLimits {
    /// Limits of `max_batch_tokens` padded tokens and `max_batch_requests` inputs per batch.
    pub fn new(max_batch_tokens: usize, max_batch_requests: usize) -> Self {
        Self { max_batch_tokens, max_batch_requests, padding_free: false }
    }

    /// Sets the most padded tokens in one batch.
    pub fn with_max_batch_tokens(mut self, max_batch_tokens: usize) -> Self {
        self.max_batch_tokens = max_batch_tokens;
        self
    }

    /// Sets the most inputs in one batch.
    pub fn with_max_batch_requests(mut self, max_batch_requests: usize) -> Self {
        self.max_batch_requests = max_batch_requests;
        self
    }

    /// Sets whether a batch costs its real tokens (a padding-free encoder) rather than its
    /// inputs × the longest.
    pub fn with_padding_free(mut self, padding_free: bool) -> Self {
        self.padding_free = padding_free;
        self
    }
}

/// Splits inputs of the given token `lengths` into batches: indices sorted by length (so each batch
/// pads little) and cut wherever adding the next input would pass either limit (with
/// `padding_free`, the token budget counts real tokens instead of inputs × the longest). An input
/// longer than the whole token budget goes alone in its batch. Every index appears exactly once.
pub fn plan_batches(lengths: &[usize], limits: BatchLimits) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Stable: equal lengths keep arrival order.
    order.sort_by_key(|&index| lengths[index]);
    let max_requests = limits.max_batch_requests.max(1);
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_tokens = 0;
    for index in order {
        let length = lengths[index].max(1);
        // Sorted ascending, so this input is the longest of the batch if it joins.
        let cost = if limits.padding_free { current_tokens + length } else { (current.len() + 1) * length };
        if !current.is_empty() && (cost > limits.max_batch_tokens || current.len() >= max_requests) {
            batches.push(std::mem::take(&mut current));
            current_tokens = 0;
        }
        current.push(index);
        current_tokens += length;
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(tokens: usize, requests: usize) -> BatchLimits {
        BatchLimits::new(tokens, requests)
    }

    #[test]
    fn sorts_by_length() {
        assert_eq!(plan_batches(&[5, 1, 3], limits(1000, 10)), vec![vec![1, 2, 0]]);
    }

    #[test]
    fn splits_on_padded_token_budget() {
        // Sorted lengths 2, 2, 4, 4, 10: [2,2,4,4] pads to 16 tokens; 10 alone (5×10 = 50 > 20).
        let batches = plan_batches(&[10, 2, 4, 2, 4], limits(20, 10));
        assert_eq!(batches, vec![vec![1, 3, 2, 4], vec![0]]);
    }

    #[test]
    fn padding_free_budget_counts_real_tokens() {
        // Sorted 2, 2, 4, 4, 10: padded, [2,2,4,4] is 16 tokens and 10 goes alone; counting real
        // tokens (12, then 22 > 20) the cut falls in the same place, and a budget of 22 keeps all.
        let padding_free = limits(20, 10).with_padding_free(true);
        assert_eq!(plan_batches(&[10, 2, 4, 2, 4], padding_free), vec![vec![1, 3, 2, 4], vec![0]]);
        assert_eq!(plan_batches(&[10, 2, 4, 2, 4], padding_free.with_max_batch_tokens(22)), vec![vec![1, 3, 2, 4, 0]]);
        // Seven short inputs and a long one: padded they would cost 8 × 200 = 1600.
        let lengths = [20, 20, 20, 20, 20, 20, 20, 200];
        assert_eq!(plan_batches(&lengths, limits(400, 16)).len(), 2);
        assert_eq!(plan_batches(&lengths, limits(400, 16).with_padding_free(true)).len(), 1);
    }

    #[test]
    fn splits_on_request_count() {
        let batches = plan_batches(&[1; 5], limits(1000, 2));
        assert_eq!(batches, vec![vec![0, 1], vec![2, 3], vec![4]]);
    }

    #[test]
    fn oversized_input_goes_alone_and_nothing_is_lost() {
        let lengths = [300, 1, 512, 7, 7, 256];
        let batches = plan_batches(&lengths, limits(256, 4));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);
        for batch in &batches {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            assert!(batch.len() == 1 || batch.len() * longest <= 256, "{batch:?}");
            assert!(batch.len() <= 4);
        }
        assert!(plan_batches(&[], limits(10, 10)).is_empty());
        assert_eq!(plan_batches(&[3], limits(0, 0)), vec![vec![0]]);
    }
}

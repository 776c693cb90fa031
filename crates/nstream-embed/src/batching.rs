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
}

impl BatchLimits {
    /// Limits of `max_batch_tokens` padded tokens and `max_batch_requests` inputs per batch.
    pub fn new(max_batch_tokens: usize, max_batch_requests: usize) -> Self {
        Self { max_batch_tokens, max_batch_requests }
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
}

/// Splits inputs of the given token `lengths` into batches: indices sorted by length (so each batch
/// pads little) and cut wherever adding the next input would pass either limit. An input longer than
/// the whole token budget goes alone in its batch. Every index appears exactly once.
pub fn plan_batches(lengths: &[usize], limits: BatchLimits) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Stable: equal lengths keep arrival order.
    order.sort_by_key(|&index| lengths[index]);
    let max_requests = limits.max_batch_requests.max(1);
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for index in order {
        // Sorted ascending, so this input is the longest of the batch if it joins.
        let padded = (current.len() + 1) * lengths[index].max(1);
        if !current.is_empty() && (padded > limits.max_batch_tokens || current.len() >= max_requests) {
            batches.push(std::mem::take(&mut current));
        }
        current.push(index);
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
        BatchLimits { max_batch_tokens: tokens, max_batch_requests: requests }
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

//! Holding requests for a model with no Ready endpoint (scaled to zero, or starting): a bounded
//! number per model, each for a bounded time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The per-model hold queues.
#[derive(Debug)]
pub struct HoldQueues {
    capacity: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl HoldQueues {
    /// At most `capacity` requests held per model (0: never hold).
    pub fn new(capacity: usize) -> Self {
        Self { capacity, held: Arc::default() }
    }

    /// A place in `model`'s queue, or `None` when it is full.
    pub fn enter(&self, model: &str) -> Option<HoldTicket> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(model.to_owned()).or_default();
        if *count >= self.capacity {
            return None;
        }
        *count += 1;
        Some(HoldTicket { model: model.to_owned(), held: Arc::clone(&self.held) })
    }

    /// Requests held now for `model`.
    pub fn held(&self, model: &str) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).get(model).copied().unwrap_or(0)
    }
}

/// A held request's place; dropping it frees the place.
#[derive(Debug)]
pub struct HoldTicket {
    model: String,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for HoldTicket {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.model) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_holds_at_most_its_capacity_per_model() {
        let queues = HoldQueues::new(2);
        let first = queues.enter("a/x").expect("room");
        let _second = queues.enter("a/x").expect("room");
        assert!(queues.enter("a/x").is_none(), "the third is refused");
        let _other = queues.enter("a/y").expect("another model has its own queue");
        assert_eq!(queues.held("a/x"), 2);
        drop(first);
        assert_eq!(queues.held("a/x"), 1);
        assert!(queues.enter("a/x").is_some(), "a freed place is reused");
    }

    #[test]
    fn a_capacity_of_zero_never_holds() {
        assert!(HoldQueues::new(0).enter("a/x").is_none());
    }
}

//! The pooled K/V memory of a model's live sequences, and each sequence's claim on it.

use candle_core::{DType, Device, Tensor};

use super::LlamaConfig;
use crate::error::{Error, Result};

/// The attention memory of every sequence of a model: per layer, K and V of shape
/// `(slots, kv_heads, capacity, head_dim)`, one slot per live [`SequenceCache`].
///
/// One tensor per layer, rather than one per sequence, lets a decode step write every new K/V row
/// with one scatter and attend for every decoding sequence with one batched matrix product. It
/// grows by doubling (slots when every slot is taken, capacity when a sequence needs more, up to
/// the context length) and is released when the last sequence is dropped, so an idle model holds
/// no cache and a short answer never pays for the whole context.
pub(super) struct KvPool {
    pub(super) keys: Vec<Tensor>,
    pub(super) values: Vec<Tensor>,
    pub(super) slots: usize,
    pub(super) capacity: usize,
    /// Free slots; the lowest is taken first so the live ones stay packed at the front.
    free: std::collections::BTreeSet<usize>,
    live: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    context_length: usize,
    dtype: DType,
    device: Device,
}

impl KvPool {
    pub(super) fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            slots: 0,
            capacity: 0,
            free: std::collections::BTreeSet::new(),
            live: 0,
            layers: config.layers,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
            context_length: config.context_length,
            dtype,
            device: device.clone(),
        }
    }

    /// Reallocates every layer's K and V at `slots` × `capacity`, keeping what they hold.
    fn resize(&mut self, slots: usize, capacity: usize) -> Result<()> {
        let shape = (slots, self.kv_heads, capacity, self.head_dim);
        for tensors in [&mut self.keys, &mut self.values] {
            if tensors.is_empty() {
                *tensors = (0..self.layers)
                    .map(|_| Tensor::zeros(shape, self.dtype, &self.device))
                    .collect::<candle_core::Result<_>>()?;
                continue;
            }
            for tensor in tensors.iter_mut() {
                let mut grown = tensor.clone();
                if capacity != self.capacity {
                    let wider =
                        Tensor::zeros((self.slots, self.kv_heads, capacity, self.head_dim), self.dtype, &self.device)?;
                    wider.slice_set(&grown, 2, 0)?;
                    grown = wider;
                }
                if slots != self.slots {
                    let taller = Tensor::zeros(shape, self.dtype, &self.device)?;
                    taller.slice_set(&grown, 0, 0)?;
                    grown = taller;
                }
                *tensor = grown;
            }
        }
        self.free.extend(self.slots..slots);
        self.slots = slots;
        self.capacity = capacity;
        Ok(())
    }

    /// Takes a slot, growing the pool when none is free; an empty pool starts over at
    /// `capacity` (so memory left by a long burst goes back when the model is idle).
    pub(super) fn acquire(&mut self, capacity: usize) -> Result<usize> {
        if self.live == 0 && (self.slots > 0 || !self.keys.is_empty()) {
            self.keys.clear();
            self.values.clear();
            self.free.clear();
            self.slots = 0;
            self.capacity = 0;
        }
        if self.keys.is_empty() {
            self.resize(1, capacity.clamp(1, self.context_length))?;
        } else {
            self.reserve(capacity)?;
        }
        if self.free.is_empty() {
            self.resize(self.slots * 2, self.capacity)?;
        }
        let slot = self.free.pop_first().ok_or_else(|| Error::Inference("no free cache slot".into()))?;
        self.live += 1;
        Ok(slot)
    }

    fn release(&mut self, slot: usize) {
        if slot < self.slots && self.free.insert(slot) {
            self.live = self.live.saturating_sub(1);
        }
    }

    /// What the pool holds now.
    pub(super) fn usage(&self) -> KvUsage {
        KvUsage { slots_used: self.live, slots: self.slots, capacity_tokens: self.slots * self.capacity }
    }

    /// Makes room for `needed` tokens per slot (doubling, capped at the context length).
    pub(super) fn reserve(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        if needed > self.context_length {
            return Err(Error::Inference(format!("sequence cache overflow: {needed} > {}", self.context_length)));
        }
        let capacity = needed.max(self.capacity.saturating_mul(2)).min(self.context_length);
        self.resize(self.slots, capacity)
    }
}

/// How much of a model's K/V memory is allocated and claimed, for the KV-cache gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvUsage {
    /// Slots held by live sequences.
    pub slots_used: usize,
    /// Slots allocated (grown by doubling; kept until the next sequence after an idle spell).
    pub slots: usize,
    /// Tokens the allocated memory holds: slots × the per-slot capacity.
    pub capacity_tokens: usize,
}

/// One sequence's claim on the model's K/V memory: a slot of the pool, its length (the position
/// of its next token), its limit and the LoRA adapter its tokens run with, if any. Dropping it
/// frees the slot.
pub struct SequenceCache {
    pub(super) slot: usize,
    pub(super) len: usize,
    pub(super) limit: usize,
    pub(super) pool: std::sync::Arc<std::sync::Mutex<KvPool>>,
    pub(super) adapter: Option<std::sync::Arc<super::LoraAdapter>>,
}

impl std::fmt::Debug for SequenceCache {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SequenceCache")
            .field("slot", &self.slot)
            .field("len", &self.len)
            .field("limit", &self.limit)
            .field("adapter", &self.adapter.as_ref().map(|adapter| adapter.name()))
            .finish()
    }
}

impl SequenceCache {
    /// Tokens stored (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens this sequence may ever hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Runs this sequence's tokens with `adapter` (`None`: the bare base); the adapter must have
    /// been laid out for the cache's model. Set it before the first token: its K/V rows are the
    /// adapter's.
    pub fn set_adapter(&mut self, adapter: Option<std::sync::Arc<super::LoraAdapter>>) -> crate::Result<()> {
        if let Some(adapter) = &adapter
            && adapter.model() != std::sync::Arc::as_ptr(&self.pool) as usize
        {
            return Err(crate::Error::Inference(format!(
                "adapter `{}` was laid out for another model",
                adapter.name()
            )));
        }
        self.adapter = adapter;
        Ok(())
    }

    /// The sequence's adapter, if any.
    pub fn adapter(&self) -> Option<&std::sync::Arc<super::LoraAdapter>> {
        self.adapter.as_ref()
    }
}

impl Drop for SequenceCache {
    fn drop(&mut self) {
        lock(&self.pool).release(self.slot);
    }
}

/// Locks the pool; a panic in an earlier step leaves nothing half-written that matters (a
/// failed step never advances a cache's length), so a poisoned lock is taken as is.
pub(super) fn lock(pool: &std::sync::Mutex<KvPool>) -> std::sync::MutexGuard<'_, KvPool> {
    pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

//! The pooled K/V memory of a model's live sequences, and each sequence's claim on it.

use candle_core::{DType, Device, Tensor};

use super::LlamaConfig;
use crate::error::{Error, Result};

/// The attention memory of every sequence of a model: per layer, K and V of shape
/// `(kv_heads, tokens, head_dim)`, in which each live [`SequenceCache`] owns a region of the
/// token axis sized for its own length.
///
/// One tensor per layer, rather than one per sequence, lets a decode step write every new K/V row
/// with one scatter. A region starts at the sequence's prompt and a stretch of answer and grows
/// by doubling (up to the sequence's own limit) in place when the tokens after it are free, else
/// where a free stretch is, else the pool is laid out again, packed, with room to grow; so a
/// short answer never pays for a long neighbour's context (each sequence's memory follows its own
/// length) and the pool never holds more than its sequences' limits together. It is released
/// when the last sequence is dropped, so an idle model holds no cache.
pub(super) struct KvPool {
    pub(super) keys: Vec<Tensor>,
    pub(super) values: Vec<Tensor>,
    /// Tokens allocated along the pool's token axis.
    pub(super) tokens: usize,
    /// Each slot's region, `None` when the slot is free.
    regions: Vec<Option<Region>>,
    live: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    context_length: usize,
    dtype: DType,
    device: Device,
}

/// A sequence's stretch of the pool's token axis.
#[derive(Clone, Copy, Debug)]
struct Region {
    start: usize,
    capacity: usize,
    /// The most tokens the sequence may ever hold (its region never grows past it).
    limit: usize,
}

impl KvPool {
    pub(super) fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            tokens: 0,
            regions: Vec::new(),
            live: 0,
            layers: config.layers,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
            context_length: config.context_length,
            dtype,
            device: device.clone(),
        }
    }

    /// Where slot `slot`'s tokens start on the pool's token axis.
    pub(super) fn start(&self, slot: usize) -> Result<usize> {
        self.region(slot).map(|region| region.start)
    }

    fn region(&self, slot: usize) -> Result<Region> {
        self.regions
            .get(slot)
            .copied()
            .flatten()
            .ok_or_else(|| Error::Inference(format!("cache slot {slot} holds no sequence")))
    }

    /// Takes a slot for a sequence of at most `limit` tokens with room for `capacity` now; an
    /// empty pool starts over (so memory left by a long burst goes back when the model is idle).
    pub(super) fn acquire(&mut self, capacity: usize, limit: usize) -> Result<usize> {
        if self.live == 0 {
            self.keys.clear();
            self.values.clear();
            self.regions.clear();
            self.tokens = 0;
        }
        let limit = limit.clamp(1, self.context_length);
        let capacity = capacity.clamp(1, limit);
        let slot = match self.regions.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.regions.push(None);
                self.regions.len() - 1
            }
        };
        match self.find_free(capacity, None) {
            Some(start) => self.regions[slot] = Some(Region { start, capacity, limit }),
            None => self.lay_out(slot, Region { start: 0, capacity, limit })?,
        }
        self.live += 1;
        Ok(slot)
    }

    fn release(&mut self, slot: usize) {
        if let Some(region) = self.regions.get_mut(slot)
            && region.take().is_some()
        {
            self.live = self.live.saturating_sub(1);
        }
    }

    /// What the pool holds now.
    pub(super) fn usage(&self) -> KvUsage {
        KvUsage { slots_used: self.live, slots: self.regions.len(), capacity_tokens: self.tokens }
    }

    /// Makes room for `needed` tokens in slot `slot` (doubling its region, capped at its limit):
    /// in place when the tokens after it are free, else in a free stretch (its tokens copied),
    /// else by laying the pool out again.
    pub(super) fn reserve(&mut self, slot: usize, needed: usize) -> Result<()> {
        let region = self.region(slot)?;
        if needed <= region.capacity {
            return Ok(());
        }
        if needed > region.limit {
            return Err(Error::Inference(format!("sequence cache overflow: {needed} > {}", region.limit)));
        }
        let capacity = needed.max(region.capacity.saturating_mul(2)).min(region.limit);
        let grown = Region { capacity, ..region };
        if self.is_free(region.start + region.capacity, region.start + capacity, Some(slot)) {
            self.regions[slot] = Some(grown);
            return Ok(());
        }
        if let Some(start) = self.find_free(capacity, Some(slot)) {
            for tensor in self.keys.iter().chain(&self.values) {
                let held = tensor.narrow(1, region.start, region.capacity)?.contiguous()?;
                tensor.slice_set(&held, 1, start)?;
            }
            self.regions[slot] = Some(Region { start, ..grown });
            return Ok(());
        }
        self.lay_out(slot, grown)
    }

    /// Whether tokens `from..to` are inside the pool and in no region but `own`'s.
    fn is_free(&self, from: usize, to: usize, own: Option<usize>) -> bool {
        to <= self.tokens
            && self.regions.iter().enumerate().all(|(slot, region)| match region {
                Some(region) if Some(slot) != own => region.start + region.capacity <= from || to <= region.start,
                _ => true,
            })
    }

    /// The start of the first free stretch of `capacity` tokens (regions other than `own`'s).
    fn find_free(&self, capacity: usize, own: Option<usize>) -> Option<usize> {
        let mut taken: Vec<(usize, usize)> = self
            .regions
            .iter()
            .enumerate()
            .filter_map(|(slot, region)| match region {
                Some(region) if Some(slot) != own => Some((region.start, region.start + region.capacity)),
                _ => None,
            })
            .collect();
        taken.sort_unstable();
        let mut start = 0;
        for (from, to) in taken {
            if from >= start + capacity {
                break;
            }
            start = start.max(to);
        }
        (start + capacity <= self.tokens).then_some(start)
    }

    /// Lays the pool out again with slot `slot` as `region`: every region packed in slot order,
    /// with half as much again to grow into (never more than the regions' limits together),
    /// what each holds copied to its new place.
    fn lay_out(&mut self, slot: usize, region: Region) -> Result<()> {
        let mut regions = self.regions.clone();
        regions[slot] = Some(region);
        let live = || regions.iter().flatten();
        let needed: usize = live().map(|region| region.capacity).sum();
        let growth: usize = live().map(|region| region.limit - region.capacity).sum();
        let tokens = needed + growth.min(needed / 2);
        // (old start, tokens held, new start) of every region that holds something.
        let mut moves = Vec::new();
        let mut start = 0;
        for (index, entry) in regions.iter_mut().enumerate() {
            let Some(entry) = entry else { continue };
            if let Some(previous) = self.regions[index] {
                moves.push((previous.start, previous.capacity, start));
            }
            entry.start = start;
            start += entry.capacity;
        }
        let shape = (self.kv_heads, tokens, self.head_dim);
        for tensors in [&mut self.keys, &mut self.values] {
            if tensors.is_empty() {
                *tensors = (0..self.layers)
                    .map(|_| Tensor::zeros(shape, self.dtype, &self.device))
                    .collect::<candle_core::Result<_>>()?;
                continue;
            }
            // Layer by layer, so that at most one layer's old tensor is held beside the new ones.
            for tensor in tensors.iter_mut() {
                let packed = Tensor::zeros(shape, self.dtype, &self.device)?;
                for &(from, count, to) in &moves {
                    packed.slice_set(&tensor.narrow(1, from, count)?.contiguous()?, 1, to)?;
                }
                *tensor = packed;
            }
        }
        self.regions = regions;
        self.tokens = tokens;
        Ok(())
    }
}

/// How much of a model's K/V memory is allocated and claimed, for the KV-cache gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvUsage {
    /// Slots held by live sequences.
    pub slots_used: usize,
    /// Slots numbered (kept until the next sequence after an idle spell).
    pub slots: usize,
    /// Tokens the allocated memory holds: the sequences' regions (each sized for its own
    /// length) and room for them to grow.
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

//! Attention over the K/V pool: the decoding sequences together (one batched product over their
//! regions gathered side by side, or on the CPU in f32 a per-sequence kernel straight from the
//! pool's memory), and each prefill chunk with its causal mask.

use candle_core::{DType, Device, Tensor};

use super::LlamaConfig;
use super::forward::{Step, StepInput};
use crate::cpu::CandleThreads;
use crate::error::{Error, Result};

/// Attention for every row of the step, `(rows, heads * head_dim)` in row order: the decoding
/// sequences' rows, then each prefill chunk's, put back in the step's order.
pub(super) fn attend(
    queries: &Tensor,
    pool_keys: &Tensor,
    pool_values: &Tensor,
    inputs: &[StepInput<'_>],
    step: &Step,
    config: &LlamaConfig,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    if let Some(decode) = &step.decode {
        parts.push(match &decode.batched {
            None => cpu_decode_attention(queries, pool_keys, pool_values, &decode.sequences, config, step.capacity)?,
            Some(batched) => batched_decode_attention(queries, pool_keys, pool_values, batched, step.rows, config)?,
        });
    }
    let mut row = 0;
    let mut masks = step.prefill_masks.iter();
    for (input, &start) in inputs.iter().zip(&step.starts) {
        let count = input.tokens.len();
        if count > 1 {
            let mask = masks.next().ok_or_else(|| Error::Inference("a prefill mask is missing".into()))?;
            parts.push(prefill_attention(queries, (pool_keys, pool_values), (input, start), row, mask, config)?);
        }
        row += count;
    }
    let attended = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
    // The parts hold the decoding rows first, then each prefill chunk: back to row order.
    Ok(match step.decode.as_ref().and_then(|decode| decode.reorder.as_ref()) {
        Some(reorder) => attended.index_select(reorder, 0)?,
        None => attended,
    })
}

/// The decoding sequences' attention as one batched product over their regions, gathered side
/// by side and padded to the longest, `(sequences, heads * head_dim)` in step order.
fn batched_decode_attention(
    queries: &Tensor,
    pool_keys: &Tensor,
    pool_values: &Tensor,
    batched: &BatchedDecode,
    rows: usize,
    config: &LlamaConfig,
) -> Result<Tensor> {
    let (kv_heads, head_dim) = (config.kv_heads, config.head_dim);
    let group = config.heads / kv_heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    // (rows, heads, d) -> per slot (slots, kv_heads, group, d): query heads h*group..h*group+group
    // share key/value head h, so no K/V repetition.
    let count = batched.count;
    let query = queries.reshape((rows, kv_heads, group, head_dim))?.index_select(&batched.query_rows, 0)?;
    // (kv_heads, count * longest, d) -> (count, kv_heads, longest, d)
    let gather = |pool: &Tensor| -> Result<Tensor> {
        Ok(pool
            .index_select(&batched.positions, 1)?
            .reshape((kv_heads, count, batched.longest, head_dim))?
            .transpose(0, 1)?
            .contiguous()?)
    };
    let (all_keys, all_values) = (gather(pool_keys)?, gather(pool_values)?);
    let scores = (query.matmul(&all_keys.t()?)? * scale)?.broadcast_add(&batched.mask)?;
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(weights.matmul(&all_values)?.reshape((count, config.heads * head_dim))?)
}

/// One prefill chunk's attention over its region starting at `start` (the cached prefix and the
/// chunk itself, masked causally), `(count, heads * head_dim)`; `row` is the chunk's first row in
/// the step.
fn prefill_attention(
    queries: &Tensor,
    (pool_keys, pool_values): (&Tensor, &Tensor),
    (input, start): (&StepInput<'_>, usize),
    row: usize,
    mask: &Tensor,
    config: &LlamaConfig,
) -> Result<Tensor> {
    let (kv_heads, head_dim) = (config.kv_heads, config.head_dim);
    let group = config.heads / kv_heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let count = input.tokens.len();
    let total = input.cache.len + count;
    let slot_keys = pool_keys.narrow(1, start, total)?;
    let slot_values = pool_values.narrow(1, start, total)?;
    let query =
        queries.narrow(0, row, count)?.transpose(0, 1)?.contiguous()?.reshape((kv_heads, group * count, head_dim))?;
    let scores = (query.matmul(&slot_keys.t()?)? * scale)?
        .reshape((kv_heads, group, count, total))?
        .broadcast_add(mask)?
        .reshape((kv_heads, group * count, total))?;
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(weights
        .matmul(&slot_values)?
        .reshape((config.heads, count, head_dim))?
        .transpose(0, 1)?
        .reshape((count, config.heads * head_dim))?)
}

/// The sequences of a step that decode one token.
pub(super) struct DecodeBatch {
    /// `(step row, region start on the pool's token axis, length after this step)` of each, in
    /// step order.
    pub(super) sequences: Vec<(usize, usize, usize)>,
    /// The tensors of one batched product over the pool (any device but the CPU in f32, which
    /// has [`cpu_decode_attention`]).
    batched: Option<BatchedDecode>,
    /// When prefill chunks share the step: for each step row, its row in
    /// `[decoded rows; prefill chunks in order]`.
    reorder: Option<Tensor>,
}

/// The decoding sequences laid out for one batched attention over their regions, gathered side
/// by side.
struct BatchedDecode {
    /// Decoding sequences.
    count: usize,
    /// The longest decoding sequence after this step, so the keys attended.
    longest: usize,
    /// The step row holding each sequence's query, in step order.
    query_rows: Tensor,
    /// `count * longest` pool positions: each sequence's tokens, its last one repeated past its
    /// length (masked out).
    positions: Tensor,
    /// `(count, 1, 1, longest)`, 0 where a sequence's query may look, -inf past its length.
    mask: Tensor,
}

impl DecodeBatch {
    pub(super) fn new(
        inputs: &[StepInput<'_>],
        starts: &[usize],
        device: &Device,
        dtype: DType,
        force_batched: bool,
    ) -> Result<Option<Self>> {
        let mut sequences = Vec::new();
        let mut row = 0;
        for (input, &start) in inputs.iter().zip(starts) {
            if input.tokens.len() == 1 {
                sequences.push((row, start, input.cache.len + 1));
            }
            row += input.tokens.len();
        }
        if sequences.is_empty() {
            return Ok(None);
        }
        let reorder = if sequences.len() == inputs.len() {
            None
        } else {
            let mut reorder = Vec::with_capacity(row);
            let mut decoded = 0u32;
            let mut prefilled = sequences.len() as u32;
            for input in inputs {
                if input.tokens.len() == 1 {
                    reorder.push(decoded);
                    decoded += 1;
                } else {
                    reorder.extend(prefilled..prefilled + input.tokens.len() as u32);
                    prefilled += input.tokens.len() as u32;
                }
            }
            Some(Tensor::from_vec(reorder, row, device)?)
        };
        let batched = if device.is_cpu() && dtype == DType::F32 && !force_batched {
            None
        } else {
            let count = sequences.len();
            let longest = sequences.iter().map(|&(_, _, length)| length).max().unwrap_or(1);
            let query_rows: Vec<u32> = sequences.iter().map(|&(row, _, _)| row as u32).collect();
            let positions: Vec<u32> = sequences
                .iter()
                .flat_map(|&(_, start, length)| (0..longest).map(move |key| (start + key.min(length - 1)) as u32))
                .collect();
            let mask: Vec<f32> = sequences
                .iter()
                .flat_map(|&(_, _, length)| {
                    (0..longest).map(move |key| if key < length { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            Some(BatchedDecode {
                count,
                longest,
                query_rows: Tensor::from_vec(query_rows, count, device)?,
                positions: Tensor::from_vec(positions, count * longest, device)?,
                mask: Tensor::from_vec(mask, (count, 1, 1, longest), device)?.to_dtype(dtype)?,
            })
        };
        Ok(Some(Self { sequences, batched, reorder }))
    }
}

/// Decode attention on the CPU in f32, straight from the pool's memory: for each decoding
/// sequence and query head, scores against its own keys only, softmax, weighted sum of its
/// values. Each (sequence, head) is computed the same way whatever else is in the step, so a
/// sequence's numbers never depend on its neighbours (seeded sampling reproduces under load),
/// and nothing is padded or masked. Returns `(sequences, heads * head_dim)`.
fn cpu_decode_attention(
    queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    sequences: &[(usize, usize, usize)],
    config: &LlamaConfig,
    capacity: usize,
) -> Result<Tensor> {
    let (heads, kv_heads, head_dim) = (config.heads, config.kv_heads, config.head_dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let queries = queries.contiguous()?;
    let (query_storage, query_layout) = queries.storage_and_layout();
    let (key_storage, key_layout) = keys.storage_and_layout();
    let (value_storage, value_layout) = values.storage_and_layout();
    let (
        candle_core::Storage::Cpu(query_storage),
        candle_core::Storage::Cpu(key_storage),
        candle_core::Storage::Cpu(value_storage),
    ) = (&*query_storage, &*key_storage, &*value_storage)
    else {
        return Err(Error::Inference("CPU decode attention on tensors that are not on the CPU".into()));
    };
    if !key_layout.is_contiguous() || !value_layout.is_contiguous() {
        return Err(Error::Inference("the K/V pool is not contiguous".into()));
    }
    let query_data = &query_storage.as_slice::<f32>()?[query_layout.start_offset()..];
    let key_data = &key_storage.as_slice::<f32>()?[key_layout.start_offset()..];
    let value_data = &value_storage.as_slice::<f32>()?[value_layout.start_offset()..];
    let mut output = vec![0f32; sequences.len() * heads * head_dim];
    // On candle's threads, like the matrix products around it: a second pool would compete with
    // their spinning workers for the cores.
    // One work item per (sequence, K/V head): the query heads of its group are consecutive in a
    // row and read its cached keys and values once.
    nstream_kernels::for_each_row(&CandleThreads, &mut output, group * head_dim, &|index, out| {
        let (sequence, kv_head) = (index / kv_heads, index % kv_heads);
        let (row, start, length) = sequences[sequence];
        let queries = &query_data[(row * heads + kv_head * group) * head_dim..][..group * head_dim];
        // The pool is (kv_heads, capacity, head_dim): head `kv_head`'s tokens of this region.
        let base = (kv_head * capacity + start) * head_dim;
        let keys = &key_data[base..base + length * head_dim];
        let values = &value_data[base..base + length * head_dim];
        nstream_kernels::attend(queries, keys, values, head_dim, scale, out);
    });
    Ok(Tensor::from_vec(output, (sequences.len(), heads * head_dim), &Device::Cpu)?)
}

/// The additive causal mask of `count` new queries after `start` cached tokens:
/// `(count, start + count)`, 0 where a query may look and -inf where it may not.
pub(super) fn causal_mask(count: usize, start: usize, device: &Device) -> Result<Tensor> {
    let total = start + count;
    let mask: Vec<f32> = (0..count)
        .flat_map(|query| (0..total).map(move |key| if key > start + query { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (count, total), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_causal_mask_sees_the_prefix_and_the_past() {
        let mask: Vec<Vec<f32>> = causal_mask(2, 1, &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(mask[0], [0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(mask[1], [0.0, 0.0, 0.0]);
    }
}

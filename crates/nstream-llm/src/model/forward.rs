//! One step of the model for several sequences at once ([`LlamaModel::forward`]), in named
//! stages: check the inputs, lay out the step's rows, then per layer project q/k/v with RoPE,
//! store the new K/V rows in the pool, attend ([`super::attention`]) and run the MLP, and last
//! the logits after each sequence's last token (or every token, for prompt log probabilities).

use candle_core::{DType, Tensor};

use super::LlamaModel;
use super::attention::{DecodeBatch, attend, causal_mask};
use super::kv_pool::{KvPool, lock};
use super::lora::{Group, StepLora};
use super::weights::{Layer, Projections};
use crate::cpu::{SplitRope, SwiGlu};
use crate::error::{Error, Result};

use super::SequenceCache;

/// One sequence's part of a [`LlamaModel::forward`] step: the new tokens and its cache.
pub struct StepInput<'a> {
    /// Tokens to append: a prompt chunk, or the last sampled token.
    pub tokens: &'a [u32],
    /// The sequence's cache; its length is the position of `tokens[0]`.
    pub cache: &'a mut SequenceCache,
}

/// What every layer of one step shares: the rows' RoPE angles, the decoding sequences, where
/// their new K/V rows go in the pool, and the prefill chunks' causal masks.
pub(super) struct Step {
    /// Rows of the step: every input's tokens, in input order.
    pub(super) rows: usize,
    /// `(rows, 1, head_dim / 2)`: each row's angles, for candle's RoPE ops.
    cos: Tensor,
    sin: Tensor,
    /// `(rows, head_dim / 2)`: the same, for the fused CPU split with RoPE.
    cos_rows: Tensor,
    sin_rows: Tensor,
    /// On the CPU in f32, q/k/v are split with RoPE in one op and SwiGLU is one op.
    fused_cpu_ops: bool,
    /// The sequences decoding one token, when there are any.
    pub(super) decode: Option<DecodeBatch>,
    /// `(step row of each decoding sequence, pool position of each (head, sequence,
    /// dimension))` for the decode scatter.
    decode_writes: Option<(Tensor, Tensor)>,
    /// The causal mask of each prefill chunk, in input order.
    pub(super) prefill_masks: Vec<Tensor>,
    /// Tokens along the pool's token axis during this step.
    pub(super) capacity: usize,
    /// Where each input's region starts on the pool's token axis, in input order.
    pub(super) starts: Vec<usize>,
    /// The LoRA adapters of the step's sequences and their rows.
    lora: StepLora,
}

impl LlamaModel {
    /// Runs one step for several sequences: appends each input's tokens to its cache and returns
    /// the logits after each input's last token, shape `(inputs, vocab_size)`, f32.
    ///
    /// Every projection and the MLP run once over all the step's rows. New K/V rows go into the
    /// pool with one scatter per layer; the sequences decoding one token attend together in one
    /// batched product over the pool's slots (padded to the longest, masked), and those
    /// prefilling a chunk attend one by one with a causal mask.
    ///
    /// On error the caches are left at their old length (what was written past it is ignored).
    pub fn forward(&self, inputs: &mut [StepInput<'_>]) -> Result<Tensor> {
        self.forward_rows(inputs, &[])
    }

    /// [`Self::forward`], returning the logits after every token of the inputs whose flag in
    /// `every_row` is set (their prompt's log probabilities), and after the last token of the
    /// others: `(rows, vocab_size)`, f32, in input order. A missing flag is unset.
    pub fn forward_rows(&self, inputs: &mut [StepInput<'_>], every_row: &[bool]) -> Result<Tensor> {
        self.check_step(inputs)?;
        let mut pool = lock(&self.pool);
        let (tokens, positions) = self.step_rows(inputs, &mut pool)?;
        let step = self.prepare_step(inputs, &pool, positions)?;
        let token_ids = Tensor::from_vec(tokens, step.rows, &self.device)?;
        let mut hidden = self.embeddings.index_select(&token_ids, 0)?;
        for (layer_index, layer) in self.layers.iter().enumerate() {
            hidden = self.layer_forward(layer, layer_index, hidden, inputs, &pool, &step)?;
        }
        self.output_logits(inputs, every_row, &hidden)
    }

    /// Refuses an empty step, an input without tokens and a cache of another model.
    fn check_step(&self, inputs: &[StepInput<'_>]) -> Result<()> {
        if inputs.is_empty() || inputs.iter().any(|input| input.tokens.is_empty()) {
            return Err(Error::Inference("a forward step needs at least one token per sequence".into()));
        }
        if inputs.iter().any(|input| !std::sync::Arc::ptr_eq(&input.cache.pool, &self.pool)) {
            return Err(Error::Inference("a cache of another model was passed to forward".into()));
        }
        Ok(())
    }

    /// The step's token ids and their positions, in input order, after checking each input
    /// against its cache's limit and the vocabulary; makes room in the pool for each.
    fn step_rows(&self, inputs: &[StepInput<'_>], pool: &mut KvPool) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for input in inputs {
            let start = input.cache.len;
            let end = start + input.tokens.len();
            if end > input.cache.limit {
                return Err(Error::Inference(format!("sequence too long: {end} > {}", input.cache.limit)));
            }
            if let Some(&bad) = input.tokens.iter().find(|&&token| token as usize >= self.config.vocab_size) {
                return Err(Error::Inference(format!("token id {bad} is outside the vocabulary")));
            }
            pool.reserve(input.cache.slot, end)?;
            tokens.extend_from_slice(input.tokens);
            positions.extend((start..end).map(|position| position as u32));
        }
        Ok((tokens, positions))
    }

    /// Lays out what every layer of the step shares.
    fn prepare_step(&self, inputs: &[StepInput<'_>], pool: &KvPool, positions: Vec<u32>) -> Result<Step> {
        let rows = positions.len();
        let position_ids = Tensor::from_vec(positions, rows, &self.device)?;
        let starts = inputs.iter().map(|input| pool.start(input.cache.slot)).collect::<Result<Vec<usize>>>()?;
        let decode = DecodeBatch::new(inputs, &starts, &self.device, self.dtype, self.batched_decode)?;
        let decode_writes = self.decode_writes(decode.as_ref())?;
        let prefill_masks = inputs
            .iter()
            .filter(|input| input.tokens.len() > 1)
            .map(|input| {
                causal_mask(input.tokens.len(), input.cache.len, &self.device)?
                    .to_dtype(self.dtype)
                    .map_err(Error::from)
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let half = self.config.head_dim / 2;
        let cos = self.cos.index_select(&position_ids, 0)?.reshape((rows, 1, half))?;
        let sin = self.sin.index_select(&position_ids, 0)?.reshape((rows, 1, half))?;
        let (cos_rows, sin_rows) = (cos.reshape((rows, half))?, sin.reshape((rows, half))?);
        let adapters: Vec<_> = inputs.iter().map(|input| input.cache.adapter.as_ref()).collect();
        let lengths: Vec<usize> = inputs.iter().map(|input| input.tokens.len()).collect();
        let lora = match adapters.iter().any(Option::is_some) {
            true => StepLora::new(&adapters, &lengths, &self.device)?,
            false => StepLora::default(),
        };
        Ok(Step {
            rows,
            cos,
            sin,
            cos_rows,
            sin_rows,
            fused_cpu_ops: self.device.is_cpu() && self.dtype == DType::F32,
            decode,
            decode_writes,
            prefill_masks,
            capacity: pool.tokens,
            starts,
            lora,
        })
    }

    /// Where the new K/V rows of decoding sequences go: one scatter along the pool's token
    /// axis, at each sequence's region start plus its position, for every (head, sequence,
    /// dimension). Every one is its own GPU thread, so the write costs the same for 1 or 64
    /// sequences. (Prefill chunks are block copies, one per sequence.)
    fn decode_writes(&self, decode: Option<&DecodeBatch>) -> Result<Option<(Tensor, Tensor)>> {
        let Some(decode) = decode else { return Ok(None) };
        let (kv_heads, head_dim) = (self.config.kv_heads, self.config.head_dim);
        let count = decode.sequences.len();
        let rows: Vec<u32> = decode.sequences.iter().map(|&(row, _, _)| row as u32).collect();
        let mut positions = Vec::with_capacity(kv_heads * count * head_dim);
        for _ in 0..kv_heads {
            for &(_, start, length) in &decode.sequences {
                positions.extend(std::iter::repeat_n((start + length - 1) as u32, head_dim));
            }
        }
        Ok(Some((
            Tensor::from_vec(rows, count, &self.device)?,
            Tensor::from_vec(positions, (kv_heads, count, head_dim), &self.device)?,
        )))
    }

    /// One transformer block over the step's rows: attention, then the MLP, each with its
    /// residual.
    fn layer_forward(
        &self,
        layer: &Layer,
        layer_index: usize,
        hidden: Tensor,
        inputs: &[StepInput<'_>],
        pool: &KvPool,
        step: &Step,
    ) -> Result<Tensor> {
        let config = &self.config;
        let normed = candle_nn::ops::rms_norm(&hidden, &layer.attention_norm, config.rms_norm_eps as f32)?;
        let (queries, keys, values) = self.attention_qkv(layer, layer_index, &normed, step)?;
        let pool_keys = &pool.keys[layer_index];
        let pool_values = &pool.values[layer_index];
        let values = values.reshape((step.rows, config.kv_heads, config.head_dim))?;
        self.store_kv((pool_keys, pool_values), (&keys, &values), inputs, step)?;
        let attended = attend(&queries, pool_keys, pool_values, inputs, step, config)?;
        let output = layer.attention_output.forward(&attended)?;
        let output = self.lora(output, &attended, layer_index, Group::Output, step)?;
        let hidden = (output + &hidden)?;
        self.mlp(layer, layer_index, hidden, step)
    }

    /// Queries `(rows, heads, head_dim)` and keys `(rows, kv_heads, head_dim)` with RoPE applied,
    /// and values `(rows, kv_heads * head_dim)`.
    fn attention_qkv(
        &self,
        layer: &Layer,
        layer_index: usize,
        normed: &Tensor,
        step: &Step,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let config = &self.config;
        let (rows, head_dim) = (step.rows, config.head_dim);
        Ok(match &layer.attention_qkv {
            Projections::Fused { linear, widths } if step.fused_cpu_ops && widths.len() == 3 => {
                let split =
                    SplitRope { widths: [widths[0], widths[1], widths[2]], head_dim, neox: config.rope_is_neox };
                let projected = self.lora(linear.forward(normed)?, normed, layer_index, Group::Qkv, step)?;
                let [queries, keys, values] = split.apply(&projected, &step.cos_rows, &step.sin_rows)?;
                (
                    queries.reshape((rows, config.heads, head_dim))?,
                    keys.reshape((rows, config.kv_heads, head_dim))?,
                    values,
                )
            }
            _ => {
                let parts = layer.attention_qkv.forward(normed)?;
                let [queries, keys, values]: [Tensor; 3] = self
                    .lora_parts(parts, normed, layer_index, Group::Qkv, step)?
                    .try_into()
                    .map_err(|_| Error::Inference("q/k/v projections are not three".into()))?;
                (
                    self.rope(&queries.contiguous()?, config.heads, step)?,
                    self.rope(&keys.contiguous()?, config.kv_heads, step)?,
                    values.contiguous()?,
                )
            }
        })
    }

    /// RoPE over `(rows, heads * head_dim)`; each row is its own "batch" of one position, so
    /// every row gets its own angle. Returns `(rows, heads, head_dim)`.
    fn rope(&self, x: &Tensor, heads: usize, step: &Step) -> Result<Tensor> {
        let (rows, head_dim) = (step.rows, self.config.head_dim);
        let x = x.reshape((rows, heads, 1, head_dim))?;
        let rotated = if self.config.rope_is_neox {
            candle_nn::rotary_emb::rope(&x, &step.cos, &step.sin)?
        } else {
            candle_nn::rotary_emb::rope_i(&x, &step.cos, &step.sin)?
        };
        Ok(rotated.reshape((rows, heads, head_dim))?)
    }

    /// Writes the step's new K/V rows into this layer's pool tensors: the decoding sequences'
    /// with one scatter, each prefill chunk as a block at its cache's length.
    fn store_kv(
        &self,
        (pool_keys, pool_values): (&Tensor, &Tensor),
        (keys, values): (&Tensor, &Tensor),
        inputs: &[StepInput<'_>],
        step: &Step,
    ) -> Result<()> {
        if let Some((rows, positions)) = &step.decode_writes {
            for (pool_part, part) in [(pool_keys, keys), (pool_values, values)] {
                // (sequences, kv_heads, head_dim) -> (kv_heads, sequences, head_dim), the pool's order.
                let new_rows = part.index_select(rows, 0)?.transpose(0, 1)?.contiguous()?;
                pool_part.scatter_set(positions, &new_rows, 1)?;
            }
        }
        let mut row = 0;
        for (input, &start) in inputs.iter().zip(&step.starts) {
            let count = input.tokens.len();
            if count > 1 {
                for (pool_part, part) in [(pool_keys, keys), (pool_values, values)] {
                    let block = part.narrow(0, row, count)?.transpose(0, 1)?.contiguous()?;
                    pool_part.slice_set(&block, 1, start + input.cache.len)?;
                }
            }
            row += count;
        }
        Ok(())
    }

    /// The MLP with its residual: SwiGLU over the gate and up projections, then down.
    fn mlp(&self, layer: &Layer, layer_index: usize, hidden: Tensor, step: &Step) -> Result<Tensor> {
        let normed = candle_nn::ops::rms_norm(&hidden, &layer.ffn_norm, self.config.rms_norm_eps as f32)?;
        let activated = match &layer.ffn_gate_up {
            Projections::Fused { linear, widths }
                if step.fused_cpu_ops && widths.len() == 2 && widths[0] == widths[1] =>
            {
                self.lora(linear.forward(&normed)?, &normed, layer_index, Group::GateUp, step)?
                    .apply_op1_no_bwd(&SwiGlu)?
            }
            _ => {
                let parts = layer.ffn_gate_up.forward(&normed)?;
                let [gate, up]: [Tensor; 2] = self
                    .lora_parts(parts, &normed, layer_index, Group::GateUp, step)?
                    .try_into()
                    .map_err(|_| Error::Inference("gate/up projections are not two".into()))?;
                (candle_nn::ops::silu(&gate)? * up)?
            }
        };
        let output = self.lora(layer.ffn_down.forward(&activated)?, &activated, layer_index, Group::Down, step)?;
        Ok((output + &hidden)?)
    }

    /// `output` plus the update of the step's LoRA adapters (unchanged when there is none).
    fn lora(&self, output: Tensor, input: &Tensor, layer_index: usize, group: Group, step: &Step) -> Result<Tensor> {
        match step.lora.is_empty() {
            true => Ok(output),
            false => step.lora.apply(output, input, layer_index, group),
        }
    }

    /// [`LlamaModel::lora`] for projections computed separately: their outputs side by side get
    /// the group's update, then are split again.
    fn lora_parts(
        &self,
        parts: Vec<Tensor>,
        input: &Tensor,
        layer_index: usize,
        group: Group,
        step: &Step,
    ) -> Result<Vec<Tensor>> {
        if step.lora.is_empty() {
            return Ok(parts);
        }
        let widths: Vec<usize> = parts.iter().map(|part| part.dim(1)).collect::<candle_core::Result<_>>()?;
        let joined = step.lora.apply(Tensor::cat(&parts, 1)?, input, layer_index, group)?;
        let mut start = 0;
        widths
            .into_iter()
            .map(|width| {
                let part = joined.narrow(1, start, width)?;
                start += width;
                Ok(part)
            })
            .collect()
    }

    /// Advances every cache past its tokens and returns the logits after each input's last
    /// token, or after each of its tokens when flagged in `every_row`: `(rows, vocab_size)`, f32.
    fn output_logits(&self, inputs: &mut [StepInput<'_>], every_row: &[bool], hidden: &Tensor) -> Result<Tensor> {
        let mut last_rows = Vec::with_capacity(inputs.len());
        let mut row = 0u32;
        for (index, input) in inputs.iter_mut().enumerate() {
            let start = row;
            row += input.tokens.len() as u32;
            if every_row.get(index).copied().unwrap_or(false) {
                last_rows.extend(start..row);
            } else {
                last_rows.push(row - 1);
            }
            input.cache.len += input.tokens.len();
        }
        let count = last_rows.len();
        let last_rows = Tensor::from_vec(last_rows, count, &self.device)?;
        let last = hidden.index_select(&last_rows, 0)?;
        let normed = candle_nn::ops::rms_norm(&last, &self.norm, self.config.rms_norm_eps as f32)?;
        Ok(self.output.forward(&normed)?.to_dtype(DType::F32)?)
    }
}

//! The BERT encoder's f32 CPU path on nstream-kernels' dense kernels instead of candle ops.
//!
//! Why: at one sentence per request (a 15 × 384 activation) the forward pass is a few hundred
//! small candle ops, each allocating its output and some dispatching to a thread pool, and
//! candle's f32 products (the gemm crate) pack both operands on every call. Here the weights are
//! packed once at load ([`PackedMatrix`]), the GELU runs inside the intermediate product, the
//! residual add inside the layer norm, and the attention is one pass per block of query rows over
//! the fused q/k/v rows (padding keys skipped rather than masked). Buffers are allocated once per
//! forward pass. The threads are rayon's (the pool the worker runs in), the same that candle's
//! products use, so no second pool competes for the cores.
//!
//! The arithmetic is the same as the candle path's up to rounding (f32 throughout, sums in a
//! different order, polynomial `exp` and `erf` accurate to 1e-7 and 2e-6); tests/reference.rs checks the
//! result against sentence-transformers, and the unit test below against the candle path.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use candle_core::Tensor;
use nstream_kernels::dense::{Activation, AttentionShape, PackedMatrix, add_layer_norm, encoder_attention};
use nstream_kernels::dense_bf16::PackedMatrixBf16;
use nstream_kernels::{KernelError, Parallel};
use rayon::prelude::*;

use crate::config::HiddenAct;
use crate::error::{Error, Result};

/// Runs work items on the rayon pool the calling thread belongs to (the global one otherwise):
/// the caller and `threads − 1` helpers take items one at a time from a shared counter, so a
/// helper that starts late (other processes on the cores) takes fewer.
pub(crate) struct RayonThreads;

impl Parallel for RayonThreads {
    fn run(&self, items: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
        let threads = rayon::current_num_threads().min(items);
        if threads <= 1 {
            if items > 0 {
                work(0..items);
            }
            return;
        }
        let next = AtomicUsize::new(0);
        let take = || {
            loop {
                let item = next.fetch_add(1, Ordering::Relaxed);
                if item >= items {
                    break;
                }
                work(item..item + 1);
            }
        };
        rayon::in_place_scope(|scope| {
            for _ in 1..threads {
                scope.spawn(|_| take());
            }
            take();
        });
    }
}

fn kernel_error(error: KernelError) -> Error {
    Error::Inference(format!("BERT kernels: {error}"))
}

/// A layer norm's parameters.
pub(crate) struct Norm {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) epsilon: f32,
}

/// Rows of a layer norm per parallel work item.
const NORM_ROWS: usize = 128;

impl Norm {
    /// `values = norm(values + residual)`, row by row, blocks of rows spread over rayon's threads.
    fn apply(&self, values: &mut [f32], residual: Option<&[f32]>) -> Result<()> {
        let block = NORM_ROWS * self.weight.len().max(1);
        if residual.is_some_and(|residual| residual.len() != values.len()) {
            return add_layer_norm(values, residual, &self.weight, &self.bias, self.epsilon).map_err(kernel_error);
        }
        values.par_chunks_mut(block).enumerate().try_for_each(|(index, part)| {
            let residual = residual.map(|residual| &residual[index * block..][..part.len()]);
            add_layer_norm(part, residual, &self.weight, &self.bias, self.epsilon).map_err(kernel_error)
        })
    }
}

/// The activations of one forward pass, kept between passes: a buffer is zeroed only where it
/// grows (every value is written before it is read), so a pass of the size of an earlier one
/// neither clears nor page-faults tens of megabytes. They stay at the largest batch's size, which
/// the batcher's token budget bounds (`--max-batch-tokens`, 2,048 on the CPU by default: 13.5
/// KiB per token of MiniLM, about 28 MiB).
#[derive(Default)]
pub(crate) struct Buffers {
    qkv: Vec<f32>,
    context: Vec<f32>,
    attention: Vec<f32>,
    intermediate: Vec<f32>,
}

/// A linear layer packed for the kernels: f32 products, or bf16 products (`--dtype bf16` on a CPU
/// with AVX-512 BF16; everything else stays f32).
pub(crate) enum Linear {
    F32(PackedMatrix),
    Bf16(PackedMatrixBf16),
}

impl Linear {
    /// Output features.
    pub(crate) fn rows(&self) -> usize {
        match self {
            Self::F32(matrix) => matrix.rows(),
            Self::Bf16(matrix) => matrix.rows(),
        }
    }

    /// `output = activation(input · Wᵀ + bias)` for `batch` rows.
    fn matmul(&self, input: &[f32], batch: usize, output: &mut [f32], activation: Activation) -> Result<()> {
        match self {
            Self::F32(matrix) => matrix.matmul(input, batch, output, activation, &RayonThreads),
            Self::Bf16(matrix) => matrix.matmul(input, batch, output, activation, &RayonThreads),
        }
        .map_err(kernel_error)
    }
}

/// One encoder layer with its products packed.
pub(crate) struct CpuLayer {
    pub(crate) qkv: Linear,
    pub(crate) attention_output: Linear,
    pub(crate) attention_norm: Norm,
    pub(crate) intermediate: Linear,
    pub(crate) output: Linear,
    pub(crate) output_norm: Norm,
}

/// The BERT encoder on the CPU in f32.
pub(crate) struct CpuBert {
    /// `vocab × hidden`.
    pub(crate) word_embeddings: Vec<f32>,
    /// `positions × hidden`, token type 0 already added.
    pub(crate) position_embeddings: Vec<f32>,
    pub(crate) embeddings_norm: Norm,
    pub(crate) layers: Vec<CpuLayer>,
    pub(crate) activation: Activation,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    /// Reused by every forward pass (one at a time: a model has one worker).
    pub(crate) buffers: Mutex<Buffers>,
}

/// The kernels' activation for a config's.
pub(crate) fn activation_for(activation: HiddenAct) -> Activation {
    match activation {
        HiddenAct::Gelu => Activation::GeluErf,
        HiddenAct::GeluApproximate => Activation::GeluTanh,
        HiddenAct::Relu => Activation::Relu,
    }
}

/// A linear layer's weight and bias (candle tensors, f32 on the CPU) packed for the kernels.
/// With `bf16_products`, stored as bfloat16 for bf16 products (the caller checked the CPU).
pub(crate) fn pack(weight: &Tensor, bias: &Tensor, bf16_products: bool) -> Result<Linear> {
    let (rows, cols) = weight.dims2()?;
    let weights = weight.flatten_all()?.to_vec1::<f32>()?;
    let bias = bias.to_vec1::<f32>()?;
    if bf16_products {
        return PackedMatrixBf16::new(&weights, rows, cols, Some(&bias)).map(Linear::Bf16).map_err(kernel_error);
    }
    PackedMatrix::new(&weights, rows, cols, Some(&bias)).map(Linear::F32).map_err(kernel_error)
}

impl CpuBert {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// The last hidden states (`batch × sequence × hidden`, row-major) of right-padded `ids`
    /// (`batch × sequence`) whose real lengths are `lengths`.
    ///
    /// Padding costs nothing: the real tokens of every sequence are packed one after another (no
    /// padding rows), every product runs on those rows only and the attention runs per sequence
    /// over its own rows. Padding rows of the result are zeros.
    pub(crate) fn forward(&self, ids: &[u32], batch: usize, sequence: usize, lengths: &[usize]) -> Result<Vec<f32>> {
        let hidden = self.hidden();
        let positions = self.position_embeddings.len() / hidden.max(1);
        if sequence > positions {
            return Err(Error::Inference(format!(
                "sequence of {sequence} tokens exceeds the {positions} positions of the model"
            )));
        }
        if ids.len() != batch * sequence {
            return Err(Error::Inference(format!("{} token ids for a batch of {batch} × {sequence}", ids.len())));
        }
        if lengths.len() != batch || lengths.iter().any(|&length| length > sequence) {
            return Err(Error::Inference(format!("lengths {lengths:?} do not fit a batch of {batch} × {sequence}")));
        }
        let packed_ids: Vec<(u32, usize)> = ids
            .chunks_exact(sequence.max(1))
            .zip(lengths)
            .flat_map(|(row, &length)| row[..length].iter().enumerate().map(|(position, &id)| (id, position)))
            .collect();
        let states = self.forward_packed(&packed_ids, lengths)?;
        let mut padded = vec![0f32; batch * sequence * hidden];
        let mut packed_rows = states.chunks_exact(hidden.max(1));
        for (output, &length) in padded.chunks_exact_mut((sequence * hidden).max(1)).zip(lengths) {
            for row in output.chunks_exact_mut(hidden.max(1)).take(length) {
                if let Some(values) = packed_rows.next() {
                    row.copy_from_slice(values);
                }
            }
        }
        Ok(padded)
    }

    /// The last hidden states of packed sequences: `tokens` holds every sequence's (id, position)
    /// one after another, `lengths` how many belong to each. Returns `tokens.len() × hidden`.
    fn forward_packed(&self, tokens: &[(u32, usize)], lengths: &[usize]) -> Result<Vec<f32>> {
        let hidden = self.hidden();
        let rows = tokens.len();
        let vocabulary = self.word_embeddings.len() / hidden.max(1);
        let mut states = vec![0f32; rows * hidden];
        for (&(id, position), state) in tokens.iter().zip(states.chunks_exact_mut(hidden)) {
            let id = id as usize;
            if id >= vocabulary {
                return Err(Error::Inference(format!(
                    "token id {id} is outside the vocabulary of {vocabulary} tokens"
                )));
            }
            let word = &self.word_embeddings[id * hidden..][..hidden];
            let position = &self.position_embeddings[position * hidden..][..hidden];
            for ((value, &word), &position) in state.iter_mut().zip(word).zip(position) {
                *value = word + position;
            }
        }
        self.embeddings_norm.apply(&mut states, None)?;

        let intermediate_size = self.layers.first().map_or(0, |layer| layer.intermediate.rows());
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        let Buffers { qkv, context, attention, intermediate } = &mut *buffers;
        qkv.resize(rows * 3 * hidden, 0.0);
        context.resize(rows * hidden, 0.0);
        attention.resize(rows * hidden, 0.0);
        intermediate.resize(rows * intermediate_size, 0.0);
        for layer in &self.layers {
            layer.qkv.matmul(&states, rows, qkv, Activation::Identity)?;
            self.attention(qkv, lengths, context)?;
            layer.attention_output.matmul(context, rows, attention, Activation::Identity)?;
            layer.attention_norm.apply(attention, Some(&states))?;
            layer.intermediate.matmul(attention, rows, intermediate, self.activation)?;
            layer.output.matmul(intermediate, rows, &mut states, Activation::Identity)?;
            layer.output_norm.apply(&mut states, Some(attention))?;
        }
        Ok(states)
    }

    /// Each packed sequence's attention over its own rows (`qkv`: `rows × 3·hidden`, `context`:
    /// `rows × hidden`); the kernel spreads a sequence's blocks of query rows over the threads.
    fn attention(&self, qkv: &[f32], lengths: &[usize], context: &mut [f32]) -> Result<()> {
        let hidden = self.hidden();
        let mut first = 0;
        for &length in lengths.iter().filter(|&&length| length > 0) {
            let shape = AttentionShape { batch: 1, sequence: length, heads: self.heads, head_dim: self.head_dim };
            encoder_attention(
                &qkv[first * 3 * hidden..][..length * 3 * hidden],
                shape,
                &[length],
                &mut context[first * hidden..][..length * hidden],
                &RayonThreads,
            )
            .map_err(kernel_error)?;
            first += length;
        }
        Ok(())
    }
}

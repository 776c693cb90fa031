//! Fused CPU kernels of the training forward, each with a hand-written backward pass.
//!
//! Written out of candle's differentiable primitives, RMSNorm, SwiGLU, RoPE, attention and the
//! cross-entropy are dozens of element-wise operations, each allocating its output and running
//! on one thread, and candle's backward adds as many again (plus the gradients of frozen
//! tensors, which it computes and drops). These custom operations compute the same functions in
//! one pass each, over rows in parallel (rayon), and their `bwd` computes only the gradients of
//! arguments that track one. The composite forms in `forward` stay as the reference (and the
//! path off the CPU); the tests compare both, values and gradients.
//!
//! The inner loops run through [`crate::simd::dispatch`]: compiled for AVX2 + FMA or AVX-512
//! where the CPU has them (the crate itself is built for baseline x86-64), each parallel task
//! dispatching its own rows.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::simd::{Kernel, Level, dispatch};

/// The float types the kernels run in (f32 for training, f64 for the finite-difference tests).
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
    /// `exp` for the kernels' inner loops: a polynomial that vectorises (f32, within 2 ulp on
    /// the range a softmax or sigmoid uses), the library's `exp` in f64 (the precise tests).
    fn fast_exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    /// `self * a + b` rounded once (only called where the CPU has FMA).
    fn mul_add(self, a: Self, b: Self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        exp_f32(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
}

/// Cephes' `expf` without branches (so that loops of it vectorise): `x = n ln 2 + r`, a degree-6
/// polynomial for `exp(r)`, and `2^n` from the exponent bits. Inputs are clamped to
/// [-87.3, 88] (results from 1.2e-38 to 1.65e38); NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOW: f32 = -87.3;
    const HIGH: f32 = 88.0;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // `clamp` keeps NaN a NaN.
    let x = x.clamp(LOW, HIGH);
    let rounded = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - rounded * 0.693_359_4 - rounded * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_66;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let exponent = rounded as i32;
    y * f32::from_bits(((exponent + 127) << 23) as u32)
}

fn error(message: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(message.into())
}

/// The contiguous values of a CPU storage.
fn values<'a, T: Real>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => Err(error("a fused training kernel needs contiguous inputs")),
    }
}

/// Runs `f` over a tensor's values (made contiguous first).
fn with_values<T: Real, R>(tensor: &Tensor, f: impl FnOnce(&[T]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let tensor = tensor.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(values(cpu, layout)?),
        _ => Err(error("the fused training kernels run on the CPU")),
    }
}

fn tensor_of<T: Real>(data: Vec<T>, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, like.shape(), like.device())
}

/// Rows per parallel task: enough work per task that rayon's overhead stays small.
fn rows_per_task(rows: usize, width: usize) -> usize {
    (16_384 / width.max(1)).clamp(1, rows.max(1))
}

/// `a * b + c`, fused where the CPU has FMA.
#[inline(always)]
fn fused<T: Real, const FMA: bool>(a: T, b: T, c: T) -> T {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Independent partial sums of [`dot`] and [`sum_of_squares`]: enough for four 256-bit f32
/// accumulators, so that the loop is not bound by the latency of one chain of additions.
const LANES: usize = 32;

#[inline(always)]
fn sum_lanes<T: Real>(sums: &[T; LANES], rest: T) -> T {
    let mut half = [T::zero(); LANES / 2];
    for (index, value) in half.iter_mut().enumerate() {
        *value = sums[index] + sums[index + LANES / 2];
    }
    half.iter().fold(rest, |total, &lane| total + lane)
}

#[inline(always)]
fn dot<T: Real, const FMA: bool>(a: &[T], b: &[T]) -> T {
    let mut sums = [T::zero(); LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((sum, &a), &b) in sums.iter_mut().zip(x).zip(y) {
            *sum = fused::<T, FMA>(a, b, *sum);
        }
    }
    let mut rest = T::zero();
    for (&x, &y) in a_rest.iter().zip(b_rest) {
        rest = fused::<T, FMA>(x, y, rest);
    }
    sum_lanes(&sums, rest)
}

/// `out += factor * x`.
#[inline(always)]
fn add_scaled<T: Real, const FMA: bool>(out: &mut [T], factor: T, x: &[T]) {
    for (o, &value) in out.iter_mut().zip(x) {
        *o = fused::<T, FMA>(factor, value, *o);
    }
}

macro_rules! dispatch_storage {
    ($storage:expr, $call:ident ( $($argument:expr),* )) => {
        match $storage {
            CpuStorage::F32(_) => $call::<f32>($($argument),*),
            CpuStorage::F64(_) => $call::<f64>($($argument),*),
            _ => Err(error("the fused training kernels run in f32 or f64")),
        }
    };
}

macro_rules! dispatch_dtype {
    ($dtype:expr, $call:ident ( $($argument:expr),* )) => {
        match $dtype {
            candle_core::DType::F32 => $call::<f32>($($argument),*),
            candle_core::DType::F64 => $call::<f64>($($argument),*),
            _ => Err(error("the fused training kernels run in f32 or f64")),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w over the last dimension.

/// Llama's RMSNorm of `(rows, hidden)` by a `(hidden,)` weight.
pub(crate) struct RmsNorm {
    pub eps: f64,
    pub level: Level,
}

#[inline(always)]
fn inverse_rms<T: Real, const FMA: bool>(row: &[T], eps: f64) -> T {
    let mean = dot::<T, FMA>(row, row) / T::from_f64(row.len() as f64);
    T::one() / (mean + T::from_f64(eps)).sqrt()
}

/// Normalises the rows of `x` into `out`.
struct NormRows<'a, T> {
    out: &'a mut [T],
    x: &'a [T],
    weight: &'a [T],
    eps: f64,
}

impl<T: Real> Kernel for NormRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let width = self.weight.len();
        for (out, row) in self.out.chunks_exact_mut(width).zip(self.x.chunks_exact(width)) {
            let inverse = inverse_rms::<T, FMA>(row, self.eps);
            for ((o, &value), &scale) in out.iter_mut().zip(row).zip(self.weight) {
                *o = value * inverse * scale;
            }
        }
    }
}

/// The input gradient of the rows of `x` from the output gradient `g`, into `out`.
struct NormRowsBackward<'a, T> {
    out: &'a mut [T],
    x: &'a [T],
    g: &'a [T],
    weight: &'a [T],
    eps: f64,
}

impl<T: Real> Kernel for NormRowsBackward<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let width = self.weight.len();
        let n = T::from_f64(width as f64);
        let rows = self.out.chunks_exact_mut(width).zip(self.x.chunks_exact(width)).zip(self.g.chunks_exact(width));
        for ((out, row), g) in rows {
            let inverse = inverse_rms::<T, FMA>(row, self.eps);
            // Σ g w x, as a dot product of g ⊙ w with x, written into `out` first.
            for ((o, &gv), &w) in out.iter_mut().zip(g).zip(self.weight) {
                *o = gv * w;
            }
            let projection = dot::<T, FMA>(out, row);
            let correction = inverse * inverse * inverse * projection / n;
            for (o, &value) in out.iter_mut().zip(row) {
                *o = inverse * *o - value * correction;
            }
        }
    }
}

fn rms_norm_forward<T: Real>(
    norm: &RmsNorm,
    x: &CpuStorage,
    x_layout: &Layout,
    weight: &CpuStorage,
    weight_layout: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (x, weight) = (values::<T>(x, x_layout)?, values::<T>(weight, weight_layout)?);
    let width = weight.len();
    if width == 0 || !x.len().is_multiple_of(width) {
        return Err(error("rms-norm: the input's rows do not match the weight"));
    }
    let mut out = vec![T::zero(); x.len()];
    let chunk = rows_per_task(x.len() / width, width) * width;
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(out, x)| {
        dispatch(norm.level, NormRows { out, x, weight, eps: norm.eps });
    });
    Ok((T::to_cpu_storage_owned(out), x_layout.shape().clone()))
}

fn rms_norm_backward<T: Real>(
    norm: &RmsNorm,
    x: &Tensor,
    weight: &Tensor,
    gradient: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (want_x, want_weight) = (x.track_op(), weight.track_op());
    let eps = norm.eps;
    with_values::<T, _>(x, |xs| {
        with_values::<T, _>(weight, |ws| {
            with_values::<T, _>(gradient, |gs| {
                let width = ws.len();
                let chunk = rows_per_task(xs.len() / width.max(1), width) * width;
                let x_gradient = if want_x {
                    let mut out = vec![T::zero(); xs.len()];
                    out.par_chunks_mut(chunk).zip(xs.par_chunks(chunk)).zip(gs.par_chunks(chunk)).for_each(
                        |((out, x), g)| {
                            dispatch(norm.level, NormRowsBackward { out, x, g, weight: ws, eps });
                        },
                    );
                    Some(tensor_of(out, x)?)
                } else {
                    None
                };
                let weight_gradient = if want_weight {
                    let mut sums = vec![T::zero(); width];
                    for (row, g) in xs.chunks_exact(width).zip(gs.chunks_exact(width)) {
                        let inverse = inverse_rms::<T, false>(row, eps);
                        for ((sum, &value), &gv) in sums.iter_mut().zip(row).zip(g) {
                            *sum += gv * value * inverse;
                        }
                    }
                    Some(tensor_of(sums, weight)?)
                } else {
                    None
                };
                Ok((x_gradient, weight_gradient))
            })
        })
    })
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_storage!(x, rms_norm_forward(self, x, x_layout, weight, weight_layout))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _result: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(x.dtype(), rms_norm_backward(self, x, weight, gradient))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: y = silu(gate) * up, silu(g) = g * sigmoid(g).

/// `silu(gate) * up`, element-wise.
pub(crate) struct SwiGlu {
    pub level: Level,
}

const ELEMENTS_PER_TASK: usize = 16_384;

#[inline(always)]
fn sigmoid<T: Real>(value: T) -> T {
    T::one() / ((-value).fast_exp() + T::one())
}

struct SwiGluForward<'a, T> {
    out: &'a mut [T],
    gate: &'a [T],
    up: &'a [T],
}

impl<T: Real> Kernel for SwiGluForward<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        for ((o, &g), &u) in self.out.iter_mut().zip(self.gate).zip(self.up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

struct SwiGluBackward<'a, T> {
    gate_out: &'a mut [T],
    up_out: &'a mut [T],
    gate: &'a [T],
    up: &'a [T],
    g: &'a [T],
}

impl<T: Real> Kernel for SwiGluBackward<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let outputs = self.gate_out.iter_mut().zip(self.up_out.iter_mut());
        for (((gate_out, up_out), &x), (&u, &gv)) in outputs.zip(self.gate).zip(self.up.iter().zip(self.g)) {
            let s = sigmoid(x);
            *gate_out = gv * u * s * (T::one() + x * (T::one() - s));
            *up_out = gv * x * s;
        }
    }
}

fn swiglu_forward<T: Real>(
    op: &SwiGlu,
    gate: &CpuStorage,
    gate_layout: &Layout,
    up: &CpuStorage,
    up_layout: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (gate, up) = (values::<T>(gate, gate_layout)?, values::<T>(up, up_layout)?);
    if gate.len() != up.len() {
        return Err(error("swiglu: gate and up differ in size"));
    }
    let mut out = vec![T::zero(); gate.len()];
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(gate.par_chunks(ELEMENTS_PER_TASK))
        .zip(up.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|((out, gate), up)| dispatch(op.level, SwiGluForward { out, gate, up }));
    Ok((T::to_cpu_storage_owned(out), gate_layout.shape().clone()))
}

fn swiglu_backward<T: Real>(
    op: &SwiGlu,
    gate: &Tensor,
    up: &Tensor,
    gradient: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (want_gate, want_up) = (gate.track_op(), up.track_op());
    if !want_gate && !want_up {
        return Ok((None, None));
    }
    with_values::<T, _>(gate, |gates| {
        with_values::<T, _>(up, |ups| {
            with_values::<T, _>(gradient, |gs| {
                if ups.len() != gates.len() || gs.len() != gates.len() {
                    return Err(error("swiglu: gate, up and gradient differ in size"));
                }
                let mut gate_gradient = vec![T::zero(); gates.len()];
                let mut up_gradient = vec![T::zero(); gates.len()];
                gate_gradient
                    .par_chunks_mut(ELEMENTS_PER_TASK)
                    .zip(up_gradient.par_chunks_mut(ELEMENTS_PER_TASK))
                    .zip(gates.par_chunks(ELEMENTS_PER_TASK))
                    .zip(ups.par_chunks(ELEMENTS_PER_TASK).zip(gs.par_chunks(ELEMENTS_PER_TASK)))
                    .for_each(|(((gate_out, up_out), gate), (up, g))| {
                        dispatch(op.level, SwiGluBackward { gate_out, up_out, gate, up, g });
                    });
                let gate_gradient = if want_gate { Some(tensor_of(gate_gradient, gate)?) } else { None };
                let up_gradient = if want_up { Some(tensor_of(up_gradient, up)?) } else { None };
                Ok((gate_gradient, up_gradient))
            })
        })
    })
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "train-swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_storage!(gate, swiglu_forward(self, gate, gate_layout, up, up_layout))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _result: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(gate.dtype(), swiglu_backward(self, gate, up, gradient))
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen products: x W^T straight on the storages (no copy of the input or the output).

/// `x W^T` for a `(rows, in)` input and a `(out, in)` weight held by a CPU tensor.
pub(crate) fn product_with_transposed(
    x: &CpuStorage,
    x_layout: &Layout,
    weight: &Tensor,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (rows, input) = x_layout.shape().dims2()?;
    let (guard, weight_layout) = weight.storage_and_layout();
    let Storage::Cpu(weight_storage) = &*guard else {
        return Err(error("a frozen product runs on the CPU"));
    };
    let (out, weight_input) = weight_layout.shape().dims2()?;
    if weight_input != input {
        return Err(error(format!("a frozen product of {input} inputs by a ({out}, {weight_input}) weight")));
    }
    let transposed = weight_layout.transpose(0, 1)?;
    let product = x.matmul(weight_storage, (1, rows, out, input), x_layout, &transposed)?;
    Ok((product, Shape::from((rows, out))))
}

// ---------------------------------------------------------------------------------------------
// Output head and cross-entropy: logits = x W^T; per row, ln(sum(exp(l - max))) - (l[target] - max).

/// The negative log-likelihood of each row's target under the output head `weight`
/// (`(vocab, hidden)`), from `(rows, hidden)` hidden states: `(rows,)`. The logits, the largest
/// tensor of the step, are computed inside and kept for the backward pass only, which turns them
/// into their gradient in place (the composite form materialised five vocabulary-wide copies).
pub(crate) struct OutputLoss {
    /// The head, the same tensor as the operation's second argument (which records it in the
    /// graph); the product reads this one to avoid copying it.
    pub weight: Tensor,
    /// Where the head's gradient goes when the head is held outside the graph (full
    /// fine-tuning): the operation's second argument then does not track a gradient.
    pub matrix: Option<crate::sink::TrainedMatrix>,
    pub targets: Vec<u32>,
    /// The forward's logits, `(rows, vocab)` row-major, in the operation's dtype.
    pub logits: std::sync::Mutex<Option<CpuStorage>>,
    pub level: Level,
}

#[inline(always)]
fn row_max<T: Real>(row: &[T]) -> T {
    // Eight running maxima, so that the loop vectorises.
    let mut maxima = [row[0]; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (max, &value) in maxima.iter_mut().zip(chunk) {
            *max = if value > *max { value } else { *max };
        }
    }
    let max = rest.iter().fold(maxima[0], |max, &value| if value > max { value } else { max });
    maxima.iter().fold(max, |max, &value| if value > max { value } else { max })
}

/// The sum of `exp(value - max)` over a row (eight partial sums).
#[inline(always)]
fn exp_sum<T: Real>(row: &[T], max: T) -> T {
    let mut sums = [T::zero(); 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (sum, &value) in sums.iter_mut().zip(chunk) {
            *sum += (value - max).fast_exp();
        }
    }
    let rest = rest.iter().fold(T::zero(), |sum, &value| sum + (value - max).fast_exp());
    sums.iter().fold(rest, |total, &sum| total + sum)
}

/// The loss of each row: `ln Σ exp(l - max) - (l[target] - max)`.
struct RowLosses<'a, T> {
    logits: &'a [T],
    vocab: usize,
    targets: &'a [u32],
    losses: &'a mut [T],
}

impl<T: Real> Kernel for RowLosses<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        for ((row, &target), loss) in self.logits.chunks_exact(self.vocab).zip(self.targets).zip(self.losses) {
            let max = row_max(row);
            *loss = exp_sum(row, max).ln() - (row[target as usize] - max);
        }
    }
}

/// Turns rows of logits into the gradient of the loss: `g (softmax - onehot(target))`.
struct RowGradients<'a, T> {
    logits: &'a mut [T],
    vocab: usize,
    targets: &'a [u32],
    gradients: &'a [T],
}

impl<T: Real> Kernel for RowGradients<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<const FMA: bool>(self) {
        for ((row, &target), &g) in self.logits.chunks_exact_mut(self.vocab).zip(self.targets).zip(self.gradients) {
            let max = row_max(row);
            let mut sums = [T::zero(); 8];
            let mut chunks = row.chunks_exact_mut(8);
            for chunk in &mut chunks {
                for (sum, value) in sums.iter_mut().zip(chunk.iter_mut()) {
                    *value = (*value - max).fast_exp();
                    *sum += *value;
                }
            }
            let mut sum = T::zero();
            for value in chunks.into_remainder() {
                *value = (*value - max).fast_exp();
                sum += *value;
            }
            let sum = sums.iter().fold(sum, |total, &lane| total + lane);
            let factor = g / sum;
            for value in row.iter_mut() {
                *value *= factor;
            }
            row[target as usize] -= g;
        }
    }
}

fn output_loss_forward<T: Real>(
    op: &OutputLoss,
    hidden: &CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (logits, shape) = product_with_transposed(hidden, layout, &op.weight)?;
    let (rows, vocab) = shape.dims2()?;
    if rows != op.targets.len() || vocab == 0 {
        return Err(error("output loss: one target per row"));
    }
    if let Some(&bad) = op.targets.iter().find(|&&target| target as usize >= vocab) {
        return Err(error(format!("output loss: target {bad} outside the vocabulary of {vocab}")));
    }
    let all = T::cpu_storage_as_slice(&logits)?;
    let mut losses = vec![T::zero(); rows];
    let rows_per = rows_per_task(rows, vocab).max(4);
    losses
        .par_chunks_mut(rows_per)
        .zip(all.par_chunks(rows_per * vocab))
        .zip(op.targets.par_chunks(rows_per))
        .for_each(|((losses, logits), targets)| dispatch(op.level, RowLosses { logits, vocab, targets, losses }));
    if let Ok(mut cache) = op.logits.lock() {
        *cache = Some(logits);
    }
    Ok((T::to_cpu_storage_owned(losses), Shape::from(rows)))
}

fn output_loss_backward<T: Real>(
    op: &OutputLoss,
    hidden: &Tensor,
    weight: &Tensor,
    gradient: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (want_hidden, want_weight) = (hidden.track_op(), weight.track_op() || op.matrix.is_some());
    if !want_hidden && !want_weight {
        return Ok((None, None));
    }
    let cached = op.logits.lock().ok().and_then(|mut cache| cache.take());
    let logits = match cached {
        Some(logits) => T::cpu_storage_data(logits)?,
        None => {
            let detached = hidden.detach().contiguous()?;
            let (storage, layout) = detached.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else { return Err(error("the fused training kernels run on the CPU")) };
            T::cpu_storage_data(product_with_transposed(cpu, layout, &op.weight)?.0)?
        }
    };
    let rows = op.targets.len();
    let vocab = logits.len().checked_div(rows).unwrap_or(0);
    if vocab == 0 || logits.len() != rows * vocab {
        return Err(error("output loss: the cached logits do not match the targets"));
    }
    let mut logits = logits;
    with_values::<T, _>(gradient, |gs| {
        let rows_per = rows_per_task(rows, vocab).max(4);
        logits
            .par_chunks_mut(rows_per * vocab)
            .zip(op.targets.par_chunks(rows_per))
            .zip(gs.par_chunks(rows_per))
            .for_each(|((logits, targets), gradients)| {
                dispatch(op.level, RowGradients { logits, vocab, targets, gradients });
            });
        Ok(())
    })?;
    let logit_gradient = Tensor::from_vec(logits, (rows, vocab), hidden.device())?;
    let hidden_gradient = if want_hidden { Some(logit_gradient.matmul(&op.weight.detach())?) } else { None };
    let weight_gradient = if want_weight { Some(logit_gradient.t()?.matmul(&hidden.detach())?) } else { None };
    match (&op.matrix, weight_gradient) {
        (Some(matrix), Some(gradient)) => {
            matrix.sink.add(&matrix.name, gradient)?;
            Ok((hidden_gradient, None))
        }
        (_, weight_gradient) => Ok((hidden_gradient, weight_gradient)),
    }
}

impl CustomOp2 for OutputLoss {
    fn name(&self) -> &'static str {
        "train-output-loss"
    }

    fn cpu_fwd(
        &self,
        hidden: &CpuStorage,
        layout: &Layout,
        _weight: &CpuStorage,
        _weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_storage!(hidden, output_loss_forward(self, hidden, layout))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _result: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(hidden.dtype(), output_loss_backward(self, hidden, weight, gradient))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal attention with NeoX RoPE on the queries and keys, grouped-query heads.

/// Causal self-attention over `(batch * length, heads * head_dim)` queries and
/// `(batch * length, kv_heads * head_dim)` keys and values (the projections' own layout), with
/// RoPE applied to queries and keys inside. Output: `(batch * length, heads * head_dim)`.
pub(crate) struct Attention {
    pub batch: usize,
    pub length: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    /// `(length, head_dim)` cosines and sines of the rotation angles, row-major.
    pub cos: Vec<f32>,
    /// See `cos`.
    pub sin: Vec<f32>,
    pub level: Level,
}

/// One head's rows of one sequence, rotated or not.
#[derive(Clone, Copy)]
struct HeadView<'a, T> {
    data: &'a [T],
    row_width: usize,
    offset: usize,
}

/// The attention's sizes and rotation tables in the kernels' float type.
struct Geometry<T> {
    length: usize,
    dim: usize,
    scale: T,
    cos: Vec<T>,
    sin: Vec<T>,
}

impl<T: Real> Geometry<T> {
    fn new(attention: &Attention) -> Self {
        let convert = |table: &[f32]| -> Vec<T> { table.iter().map(|&value| T::from_f64(f64::from(value))).collect() };
        Self {
            length: attention.length,
            dim: attention.head_dim,
            scale: T::from_f64(attention.scale),
            cos: convert(&attention.cos),
            sin: convert(&attention.sin),
        }
    }

    /// The `(length, head_dim)` block of the view's head in sequence `sequence`, rotated when
    /// `rotate`.
    #[inline(always)]
    fn gather<const FMA: bool>(&self, view: HeadView<'_, T>, sequence: usize, rotate: bool) -> Vec<T> {
        let (length, dim) = (self.length, self.dim);
        let half = dim / 2;
        let mut out = vec![T::zero(); length * dim];
        for position in 0..length {
            let start = (sequence * length + position) * view.row_width + view.offset;
            let row = &view.data[start..start + dim];
            let out_row = &mut out[position * dim..(position + 1) * dim];
            if rotate {
                let span = position * dim..(position + 1) * dim;
                let (cos, sin) = (&self.cos[span.clone()], &self.sin[span]);
                let (first, second) = row.split_at(half);
                let (out_first, out_second) = out_row.split_at_mut(half);
                let (cos_first, cos_second) = cos.split_at(half);
                let (sin_first, sin_second) = sin.split_at(half);
                let outputs = out_first.iter_mut().zip(out_second.iter_mut());
                let inputs = first.iter().zip(second);
                let tables = cos_first.iter().zip(cos_second).zip(sin_first.iter().zip(sin_second));
                for (((o1, o2), (&a, &b)), ((&c1, &c2), (&s1, &s2))) in outputs.zip(inputs).zip(tables) {
                    *o1 = fused::<T, FMA>(-b, s1, a * c1);
                    *o2 = fused::<T, FMA>(a, s2, b * c2);
                }
            } else {
                out_row.copy_from_slice(row);
            }
        }
        out
    }

    /// The gradient of the input of the rotation from the gradient of its output, in place.
    #[inline(always)]
    fn unrotate<const FMA: bool>(&self, gradient: &mut [T]) {
        let (length, dim) = (self.length, self.dim);
        let half = dim / 2;
        for position in 0..length {
            let span = position * dim..(position + 1) * dim;
            let (cos, sin) = (&self.cos[span.clone()], &self.sin[span.clone()]);
            let (first, second) = gradient[span].split_at_mut(half);
            let (cos_first, cos_second) = cos.split_at(half);
            let (sin_first, sin_second) = sin.split_at(half);
            let tables = cos_first.iter().zip(cos_second).zip(sin_first.iter().zip(sin_second));
            for ((a, b), ((&c1, &c2), (&s1, &s2))) in first.iter_mut().zip(second.iter_mut()).zip(tables) {
                let (x, y) = (*a, *b);
                *a = fused::<T, FMA>(y, s2, x * c1);
                *b = fused::<T, FMA>(-x, s1, y * c2);
            }
        }
    }

    /// Row `position` of the softmax probabilities (positions `0..=position`), into
    /// `probabilities`.
    #[inline(always)]
    fn probabilities<const FMA: bool>(&self, queries: &[T], keys: &[T], position: usize, probabilities: &mut [T]) {
        let dim = self.dim;
        let query = &queries[position * dim..(position + 1) * dim];
        let row = &mut probabilities[..=position];
        for (p, key) in row.iter_mut().zip(keys.chunks_exact(dim)) {
            *p = dot::<T, FMA>(query, key) * self.scale;
        }
        let max = row_max(row);
        let mut sum = T::zero();
        for p in row.iter_mut() {
            *p = (*p - max).fast_exp();
            sum += *p;
        }
        let inverse = T::one() / sum;
        for p in row.iter_mut() {
            *p *= inverse;
        }
    }
}

/// The output block `(length, head_dim)` of one query head of one sequence.
struct HeadForward<'a, T> {
    geometry: &'a Geometry<T>,
    queries: HeadView<'a, T>,
    keys: HeadView<'a, T>,
    values: HeadView<'a, T>,
    sequence: usize,
}

impl<T: Real> Kernel for HeadForward<'_, T> {
    type Output = Vec<T>;

    #[inline(always)]
    fn run<const FMA: bool>(self) -> Vec<T> {
        let geometry = self.geometry;
        let (length, dim) = (geometry.length, geometry.dim);
        let q = geometry.gather::<FMA>(self.queries, self.sequence, true);
        let k = geometry.gather::<FMA>(self.keys, self.sequence, true);
        let v = geometry.gather::<FMA>(self.values, self.sequence, false);
        let mut out = vec![T::zero(); length * dim];
        let mut probabilities = vec![T::zero(); length];
        for position in 0..length {
            geometry.probabilities::<FMA>(&q, &k, position, &mut probabilities);
            let out_row = &mut out[position * dim..(position + 1) * dim];
            for (&p, value) in probabilities[..=position].iter().zip(v.chunks_exact(dim)) {
                add_scaled::<T, FMA>(out_row, p, value);
            }
        }
        out
    }
}

/// The gradients of one key/value head of one sequence: its `group` query heads', its keys' and
/// its values'.
struct HeadBackward<'a, T> {
    geometry: &'a Geometry<T>,
    queries: &'a [T],
    keys: HeadView<'a, T>,
    values: HeadView<'a, T>,
    gradient: &'a [T],
    q_width: usize,
    first_head: usize,
    group: usize,
    sequence: usize,
}

type HeadGradients<T> = (Vec<Vec<T>>, Vec<T>, Vec<T>);

impl<T: Real> Kernel for HeadBackward<'_, T> {
    type Output = HeadGradients<T>;

    #[inline(always)]
    fn run<const FMA: bool>(self) -> HeadGradients<T> {
        let geometry = self.geometry;
        let (length, dim, scale) = (geometry.length, geometry.dim, geometry.scale);
        let k = geometry.gather::<FMA>(self.keys, self.sequence, true);
        let v = geometry.gather::<FMA>(self.values, self.sequence, false);
        let mut key_gradient = vec![T::zero(); length * dim];
        let mut value_gradient = vec![T::zero(); length * dim];
        let mut query_gradients = Vec::with_capacity(self.group);
        let mut probabilities = vec![T::zero(); length];
        let mut scores = vec![T::zero(); length];
        for member in 0..self.group {
            let view = |data| HeadView { data, row_width: self.q_width, offset: (self.first_head + member) * dim };
            let q = geometry.gather::<FMA>(view(self.queries), self.sequence, true);
            let g = geometry.gather::<FMA>(view(self.gradient), self.sequence, false);
            let mut query_gradient = vec![T::zero(); length * dim];
            for position in 0..length {
                geometry.probabilities::<FMA>(&q, &k, position, &mut probabilities);
                let g_row = &g[position * dim..(position + 1) * dim];
                let mut weighted = T::zero();
                for ((score, &p), value) in scores.iter_mut().zip(&probabilities[..=position]).zip(v.chunks_exact(dim))
                {
                    let d = dot::<T, FMA>(g_row, value);
                    *score = d;
                    weighted = fused::<T, FMA>(p, d, weighted);
                }
                let q_row = &q[position * dim..(position + 1) * dim];
                let query_row = &mut query_gradient[position * dim..(position + 1) * dim];
                let columns = key_gradient
                    .chunks_exact_mut(dim)
                    .zip(value_gradient.chunks_exact_mut(dim))
                    .zip(k.chunks_exact(dim))
                    .zip(probabilities[..=position].iter().zip(&scores[..=position]));
                for (((key_row, value_row), key), (&p, &score)) in columns {
                    let score_gradient = p * (score - weighted) * scale;
                    add_scaled::<T, FMA>(query_row, score_gradient, key);
                    add_scaled::<T, FMA>(key_row, score_gradient, q_row);
                    add_scaled::<T, FMA>(value_row, p, g_row);
                }
            }
            geometry.unrotate::<FMA>(&mut query_gradient);
            query_gradients.push(query_gradient);
        }
        geometry.unrotate::<FMA>(&mut key_gradient);
        (query_gradients, key_gradient, value_gradient)
    }
}

impl Attention {
    fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    fn forward<T: Real>(&self, queries: &[T], keys: &[T], values: &[T]) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, length, heads, dim) = (self.batch, self.length, self.heads, self.head_dim);
        let (q_width, kv_width) = (heads * dim, self.kv_heads * dim);
        if queries.len() != batch * length * q_width
            || keys.len() != batch * length * kv_width
            || values.len() != keys.len()
        {
            return Err(error("attention: the inputs do not match the batch and head sizes"));
        }
        let group = self.group();
        let geometry = Geometry::<T>::new(self);
        let blocks: Vec<Vec<T>> = (0..batch * heads)
            .into_par_iter()
            .map(|task| {
                let (sequence, head) = (task / heads, task % heads);
                let kv_offset = head / group * dim;
                let kernel = HeadForward {
                    geometry: &geometry,
                    queries: HeadView { data: queries, row_width: q_width, offset: head * dim },
                    keys: HeadView { data: keys, row_width: kv_width, offset: kv_offset },
                    values: HeadView { data: values, row_width: kv_width, offset: kv_offset },
                    sequence,
                };
                dispatch(self.level, kernel)
            })
            .collect();
        let mut out = vec![T::zero(); queries.len()];
        for (task, block) in blocks.iter().enumerate() {
            let (sequence, head) = (task / heads, task % heads);
            for position in 0..length {
                let start = (sequence * length + position) * q_width + head * dim;
                out[start..start + dim].copy_from_slice(&block[position * dim..(position + 1) * dim]);
            }
        }
        Ok((T::to_cpu_storage_owned(out), Shape::from((batch * length, q_width))))
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Real>(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, length, heads, dim) = (self.batch, self.length, self.heads, self.head_dim);
        let (q_width, kv_width) = (heads * dim, self.kv_heads * dim);
        let group = self.group();
        let geometry = Geometry::<T>::new(self);
        with_values::<T, _>(queries, |qs| {
            with_values::<T, _>(keys, |ks| {
                with_values::<T, _>(values, |vs| {
                    with_values::<T, _>(gradient, |gs| {
                        // Per (sequence, key/value head): the gradients of its `group` query heads,
                        // of its keys and of its values.
                        let blocks: Vec<HeadGradients<T>> = (0..batch * self.kv_heads)
                            .into_par_iter()
                            .map(|task| {
                                let (sequence, kv_head) = (task / self.kv_heads, task % self.kv_heads);
                                let kv_view = |data| HeadView { data, row_width: kv_width, offset: kv_head * dim };
                                let kernel = HeadBackward {
                                    geometry: &geometry,
                                    queries: qs,
                                    keys: kv_view(ks),
                                    values: kv_view(vs),
                                    gradient: gs,
                                    q_width,
                                    first_head: kv_head * group,
                                    group,
                                    sequence,
                                };
                                dispatch(self.level, kernel)
                            })
                            .collect();
                        let mut query_out = vec![T::zero(); qs.len()];
                        let mut key_out = vec![T::zero(); ks.len()];
                        let mut value_out = vec![T::zero(); vs.len()];
                        for (task, (query_gradients, key_gradient, value_gradient)) in blocks.iter().enumerate() {
                            let (sequence, kv_head) = (task / self.kv_heads, task % self.kv_heads);
                            for position in 0..length {
                                let row = sequence * length + position;
                                let span = position * dim..(position + 1) * dim;
                                let kv_start = row * kv_width + kv_head * dim;
                                key_out[kv_start..kv_start + dim].copy_from_slice(&key_gradient[span.clone()]);
                                value_out[kv_start..kv_start + dim].copy_from_slice(&value_gradient[span.clone()]);
                                for (member, query_gradient) in query_gradients.iter().enumerate() {
                                    let q_start = row * q_width + (kv_head * group + member) * dim;
                                    query_out[q_start..q_start + dim].copy_from_slice(&query_gradient[span.clone()]);
                                }
                            }
                        }
                        let wrap = |data: Vec<T>, like: &Tensor| -> candle_core::Result<Option<Tensor>> {
                            if like.track_op() { Ok(Some(tensor_of(data, like)?)) } else { Ok(None) }
                        };
                        Ok((wrap(query_out, queries)?, wrap(key_out, keys)?, wrap(value_out, values)?))
                    })
                })
            })
        })
    }
}

fn attention_forward<T: Real>(
    attention: &Attention,
    queries: (&CpuStorage, &Layout),
    keys: (&CpuStorage, &Layout),
    values_in: (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    attention.forward::<T>(
        values::<T>(queries.0, queries.1)?,
        values::<T>(keys.0, keys.1)?,
        values::<T>(values_in.0, values_in.1)?,
    )
}

#[allow(clippy::type_complexity)]
fn attention_backward<T: Real>(
    attention: &Attention,
    queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    gradient: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    attention.backward::<T>(queries, keys, values, gradient)
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "train-attention"
    }

    fn cpu_fwd(
        &self,
        queries: &CpuStorage,
        queries_layout: &Layout,
        keys: &CpuStorage,
        keys_layout: &Layout,
        values: &CpuStorage,
        values_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_storage!(
            queries,
            attention_forward(self, (queries, queries_layout), (keys, keys_layout), (values, values_layout))
        )
    }

    fn bwd(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        _result: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(queries.dtype(), attention_backward(self, queries, keys, values, gradient))
    }
}

// ---------------------------------------------------------------------------------------------
// A LoRA-adapted frozen linear layer: y = x W^T + s (m ⊙ x) A^T B^T, one operation.

/// `x W^T + scale · (mask ⊙ x) A^T B^T` for a frozen `(out, in)` weight `W` and the trainable
/// `(r, in)` A and `(out, r)` B (the operation's second and third arguments), with the optional
/// dropout `mask` (`(rows, in)`, already scaled by `1 / keep`). Written as candle operations it
/// is five nodes (two of them transposes) whose backward allocates and adds a full-size gradient
/// per node, and computes the frozen weight's gradient too; here the backward computes `x`'s, A's
/// and B's gradients from the storages, with the low-rank term added in place.
pub(crate) struct LoraLinear {
    pub weight: Tensor,
    pub scale: f64,
    pub mask: Option<Tensor>,
}

/// Runs `f` over a CPU tensor's storage and layout (made contiguous first).
fn with_storage<R>(
    tensor: &Tensor,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let tensor = tensor.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu, layout),
        _ => Err(error("the fused training kernels run on the CPU")),
    }
}

/// `x ⊙ mask` as a new contiguous storage, or `None` without a mask.
fn masked_input<T: Real>(
    x: &CpuStorage,
    x_layout: &Layout,
    mask: Option<&Tensor>,
) -> candle_core::Result<Option<CpuStorage>> {
    let Some(mask) = mask else { return Ok(None) };
    let xs = values::<T>(x, x_layout)?;
    with_values::<T, _>(mask, |ms| {
        if ms.len() != xs.len() {
            return Err(error("lora: the dropout mask does not match the input"));
        }
        Ok(Some(T::to_cpu_storage_owned(xs.iter().zip(ms).map(|(&x, &m)| x * m).collect())))
    })
}

/// `out += factor * x` over large slices, in parallel.
fn accumulate<T: Real>(out: &mut [T], factor: T, x: &[T], level: Level) {
    struct Accumulate<'a, T> {
        out: &'a mut [T],
        factor: T,
        x: &'a [T],
    }
    impl<T: Real> Kernel for Accumulate<'_, T> {
        type Output = ();
        #[inline(always)]
        fn run<const FMA: bool>(self) {
            add_scaled::<T, FMA>(self.out, self.factor, self.x);
        }
    }
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(x.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(out, x)| dispatch(level, Accumulate { out, factor, x }));
}

fn lora_forward<T: Real>(
    op: &LoraLinear,
    (x, x_layout): (&CpuStorage, &Layout),
    (a, a_layout): (&CpuStorage, &Layout),
    (b, b_layout): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (rows, input) = x_layout.shape().dims2()?;
    let (rank, a_input) = a_layout.shape().dims2()?;
    let (out, b_rank) = b_layout.shape().dims2()?;
    if a_input != input || b_rank != rank {
        return Err(error(format!(
            "lora: A {:?} and B {:?} do not fit an input of {input}",
            a_layout.dims(),
            b_layout.dims()
        )));
    }
    let (product, shape) = product_with_transposed(x, x_layout, &op.weight)?;
    if shape.dims2()? != (rows, out) {
        return Err(error("lora: the frozen weight and B differ in outputs"));
    }
    let masked = masked_input::<T>(x, x_layout, op.mask.as_ref())?;
    let contiguous_input = Layout::contiguous((rows, input));
    let (input_storage, input_layout) = match &masked {
        Some(storage) => (storage, &contiguous_input),
        None => (x, x_layout),
    };
    let low = input_storage.matmul(a, (1, rows, rank, input), input_layout, &a_layout.transpose(0, 1)?)?;
    let update = low.matmul(b, (1, rows, out, rank), &Layout::contiguous((rows, rank)), &b_layout.transpose(0, 1)?)?;
    let mut y = T::cpu_storage_data(product)?;
    accumulate(&mut y, T::from_f64(op.scale), T::cpu_storage_as_slice(&update)?, Level::detected());
    Ok((T::to_cpu_storage_owned(y), shape))
}

#[allow(clippy::type_complexity)]
fn lora_backward<T: Real>(
    op: &LoraLinear,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    gradient: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (rows, input) = x.dims2()?;
    let (rank, _) = a.dims2()?;
    let (out, _) = b.dims2()?;
    let scale = T::from_f64(op.scale);
    let level = Level::detected();
    with_storage(gradient, |g, g_layout| {
        with_storage(x, |xs, x_layout| {
            with_storage(a, |a_storage, a_layout| {
                with_storage(b, |b_storage, b_layout| {
                    let (weight_guard, weight_layout) = op.weight.storage_and_layout();
                    let Storage::Cpu(weight) = &*weight_guard else {
                        return Err(error("the fused training kernels run on the CPU"));
                    };
                    let low_layout = Layout::contiguous((rows, rank));
                    // s · g B: (rows, r).
                    let mut g_b =
                        T::cpu_storage_data(g.matmul(b_storage, (1, rows, rank, out), g_layout, b_layout)?)?;
                    g_b.iter_mut().for_each(|value| *value *= scale);
                    let g_b = T::to_cpu_storage_owned(g_b);
                    let x_gradient = if x.track_op() {
                        let mut base =
                            T::cpu_storage_data(g.matmul(weight, (1, rows, input, out), g_layout, weight_layout)?)?;
                        let low = g_b.matmul(a_storage, (1, rows, input, rank), &low_layout, a_layout)?;
                        let low = T::cpu_storage_as_slice(&low)?;
                        match &op.mask {
                            Some(mask) => with_values::<T, _>(mask, |ms| {
                                let masked: Vec<T> = low.iter().zip(ms).map(|(&value, &m)| value * m).collect();
                                accumulate(&mut base, T::one(), &masked, level);
                                Ok(())
                            })?,
                            None => accumulate(&mut base, T::one(), low, level),
                        }
                        Some(Tensor::from_vec(base, (rows, input), x.device())?)
                    } else {
                        None
                    };
                    let masked = masked_input::<T>(xs, x_layout, op.mask.as_ref())?;
                    let contiguous_input = Layout::contiguous((rows, input));
                    let (input_storage, input_layout) = match &masked {
                        Some(storage) => (storage, &contiguous_input),
                        None => (xs, x_layout),
                    };
                    let a_gradient = if a.track_op() {
                        let product = g_b.matmul(
                            input_storage,
                            (1, rank, input, rows),
                            &low_layout.transpose(0, 1)?,
                            input_layout,
                        )?;
                        Some(Tensor::from_vec(T::cpu_storage_data(product)?, (rank, input), a.device())?)
                    } else {
                        None
                    };
                    let b_gradient = if b.track_op() {
                        let low = input_storage.matmul(
                            a_storage,
                            (1, rows, rank, input),
                            input_layout,
                            &a_layout.transpose(0, 1)?,
                        )?;
                        let mut low = T::cpu_storage_data(low)?;
                        low.iter_mut().for_each(|value| *value *= scale);
                        let low = T::to_cpu_storage_owned(low);
                        let product = g.matmul(&low, (1, out, rank, rows), &g_layout.transpose(0, 1)?, &low_layout)?;
                        Some(Tensor::from_vec(T::cpu_storage_data(product)?, (out, rank), b.device())?)
                    } else {
                        None
                    };
                    Ok((x_gradient, a_gradient, b_gradient))
                })
            })
        })
    })
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "train-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_storage!(x, lora_forward(self, (x, x_layout), (a, a_layout), (b, b_layout)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _result: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(x.dtype(), lora_backward(self, x, a, b, gradient))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn random(count: usize, seed: u64) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..count).map(|_| rng.f32() * 2.0 - 1.0).collect()
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |max, value| max.max(value.abs())).max(1e-6);
        a.iter().zip(&b).fold(0.0f32, |max, (x, y)| max.max((x - y).abs())) / scale
    }

    #[test]
    fn the_vectorised_exp_is_within_two_ulp_of_the_library_exp() {
        let mut worst = 0.0f32;
        for index in 0..=200_000 {
            let x = -87.0 + 175.0 * index as f32 / 200_000.0;
            let (ours, reference) = (exp_f32(x), x.exp());
            worst = worst.max((ours - reference).abs() / reference);
        }
        assert!(worst < 2.5 * f32::EPSILON, "relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37 && exp_f32(f32::INFINITY) > 1e38);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// Every kernel, forward and backward, at every instruction set this CPU has, against the
    /// baseline build of the same loops (FMA and wider sums round differently: 1e-5 relative).
    #[test]
    fn every_instruction_set_computes_what_the_baseline_computes() {
        let device = Device::Cpu;
        let (batch, length, heads, kv_heads, head_dim) = (2, 9, 4, 2, 8);
        let (rows, hidden) = (batch * length, heads * head_dim);
        let angles: Vec<f32> = (0..length * head_dim).map(|index| (index as f32 * 0.37).sin()).collect();
        let run = |level: Level| -> Vec<Tensor> {
            let variable = |count: usize, shape: (usize, usize), seed: u64| {
                Var::from_vec(random(count, seed), shape, &device).unwrap()
            };
            let x = variable(rows * hidden, (rows, hidden), 1);
            let norm_weight = variable(hidden, (1, hidden), 2);
            let norm_weight = norm_weight.as_tensor().reshape(hidden).unwrap();
            let normed = x.as_tensor().apply_op2(&norm_weight, RmsNorm { eps: 1e-5, level }).unwrap();
            let keys = variable(rows * kv_heads * head_dim, (rows, kv_heads * head_dim), 3);
            let values = variable(rows * kv_heads * head_dim, (rows, kv_heads * head_dim), 4);
            let attention = Attention {
                batch,
                length,
                heads,
                kv_heads,
                head_dim,
                scale: 0.3,
                cos: angles.iter().map(|angle| angle.cos()).collect(),
                sin: angles.iter().map(|angle| angle.sin()).collect(),
                level,
            };
            let attended = normed.apply_op3(keys.as_tensor(), values.as_tensor(), attention).unwrap();
            let up = variable(rows * hidden, (rows, hidden), 5);
            let activated = attended.apply_op2(up.as_tensor(), SwiGlu { level }).unwrap();
            let head = variable(40 * hidden, (40, hidden), 6);
            let targets: Vec<u32> = (0..rows as u32).map(|row| row * 7 % 40).collect();
            let loss = OutputLoss {
                weight: head.as_tensor().clone(),
                matrix: None,
                targets,
                logits: std::sync::Mutex::new(None),
                level,
            };
            let losses = activated.apply_op2(head.as_tensor(), loss).unwrap();
            let gradients = losses.sum_all().unwrap().backward().unwrap();
            let mut out = vec![normed.clone(), attended.clone(), activated.clone(), losses.clone()];
            for var in [&x, &keys, &values, &up, &head] {
                out.push(gradients.get(var.as_tensor()).expect("a gradient").clone());
            }
            out
        };
        let baseline = run(Level::Baseline);
        for level in Level::available() {
            for (index, (ours, reference)) in run(level).iter().zip(&baseline).enumerate() {
                let difference = largest_difference(ours, reference);
                assert!(difference < 1e-5, "{level:?}, tensor {index}: relative difference {difference}");
            }
        }
    }

    #[test]
    fn the_lora_operation_computes_the_product_and_its_gradients() {
        let device = Device::Cpu;
        let (rows, input, out, rank) = (6, 10, 7, 3);
        let x = Var::from_vec(random(rows * input, 1), (rows, input), &device).unwrap();
        let weight = Tensor::from_vec(random(out * input, 2), (out, input), &device).unwrap();
        let a = Var::from_vec(random(rank * input, 3), (rank, input), &device).unwrap();
        let b = Var::from_vec(random(out * rank, 4), (out, rank), &device).unwrap();
        let mask_values: Vec<f32> = (0..rows * input).map(|index| if index % 3 == 0 { 0.0 } else { 1.5 }).collect();
        let mask = Tensor::from_vec(mask_values, (rows, input), &device).unwrap();
        let upstream = Tensor::from_vec(random(rows * out, 5), (rows, out), &device).unwrap();
        let scale = 2.5;
        for mask in [None, Some(mask)] {
            let op = LoraLinear { weight: weight.clone(), scale, mask: mask.clone() };
            let fused = x.as_tensor().apply_op3(a.as_tensor(), b.as_tensor(), op).unwrap();
            let input_tensor = match &mask {
                Some(mask) => (x.as_tensor() * mask).unwrap(),
                None => x.as_tensor().clone(),
            };
            let low =
                input_tensor.matmul(&a.as_tensor().t().unwrap()).unwrap().matmul(&b.as_tensor().t().unwrap()).unwrap();
            let reference = (x.as_tensor().matmul(&weight.t().unwrap()).unwrap() + (low * scale).unwrap()).unwrap();
            assert!(largest_difference(&fused, &reference) < 1e-6);
            let fused_gradients = (fused * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            let reference_gradients = (reference * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            for var in [&x, &a, &b] {
                let ours = fused_gradients.get(var.as_tensor()).expect("a gradient");
                let expected = reference_gradients.get(var.as_tensor()).expect("a reference gradient");
                let difference = largest_difference(ours, expected);
                assert!(difference < 1e-6, "relative difference {difference}");
            }
        }
    }
}

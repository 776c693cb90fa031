//! Fused CPU kernels of the training forward, each with a hand-written backward pass.
//!
//! Written out of candle's differentiable primitives, RMSNorm, SwiGLU, RoPE, attention and the
//! cross-entropy are dozens of element-wise operations, each allocating its output and running
//! on one thread, and candle's backward adds as many again (plus the gradients of frozen
//! tensors, which it computes and drops). These custom operations compute the same functions in
//! one pass each, over rows in parallel (rayon), and their `bwd` computes only the gradients of
//! arguments that track one. The composite forms in `forward` stay as the reference (and the
//! path off the CPU); the tests compare both, values and gradients.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// The float types the kernels run in (f32 for training, f64 for the finite-difference tests).
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
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

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    // Eight independent sums, so that the loop vectorises.
    let mut sums = [T::zero(); 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((sum, &a), &b) in sums.iter_mut().zip(x).zip(y) {
            *sum += a * b;
        }
    }
    let mut total = T::zero();
    for (x, y) in a_rest.iter().zip(b_rest) {
        total += *x * *y;
    }
    sums.iter().fold(total, |sum, &lane| sum + lane)
}

/// `out += factor * x`.
fn add_scaled<T: Real>(out: &mut [T], factor: T, x: &[T]) {
    for (o, &value) in out.iter_mut().zip(x) {
        *o += factor * value;
    }
}

macro_rules! dispatch {
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
}

fn inverse_rms<T: Real>(row: &[T], eps: f64) -> T {
    let mut sum = T::zero();
    for &value in row {
        sum += value * value;
    }
    let mean = sum / T::from_f64(row.len() as f64);
    T::one() / (mean + T::from_f64(eps)).sqrt()
}

fn rms_norm_forward<T: Real>(
    x: &CpuStorage,
    x_layout: &Layout,
    weight: &CpuStorage,
    weight_layout: &Layout,
    eps: f64,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (x, weight) = (values::<T>(x, x_layout)?, values::<T>(weight, weight_layout)?);
    let width = weight.len();
    let mut out = vec![T::zero(); x.len()];
    let chunk = rows_per_task(x.len() / width.max(1), width) * width;
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(out, x)| {
        for (out, row) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
            let inverse = inverse_rms(row, eps);
            for ((o, &value), &scale) in out.iter_mut().zip(row).zip(weight) {
                *o = value * inverse * scale;
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), x_layout.shape().clone()))
}

fn rms_norm_backward<T: Real>(
    x: &Tensor,
    weight: &Tensor,
    gradient: &Tensor,
    eps: f64,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (want_x, want_weight) = (x.track_op(), weight.track_op());
    with_values::<T, _>(x, |xs| {
        with_values::<T, _>(weight, |ws| {
            with_values::<T, _>(gradient, |gs| {
                let width = ws.len();
                let n = T::from_f64(width as f64);
                let chunk = rows_per_task(xs.len() / width.max(1), width) * width;
                let x_gradient = if want_x {
                    let mut out = vec![T::zero(); xs.len()];
                    out.par_chunks_mut(chunk).zip(xs.par_chunks(chunk)).zip(gs.par_chunks(chunk)).for_each(
                        |((out, x), g)| {
                            for ((out, row), g) in
                                out.chunks_exact_mut(width).zip(x.chunks_exact(width)).zip(g.chunks_exact(width))
                            {
                                let inverse = inverse_rms(row, eps);
                                let mut projection = T::zero();
                                for ((&value, &gv), &w) in row.iter().zip(g).zip(ws) {
                                    projection += gv * w * value;
                                }
                                let correction = inverse * inverse * inverse * projection / n;
                                for (((o, &value), &gv), &w) in out.iter_mut().zip(row).zip(g).zip(ws) {
                                    *o = inverse * w * gv - value * correction;
                                }
                            }
                        },
                    );
                    Some(tensor_of(out, x)?)
                } else {
                    None
                };
                let weight_gradient = if want_weight {
                    let mut sums = vec![T::zero(); width];
                    for (row, g) in xs.chunks_exact(width).zip(gs.chunks_exact(width)) {
                        let inverse = inverse_rms(row, eps);
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
        dispatch!(x, rms_norm_forward(x, x_layout, weight, weight_layout, self.eps))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _result: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(x.dtype(), rms_norm_backward(x, weight, gradient, self.eps))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: y = silu(gate) * up, silu(g) = g * sigmoid(g).

/// `silu(gate) * up`, element-wise.
pub(crate) struct SwiGlu;

const ELEMENTS_PER_TASK: usize = 16_384;

fn sigmoid<T: Real>(value: T) -> T {
    T::one() / ((-value).exp() + T::one())
}

fn swiglu_forward<T: Real>(
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
        .for_each(|((out, gate), up)| {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g * sigmoid(g) * u;
            }
        });
    Ok((T::to_cpu_storage_owned(out), gate_layout.shape().clone()))
}

fn swiglu_backward<T: Real>(
    gate: &Tensor,
    up: &Tensor,
    gradient: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let (want_gate, want_up) = (gate.track_op(), up.track_op());
    with_values::<T, _>(gate, |gates| {
        with_values::<T, _>(up, |ups| {
            with_values::<T, _>(gradient, |gs| {
                let mut gate_gradient = vec![T::zero(); if want_gate { gates.len() } else { 0 }];
                let mut up_gradient = vec![T::zero(); if want_up { gates.len() } else { 0 }];
                gates
                    .par_chunks(ELEMENTS_PER_TASK)
                    .zip(ups.par_chunks(ELEMENTS_PER_TASK))
                    .zip(gs.par_chunks(ELEMENTS_PER_TASK))
                    .enumerate()
                    .map(|(index, ((gate, up), g))| {
                        let mut gate_part = vec![T::zero(); if want_gate { gate.len() } else { 0 }];
                        let mut up_part = vec![T::zero(); if want_up { gate.len() } else { 0 }];
                        for (position, ((&x, &u), &gv)) in gate.iter().zip(up).zip(g).enumerate() {
                            let s = sigmoid(x);
                            if want_gate {
                                gate_part[position] = gv * u * s * (T::one() + x * (T::one() - s));
                            }
                            if want_up {
                                up_part[position] = gv * x * s;
                            }
                        }
                        (index, gate_part, up_part)
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .for_each(|(index, gate_part, up_part)| {
                        let start = index * ELEMENTS_PER_TASK;
                        if want_gate {
                            gate_gradient[start..start + gate_part.len()].copy_from_slice(&gate_part);
                        }
                        if want_up {
                            up_gradient[start..start + up_part.len()].copy_from_slice(&up_part);
                        }
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
        dispatch!(gate, swiglu_forward(gate, gate_layout, up, up_layout))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _result: &Tensor,
        gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        dispatch_dtype!(gate.dtype(), swiglu_backward(gate, up, gradient))
    }
}

// ---------------------------------------------------------------------------------------------
// Output head and cross-entropy: logits = x W^T; per row, ln(sum(exp(l - max))) - (l[target] - max).

/// The negative log-likelihood of each row's target under the output head `weight`
/// (`(vocab, hidden)`), from `(rows, hidden)` hidden states: `(rows,)`. The logits, the largest
/// tensor of the step, are computed inside and kept for the backward pass only (the composite
/// form materialised five vocabulary-wide copies of them).
pub(crate) struct OutputLoss {
    /// The head, the same tensor as the operation's second argument (which records it in the
    /// graph); the product reads this one to avoid copying it.
    pub weight: Tensor,
    pub targets: Vec<u32>,
    pub logits: std::sync::Mutex<Option<Tensor>>,
}

fn row_max<T: Real>(row: &[T]) -> T {
    row.iter().copied().fold(row[0], |max, value| if value > max { value } else { max })
}

fn output_loss_forward<T: Real>(
    op: &OutputLoss,
    hidden: &CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = Tensor::from_slice(values::<T>(hidden, layout)?, layout.shape(), op.weight.device())?;
    let logits = x.matmul(&op.weight.detach().t()?)?;
    let (rows, vocab) = logits.dims2()?;
    if rows != op.targets.len() || vocab == 0 {
        return Err(error("output loss: one target per row"));
    }
    if let Some(&bad) = op.targets.iter().find(|&&target| target as usize >= vocab) {
        return Err(error(format!("output loss: target {bad} outside the vocabulary of {vocab}")));
    }
    let losses: Vec<T> = with_values::<T, _>(&logits, |all| {
        Ok(all
            .par_chunks(vocab)
            .zip(op.targets.par_iter())
            .map(|(row, &target)| {
                let max = row_max(row);
                let mut sum = T::zero();
                for &value in row {
                    sum += (value - max).exp();
                }
                sum.ln() - (row[target as usize] - max)
            })
            .collect())
    })?;
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
    let (want_hidden, want_weight) = (hidden.track_op(), weight.track_op());
    if !want_hidden && !want_weight {
        return Ok((None, None));
    }
    let cached = op.logits.lock().ok().and_then(|mut cache| cache.take());
    let logits = match cached {
        Some(logits) => logits,
        None => hidden.detach().matmul(&op.weight.detach().t()?)?,
    };
    let (_, vocab) = logits.dims2()?;
    let logit_gradient = with_values::<T, _>(&logits, |xs| {
        with_values::<T, _>(gradient, |gs| {
            let mut out = vec![T::zero(); xs.len()];
            out.par_chunks_mut(vocab).zip(xs.par_chunks(vocab)).zip(gs.par_iter()).zip(op.targets.par_iter()).for_each(
                |(((out, row), &g), &target)| {
                    let max = row_max(row);
                    let mut sum = T::zero();
                    for (o, &value) in out.iter_mut().zip(row) {
                        let exponential = (value - max).exp();
                        *o = exponential;
                        sum += exponential;
                    }
                    for o in out.iter_mut() {
                        *o = g * (*o / sum);
                    }
                    out[target as usize] -= g;
                },
            );
            tensor_of(out, &logits)
        })
    })?;
    drop(logits);
    let hidden_gradient = if want_hidden { Some(logit_gradient.matmul(&op.weight.detach())?) } else { None };
    let weight_gradient = if want_weight { Some(logit_gradient.t()?.matmul(&hidden.detach())?) } else { None };
    Ok((hidden_gradient, weight_gradient))
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
        dispatch!(hidden, output_loss_forward(self, hidden, layout))
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
}

/// One head's rows of one sequence, rotated or not.
struct HeadView<'a, T> {
    data: &'a [T],
    row_width: usize,
    offset: usize,
}

impl Attention {
    fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// The `(length, head_dim)` block of head `head` of sequence `sequence`, rotated when `rotate`.
    fn gather<T: Real>(&self, view: HeadView<'_, T>, sequence: usize, rotate: bool) -> Vec<T> {
        let (length, dim) = (self.length, self.head_dim);
        let half = dim / 2;
        let mut out = vec![T::zero(); length * dim];
        for position in 0..length {
            let start = (sequence * length + position) * view.row_width + view.offset;
            let row = &view.data[start..start + dim];
            let out_row = &mut out[position * dim..(position + 1) * dim];
            if rotate {
                let (cos, sin) = (&self.cos[position * dim..], &self.sin[position * dim..]);
                for index in 0..dim {
                    let rotated = if index < half { -row[index + half] } else { row[index - half] };
                    out_row[index] =
                        row[index] * T::from_f64(f64::from(cos[index])) + rotated * T::from_f64(f64::from(sin[index]));
                }
            } else {
                out_row.copy_from_slice(row);
            }
        }
        out
    }

    /// The gradient of the input of the rotation from the gradient of its output, in place.
    fn unrotate<T: Real>(&self, gradient: &mut [T]) {
        let (length, dim) = (self.length, self.head_dim);
        let half = dim / 2;
        let mut row_out = vec![T::zero(); dim];
        for position in 0..length {
            let (cos, sin) = (&self.cos[position * dim..], &self.sin[position * dim..]);
            let row = &mut gradient[position * dim..(position + 1) * dim];
            for index in 0..dim {
                let c = T::from_f64(f64::from(cos[index]));
                row_out[index] = if index < half {
                    row[index] * c + row[index + half] * T::from_f64(f64::from(sin[index + half]))
                } else {
                    row[index] * c - row[index - half] * T::from_f64(f64::from(sin[index - half]))
                };
            }
            row.copy_from_slice(&row_out);
        }
    }

    /// Row `i` of the softmax probabilities (positions `0..=i`), into `probabilities`.
    fn probabilities<T: Real>(&self, queries: &[T], keys: &[T], position: usize, probabilities: &mut [T]) {
        let dim = self.head_dim;
        let scale = T::from_f64(self.scale);
        let query = &queries[position * dim..(position + 1) * dim];
        let mut max = T::from_f64(f64::NEG_INFINITY);
        for (column, p) in probabilities[..=position].iter_mut().enumerate() {
            let score = dot(query, &keys[column * dim..(column + 1) * dim]) * scale;
            *p = score;
            if score > max {
                max = score;
            }
        }
        let mut sum = T::zero();
        for p in probabilities[..=position].iter_mut() {
            *p = (*p - max).exp();
            sum += *p;
        }
        for p in probabilities[..=position].iter_mut() {
            *p /= sum;
        }
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
        let blocks: Vec<Vec<T>> = (0..batch * heads)
            .into_par_iter()
            .map(|task| {
                let (sequence, head) = (task / heads, task % heads);
                let kv_head = head / group;
                let q = self.gather(HeadView { data: queries, row_width: q_width, offset: head * dim }, sequence, true);
                let k =
                    self.gather(HeadView { data: keys, row_width: kv_width, offset: kv_head * dim }, sequence, true);
                let v =
                    self.gather(HeadView { data: values, row_width: kv_width, offset: kv_head * dim }, sequence, false);
                let mut out = vec![T::zero(); length * dim];
                let mut probabilities = vec![T::zero(); length];
                for position in 0..length {
                    self.probabilities(&q, &k, position, &mut probabilities);
                    let out_row = &mut out[position * dim..(position + 1) * dim];
                    for (column, &p) in probabilities[..=position].iter().enumerate() {
                        add_scaled(out_row, p, &v[column * dim..(column + 1) * dim]);
                    }
                }
                out
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
        let scale = T::from_f64(self.scale);
        with_values::<T, _>(queries, |qs| {
            with_values::<T, _>(keys, |ks| {
                with_values::<T, _>(values, |vs| {
                    with_values::<T, _>(gradient, |gs| {
                        // Per (sequence, key/value head): the gradients of its `group` query heads,
                        // of its keys and of its values.
                        let blocks: Vec<(Vec<Vec<T>>, Vec<T>, Vec<T>)> = (0..batch * self.kv_heads)
                            .into_par_iter()
                            .map(|task| {
                                let (sequence, kv_head) = (task / self.kv_heads, task % self.kv_heads);
                                let kv_view = |data| HeadView { data, row_width: kv_width, offset: kv_head * dim };
                                let k = self.gather(kv_view(ks), sequence, true);
                                let v = self.gather(kv_view(vs), sequence, false);
                                let mut key_gradient = vec![T::zero(); length * dim];
                                let mut value_gradient = vec![T::zero(); length * dim];
                                let mut query_gradients = Vec::with_capacity(group);
                                let mut probabilities = vec![T::zero(); length];
                                let mut scores = vec![T::zero(); length];
                                for member in 0..group {
                                    let head = kv_head * group + member;
                                    let view = |data, row_width| HeadView { data, row_width, offset: head * dim };
                                    let q = self.gather(view(qs, q_width), sequence, true);
                                    let g = self.gather(view(gs, q_width), sequence, false);
                                    let mut query_gradient = vec![T::zero(); length * dim];
                                    for position in 0..length {
                                        self.probabilities(&q, &k, position, &mut probabilities);
                                        let g_row = &g[position * dim..(position + 1) * dim];
                                        let mut weighted = T::zero();
                                        for ((score, &p), value) in
                                            scores.iter_mut().zip(&probabilities[..=position]).zip(v.chunks_exact(dim))
                                        {
                                            let d = dot(g_row, value);
                                            *score = d;
                                            weighted += p * d;
                                        }
                                        let q_row = &q[position * dim..(position + 1) * dim];
                                        let query_row = &mut query_gradient[position * dim..(position + 1) * dim];
                                        for column in 0..=position {
                                            let p = probabilities[column];
                                            let score_gradient = p * (scores[column] - weighted) * scale;
                                            let span = column * dim..(column + 1) * dim;
                                            add_scaled(query_row, score_gradient, &k[span.clone()]);
                                            add_scaled(&mut key_gradient[span.clone()], score_gradient, q_row);
                                            add_scaled(&mut value_gradient[span], p, g_row);
                                        }
                                    }
                                    self.unrotate(&mut query_gradient);
                                    query_gradients.push(query_gradient);
                                }
                                self.unrotate(&mut key_gradient);
                                (query_gradients, key_gradient, value_gradient)
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
        dispatch!(
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

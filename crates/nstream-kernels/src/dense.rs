//! f32 dense kernels for encoder models (BERT-style) on the CPU: a matrix product against weights
//! packed once at load, layer normalisation, activations and bidirectional attention.
//!
//! # The matrix product
//!
//! [`PackedMatrix`] holds a linear layer's weight (`rows` outputs × `cols` inputs, PyTorch's
//! `nn.Linear` layout) and optional bias, repacked into panels of 16 output columns: panel `p`
//! holds, for each input index `k`, the 16 weights `W[16p..16p+16][k]` side by side (zeros past
//! the last row). [`PackedMatrix::matmul`] computes `output = activation(input · Wᵀ + bias)` for a
//! batch of row-major input rows. The AVX2 + FMA kernel (x86-64) keeps a tile of up to 6 input
//! rows × 16 output columns in 12 registers and streams the panel through them once per tile (one
//! FMA per 8 products); at the AVX-512 level a tile is up to 12 rows, one 512-bit register each
//! (a third of the instructions per product, the same bits); the portable kernel runs the same
//! loops in plain Rust. Work items are ranges of panels over all input rows, spread over a [`Parallel`];
//! each item walks the rows in blocks of 64 so that a block of input stays in the L2 cache while
//! the item's panels stream past it.
//!
//! The level is [`crate::cpu_level`] when the matrix is built (so `NSTREAM_CPU_LEVEL=portable`
//! selects the portable kernel) or a lower one given to [`PackedMatrix::new_at`]. The AVX2 kernel
//! fuses multiply and add (one rounding per product), the portable one does not, so the two
//! differ in the last bits; each is deterministic (the sums of one output run in input order,
//! whatever the threads do).
//!
//! # Element-wise work
//!
//! [`add_layer_norm`] and [`apply_activation`] are plain loops that the compiler vectorises; at
//! the AVX2 level they are compiled with AVX2 and FMA enabled. [`encoder_attention`] runs its two
//! products on the tiles above and its softmax as such a loop. The exponential and `erf` are
//! polynomial approximations, within 3e-7 (relative) and 2e-6 of the true values (see
//! [`exp_approx`] and [`erf_approx`]).

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use crate::{CacheLine, CpuLevel, KernelError, Parallel, cpu_level};

/// Output columns per packed panel (two 256-bit registers of f32).
pub const PANEL: usize = 16;
/// Input rows of the largest tile the AVX2 and portable kernels keep in registers.
pub(crate) const TILE_ROWS: usize = 6;
/// Input rows of the largest tile of the AVX-512 kernel (one 512-bit register per row).
pub(crate) const WIDE_TILE_ROWS: usize = 12;

/// The tallest tile the kernel of `level` takes.
pub(crate) fn tile_height(level: CpuLevel) -> usize {
    if level == CpuLevel::Avx512Vnni { WIDE_TILE_ROWS } else { TILE_ROWS }
}
/// Input rows walked together by one work item (their inputs stay in L2 across the panels).
pub(crate) const ROW_BLOCK: usize = 64;
/// Most work items of one product (fewer, wider ones cost less to hand out).
const MAX_ITEMS: usize = 24;

/// One packed input index of a panel: the weights of 16 output columns, as two halves of 8.
pub(crate) type PanelStep = [[f32; 8]; 2];

/// What is applied to each output value after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// Nothing: `input · Wᵀ + bias`.
    #[default]
    Identity,
    /// GELU with the exact `erf` (PyTorch's `gelu`, BERT's `"gelu"`): `x·(1 + erf(x/√2))/2`.
    GeluErf,
    /// GELU's tanh approximation (`"gelu_new"`, `gelu(approximate="tanh")`).
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

/// A weight matrix (and bias) packed for [`PackedMatrix::matmul`].
///
/// Build it once at load with [`PackedMatrix::new`]; it is immutable and `Sync`, so one matrix
/// serves every thread.
#[derive(Clone)]
pub struct PackedMatrix {
    /// Output features (the weight's rows).
    rows: usize,
    /// Input features (the weight's columns).
    cols: usize,
    /// `panels × cols` steps: panel `p`'s step `k` holds `W[16p + j][k]` for `j` in 0..16.
    panels: Vec<PanelStep>,
    /// The bias per output column, padded with zeros to whole panels.
    bias: Vec<[f32; PANEL]>,
    level: CpuLevel,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PackedMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl PackedMatrix {
    /// Packs `weights` (`rows × cols`, row-major: row `n` holds the `cols` input weights of
    /// output `n`, as `nn.Linear.weight`) and `bias` (`rows` values, or none) for the kernel of
    /// [`cpu_level`] (an error if `NSTREAM_CPU_LEVEL` names no level).
    pub fn new(weights: &[f32], rows: usize, cols: usize, bias: Option<&[f32]>) -> Result<Self, KernelError> {
        Self::new_at(weights, rows, cols, bias, cpu_level()?)
    }

    /// [`Self::new`] for the kernel of `level`, or of the CPU's level where that is lower.
    pub fn new_at(
        weights: &[f32],
        rows: usize,
        cols: usize,
        bias: Option<&[f32]>,
        level: CpuLevel,
    ) -> Result<Self, KernelError> {
        if weights.len() != rows * cols {
            return Err(KernelError::Shape {
                message: format!("expected {rows} × {cols} weights, got {}", weights.len()),
            });
        }
        if let Some(bias) = bias
            && bias.len() != rows
        {
            return Err(KernelError::Shape { message: format!("expected {rows} bias values, got {}", bias.len()) });
        }
        let panel_count = rows.div_ceil(PANEL);
        let mut panels = vec![[[0f32; 8]; 2]; panel_count * cols];
        for (row, weights_row) in weights.chunks_exact(cols.max(1)).enumerate().take(rows) {
            let (panel, lane) = (row / PANEL, row % PANEL);
            for (k, &weight) in weights_row.iter().enumerate() {
                panels[panel * cols + k][lane / 8][lane % 8] = weight;
            }
        }
        let mut padded_bias = vec![[0f32; PANEL]; panel_count];
        if let Some(bias) = bias {
            for (row, &value) in bias.iter().enumerate() {
                padded_bias[row / PANEL][row % PANEL] = value;
            }
        }
        Ok(Self { rows, cols, panels, bias: padded_bias, level: level.min(CpuLevel::detected()) })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The level of the kernel that runs.
    pub fn level(&self) -> CpuLevel {
        self.level
    }

    /// Bytes of packed weights and bias.
    pub fn size_in_bytes(&self) -> usize {
        std::mem::size_of_val(self.panels.as_slice()) + std::mem::size_of_val(self.bias.as_slice())
    }

    /// `output = activation(input · Wᵀ + bias)` for `batch` rows: `input` is `batch × cols`
    /// row-major, `output` `batch × rows`. Ranges of output columns are spread over `parallel`.
    pub fn matmul(
        &self,
        input: &[f32],
        batch: usize,
        output: &mut [f32],
        activation: Activation,
        parallel: &dyn Parallel,
    ) -> Result<(), KernelError> {
        if !crate::check_product_shape(input, output, batch, self.rows, self.cols)? {
            return Ok(());
        }
        spread_panels(output, self.rows, PANEL, parallel, &|first_panel, rows| {
            self.multiply_item(input, first_panel, rows, activation);
        });
        Ok(())
    }

    /// The output columns from panel `first_panel` on (as wide as `output`'s rows) of every
    /// input row.
    fn multiply_item(&self, input: &[f32], first_panel: usize, output: &mut [&mut [f32]], activation: Activation) {
        let cols = self.cols;
        let width = output.first().map_or(0, |row| row.len());
        let batch = output.len();
        // Each tile overwrites the rows it uses: cleared once here, not per tile.
        let mut tile = [[0f32; PANEL]; WIDE_TILE_ROWS];
        for block_start in (0..batch).step_by(ROW_BLOCK) {
            let block_end = (block_start + ROW_BLOCK).min(batch);
            for panel_offset in 0..width.div_ceil(PANEL) {
                let panel = first_panel + panel_offset;
                let steps = &self.panels[panel * cols..][..cols];
                let bias = &self.bias[panel];
                let column = panel_offset * PANEL;
                let valid = (width - column).min(PANEL);
                for tile_rows in tile_ranges(block_start, block_end, tile_height(self.level)) {
                    let inputs = &input[tile_rows.start * cols..tile_rows.end * cols];
                    self.tile(inputs, steps, bias, &mut tile[..tile_rows.len()], activation);
                    for (row, values) in tile_rows.zip(&tile) {
                        copy_panel(values, &mut output[row][column..column + valid]);
                    }
                }
            }
        }
    }

    /// One tile: `out.len()` (1 up to the level's [`tile_height`]) input rows (`inputs`,
    /// `out.len() × cols`) × one panel.
    fn tile(
        &self,
        inputs: &[f32],
        steps: &[PanelStep],
        bias: &[f32; PANEL],
        out: &mut [[f32; PANEL]],
        activation: Activation,
    ) {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            CpuLevel::Avx512Vnni => crate::dense_avx2::wide_tile(inputs, steps, bias, out, activation),
            #[cfg(target_arch = "x86_64")]
            CpuLevel::Avx2 => crate::dense_avx2::tile(inputs, steps, bias, out, activation),
            _ => {
                tile_portable(inputs, steps, bias, out);
                for row in out.iter_mut() {
                    activation_portable(row, activation);
                }
            }
        }
    }
}

/// The first `target.len()` (at most `N`) values of a tile row into `target`: a whole row as one
/// fixed-size copy (no `memmove` call), a shorter one element-wise.
#[inline(always)]
pub(crate) fn copy_panel<const N: usize>(values: &[f32; N], target: &mut [f32]) {
    if let Ok(whole) = <&mut [f32; N]>::try_from(&mut *target) {
        *whole = *values;
    } else {
        target.copy_from_slice(&values[..target.len()]);
    }
}

/// Spreads a product's output columns over `parallel`: the `output_cols` columns (panels of
/// `panel` columns) are cut into at most [`MAX_ITEMS`] ranges of whole panels, and `work` is called
/// once per range with the index of its first panel and that column range of every output row
/// (`output` is row-major, `output_cols` per row). The f32 and bf16 products share it.
pub(crate) fn spread_panels(
    output: &mut [f32],
    output_cols: usize,
    panel: usize,
    parallel: &dyn Parallel,
    work: &(dyn Fn(usize, &mut [&mut [f32]]) + Sync),
) {
    let panels_per_item = output_cols.div_ceil(panel).div_ceil(MAX_ITEMS);
    let width = panels_per_item * panel;
    let items = output_cols.div_ceil(width);
    // Each work item owns one column range of every output row.
    let mut parts: Vec<Vec<&mut [f32]>> =
        (0..items).map(|_| Vec::with_capacity(output.len() / output_cols.max(1))).collect();
    for output_row in output.chunks_mut(output_cols) {
        for (item, part) in output_row.chunks_mut(width).enumerate() {
            parts[item].push(part);
        }
    }
    let parts: Vec<CacheLine<Mutex<Vec<&mut [f32]>>>> =
        parts.into_iter().map(|part| CacheLine(Mutex::new(part))).collect();
    parallel.run(items, &|range| {
        for item in range {
            let mut rows = parts[item].0.lock().unwrap_or_else(PoisonError::into_inner);
            work(item * panels_per_item, &mut rows);
        }
    });
}

/// The portable tile: `out[r][j] = bias[j] + Σ_k inputs[r·cols + k] · steps[k][j]`, the sum in
/// input order.
fn tile_portable(inputs: &[f32], steps: &[PanelStep], bias: &[f32; PANEL], out: &mut [[f32; PANEL]]) {
    let cols = steps.len();
    for (row, accumulator) in out.iter_mut().enumerate() {
        let input = &inputs[row * cols..][..cols];
        *accumulator = *bias;
        for (&value, step) in input.iter().zip(steps) {
            let weights = step.as_flattened();
            for (sum, &weight) in accumulator.iter_mut().zip(weights) {
                *sum += value * weight;
            }
        }
    }
}

/// `e^x` for f32, accurate to about 2 units in the last place over the range where it is a
/// normal number (Cephes' `expf` polynomial after reducing by multiples of `ln 2`); `e^−87.3`
/// below −87.3 and `e^88` above 88. Plain arithmetic, so loops over it vectorise.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: `n · LN2_HIGH` is exact for the `n` that occur.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let value = p * r * r + r + 1.0;
    // 2^n as f32 bits: n is within −126..=127 after the clamp, a normal number.
    value * f32::from_bits(((exponent + 127) as u32) << 23)
}

/// `erf(x)` for f32, within 2e-6 of the true value (Eigen's rational approximation on
/// `[-4, 4]`; ±1 outside, where f32 cannot tell the difference). Plain arithmetic, so loops over
/// it vectorise.
#[inline(always)]
pub fn erf_approx(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_2e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}

/// The activation of one value.
#[inline(always)]
fn activate(x: f32, activation: Activation) -> f32 {
    match activation {
        Activation::Identity => x,
        Activation::GeluErf => 0.5 * x * (1.0 + erf_approx(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            // tanh(u) = 1 − 2 / (e^{2u} + 1), as candle and PyTorch's tanh approximation use it.
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
            let tanh = 1.0 - 2.0 / (exp_approx(2.0 * u) + 1.0);
            0.5 * x * (1.0 + tanh)
        }
        Activation::Relu => x.max(0.0),
    }
}

/// [`apply_activation`]'s body, compiled into whichever features the caller has.
#[inline(always)]
pub(crate) fn activation_portable(values: &mut [f32], activation: Activation) {
    match activation {
        Activation::Identity => {}
        // One loop per activation, so that each vectorises without a branch inside.
        Activation::GeluErf => {
            for value in values.iter_mut() {
                *value = activate(*value, Activation::GeluErf);
            }
        }
        Activation::GeluTanh => {
            for value in values.iter_mut() {
                *value = activate(*value, Activation::GeluTanh);
            }
        }
        Activation::Relu => {
            for value in values.iter_mut() {
                *value = activate(*value, Activation::Relu);
            }
        }
    }
}

/// Applies `activation` to every value in place, with the kernels of [`cpu_level`] (portable
/// where `NSTREAM_CPU_LEVEL` names no level).
pub fn apply_activation(values: &mut [f32], activation: Activation) {
    match cpu_level().unwrap_or(CpuLevel::Portable) {
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 | CpuLevel::Avx512Vnni => crate::dense_avx2::activation(values, activation),
        _ => activation_portable(values, activation),
    }
}

/// Sum of `values` in 8 interleaved partial sums (so that it vectorises), then those in order.
#[inline(always)]
fn sum_lanes(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (chunks, rest) = values.as_chunks::<8>();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane += value;
        }
    }
    let mut total = 0.0;
    for lane in lanes {
        total += lane;
    }
    for &value in rest {
        total += value;
    }
    total
}

/// [`add_layer_norm`]'s body, compiled into whichever features the caller has.
#[inline(always)]
pub(crate) fn layer_norm_portable(
    values: &mut [f32],
    residual: Option<&[f32]>,
    weight: &[f32],
    bias: &[f32],
    epsilon: f32,
) {
    let width = weight.len();
    for (row_index, row) in values.chunks_exact_mut(width).enumerate() {
        if let Some(residual) = residual {
            for (value, &add) in row.iter_mut().zip(&residual[row_index * width..][..width]) {
                *value += add;
            }
        }
        let mean = sum_lanes(row) / width as f32;
        let mut lanes = [0f32; 8];
        let (chunks, rest) = row.as_chunks::<8>();
        for chunk in chunks {
            for (lane, &value) in lanes.iter_mut().zip(chunk) {
                let centred = value - mean;
                *lane += centred * centred;
            }
        }
        let mut squares = 0.0;
        for lane in lanes {
            squares += lane;
        }
        for &value in rest {
            squares += (value - mean) * (value - mean);
        }
        let inverse = 1.0 / (squares / width as f32 + epsilon).sqrt();
        for ((value, &scale), &shift) in row.iter_mut().zip(weight).zip(bias) {
            *value = (*value - mean) * inverse * scale + shift;
        }
    }
}

/// Layer normalisation of each row of `values` (rows of `weight.len()` values) after adding
/// `residual` (the same shape) when given: `y = (x − mean) / sqrt(var + epsilon) · weight + bias`
/// with the biased variance, as `torch.nn.LayerNorm`. In place.
pub fn add_layer_norm(
    values: &mut [f32],
    residual: Option<&[f32]>,
    weight: &[f32],
    bias: &[f32],
    epsilon: f32,
) -> Result<(), KernelError> {
    let width = weight.len();
    if width == 0 || bias.len() != width || !values.len().is_multiple_of(width) {
        return Err(KernelError::Shape {
            message: format!(
                "layer norm: {} values are not rows of the weight's {width} (bias {})",
                values.len(),
                bias.len()
            ),
        });
    }
    if let Some(residual) = residual
        && residual.len() != values.len()
    {
        return Err(KernelError::Shape {
            message: format!("layer norm: residual of {} values for {} values", residual.len(), values.len()),
        });
    }
    match cpu_level().unwrap_or(CpuLevel::Portable) {
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 | CpuLevel::Avx512Vnni => {
            crate::dense_avx2::layer_norm(values, residual, weight, bias, epsilon);
        }
        _ => layer_norm_portable(values, residual, weight, bias, epsilon),
    }
    Ok(())
}

/// The shape of [`encoder_attention`]'s inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Positions per sequence (the padded length).
    pub sequence: usize,
    /// Attention heads.
    pub heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// Query rows handled by one work item of [`encoder_attention`].
const ATTENTION_ROWS: usize = 64;

/// Bidirectional multi-head attention of an encoder over right-padded sequences.
///
/// `qkv` holds `batch × sequence` rows of `3 · heads · head_dim` values: the queries (already
/// scaled by `1/sqrt(head_dim)`), then the keys, then the values, each head's `head_dim` values
/// contiguous. Sequence `b` has `lengths[b]` real positions; padding keys get no weight (as
/// a mask of `-inf`, or of `-1e4` once the exponential underflows). For every row (padding rows
/// too) and head, `softmax(q · kᵀ) · v` goes to that row's head slot of `output`
/// (`batch × sequence` rows of `heads · head_dim`). Blocks of query rows are spread over
/// `parallel`.
///
/// Both products of a head run on the matrix product's register tiles: the head's keys are
/// packed as panels of 16 keys (so a tile of query rows × 16 scores is [`PANEL`]-wide sums
/// over the head's dimensions) and its values as panels of 16 dimensions (a tile of rows × 16
/// context values sums over the keys). Each sum runs in order.
pub fn encoder_attention(
    qkv: &[f32],
    shape: AttentionShape,
    lengths: &[usize],
    output: &mut [f32],
    parallel: &dyn Parallel,
) -> Result<(), KernelError> {
    let AttentionShape { batch, sequence, heads, head_dim } = shape;
    let hidden = heads * head_dim;
    let shape_error = |message: String| Err(KernelError::Shape { message: format!("attention: {message}") });
    if qkv.len() != batch * sequence * 3 * hidden {
        return shape_error(format!("expected {batch} × {sequence} × 3 × {hidden} qkv values, got {}", qkv.len()));
    }
    if output.len() != batch * sequence * hidden {
        return shape_error(format!("expected {batch} × {sequence} × {hidden} output values, got {}", output.len()));
    }
    if lengths.len() != batch || lengths.iter().any(|&length| length == 0 || length > sequence) {
        return shape_error(format!("lengths {lengths:?} do not fit {batch} sequences of {sequence}"));
    }
    if output.is_empty() {
        return Ok(());
    }
    // Work items: blocks of query rows inside one sequence.
    let mut parts: Vec<AttentionPart<'_>> = Vec::new();
    for (sequence_index, rows) in output.chunks_mut(sequence * hidden).enumerate() {
        for (block, block_rows) in rows.chunks_mut(ATTENTION_ROWS * hidden).enumerate() {
            parts.push(CacheLine(Mutex::new((sequence_index, block * ATTENTION_ROWS, block_rows))));
        }
    }
    let level = cpu_level().unwrap_or(CpuLevel::Portable);
    parallel.run(parts.len(), &|range| {
        let mut scratch = AttentionScratch::default();
        for item in range {
            let mut part = parts[item].0.lock().unwrap_or_else(PoisonError::into_inner);
            let (sequence_index, first_row, ref mut block) = *part;
            let rows = &qkv[sequence_index * sequence * 3 * hidden..][..sequence * 3 * hidden];
            let job = AttentionRows { rows, shape, length: lengths[sequence_index], first_row };
            match level {
                #[cfg(target_arch = "x86_64")]
                CpuLevel::Avx2 | CpuLevel::Avx512Vnni => {
                    crate::dense_avx2::attention(&job, block, &mut scratch, level == CpuLevel::Avx512Vnni);
                }
                _ => attention_rows(&job, block, &mut scratch, &PortableAttention),
            }
        }
    });
    Ok(())
}

/// A work item's output of [`encoder_attention`]: (sequence, first query row, its rows).
type AttentionPart<'a> = CacheLine<Mutex<(usize, usize, &'a mut [f32])>>;

/// One work item of [`encoder_attention`]: the query rows from `first_row` of one sequence.
pub(crate) struct AttentionRows<'a> {
    /// The sequence's qkv rows.
    rows: &'a [f32],
    shape: AttentionShape,
    /// Real positions.
    length: usize,
    first_row: usize,
}

/// One thread's buffers for [`encoder_attention`]'s items, grown to the largest item's needs.
#[derive(Default)]
pub(crate) struct AttentionScratch {
    /// One head's queries of the item's rows, contiguous (`rows × head_dim`).
    queries: Vec<f32>,
    /// The keys as panels of 16 keys: panel `p`'s step `c` holds value `c` (of `heads · head_dim`)
    /// of keys `16p..16p + 16` (zeros past the last key); `⌈length / 16⌉ × hidden` steps.
    keys: Vec<PanelStep>,
    /// Each head's values as panels of 16 dimensions: panel `q`'s step `j` holds key `j`'s
    /// dimensions `16q..16q + 16` (zeros past `head_dim`); `heads × ⌈head_dim / 16⌉ × length` steps.
    values: Vec<PanelStep>,
    /// The rows' scores, then their softmax numerators (`rows × length`).
    scores: Vec<f32>,
    /// The softmax denominator of each row.
    totals: Vec<f32>,
    /// `heads · head_dim` zeros: the keys past the last one in a panel.
    zeros: Vec<f32>,
}

/// The primitives [`attention_rows`] runs on, one implementation per kernel level.
pub(crate) trait AttentionKernels {
    /// The tallest tile [`Self::tile`] takes.
    fn tile_height(&self) -> usize;
    /// One bias-free tile of the product: `out.len()` rows of `inputs` × one panel of `steps`.
    fn tile(&self, inputs: &[f32], steps: &[PanelStep], out: &mut [[f32; PANEL]]);
    /// Transposes [`PANEL`] keys (each `steps.len()` values) into a panel: `steps[d][j] = keys[j][d]`.
    fn pack_keys(&self, keys: &[&[f32]; PANEL], steps: &mut [PanelStep]);
}

/// [`AttentionKernels`] in plain Rust.
pub(crate) struct PortableAttention;

impl AttentionKernels for PortableAttention {
    fn tile_height(&self) -> usize {
        TILE_ROWS
    }

    fn tile(&self, inputs: &[f32], steps: &[PanelStep], out: &mut [[f32; PANEL]]) {
        tile_portable(inputs, steps, &[0.0; PANEL], out);
    }

    #[inline(always)]
    fn pack_keys(&self, keys: &[&[f32]; PANEL], steps: &mut [PanelStep]) {
        pack_keys_portable(keys, steps);
    }
}

/// [`AttentionKernels::pack_keys`] in plain Rust.
#[inline(always)]
pub(crate) fn pack_keys_portable(keys: &[&[f32]; PANEL], steps: &mut [PanelStep]) {
    for (dimension, step) in steps.iter_mut().enumerate() {
        for (lane, key) in step.as_flattened_mut().iter_mut().zip(keys) {
            *lane = key[dimension];
        }
    }
}

/// The ranges of rows `start..end` cut into register tiles of at most `height` rows, of even
/// height (15 rows in tiles of 6: 5 + 5 + 5, not 6 + 6 + 3): a short tile has too few
/// independent sums to hide the FMA latency.
pub(crate) fn tile_ranges(start: usize, end: usize, height: usize) -> impl Iterator<Item = Range<usize>> {
    let rows = end - start;
    let tiles = rows.div_ceil(height);
    (0..tiles).scan(start, move |next, index| {
        let height = rows / tiles + usize::from(index < rows % tiles);
        let range = *next..*next + height;
        *next += height;
        Some(range)
    })
}

/// [`encoder_attention`]'s body for one item, compiled into whichever features the caller has,
/// on `kernels`' tiles and key packing.
#[inline(always)]
pub(crate) fn attention_rows(
    job: &AttentionRows<'_>,
    output: &mut [f32],
    scratch: &mut AttentionScratch,
    kernels: &impl AttentionKernels,
) {
    let AttentionShape { heads, head_dim, .. } = job.shape;
    let hidden = heads * head_dim;
    let stride = 3 * hidden;
    let length = job.length;
    let rows = output.len() / hidden;
    let value_panels = head_dim.div_ceil(PANEL);
    let AttentionScratch { queries, keys, values, scores, totals, zeros } = scratch;
    zeros.resize(hidden, 0.0);
    let zeros: &[f32] = zeros;
    // Each tile overwrites the rows it uses: cleared once here, not per tile.
    let mut out = [[0f32; PANEL]; WIDE_TILE_ROWS];
    queries.resize(rows * head_dim, 0.0);
    keys.resize(length.div_ceil(PANEL) * hidden, [[0.0; 8]; 2]);
    values.resize(heads * value_panels * length, [[0.0; 8]; 2]);
    scores.resize(rows * length, 0.0);
    totals.resize(rows, 0.0);
    // Every head's keys and values are packed first, reading the rows in order: key panel `p`
    // is `hidden` steps (head `h`'s at `h · head_dim`), value panel `q` of head `h` is the
    // `length` steps from `(h · value_panels + q) · length`.
    for (panel, steps) in keys.chunks_exact_mut(hidden).enumerate() {
        let panel_keys: [&[f32]; PANEL] = std::array::from_fn(|lane| {
            let key_index = panel * PANEL + lane;
            if key_index < length { &job.rows[key_index * stride + hidden..][..hidden] } else { zeros }
        });
        kernels.pack_keys(&panel_keys, steps);
    }
    for key_index in 0..length {
        let row = &job.rows[key_index * stride + 2 * hidden..][..hidden];
        for (head, head_values) in row.chunks_exact(head_dim).enumerate() {
            for (panel, part) in head_values.chunks(PANEL).enumerate() {
                values[(head * value_panels + panel) * length + key_index] = panel_step(part);
            }
        }
    }
    for head in 0..heads {
        let offset = head * head_dim;
        for (row, query) in queries.chunks_exact_mut(head_dim).enumerate() {
            query.copy_from_slice(&job.rows[(job.first_row + row) * stride + offset..][..head_dim]);
        }
        let head_keys = keys.chunks_exact(hidden).map(|panel| &panel[offset..][..head_dim]);
        let head_values = &values[head * value_panels * length..][..value_panels * length];
        for tile_rows in tile_ranges(0, rows, kernels.tile_height()) {
            let inputs = &queries[tile_rows.start * head_dim..tile_rows.end * head_dim];
            for (panel, steps) in head_keys.clone().enumerate() {
                kernels.tile(inputs, steps, &mut out[..tile_rows.len()]);
                let first = panel * PANEL;
                let width = (length - first).min(PANEL);
                for (row, sums) in tile_rows.clone().zip(&out) {
                    copy_panel(sums, &mut scores[row * length + first..][..width]);
                }
            }
        }
        for (row, total) in scores.chunks_exact_mut(length).zip(totals.iter_mut()) {
            *total = softmax_numerators(row);
        }
        for tile_rows in tile_ranges(0, rows, kernels.tile_height()) {
            let inputs = &scores[tile_rows.start * length..tile_rows.end * length];
            for (panel, steps) in head_values.chunks_exact(length).enumerate() {
                kernels.tile(inputs, steps, &mut out[..tile_rows.len()]);
                let first = panel * PANEL;
                let width = (head_dim - first).min(PANEL);
                for (row, sums) in tile_rows.clone().zip(&out) {
                    let inverse = 1.0 / totals[row];
                    let context = &mut output[row * hidden + offset + first..][..width];
                    for (value, &sum) in context.iter_mut().zip(sums) {
                        *value = sum * inverse;
                    }
                }
            }
        }
    }
}

/// Up to [`PANEL`] values as one panel step, zeros after them.
#[inline(always)]
fn panel_step(values: &[f32]) -> PanelStep {
    if let Ok(whole) = <&[f32; PANEL]>::try_from(values) {
        let (halves, _) = whole.as_chunks::<8>();
        return [halves[0], halves[1]];
    }
    let mut step = [[0.0; 8]; 2];
    step.as_flattened_mut()[..values.len()].copy_from_slice(values);
    step
}

/// Replaces `scores` by `e^(score − largest)` and returns their sum; eight running lanes so
/// that the loops vectorise.
#[inline(always)]
fn softmax_numerators(scores: &mut [f32]) -> f32 {
    let (chunks, rest) = scores.as_chunks::<8>();
    let mut lanes = [f32::NEG_INFINITY; 8];
    for chunk in chunks {
        for (lane, &score) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(score);
        }
    }
    let largest = rest.iter().fold(lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b));
    let (chunks, rest) = scores.as_chunks_mut::<8>();
    let mut sums = [0f32; 8];
    for chunk in chunks {
        for (sum, score) in sums.iter_mut().zip(chunk.iter_mut()) {
            *score = exp_approx(*score - largest);
            *sum += *score;
        }
    }
    let mut total: f32 = sums.iter().sum();
    for score in rest {
        *score = exp_approx(*score - largest);
        total += *score;
    }
    total
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::Sequential;

    /// Two scoped threads taking items in turn.
    struct TwoThreads;

    impl Parallel for TwoThreads {
        fn run(&self, items: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
            std::thread::scope(|scope| {
                for parity in 0..2 {
                    scope.spawn(move || {
                        for item in (parity..items).step_by(2) {
                            work(item..item + 1);
                        }
                    });
                }
            });
        }
    }

    fn runnable_levels() -> Vec<CpuLevel> {
        CpuLevel::ALL.into_iter().filter(|&level| level <= CpuLevel::detected()).collect()
    }

    fn random(count: usize, rng: &mut fastrand::Rng) -> Vec<f32> {
        (0..count).map(|_| rng.f32() * 2.0 - 1.0).collect()
    }

    /// `erf` in f64: its Taylor series below 2.5, the continued fraction of `erfc` above.
    fn erf_reference(x: f64) -> f64 {
        if x.abs() >= 2.5 {
            let a = x.abs();
            let mut fraction = a;
            for n in (1..=400).rev() {
                fraction = a + (n as f64 / 2.0) / fraction;
            }
            let erfc = (-a * a).exp() / (std::f64::consts::PI.sqrt() * fraction);
            return (1.0 - erfc).copysign(x);
        }
        let (mut term, mut total) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn activation_reference(x: f64, activation: Activation) -> f64 {
        match activation {
            Activation::Identity => x,
            Activation::GeluErf => 0.5 * x * (1.0 + erf_reference(x / 2f64.sqrt())),
            Activation::GeluTanh => {
                0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Relu => x.max(0.0),
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp_over_its_range() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let expected = f64::from(x).exp();
            let actual = f64::from(exp_approx(x));
            assert!((actual - expected).abs() <= 3e-7 * expected, "exp({x}) = {actual}, expected {expected}");
            x += 0.013;
        }
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(-1000.0) < 1e-37 && exp_approx(-1000.0) >= 0.0);
        assert!(exp_approx(1000.0).is_finite());
    }

    #[test]
    fn erf_is_within_2e6() {
        let mut x = -6.0f32;
        while x < 6.0 {
            let expected = erf_reference(f64::from(x));
            let actual = f64::from(erf_approx(x));
            assert!((actual - expected).abs() <= 2e-6, "erf({x}) = {actual}, expected {expected}");
            x += 0.0037;
        }
    }

    #[test]
    fn activations_match_their_definitions_at_every_level() {
        let values: Vec<f32> = (-1200..1200).map(|index| index as f32 * 0.01).collect();
        for activation in [Activation::Identity, Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
            let mut portable = values.clone();
            activation_portable(&mut portable, activation);
            let mut dispatched = values.clone();
            apply_activation(&mut dispatched, activation);
            for ((&x, &a), &b) in values.iter().zip(&portable).zip(&dispatched) {
                let expected = activation_reference(f64::from(x), activation);
                for actual in [a, b] {
                    assert!(
                        (f64::from(actual) - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                        "{activation:?}({x}) = {actual}, expected {expected}"
                    );
                }
            }
        }
    }

    /// The product in f64 from the unpacked weights.
    fn matmul_reference(
        weights: &[f32],
        bias: Option<&[f32]>,
        input: &[f32],
        batch: usize,
        rows: usize,
        cols: usize,
        activation: Activation,
    ) -> Vec<f64> {
        let mut output = Vec::with_capacity(batch * rows);
        for b in 0..batch {
            for n in 0..rows {
                let mut sum = bias.map_or(0.0, |bias| f64::from(bias[n]));
                for k in 0..cols {
                    sum += f64::from(input[b * cols + k]) * f64::from(weights[n * cols + k]);
                }
                output.push(activation_reference(sum, activation));
            }
        }
        output
    }

    #[test]
    fn every_level_shape_batch_and_activation_matches_the_f64_product() {
        let mut rng = fastrand::Rng::with_seed(11);
        // Rows around the panel (16) and item widths, columns of BERT's sizes and odd ones;
        // batches around the 6-row tile and the 64-row block.
        for (rows, cols) in [(1, 1), (5, 7), (16, 384), (33, 100), (400, 64), (1536, 24)] {
            let weights = random(rows * cols, &mut rng);
            let bias = random(rows, &mut rng);
            for level in runnable_levels() {
                for with_bias in [false, true] {
                    let bias = with_bias.then_some(bias.as_slice());
                    let matrix = PackedMatrix::new_at(&weights, rows, cols, bias, level).expect("packs");
                    assert_eq!(matrix.level(), level);
                    for batch in [1, 2, 5, 6, 7, 13, 64, 65] {
                        let input = random(batch * cols, &mut rng);
                        let activation = [Activation::Identity, Activation::GeluErf, Activation::Relu][batch % 3];
                        let expected = matmul_reference(&weights, bias, &input, batch, rows, cols, activation);
                        for parallel in [&Sequential as &dyn Parallel, &TwoThreads] {
                            let mut output = vec![f32::NAN; batch * rows];
                            matrix.matmul(&input, batch, &mut output, activation, parallel).expect("multiplies");
                            for (index, (&actual, &wanted)) in output.iter().zip(&expected).enumerate() {
                                let tolerance = 1e-5 * (cols as f64).sqrt() + 1e-6 * wanted.abs();
                                assert!(
                                    (f64::from(actual) - wanted).abs() <= tolerance,
                                    "{level} {rows}x{cols} batch {batch} {activation:?}: element {index}: {actual} vs {wanted}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_product_is_the_same_bits_whatever_the_threads() {
        let mut rng = fastrand::Rng::with_seed(3);
        let (rows, cols, batch) = (1152, 384, 15);
        let weights = random(rows * cols, &mut rng);
        let input = random(batch * cols, &mut rng);
        let matrix = PackedMatrix::new(&weights, rows, cols, None).expect("packs");
        let mut one = vec![0f32; batch * rows];
        let mut two = vec![0f32; batch * rows];
        matrix.matmul(&input, batch, &mut one, Activation::Identity, &Sequential).expect("multiplies");
        matrix.matmul(&input, batch, &mut two, Activation::Identity, &TwoThreads).expect("multiplies");
        assert_eq!(one, two);
    }

    #[test]
    fn the_avx512_tile_gives_the_avx2_tiles_bits() {
        if CpuLevel::detected() < CpuLevel::Avx512Vnni {
            return;
        }
        let mut rng = fastrand::Rng::with_seed(5);
        for (rows, cols, batch) in [(40, 384, 1), (1152, 384, 15), (384, 1536, 64), (17, 9, 13)] {
            let weights = random(rows * cols, &mut rng);
            let bias = random(rows, &mut rng);
            let input = random(batch * cols, &mut rng);
            let products: Vec<Vec<f32>> = [CpuLevel::Avx2, CpuLevel::Avx512Vnni]
                .into_iter()
                .map(|level| {
                    let matrix = PackedMatrix::new_at(&weights, rows, cols, Some(&bias), level).expect("packs");
                    let mut output = vec![0f32; batch * rows];
                    matrix.matmul(&input, batch, &mut output, Activation::GeluErf, &TwoThreads).expect("multiplies");
                    output
                })
                .collect();
            assert_eq!(products[0], products[1], "{rows}x{cols} batch {batch}");
        }
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let error = PackedMatrix::new(&[1.0; 5], 2, 3, None).expect_err("refused").to_string();
        assert!(error.contains("expected 2 × 3 weights, got 5"), "{error}");
        let error = PackedMatrix::new(&[1.0; 6], 2, 3, Some(&[0.0])).expect_err("refused").to_string();
        assert!(error.contains("expected 2 bias values, got 1"), "{error}");
        let matrix = PackedMatrix::new(&[1.0; 6], 2, 3, None).expect("packs");
        let mut output = vec![0.0; 4];
        let error = matrix.matmul(&[1.0; 5], 2, &mut output, Activation::Identity, &Sequential).expect_err("refused");
        assert!(error.to_string().contains("expected 2 × 3 input values, got 5"), "{error}");
        let error =
            matrix.matmul(&[1.0; 6], 2, &mut output[..3], Activation::Identity, &Sequential).expect_err("refused");
        assert!(error.to_string().contains("expected 2 × 2 output values, got 3"), "{error}");
        matrix.matmul(&[], 0, &mut [], Activation::Identity, &Sequential).expect("an empty batch is nothing to do");
        let error = add_layer_norm(&mut [0.0; 5], None, &[1.0; 2], &[0.0; 2], 1e-5).expect_err("refused");
        assert!(error.to_string().contains("5 values are not rows"), "{error}");
        let error = add_layer_norm(&mut [0.0; 4], Some(&[0.0; 2]), &[1.0; 2], &[0.0; 2], 1e-5).expect_err("refused");
        assert!(error.to_string().contains("residual of 2 values"), "{error}");
        let shape = AttentionShape { batch: 1, sequence: 2, heads: 1, head_dim: 2 };
        let error = encoder_attention(&[0.0; 12], shape, &[3], &mut [0.0; 4], &Sequential).expect_err("refused");
        assert!(error.to_string().contains("lengths [3] do not fit"), "{error}");
        let error = encoder_attention(&[0.0; 11], shape, &[2], &mut [0.0; 4], &Sequential).expect_err("refused");
        assert!(error.to_string().contains("qkv values"), "{error}");
    }

    #[test]
    fn layer_norm_matches_the_f64_definition() {
        let mut rng = fastrand::Rng::with_seed(5);
        for width in [1, 7, 8, 384, 390] {
            let rows = 3;
            let values: Vec<f32> = random(rows * width, &mut rng).iter().map(|v| v * 3.0 + 1.5).collect();
            let residual = random(rows * width, &mut rng);
            let weight = random(width, &mut rng);
            let bias = random(width, &mut rng);
            for with_residual in [false, true] {
                let mut expected = Vec::new();
                for row in 0..rows {
                    let x: Vec<f64> = (0..width)
                        .map(|i| {
                            f64::from(values[row * width + i])
                                + if with_residual { f64::from(residual[row * width + i]) } else { 0.0 }
                        })
                        .collect();
                    let mean = x.iter().sum::<f64>() / width as f64;
                    let variance = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
                    for i in 0..width {
                        expected.push(
                            (x[i] - mean) / (variance + 1e-12).sqrt() * f64::from(weight[i]) + f64::from(bias[i]),
                        );
                    }
                }
                let residual = with_residual.then_some(residual.as_slice());
                let mut portable = values.clone();
                layer_norm_portable(&mut portable, residual, &weight, &bias, 1e-12);
                let mut dispatched = values.clone();
                add_layer_norm(&mut dispatched, residual, &weight, &bias, 1e-12).expect("normalises");
                for ((&a, &b), &wanted) in portable.iter().zip(&dispatched).zip(&expected) {
                    for actual in [a, b] {
                        assert!((f64::from(actual) - wanted).abs() <= 2e-5, "width {width}: {actual} vs {wanted}");
                    }
                }
            }
        }
    }

    #[test]
    fn attention_matches_the_masked_f64_definition() {
        let mut rng = fastrand::Rng::with_seed(9);
        for (batch, sequence, heads, head_dim, lengths) in
            [(1, 1, 1, 4, vec![1]), (2, 5, 3, 8, vec![5, 2]), (3, 37, 12, 32, vec![37, 1, 20]), (1, 9, 2, 12, vec![9])]
        {
            let hidden = heads * head_dim;
            let qkv = random(batch * sequence * 3 * hidden, &mut rng);
            let shape = AttentionShape { batch, sequence, heads, head_dim };
            let mut expected = vec![0f64; batch * sequence * hidden];
            for b in 0..batch {
                for i in 0..sequence {
                    for h in 0..heads {
                        let at = |row: usize, part: usize, d: usize| {
                            f64::from(qkv[(b * sequence + row) * 3 * hidden + part * hidden + h * head_dim + d])
                        };
                        let scores: Vec<f64> =
                            (0..lengths[b]).map(|j| (0..head_dim).map(|d| at(i, 0, d) * at(j, 1, d)).sum()).collect();
                        let largest = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let weights: Vec<f64> = scores.iter().map(|s| (s - largest).exp()).collect();
                        let total: f64 = weights.iter().sum();
                        for d in 0..head_dim {
                            expected[(b * sequence + i) * hidden + h * head_dim + d] =
                                weights.iter().enumerate().map(|(j, w)| w * at(j, 2, d)).sum::<f64>() / total;
                        }
                    }
                }
            }
            for parallel in [&Sequential as &dyn Parallel, &TwoThreads] {
                let mut output = vec![f32::NAN; batch * sequence * hidden];
                encoder_attention(&qkv, shape, &lengths, &mut output, parallel).expect("attends");
                for (index, (&actual, &wanted)) in output.iter().zip(&expected).enumerate() {
                    assert!(
                        (f64::from(actual) - wanted).abs() <= 1e-5,
                        "{shape:?} element {index}: {actual} vs {wanted}"
                    );
                }
            }
            // Each level's kernels on the first sequence, whatever NSTREAM_CPU_LEVEL says.
            let rows = &qkv[..sequence * 3 * hidden];
            let job = AttentionRows { rows, shape, length: lengths[0], first_row: 0 };
            for level in runnable_levels() {
                let mut output = vec![0f32; sequence * hidden];
                let mut scratch = AttentionScratch::default();
                match level {
                    #[cfg(target_arch = "x86_64")]
                    CpuLevel::Avx2 | CpuLevel::Avx512Vnni => {
                        crate::dense_avx2::attention(&job, &mut output, &mut scratch, level == CpuLevel::Avx512Vnni);
                    }
                    _ => attention_rows(&job, &mut output, &mut scratch, &PortableAttention),
                }
                for (&actual, &wanted) in output.iter().zip(&expected) {
                    assert!((f64::from(actual) - wanted).abs() <= 1e-5, "{level}: {actual} vs {wanted}");
                }
            }
        }
    }
}

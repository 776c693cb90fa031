//! bf16 matrix products for encoder models on CPUs with AVX-512 BF16 (Intel Cooper Lake and
//! Sapphire Rapids on, AMD Zen 4 on): the same contract as [`crate::dense::PackedMatrix`], with
//! the weights stored as bfloat16 and each input row rounded to bfloat16 before the product.
//!
//! `VDPBF16PS` multiplies pairs of bfloat16 values and adds both products to an f32 sum, twice
//! the multiply-adds per instruction of an f32 FMA. Only the two factors are rounded (to
//! nearest, ties to even, 8 significant bits); products and sums stay f32, the bias, the
//! activation and everything outside the products (layer norms, attention, pooling) too. On
//! all-MiniLM-L6-v2 that keeps every sentence vector within cosine 0.99997 of the f32 model
//! (tests/reference.rs in nstream-embed holds it to 0.9999 against sentence-transformers).
//!
//! Layout: panels of 32 output columns; panel `p`'s step `k` holds, for each column `j`, the pair
//! `(W[32p + j][2k], W[32p + j][2k + 1])` as one 32-bit lane (the even input in the low half), so
//! a tile of up to 8 input rows × 32 columns lives in 16 registers and one step is 2 loads, 8
//! broadcasts of an input pair and 16 `VDPBF16PS`. The bias starts the sums; the activation is
//! applied in the registers and the tile stored straight into the output rows (masked where a
//! panel is partial), with the same bits as a separate `apply_activation` pass. Work is split as
//! for the f32 product: ranges of panels over all rows, rows walked in blocks that stay in the L2
//! cache.

use std::sync::{Mutex, PoisonError};

use crate::dense::{Activation, ROW_BLOCK, spread_panels};
use crate::{CacheLine, CpuLevel, KernelError, Parallel, cpu_level};

/// Output columns per panel (two 512-bit registers of f32).
pub const BF16_PANEL: usize = 32;
/// Input rows of the largest tile.
const TILE_ROWS: usize = 8;
/// Input rows converted to bfloat16 per work item.
const CONVERT_ROWS: usize = 32;

thread_local! {
    /// The last product's input as bfloat16 pairs, per calling thread (see `matmul`).
    static CONVERTED: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One packed step of a panel: 32 columns' bfloat16 pairs.
type PairStep = [u32; BF16_PANEL];

/// `x` rounded to bfloat16 (to nearest, ties to even), as its 16 bits. NaN stays a (quiet) NaN.
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// The f32 value of bfloat16 `bits`.
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Two values as one bfloat16 pair lane (`even` in the low half).
fn pair(even: f32, odd: f32) -> u32 {
    u32::from(bf16_bits(even)) | (u32::from(bf16_bits(odd)) << 16)
}

/// Whether this CPU runs [`PackedMatrixBf16`]: x86-64 with AVX-512 F, BW and BF16, and
/// `NSTREAM_CPU_LEVEL` not capping the kernels below AVX-512.
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        matches!(cpu_level(), Ok(CpuLevel::Avx512Vnni)) && has!("avx512f") && has!("avx512bw") && has!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (cpu_level, CpuLevel::Portable);
        false
    }
}

/// A weight matrix (and bias) stored as bfloat16 pairs for [`PackedMatrixBf16::matmul`].
///
/// Built once at load; immutable and `Sync`. Only on CPUs where [`bf16_available`] holds.
#[derive(Clone)]
pub struct PackedMatrixBf16 {
    rows: usize,
    cols: usize,
    /// `panels × cols.div_ceil(2)` steps.
    panels: Vec<PairStep>,
    /// The bias per output column, padded with zeros to whole panels.
    bias: Vec<[f32; BF16_PANEL]>,
}

impl std::fmt::Debug for PackedMatrixBf16 {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("PackedMatrixBf16").field("rows", &self.rows).field("cols", &self.cols).finish()
    }
}

impl PackedMatrixBf16 {
    /// Packs `weights` (`rows × cols`, row-major: `nn.Linear.weight`) and `bias` (`rows` values,
    /// or none). An error where the CPU lacks AVX-512 BF16 ([`bf16_available`]).
    pub fn new(weights: &[f32], rows: usize, cols: usize, bias: Option<&[f32]>) -> Result<Self, KernelError> {
        if !bf16_available() {
            return Err(KernelError::Unsupported {
                message: "bf16 products need a CPU with AVX-512 BF16 (and NSTREAM_CPU_LEVEL not below avx512)"
                    .to_string(),
            });
        }
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
        let pairs = cols.div_ceil(2);
        let panel_count = rows.div_ceil(BF16_PANEL);
        let mut panels = vec![[0u32; BF16_PANEL]; panel_count * pairs];
        for (row, weights_row) in weights.chunks_exact(cols.max(1)).enumerate().take(rows) {
            let (panel, lane) = (row / BF16_PANEL, row % BF16_PANEL);
            for (step, values) in weights_row.chunks(2).enumerate() {
                panels[panel * pairs + step][lane] = pair(values[0], values.get(1).copied().unwrap_or(0.0));
            }
        }
        let mut padded_bias = vec![[0f32; BF16_PANEL]; panel_count];
        if let Some(bias) = bias {
            for (row, &value) in bias.iter().enumerate() {
                padded_bias[row / BF16_PANEL][row % BF16_PANEL] = value;
            }
        }
        Ok(Self { rows, cols, panels, bias: padded_bias })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held by the packed weights and bias.
    pub fn size_in_bytes(&self) -> usize {
        std::mem::size_of_val(self.panels.as_slice()) + std::mem::size_of_val(self.bias.as_slice())
    }

    /// `output = activation(bf16(input) · bf16(W)ᵀ + bias)` for `batch` rows (`input`
    /// `batch × cols`, `output` `batch × rows`, row-major), spread over `parallel`.
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
        let pairs = self.cols.div_ceil(2);
        // The input rounded to bfloat16 pairs once, in parallel blocks of rows, into the calling
        // thread's buffer (kept between products: zeroed only where it grows).
        let mut converted = CONVERTED.take();
        converted.resize(batch * pairs, 0);
        {
            let parts: Vec<CacheLine<Mutex<&mut [u32]>>> =
                converted.chunks_mut(CONVERT_ROWS * pairs).map(|part| CacheLine(Mutex::new(part))).collect();
            parallel.run(parts.len(), &|range| {
                for item in range {
                    let mut part = parts[item].0.lock().unwrap_or_else(PoisonError::into_inner);
                    let first_row = item * CONVERT_ROWS;
                    for (offset, row) in part.chunks_exact_mut(pairs).enumerate() {
                        convert_row(&input[(first_row + offset) * self.cols..][..self.cols], row);
                    }
                }
            });
        }
        spread_panels(output, self.rows, BF16_PANEL, parallel, &|first_panel, rows| {
            self.multiply_item(&converted, pairs, first_panel, rows, activation);
        });
        CONVERTED.set(converted);
        Ok(())
    }

    /// The output columns from panel `first_panel` on of every (converted) input row.
    fn multiply_item(
        &self,
        input: &[u32],
        pairs: usize,
        first_panel: usize,
        output: &mut [&mut [f32]],
        activation: Activation,
    ) {
        let width = output.first().map_or(0, |row| row.len());
        let batch = output.len();
        for block_start in (0..batch).step_by(ROW_BLOCK) {
            let block_end = (block_start + ROW_BLOCK).min(batch);
            for panel_offset in 0..width.div_ceil(BF16_PANEL) {
                let panel = first_panel + panel_offset;
                let steps = &self.panels[panel * pairs..][..pairs];
                let columns = Columns {
                    start: panel_offset * BF16_PANEL,
                    count: (width - panel_offset * BF16_PANEL).min(BF16_PANEL),
                    bias: &self.bias[panel],
                    activation,
                };
                let mut tile_start = block_start;
                while tile_start < block_end {
                    let tile_rows = (block_end - tile_start).min(TILE_ROWS);
                    let inputs = &input[tile_start * pairs..][..tile_rows * pairs];
                    tile_product(inputs, steps, &columns, &mut output[tile_start..tile_start + tile_rows]);
                    tile_start += tile_rows;
                }
            }
        }
    }
}

/// Where a tile's results go: `count` (1..=32) output columns from `start` of each of its rows,
/// after `bias` and `activation`.
struct Columns<'a> {
    start: usize,
    count: usize,
    bias: &'a [f32; BF16_PANEL],
    activation: Activation,
}

/// `values` rounded to bfloat16 pairs (`row[k]` holds values `2k` and `2k + 1`, a zero after an
/// odd last one): 32 values per instruction, the rest one pair at a time.
#[allow(unsafe_code)]
fn convert_row(values: &[f32], row: &mut [u32]) {
    assert_eq!(row.len(), values.len().div_ceil(2), "a converted row holds the values' pairs");
    let (whole, rest) = values.as_chunks::<32>();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a `PackedMatrixBf16` exists only where `bf16_available` held (AVX-512 F and BF16).
    unsafe {
        avx512::convert(whole, &mut row[..whole.len() * 16]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (lanes, chunk) in row.chunks_exact_mut(16).zip(whole) {
        for (lane, pair_values) in lanes.iter_mut().zip(chunk.as_chunks::<2>().0) {
            *lane = pair(pair_values[0], pair_values[1]);
        }
    }
    let (pairs, odd) = rest.as_chunks::<2>();
    let tail = &mut row[whole.len() * 16..];
    for (lane, &[even, next]) in tail.iter_mut().zip(pairs) {
        *lane = pair(even, next);
    }
    if let (Some(&last), Some(lane)) = (odd.first(), tail.last_mut()) {
        *lane = pair(last, 0.0);
    }
}

/// `rows[r][columns] = activation(bias + Σ_k pair products)`, for `rows.len()` (1..=8) rows.
#[allow(unsafe_code)]
fn tile_product(inputs: &[u32], steps: &[PairStep], columns: &Columns, rows: &mut [&mut [f32]]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a `PackedMatrixBf16` exists only where `bf16_available` held (the CPU has
        // AVX-512 F, BW and BF16); `multiply_item` passes `R × steps.len()` inputs and `R` rows.
        unsafe {
            match rows.len() {
                1 => avx512::tile::<1>(inputs, steps, columns, rows),
                2 => avx512::tile::<2>(inputs, steps, columns, rows),
                3 => avx512::tile::<3>(inputs, steps, columns, rows),
                4 => avx512::tile::<4>(inputs, steps, columns, rows),
                5 => avx512::tile::<5>(inputs, steps, columns, rows),
                6 => avx512::tile::<6>(inputs, steps, columns, rows),
                7 => avx512::tile::<7>(inputs, steps, columns, rows),
                _ => avx512::tile::<8>(inputs, steps, columns, rows),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (inputs, steps, columns, rows);
        unreachable!("PackedMatrixBf16 is only built on x86-64 with AVX-512 BF16");
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::{
        __m512, __m512bh, __m512i, __mmask16, _mm512_add_ps, _mm512_cvtne2ps_pbh, _mm512_div_ps, _mm512_dpbf16_ps,
        _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps, _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps,
        _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps, _mm512_storeu_si512,
    };

    use super::{BF16_PANEL, Columns, PairStep};
    use crate::dense::{Activation, apply_activation};

    /// Each chunk of 32 values rounded to bfloat16 (to nearest even, as `VCVTNE2PS2BF16` does;
    /// it also reads a subnormal value as zero) into 16 pair lanes of `row`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `row` holds 16 lanes per chunk.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert(chunks: &[[f32; 32]], row: &mut [u32]) {
        assert_eq!(row.len(), chunks.len() * 16, "16 lanes per chunk");
        for (chunk, lanes) in chunks.iter().zip(row.chunks_exact_mut(16)) {
            // SAFETY: a chunk is 32 f32 values (two 512-bit loads), a lane group 16 u32 values.
            unsafe {
                let low = _mm512_loadu_ps(chunk.as_ptr());
                let high = _mm512_loadu_ps(chunk.as_ptr().add(16));
                let converted = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(high, low));
                _mm512_storeu_si512(lanes.as_mut_ptr().cast(), converted);
            }
        }
    }

    /// One tile of `R` rows × 32 columns, written to the rows' `columns` after the bias and the
    /// activation (GELU-erf and ReLU in registers, GELU-tanh through
    /// [`crate::dense::apply_activation`]): the same bits as the product followed by
    /// `apply_activation` at the AVX2 level, without a pass over the output.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `inputs` holds `R × steps.len()` pairs and `rows` `R`
    /// rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tile<const R: usize>(
        inputs: &[u32],
        steps: &[PairStep],
        columns: &Columns,
        rows: &mut [&mut [f32]],
    ) {
        let pairs = steps.len();
        assert!(inputs.len() >= R * pairs && rows.len() >= R, "a tile's inputs match its rows");
        assert!((1..=BF16_PANEL).contains(&columns.count), "a tile writes 1 to 32 columns");
        for row in &rows[..R] {
            assert!(row.len() >= columns.start + columns.count, "a tile's columns are in its rows");
        }
        let bias = columns.bias;
        // SAFETY: the bias is 32 f32 values.
        let (low_bias, high_bias) = unsafe { (_mm512_loadu_ps(bias.as_ptr()), _mm512_loadu_ps(bias.as_ptr().add(16))) };
        let mut sums: [[__m512; 2]; R] = [[low_bias, high_bias]; R];
        for (step_index, step) in steps.iter().enumerate() {
            // SAFETY: a step is 32 u32 values (two 512-bit loads).
            let (low, high) = unsafe {
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(step.as_ptr().cast())),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(step.as_ptr().add(16).cast())),
                )
            };
            for (row, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `row < R` and `step_index < pairs`, inside the `R × pairs` inputs.
                let value = unsafe { *inputs.as_ptr().add(row * pairs + step_index) };
                // SAFETY: a broadcast of 32 bits, reinterpreted as 32 bfloat16 values.
                let broadcast = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(value as i32)) };
                sum[0] = _mm512_dpbf16_ps(sum[0], broadcast, low);
                sum[1] = _mm512_dpbf16_ps(sum[1], broadcast, high);
            }
        }
        let count = columns.count;
        let low_mask: __mmask16 = if count >= 16 { u16::MAX } else { (1u16 << count) - 1 };
        let high_mask: __mmask16 = if count >= 32 { u16::MAX } else { (1u16 << count.saturating_sub(16)) - 1 };
        for (row, sum) in rows[..R].iter_mut().zip(&sums) {
            let target = &mut row[columns.start..columns.start + count];
            let (low, high) = match columns.activation {
                Activation::Identity => (sum[0], sum[1]),
                Activation::Relu => {
                    (_mm512_max_ps(sum[0], _mm512_setzero_ps()), _mm512_max_ps(sum[1], _mm512_setzero_ps()))
                }
                Activation::GeluErf => (gelu_erf(sum[0]), gelu_erf(sum[1])),
                Activation::GeluTanh => {
                    let mut values = [0f32; BF16_PANEL];
                    // SAFETY: `values` is 32 f32 values.
                    unsafe {
                        _mm512_storeu_ps(values.as_mut_ptr(), sum[0]);
                        _mm512_storeu_ps(values.as_mut_ptr().add(16), sum[1]);
                    }
                    apply_activation(&mut values[..count], Activation::GeluTanh);
                    target.copy_from_slice(&values[..count]);
                    continue;
                }
            };
            // SAFETY: `target` holds `count` values; the masks store lanes below `count` only
            // (masked-off lanes are neither written nor touched).
            unsafe {
                _mm512_mask_storeu_ps(target.as_mut_ptr(), low_mask, low);
                _mm512_mask_storeu_ps(target.as_mut_ptr().add(16.min(count)), high_mask, high);
            }
        }
    }

    /// `0.5·x·(1 + erf(x/√2))` on 16 lanes: [`crate::dense::erf_approx`]'s operations in its
    /// order (no fused multiply-adds), so the same bits as the scalar and AVX2 code.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu_erf(x: __m512) -> __m512 {
        let constant = _mm512_set1_ps;
        let half_x = _mm512_mul_ps(constant(0.5), x);
        let scaled = _mm512_mul_ps(x, constant(std::f32::consts::FRAC_1_SQRT_2));
        // `clamp(-4, 4)` with a NaN kept: each operation returns its second operand on a NaN.
        let clamped = _mm512_min_ps(constant(4.0), _mm512_max_ps(constant(-4.0), scaled));
        let x2 = _mm512_mul_ps(clamped, clamped);
        let mut p = constant(-2.726_142_3e-10);
        for coefficient in
            [2.770_681_4e-8, -2.101_024e-6, -5.692_506_4e-5, -7.349_906_3e-4, -2.954_6e-3, -1.609_603_3e-2]
        {
            p = _mm512_add_ps(_mm512_mul_ps(p, x2), constant(coefficient));
        }
        p = _mm512_mul_ps(p, clamped);
        let mut q = constant(-1.456_607_2e-5);
        for coefficient in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329_2e-3, -1.426_474e-2] {
            q = _mm512_add_ps(_mm512_mul_ps(q, x2), constant(coefficient));
        }
        let erf = _mm512_div_ps(p, q);
        _mm512_mul_ps(half_x, _mm512_add_ps(constant(1.0), erf))
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::Sequential;
    use crate::dense::apply_activation;

    struct TwoThreads;

    impl Parallel for TwoThreads {
        fn run(&self, items: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
            let middle = items / 2;
            std::thread::scope(|scope| {
                scope.spawn(|| work(0..middle));
                work(middle..items);
            });
        }
    }

    fn random(count: usize, rng: &mut fastrand::Rng) -> Vec<f32> {
        (0..count).map(|_| rng.f32() * 2.0 - 1.0).collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_value(bf16_bits(1.0)), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
        assert_eq!(bf16_value(bf16_bits(1.0 + 2f32.powi(-8))), 1.0);
        assert_eq!(bf16_value(bf16_bits(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2f32.powi(-6));
        assert_eq!(bf16_value(bf16_bits(-2.5)), -2.5);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
        for value in [0.1f32, -3.7, 1e-20, 6.5e4] {
            let rounded = bf16_value(bf16_bits(value));
            assert!(((rounded - value) / value).abs() <= 2f32.powi(-8), "{value} -> {rounded}");
        }
    }

    /// Every shape's product equals the f64 product of the bfloat16-rounded operands (the only
    /// rounding left is f32 summation), at every row count of a tile and across panel edges.
    #[test]
    fn rows_convert_as_the_scalar_rounding_does() {
        if !bf16_available() {
            return;
        }
        let mut rng = fastrand::Rng::with_seed(4);
        for cols in [1, 2, 31, 32, 33, 64, 384, 1537] {
            let mut values = random(cols, &mut rng);
            // Ties, infinities and large values round as `bf16_bits` does.
            values[0] = 1.0 + 2f32.powi(-8);
            if cols > 3 {
                values[1] = f32::INFINITY;
                values[2] = -6.5e4;
            }
            let mut row = vec![0u32; cols.div_ceil(2)];
            convert_row(&values, &mut row);
            let expected: Vec<u32> =
                values.chunks(2).map(|chunk| pair(chunk[0], chunk.get(1).copied().unwrap_or(0.0))).collect();
            assert_eq!(row, expected, "{cols} values");
        }
    }

    #[test]
    fn products_equal_the_product_of_the_rounded_operands() {
        if !bf16_available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            assert!(PackedMatrixBf16::new(&[0.0; 4], 2, 2, None).is_err());
            return;
        }
        let mut rng = fastrand::Rng::with_seed(11);
        for (rows, cols) in [(1, 1), (5, 3), (32, 16), (33, 17), (70, 384), (384, 1536)] {
            let weights = random(rows * cols, &mut rng);
            let bias = random(rows, &mut rng);
            let matrix = PackedMatrixBf16::new(&weights, rows, cols, Some(&bias)).expect("packs");
            for batch in [1, 2, 7, 8, 9, 65, 130] {
                let input = random(batch * cols, &mut rng);
                for parallel in [&Sequential as &dyn Parallel, &TwoThreads] {
                    let mut output = vec![f32::NAN; batch * rows];
                    matrix.matmul(&input, batch, &mut output, Activation::Identity, parallel).expect("multiplies");
                    for b in 0..batch {
                        for r in 0..rows {
                            let mut wanted = f64::from(bias[r]);
                            for k in 0..cols {
                                wanted += f64::from(bf16_value(bf16_bits(input[b * cols + k])))
                                    * f64::from(bf16_value(bf16_bits(weights[r * cols + k])));
                            }
                            let actual = f64::from(output[b * rows + r]);
                            let tolerance = 1e-5 * (1.0 + (cols as f64).sqrt());
                            assert!(
                                (actual - wanted).abs() <= tolerance,
                                "{rows}×{cols} batch {batch} [{b}][{r}]: {actual} vs {wanted}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn activation_follows_the_product_and_threads_do_not_change_bits() {
        if !bf16_available() {
            return;
        }
        let mut rng = fastrand::Rng::with_seed(5);
        // 70 outputs: two whole panels and one of 6 columns; 150 inputs spread values over GELU's
        // whole curve, the clamped tails of its erf included.
        let (rows, cols, batch) = (70, 150, 41);
        let weights = random(rows * cols, &mut rng);
        let matrix = PackedMatrixBf16::new(&weights, rows, cols, None).expect("packs");
        let input = random(batch * cols, &mut rng);
        let mut plain = vec![0f32; batch * rows];
        matrix.matmul(&input, batch, &mut plain, Activation::Identity, &Sequential).expect("multiplies");
        assert!(plain.iter().any(|&value| value > 6.0) && plain.iter().any(|&value| value < -6.0));
        for activation in [Activation::Relu, Activation::GeluErf, Activation::GeluTanh] {
            let mut expected = plain.clone();
            apply_activation(&mut expected, activation);
            let mut fused = vec![f32::NAN; batch * rows];
            matrix.matmul(&input, batch, &mut fused, activation, &TwoThreads).expect("multiplies");
            for (index, (&fused, &expected)) in fused.iter().zip(&expected).enumerate() {
                assert_eq!(fused.to_bits(), expected.to_bits(), "{activation:?} at {index}: {fused} vs {expected}");
            }
        }
    }

    #[test]
    fn wrong_shapes_are_errors() {
        if !bf16_available() {
            return;
        }
        assert!(PackedMatrixBf16::new(&[0.0; 5], 2, 3, None).is_err());
        assert!(PackedMatrixBf16::new(&[0.0; 6], 2, 3, Some(&[0.0])).is_err());
        let matrix = PackedMatrixBf16::new(&[0.0; 6], 2, 3, None).expect("packs");
        let mut output = vec![0.0; 4];
        assert!(matrix.matmul(&[0.0; 5], 2, &mut output, Activation::Identity, &Sequential).is_err());
        assert!(matrix.matmul(&[0.0; 6], 2, &mut output[..3], Activation::Identity, &Sequential).is_err());
    }
}

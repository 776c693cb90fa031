//! The AVX2 + FMA versions of [`crate::dense`]'s kernels: the f32 tile of the packed matrix
//! product written with intrinsics (and its 12-row AVX-512 variant), the attention's key
//! transposes, and the element-wise bodies compiled with the features on. Every function here is
//! safe to call only where [`CpuLevel::detected`] is at least [`CpuLevel::Avx2`] (the AVX-512
//! tile: [`CpuLevel::Avx512Vnni`]); the callers pass levels that were lowered to it.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::CpuLevel;
use crate::dense::{
    Activation, AttentionKernels, AttentionRows, AttentionScratch, PANEL, PanelStep, TILE_ROWS, WIDE_TILE_ROWS,
    activation_portable, attention_rows, layer_norm_portable,
};

/// Checks what the safety of every call below rests on.
fn assert_level() {
    assert!(CpuLevel::detected() >= CpuLevel::Avx2, "the AVX2 kernels run only where the CPU has the features");
}

/// One tile of [`crate::dense::PackedMatrix`]'s product: `out.len()` (1..=6) input rows ×
/// one panel of 16 columns, then the activation.
pub(crate) fn tile(
    inputs: &[f32],
    steps: &[PanelStep],
    bias: &[f32; PANEL],
    out: &mut [[f32; PANEL]],
    activation: Activation,
) {
    assert_level();
    let cols = steps.len();
    assert!(inputs.len() == out.len() * cols && out.len() <= TILE_ROWS, "a tile's inputs match its rows");
    // SAFETY: `assert_level` checked that the CPU has AVX2 and FMA.
    unsafe {
        match out.len() {
            1 => tile_kernel::<1>(inputs, steps, bias, out),
            2 => tile_kernel::<2>(inputs, steps, bias, out),
            3 => tile_kernel::<3>(inputs, steps, bias, out),
            4 => tile_kernel::<4>(inputs, steps, bias, out),
            5 => tile_kernel::<5>(inputs, steps, bias, out),
            6 => tile_kernel::<6>(inputs, steps, bias, out),
            _ => {}
        }
        if activation != Activation::Identity {
            activation_kernel(out.as_flattened_mut(), activation);
        }
    }
}

/// `R` rows: 2·R accumulators initialised with the bias; per input index, the panel's two
/// weight registers are loaded once and multiplied with each row's broadcast input.
#[target_feature(enable = "avx2,fma")]
fn tile_kernel<const R: usize>(inputs: &[f32], steps: &[PanelStep], bias: &[f32; PANEL], out: &mut [[f32; PANEL]]) {
    let cols = steps.len();
    assert!(inputs.len() >= R * cols && out.len() >= R, "a tile's inputs match its rows");
    let rows: [*const f32; R] = std::array::from_fn(|row| inputs[row * cols..].as_ptr());
    let (bias_halves, _) = bias.as_chunks::<8>();
    let initial = [load(&bias_halves[0]), load(&bias_halves[1])];
    let mut sums = [initial; R];
    for (k, step) in steps.iter().enumerate() {
        let low = load(&step[0]);
        let high = load(&step[1]);
        for (sum, row) in sums.iter_mut().zip(&rows) {
            // SAFETY: `row` starts a run of `cols` inputs (asserted above) and `k < cols`.
            let value = _mm256_set1_ps(unsafe { *row.add(k) });
            sum[0] = _mm256_fmadd_ps(value, low, sum[0]);
            sum[1] = _mm256_fmadd_ps(value, high, sum[1]);
        }
    }
    for (values, sum) in out.iter_mut().zip(&sums) {
        let (halves, _) = values.as_chunks_mut::<8>();
        store(&mut halves[0], sum[0]);
        store(&mut halves[1], sum[1]);
    }
}

/// Checks what the safety of the AVX-512 tile rests on.
fn assert_wide() {
    assert!(CpuLevel::detected() >= CpuLevel::Avx512Vnni, "the AVX-512 tile runs only where the CPU has AVX-512");
}

/// [`tile`] on AVX-512 registers: up to 12 input rows × one panel, one register per row.
/// Each sum runs in the same order with the same fused operations as [`tile`]'s, so the two
/// give the same bits.
pub(crate) fn wide_tile(
    inputs: &[f32],
    steps: &[PanelStep],
    bias: &[f32; PANEL],
    out: &mut [[f32; PANEL]],
    activation: Activation,
) {
    assert_wide();
    let cols = steps.len();
    assert!(inputs.len() == out.len() * cols && out.len() <= WIDE_TILE_ROWS, "a tile's inputs match its rows");
    // SAFETY: `assert_wide` checked that the CPU has AVX-512 F (and AVX2 and FMA).
    unsafe {
        match out.len() {
            1 => wide_tile_kernel::<1>(inputs, steps, bias, out),
            2 => wide_tile_kernel::<2>(inputs, steps, bias, out),
            3 => wide_tile_kernel::<3>(inputs, steps, bias, out),
            4 => wide_tile_kernel::<4>(inputs, steps, bias, out),
            5 => wide_tile_kernel::<5>(inputs, steps, bias, out),
            6 => wide_tile_kernel::<6>(inputs, steps, bias, out),
            7 => wide_tile_kernel::<7>(inputs, steps, bias, out),
            8 => wide_tile_kernel::<8>(inputs, steps, bias, out),
            9 => wide_tile_kernel::<9>(inputs, steps, bias, out),
            10 => wide_tile_kernel::<10>(inputs, steps, bias, out),
            11 => wide_tile_kernel::<11>(inputs, steps, bias, out),
            12 => wide_tile_kernel::<12>(inputs, steps, bias, out),
            _ => {}
        }
        if activation != Activation::Identity {
            activation_kernel(out.as_flattened_mut(), activation);
        }
    }
}

/// `R` rows, one 512-bit accumulator each, initialised with the bias; per input index, the
/// panel's 16 weights are loaded once and multiplied with each row's broadcast input.
#[target_feature(enable = "avx512f,avx2,fma")]
fn wide_tile_kernel<const R: usize>(
    inputs: &[f32],
    steps: &[PanelStep],
    bias: &[f32; PANEL],
    out: &mut [[f32; PANEL]],
) {
    let cols = steps.len();
    assert!(inputs.len() >= R * cols && out.len() >= R, "a tile's inputs match its rows");
    let rows: [*const f32; R] = std::array::from_fn(|row| inputs[row * cols..].as_ptr());
    // SAFETY: the 16 bias values are read from a 16-value array.
    let initial = unsafe { _mm512_loadu_ps(bias.as_ptr()) };
    let mut sums = [initial; R];
    for (k, step) in steps.iter().enumerate() {
        // SAFETY: a panel step is 16 contiguous values.
        let weights = unsafe { _mm512_loadu_ps(step.as_flattened().as_ptr()) };
        for (sum, row) in sums.iter_mut().zip(&rows) {
            // SAFETY: `row` starts a run of `cols` inputs (asserted above) and `k < cols`.
            let value = _mm512_set1_ps(unsafe { *row.add(k) });
            *sum = _mm512_fmadd_ps(value, weights, *sum);
        }
    }
    for (values, sum) in out.iter_mut().zip(&sums) {
        // SAFETY: a tile row is 16 contiguous values.
        unsafe { _mm512_storeu_ps(values.as_mut_ptr(), *sum) };
    }
}

#[target_feature(enable = "avx")]
fn load(values: &[f32; 8]) -> __m256 {
    // SAFETY: the reference covers the 32 bytes read; unaligned loads are allowed.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

#[target_feature(enable = "avx")]
fn store(values: &mut [f32; 8], register: __m256) {
    // SAFETY: the reference covers the 32 bytes written; unaligned stores are allowed.
    unsafe { _mm256_storeu_ps(values.as_mut_ptr(), register) }
}

#[target_feature(enable = "avx2,fma")]
fn activation_kernel(values: &mut [f32], activation: Activation) {
    activation_portable(values, activation);
}

/// [`crate::dense::apply_activation`] with AVX2 and FMA.
pub(crate) fn activation(values: &mut [f32], activation: Activation) {
    assert_level();
    // SAFETY: `assert_level` checked that the CPU has AVX2 and FMA.
    unsafe { activation_kernel(values, activation) }
}

#[target_feature(enable = "avx2,fma")]
fn layer_norm_kernel(values: &mut [f32], residual: Option<&[f32]>, weight: &[f32], bias: &[f32], epsilon: f32) {
    layer_norm_portable(values, residual, weight, bias, epsilon);
}

/// [`crate::dense::add_layer_norm`] with AVX2 and FMA.
pub(crate) fn layer_norm(values: &mut [f32], residual: Option<&[f32]>, weight: &[f32], bias: &[f32], epsilon: f32) {
    assert_level();
    // SAFETY: `assert_level` checked that the CPU has AVX2 and FMA.
    unsafe { layer_norm_kernel(values, residual, weight, bias, epsilon) }
}

/// [`AttentionKernels`] with AVX2 and FMA, on the AVX-512 tile where `wide`; made only by
/// [`attention`], after [`assert_level`] (and [`assert_wide`] where `wide`).
struct Avx2Attention {
    wide: bool,
}

impl AttentionKernels for Avx2Attention {
    fn tile_height(&self) -> usize {
        if self.wide { WIDE_TILE_ROWS } else { TILE_ROWS }
    }

    #[inline(always)]
    fn tile(&self, inputs: &[f32], steps: &[PanelStep], out: &mut [[f32; PANEL]]) {
        if self.wide {
            wide_tile(inputs, steps, &[0.0; PANEL], out, Activation::Identity);
        } else {
            tile(inputs, steps, &[0.0; PANEL], out, Activation::Identity);
        }
    }

    #[inline(always)]
    fn pack_keys(&self, keys: &[&[f32]; PANEL], steps: &mut [PanelStep]) {
        // SAFETY: an `Avx2Attention` exists only after `assert_level` (see `attention`).
        unsafe { pack_keys_kernel(keys, steps) }
    }
}

/// [`AttentionKernels::pack_keys`] in blocks of 8 keys × 8 values, each transposed in registers
/// (the usual unpack / shuffle / lane-permute sequence); a tail of fewer than 8 values per key is
/// moved one by one.
#[target_feature(enable = "avx2,fma")]
fn pack_keys_kernel(keys: &[&[f32]; PANEL], steps: &mut [PanelStep]) {
    let width = steps.len();
    let blocks = width / 8;
    for half in 0..2 {
        let group: [&[f32]; 8] = std::array::from_fn(|key| &keys[half * 8 + key][..width]);
        for block in 0..blocks {
            let rows: [__m256; 8] = std::array::from_fn(|key| {
                let (chunks, _) = group[key].as_chunks::<8>();
                load(&chunks[block])
            });
            let columns = transpose8(rows);
            for (step, column) in steps[block * 8..][..8].iter_mut().zip(columns) {
                store(&mut step[half], column);
            }
        }
        for dimension in blocks * 8..width {
            for (lane, key) in steps[dimension][half].iter_mut().zip(&group) {
                *lane = key[dimension];
            }
        }
    }
}

/// The 8 × 8 transpose of `rows`: `result[i][j] = rows[j][i]`.
#[target_feature(enable = "avx2,fma")]
fn transpose8(rows: [__m256; 8]) -> [__m256; 8] {
    let pairs: [__m256; 8] = std::array::from_fn(|index| {
        let (first, second) = (rows[index / 2 * 2], rows[index / 2 * 2 + 1]);
        if index % 2 == 0 { _mm256_unpacklo_ps(first, second) } else { _mm256_unpackhi_ps(first, second) }
    });
    // pairs: [lo(0,1), hi(0,1), lo(2,3), hi(2,3), lo(4,5), hi(4,5), lo(6,7), hi(6,7)]
    let quads = [
        _mm256_shuffle_ps::<0x44>(pairs[0], pairs[2]),
        _mm256_shuffle_ps::<0xEE>(pairs[0], pairs[2]),
        _mm256_shuffle_ps::<0x44>(pairs[1], pairs[3]),
        _mm256_shuffle_ps::<0xEE>(pairs[1], pairs[3]),
        _mm256_shuffle_ps::<0x44>(pairs[4], pairs[6]),
        _mm256_shuffle_ps::<0xEE>(pairs[4], pairs[6]),
        _mm256_shuffle_ps::<0x44>(pairs[5], pairs[7]),
        _mm256_shuffle_ps::<0xEE>(pairs[5], pairs[7]),
    ];
    std::array::from_fn(|column| {
        let (low, high) = (quads[column % 4], quads[column % 4 + 4]);
        if column < 4 { _mm256_permute2f128_ps::<0x20>(low, high) } else { _mm256_permute2f128_ps::<0x31>(low, high) }
    })
}

#[target_feature(enable = "avx2,fma")]
fn attention_kernel(job: &AttentionRows<'_>, output: &mut [f32], scratch: &mut AttentionScratch, wide: bool) {
    attention_rows(job, output, scratch, &Avx2Attention { wide });
}

/// One work item of [`crate::dense::encoder_attention`] with AVX2 and FMA, its products on the
/// AVX-512 tile where `wide`.
pub(crate) fn attention(job: &AttentionRows<'_>, output: &mut [f32], scratch: &mut AttentionScratch, wide: bool) {
    assert_level();
    if wide {
        assert_wide();
    }
    // SAFETY: `assert_level` checked that the CPU has AVX2 and FMA.
    unsafe { attention_kernel(job, output, scratch, wide) }
}

//! The AVX2 + FMA versions of [`crate::dense`]'s kernels: the f32 tile of the packed matrix
//! product written with intrinsics, and the element-wise bodies compiled with the features on.
//! Every function here is safe to call only where [`CpuLevel::detected`] is at least
//! [`CpuLevel::Avx2`]; the callers pass levels that were lowered to it.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::CpuLevel;
use crate::dense::{
    Activation, AttentionRows, PANEL, PanelStep, TILE_ROWS, activation_portable, attention_portable,
    layer_norm_portable,
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
    let rows: [&[f32]; R] = std::array::from_fn(|row| &inputs[row * cols..][..cols]);
    let (bias_halves, _) = bias.as_chunks::<8>();
    let initial = [load(&bias_halves[0]), load(&bias_halves[1])];
    let mut sums = [initial; R];
    for (k, step) in steps.iter().enumerate() {
        let low = load(&step[0]);
        let high = load(&step[1]);
        for (sum, row) in sums.iter_mut().zip(&rows) {
            let value = _mm256_set1_ps(row[k]);
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

#[target_feature(enable = "avx2,fma")]
fn attention_kernel(job: &AttentionRows<'_>, output: &mut [f32], scratch: &mut [f32]) {
    attention_portable(job, output, scratch);
}

/// One work item of [`crate::dense::encoder_attention`] with AVX2 and FMA.
pub(crate) fn attention(job: &AttentionRows<'_>, output: &mut [f32], scratch: &mut [f32]) {
    assert_level();
    // SAFETY: `assert_level` checked that the CPU has AVX2 and FMA.
    unsafe { attention_kernel(job, output, scratch) }
}

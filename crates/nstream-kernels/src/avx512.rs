//! The AVX-512 VNNI kernel. Per output column: for each pair of weight blocks, the 64 weight
//! codes are unpacked into one register once and multiplied (`vpdpbusd`) with the same pair of
//! every activation row of a tile of up to [`ROW_TILE`] rows, each into its own f32 accumulator;
//! the blocks' offsets are added 16 blocks at a time; one horizontal sum per row and column.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{Activations, LANES, PAIR, Packing, QuantMatrix, ROW_TILE};

/// Output columns `first..first + output[0].len()` of every activation row.
pub(super) fn multiply_columns(
    matrix: &QuantMatrix,
    activations: &Activations,
    first: usize,
    output: &mut [&mut [f32]],
) {
    assert!(matrix.accelerated, "the AVX-512 kernels run only where the CPU has the features");
    let width = output.first().map_or(0, |row| row.len());
    for (tile, rows) in output.chunks_mut(ROW_TILE).enumerate() {
        let row0 = tile * ROW_TILE;
        // Few rows: four columns at a time (more independent sums in flight); more rows: two,
        // so that every accumulator stays in a register.
        let group = if rows.len() <= 2 { 4 } else { 2 };
        let grouped = width / group * group;
        let tile = Tile { matrix, activations, row0, first };
        // SAFETY: `matrix.accelerated` is only true when `avx512_available()` found every
        // feature the kernels are compiled for on this CPU.
        unsafe {
            tile_dispatch(&tile, rows, 0..grouped, group);
            tile_dispatch(&tile, rows, grouped..width, 1);
        }
    }
}

/// What one call of the kernel multiplies: activation rows from `row0`, matrix columns from
/// `first` (the output's column 0).
struct Tile<'a> {
    matrix: &'a QuantMatrix,
    activations: &'a Activations,
    row0: usize,
    first: usize,
}

/// Calls the kernel monomorphised for the packing, `output.len()` rows and `group` columns.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VNNI and F16C.
unsafe fn tile_dispatch(tile: &Tile<'_>, output: &mut [&mut [f32]], columns: std::ops::Range<usize>, group: usize) {
    macro_rules! by_rows {
        ($nibbles:literal, $group:literal) => {
            // SAFETY: the caller guarantees the CPU features.
            unsafe {
                match output.len() {
                    1 => tile_kernel::<$nibbles, 1, $group>(tile, output, columns),
                    2 => tile_kernel::<$nibbles, 2, $group>(tile, output, columns),
                    3 => tile_kernel::<$nibbles, 3, $group>(tile, output, columns),
                    4 => tile_kernel::<$nibbles, 4, $group>(tile, output, columns),
                    5 => tile_kernel::<$nibbles, 5, $group>(tile, output, columns),
                    6 => tile_kernel::<$nibbles, 6, $group>(tile, output, columns),
                    7 => tile_kernel::<$nibbles, 7, $group>(tile, output, columns),
                    _ => tile_kernel::<$nibbles, 8, $group>(tile, output, columns),
                }
            }
        };
    }
    if columns.is_empty() {
        return;
    }
    match (tile.matrix.packing, group) {
        (Packing::Nibbles, 4) => by_rows!(true, 4),
        (Packing::Nibbles, 2) => by_rows!(true, 2),
        (Packing::Nibbles, _) => by_rows!(true, 1),
        (Packing::Bytes, 4) => by_rows!(false, 4),
        (Packing::Bytes, 2) => by_rows!(false, 2),
        (Packing::Bytes, _) => by_rows!(false, 1),
    }
}

/// `R` activation rows (`output.len() == R`) times the output columns `columns`, `C` columns at
/// a time (`columns` is a multiple of `C` long): each pair of activation blocks is loaded once
/// for `C` columns, each pair of weight blocks once for `R` rows. `NIBBLES`: the matrix holds
/// Q4 codes (32 bytes per pair), else Q8 (64 bytes per pair).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
fn tile_kernel<const NIBBLES: bool, const R: usize, const C: usize>(
    tile: &Tile<'_>,
    output: &mut [&mut [f32]],
    columns: std::ops::Range<usize>,
) {
    let Tile { matrix, activations, row0, first } = *tile;
    assert_eq!(output.len(), R);
    let pairs = matrix.pairs;
    let offset_registers = matrix.offset_stride / LANES;
    let (activation_codes, _) = activations.codes.as_chunks::<PAIR>();
    let (lane_scales, _) = activations.lane_scales.as_chunks::<LANES>();
    let (sums, _) = activations.sums.as_chunks::<LANES>();
    let (nibble_pairs, _) = matrix.codes.as_chunks::<{ PAIR / 2 }>();
    let (byte_pairs, _) = matrix.codes.as_chunks::<PAIR>();
    let (offsets, _) = matrix.offsets.as_chunks::<LANES>();
    let activation_rows: [&[[u8; PAIR]]; R] =
        std::array::from_fn(|row| &activation_codes[(row0 + row) * pairs..][..pairs]);
    let scale_rows: [&[[f32; LANES]]; R] = std::array::from_fn(|row| &lane_scales[(row0 + row) * pairs..][..pairs]);
    let sum_rows: [&[[f32; LANES]]; R] =
        std::array::from_fn(|row| &sums[(row0 + row) * offset_registers..][..offset_registers]);
    // Lane l of a pair's product belongs to block 0 for l in 0..4 and 8..12, else block 1.
    let lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    let low_nibbles = _mm512_set1_epi8(0x0F);
    for column_offset in columns.step_by(C) {
        let column0 = first + column_offset;
        let nibble_columns: [&[[u8; PAIR / 2]]; C] =
            std::array::from_fn(
                |column| {
                    if NIBBLES { &nibble_pairs[(column0 + column) * pairs..][..pairs] } else { &[] }
                },
            );
        let byte_columns: [&[[u8; PAIR]]; C] =
            std::array::from_fn(
                |column| {
                    if NIBBLES { &[] } else { &byte_pairs[(column0 + column) * pairs..][..pairs] }
                },
            );
        let scale_columns: [&[u16]; C] =
            std::array::from_fn(|column| &matrix.scales[(column0 + column) * 2 * pairs..][..2 * pairs]);
        if R <= 2 {
            prefetch_columns(matrix, column0 + PREFETCH_COLUMNS, C);
        }
        let mut accumulators = [[_mm512_setzero_ps(); R]; C];
        for pair in 0..pairs {
            let weights: [__m512i; C] = std::array::from_fn(|column| {
                if NIBBLES {
                    // [16 bytes of block 0, 16 of block 1] in both halves, the upper half's high
                    // nibbles shifted down: weights 0..16 of each block, then 16..32.
                    let packed = _mm512_broadcast_i64x4(load_256(&nibble_columns[column][pair]));
                    _mm512_and_si512(_mm512_mask_srli_epi16::<4>(packed, 0xFFFF_0000, packed), low_nibbles)
                } else {
                    load_512(&byte_columns[column][pair])
                }
            });
            let weight_scales: [__m512; C] = std::array::from_fn(|column| {
                let scales = &scale_columns[column][2 * pair..2 * pair + 2];
                let bits = scales[0] as u32 | (scales[1] as u32) << 16;
                let two_scales = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
                _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(two_scales))
            });
            for row in 0..R {
                let codes = load_512(&activation_rows[row][pair]);
                let activation_scales = load_f32(&scale_rows[row][pair]);
                for column in 0..C {
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights[column], codes);
                    let scales = _mm512_mul_ps(weight_scales[column], activation_scales);
                    accumulators[column][row] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales, accumulators[column][row]);
                }
            }
        }
        for register in 0..offset_registers {
            let block_offsets: [__m512; C] = std::array::from_fn(|column| {
                _mm512_cvtph_ps(load_f16(&offsets[(column0 + column) * offset_registers + register]))
            });
            for row in 0..R {
                let block_sums = load_f32(&sum_rows[row][register]);
                for column in 0..C {
                    accumulators[column][row] =
                        _mm512_fmadd_ps(block_offsets[column], block_sums, accumulators[column][row]);
                }
            }
        }
        for (column, column_accumulators) in accumulators.iter().enumerate() {
            for (row, accumulator) in column_accumulators.iter().enumerate() {
                output[row][column_offset + column] = _mm512_reduce_add_ps(*accumulator);
            }
        }
    }
}

/// Quantises one block of 32 activations to signed 8-bit codes (rounding to nearest, ties to
/// even, as llama.cpp's SIMD code does): weights 0..16 into `low`, 16..32 into `high`; returns
/// the scale and the sum of the codes.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) fn quantize_block(values: &[f32; 32], low: &mut [u8; 16], high: &mut [u8; 16]) -> (f32, i32) {
    let (first, second) = values.split_at(16);
    let first = load_f32(first.try_into().unwrap_or(&[0.0; 16]));
    let second = load_f32(second.try_into().unwrap_or(&[0.0; 16]));
    let largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
    let scale = largest / 127.0;
    let inverse = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let first = _mm512_cvtps_epi32(_mm512_mul_ps(first, inverse));
    let second = _mm512_cvtps_epi32(_mm512_mul_ps(second, inverse));
    store_128(low, _mm512_cvtepi32_epi8(first));
    store_128(high, _mm512_cvtepi32_epi8(second));
    (scale, _mm512_reduce_add_epi32(_mm512_add_epi32(first, second)))
}

#[target_feature(enable = "sse2")]
fn store_128(bytes: &mut [u8; 16], value: __m128i) {
    // SAFETY: the reference covers the 16 bytes written; unaligned stores are allowed.
    unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), value) }
}

/// [`quantize_block`] for an activation of `matrix` (which proves the CPU has the features).
pub(super) fn quantize_for(
    matrix: &QuantMatrix,
    values: &[f32; 32],
    low: &mut [u8; 16],
    high: &mut [u8; 16],
) -> (f32, i32) {
    assert!(matrix.accelerated, "the AVX-512 kernels run only where the CPU has the features");
    // SAFETY: `matrix.accelerated` is only true when `avx512_available()` found every feature
    // `quantize_block` is compiled for on this CPU.
    unsafe { quantize_block(values, low, high) }
}

/// [`crate::attention::attend`] compiled for AVX-512 (its loops vectorised 16 lanes wide).
pub(super) fn attend(queries: &[f32], keys: &[f32], values: &[f32], head_dim: usize, scale: f32, output: &mut [f32]) {
    assert!(crate::avx512_available(), "the AVX-512 kernels run only where the CPU has the features");
    // SAFETY: checked just above.
    unsafe { attend_avx512(queries, keys, values, head_dim, scale, output) }
}

#[target_feature(enable = "avx512f,fma")]
fn attend_avx512(queries: &[f32], keys: &[f32], values: &[f32], head_dim: usize, scale: f32, output: &mut [f32]) {
    crate::attention::attend_portable(queries, keys, values, head_dim, scale, output);
}

/// How far ahead of the columns being multiplied their codes and scales are prefetched when
/// the tile has one or two rows: the hardware prefetcher alone leaves such a product (a decode
/// step of one sequence) well under the memory bandwidth (measured with examples/matmul.rs on
/// an output head that does not fit in cache: Q8_0 1.78 -> 1.14 ms, Q4_1 0.84 -> 0.75 ms).
const PREFETCH_COLUMNS: usize = 16;

/// Asks for the codes and scales of `count` columns from `column` to be brought into cache.
#[target_feature(enable = "sse")]
fn prefetch_columns(matrix: &QuantMatrix, column: usize, count: usize) {
    if column + count > matrix.rows {
        return;
    }
    let pair_bytes = matrix.codes.len() / (matrix.rows * matrix.pairs).max(1);
    let codes = &matrix.codes[column * matrix.pairs * pair_bytes..(column + count) * matrix.pairs * pair_bytes];
    let scales = &matrix.scales[column * 2 * matrix.pairs..(column + count) * 2 * matrix.pairs];
    for line in codes.chunks(64) {
        _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
    }
    for line in scales.chunks(32) {
        _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
    }
}

#[target_feature(enable = "avx512f")]
fn load_512(bytes: &[u8; 64]) -> __m512i {
    // SAFETY: the reference covers the 64 bytes read; unaligned loads are allowed.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

#[target_feature(enable = "avx")]
fn load_256(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: the reference covers the 32 bytes read; unaligned loads are allowed.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[target_feature(enable = "avx")]
fn load_f16(bits: &[u16; 16]) -> __m256i {
    // SAFETY: the reference covers the 32 bytes read; unaligned loads are allowed.
    unsafe { _mm256_loadu_si256(bits.as_ptr().cast()) }
}

#[target_feature(enable = "avx512f")]
fn load_f32(values: &[f32; 16]) -> __m512 {
    // SAFETY: the reference covers the 64 bytes read; unaligned loads are allowed.
    unsafe { _mm512_loadu_ps(values.as_ptr()) }
}

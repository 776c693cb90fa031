//! The AVX-512 VNNI kernels. Per output column (or 2-4 columns for one- and two-row tiles): each
//! register of weight codes (4 of the 32 weights of 16 blocks, or a tail pair of blocks) is
//! loaded and unpacked once and multiplied (`vpdpbusd`) with the same codes of every activation
//! row of a tile of up to [`ROW_TILE`] rows, each into its own accumulator; the blocks' offsets
//! are added 16 blocks at a time; one horizontal sum per row and column. Also the activations'
//! quantisation and the decode attention compiled for AVX-512.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{Activations, CpuLevel, LANES, Packing, QuantMatrix, ROW_TILE};

/// Output columns `first..first + output[0].len()` of every activation row.
pub(super) fn multiply_columns(
    matrix: &QuantMatrix,
    activations: &Activations,
    first: usize,
    output: &mut [&mut [f32]],
) {
    assert!(matrix.level == CpuLevel::Avx512Vnni, "the AVX-512 kernels run only where the CPU has the features");
    let width = output.first().map_or(0, |row| row.len());
    for (tile, rows) in output.chunks_mut(ROW_TILE).enumerate() {
        let row0 = tile * ROW_TILE;
        // One row: four columns at a time (more independent sums in flight), two rows: two;
        // more: one, so that every accumulator stays in a register.
        let group = match rows.len() {
            1 => 4,
            2 => 2,
            _ => 1,
        };
        let grouped = width / group * group;
        let tile = Tile { matrix, activations, row0, first };
        // SAFETY: a matrix's level is only `Avx512Vnni` when `CpuLevel::detected()` found every
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
        ($nibbles:literal, $($rows:literal => $group:literal),*) => {
            // SAFETY: the caller guarantees the CPU features.
            unsafe {
                match (output.len(), group) {
                    $(($rows, $group) => tile_kernel::<$nibbles, $rows, $group>(tile, output, columns),)*
                    (rows, group) => unreachable!("a tile of {rows} rows in groups of {group} columns"),
                }
            }
        };
    }
    if columns.is_empty() || output.is_empty() {
        return;
    }
    match tile.matrix.packing {
        Packing::Nibbles => {
            by_rows!(true, 1 => 4, 1 => 1, 2 => 2, 2 => 1, 3 => 1, 4 => 1, 5 => 1, 6 => 1, 7 => 1, 8 => 1)
        }
        Packing::Bytes => {
            by_rows!(false, 1 => 4, 1 => 1, 2 => 2, 2 => 1, 3 => 1, 4 => 1, 5 => 1, 6 => 1, 7 => 1, 8 => 1)
        }
    }
}

/// `R` activation rows (`output.len() == R`) times the output columns `columns`, `C` columns at
/// a time (`columns` is a multiple of `C` long). Groups of 16 blocks: 8 `vpdpbusd` per row leave
/// each block's integer dot product in its own lane, then one multiply by the 16 blocks' scales;
/// tail pairs: one `vpdpbusd` per pair and row, lanes scaled per half. `NIBBLES`: the matrix
/// holds Q4 codes, else Q8.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
fn tile_kernel<const NIBBLES: bool, const R: usize, const C: usize>(
    tile: &Tile<'_>,
    output: &mut [&mut [f32]],
    columns: std::ops::Range<usize>,
) {
    let Tile { matrix, activations, row0, first } = *tile;
    assert_eq!(output.len(), R);
    let (groups, tail_pairs) = (matrix.groups, matrix.tail_pairs);
    let offset_registers = matrix.offset_stride / LANES;
    let scale_stride = matrix.scale_stride;
    // Bytes of one group's and one tail pair's weight codes.
    let (group_bytes, pair_bytes) = if NIBBLES { (256, 32) } else { (512, 64) };
    let (code_rows, _) = activations.codes.as_chunks::<64>();
    let activation_vectors = activations.code_stride / 64;
    let activation_rows: [&[[u8; 64]]; R] =
        std::array::from_fn(|row| &code_rows[(row0 + row) * activation_vectors..][..activation_vectors]);
    let (scale_rows, _) = activations.scales.as_chunks::<LANES>();
    let block_scale_rows: [&[[f32; LANES]]; R] =
        std::array::from_fn(|row| &scale_rows[(row0 + row) * offset_registers..][..offset_registers]);
    let (lane_scales, _) = activations.lane_scales.as_chunks::<LANES>();
    let tail_scale_rows: [&[[f32; LANES]]; R] =
        std::array::from_fn(|row| &lane_scales[(row0 + row) * tail_pairs..][..tail_pairs]);
    let (sums, _) = activations.sums.as_chunks::<LANES>();
    let sum_rows: [&[[f32; LANES]]; R] =
        std::array::from_fn(|row| &sums[(row0 + row) * offset_registers..][..offset_registers]);
    let (offsets, _) = matrix.offsets.as_chunks::<LANES>();
    // Lane l of a tail pair's product belongs to block 0 for l in 0..4 and 8..12, else block 1.
    let lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    let low_nibbles = _mm512_set1_epi8(0x0F);
    for column_offset in columns.step_by(C) {
        let column0 = first + column_offset;
        if R <= 2 {
            prefetch_columns(matrix, column0 + PREFETCH_COLUMNS, C);
        }
        let codes: [&[u8]; C] = std::array::from_fn(|column| {
            &matrix.codes[(column0 + column) * matrix.code_stride..][..matrix.code_stride]
        });
        let scales: [&[u16]; C] =
            std::array::from_fn(|column| &matrix.scales[(column0 + column) * scale_stride..][..scale_stride]);
        let mut accumulators = [[_mm512_setzero_ps(); R]; C];
        for group in 0..groups {
            let mut dots = [[_mm512_setzero_si512(); R]; C];
            for step in 0..4 {
                // Steps `step` and `step + 4`: weights 4·step.. and 16 + 4·step.. of each block.
                let weights: [(__m512i, __m512i); C] = std::array::from_fn(|column| {
                    let group_codes = &codes[column][group * group_bytes..][..group_bytes];
                    if NIBBLES {
                        let packed = load_512(&group_codes[step * 64..][..64]);
                        (
                            _mm512_and_si512(packed, low_nibbles),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low_nibbles),
                        )
                    } else {
                        (load_512(&group_codes[step * 64..][..64]), load_512(&group_codes[(step + 4) * 64..][..64]))
                    }
                });
                for row in 0..R {
                    let first_half = load_512(&activation_rows[row][group * 8 + step]);
                    let second_half = load_512(&activation_rows[row][group * 8 + step + 4]);
                    for column in 0..C {
                        let dot = _mm512_dpbusd_epi32(dots[column][row], weights[column].0, first_half);
                        dots[column][row] = _mm512_dpbusd_epi32(dot, weights[column].1, second_half);
                    }
                }
            }
            let weight_scales: [__m512; C] =
                std::array::from_fn(|column| _mm512_cvtph_ps(load_f16(&scales[column][group * LANES..][..LANES])));
            for row in 0..R {
                let activation_scales = load_f32(&block_scale_rows[row][group]);
                for column in 0..C {
                    let scale = _mm512_mul_ps(weight_scales[column], activation_scales);
                    accumulators[column][row] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[column][row]), scale, accumulators[column][row]);
                }
            }
        }
        for pair in 0..tail_pairs {
            let weights: [__m512i; C] = std::array::from_fn(|column| {
                let pair_codes = &codes[column][groups * group_bytes + pair * pair_bytes..][..pair_bytes];
                if NIBBLES {
                    // [16 bytes of block 0, 16 of block 1] in both halves, the upper half's high
                    // nibbles shifted down: weights 0..16 of each block, then 16..32.
                    let packed = _mm512_broadcast_i64x4(load_256(pair_codes));
                    _mm512_and_si512(_mm512_mask_srli_epi16::<4>(packed, 0xFFFF_0000, packed), low_nibbles)
                } else {
                    load_512(pair_codes)
                }
            });
            let weight_scales: [__m512; C] = std::array::from_fn(|column| {
                let pair_scales = &scales[column][groups * LANES + 2 * pair..][..2];
                let bits = pair_scales[0] as u32 | (pair_scales[1] as u32) << 16;
                let two_scales = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
                _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(two_scales))
            });
            let tail_vector = groups * 8 + pair;
            for row in 0..R {
                let codes = load_512(&activation_rows[row][tail_vector]);
                let activation_scales = load_f32(&tail_scale_rows[row][pair]);
                for column in 0..C {
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), weights[column], codes);
                    let scale = _mm512_mul_ps(weight_scales[column], activation_scales);
                    accumulators[column][row] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, accumulators[column][row]);
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
    assert!(matrix.level == CpuLevel::Avx512Vnni, "the AVX-512 kernels run only where the CPU has the features");
    // SAFETY: a matrix's level is only `Avx512Vnni` when `CpuLevel::detected()` found every
    // feature `quantize_block` is compiled for on this CPU.
    unsafe { quantize_block(values, low, high) }
}

/// [`crate::attention::attend`] compiled for AVX-512 (its loops vectorised 16 lanes wide).
pub(super) fn attend(queries: &[f32], keys: &[f32], values: &[f32], head_dim: usize, scale: f32, output: &mut [f32]) {
    assert!(
        CpuLevel::detected() == CpuLevel::Avx512Vnni,
        "the AVX-512 kernels run only where the CPU has the features"
    );
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
    let codes = &matrix.codes[column * matrix.code_stride..(column + count) * matrix.code_stride];
    let scales = &matrix.scales[column * matrix.scale_stride..(column + count) * matrix.scale_stride];
    for line in codes.chunks(64) {
        _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
    }
    for line in scales.chunks(32) {
        _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
    }
}

#[target_feature(enable = "avx512f")]
fn load_512(bytes: &[u8]) -> __m512i {
    let bytes: &[u8; 64] = bytes.try_into().expect("64 bytes for a 512-bit load");
    // SAFETY: the reference covers the 64 bytes read; unaligned loads are allowed.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

#[target_feature(enable = "avx")]
fn load_256(bytes: &[u8]) -> __m256i {
    let bytes: &[u8; 32] = bytes.try_into().expect("32 bytes for a 256-bit load");
    // SAFETY: the reference covers the 32 bytes read; unaligned loads are allowed.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[target_feature(enable = "avx")]
fn load_f16(bits: &[u16]) -> __m256i {
    let bits: &[u16; 16] = bits.try_into().expect("16 halves for a 256-bit load");
    // SAFETY: the reference covers the 32 bytes read; unaligned loads are allowed.
    unsafe { _mm256_loadu_si256(bits.as_ptr().cast()) }
}

#[target_feature(enable = "avx512f")]
fn load_f32(values: &[f32; 16]) -> __m512 {
    // SAFETY: the reference covers the 64 bytes read; unaligned loads are allowed.
    unsafe { _mm512_loadu_ps(values.as_ptr()) }
}

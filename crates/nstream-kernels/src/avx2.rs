//! The AVX2 kernels (with FMA and F16C: Intel since Haswell, AMD since Zen 1), on the same
//! packing as the AVX-512 ones: a group's 64-byte step is two 256-bit halves of 8 blocks each,
//! and a group is multiplied half by half. AVX2 has no `vpdpbusd`; `vpmaddubsw` (32 unsigned ×
//! signed byte products summed in pairs to i16) followed by `vpmaddwd` with ones (pairs of i16
//! summed to i32) leaves the same sum of 4 products per 32-bit lane.
//!
//! `vpmaddubsw` saturates its i16 sums: Q4 codes (0..15) × activation codes (−127..127) cannot
//! reach it, but Q8's unsigned codes (q + 128, up to 255) could, so Q8 weights are multiplied as
//! llama.cpp's AVX2 code does: the signed codes' magnitudes × the activation codes with the
//! weights' signs (at most 2·128·127 per pair), the exact integer `Σ q_w·q_a`, with no offset term.
//! Q4 uses the offset term as the AVX-512 kernel does.
//!
//! Sixteen 256-bit registers (AVX-512 has 32 of twice the width) hold fewer accumulators: tiles
//! of up to [`ROW_TILE`] activation rows.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{Activations, CpuLevel, LANES, Packing, QuantMatrix};

/// Activation rows multiplied with one weight register while it is loaded.
const ROW_TILE: usize = 4;

/// Output columns `first..first + output[0].len()` of every activation row.
pub(super) fn multiply_columns(
    matrix: &QuantMatrix,
    activations: &Activations,
    first: usize,
    output: &mut [&mut [f32]],
) {
    assert!(matrix.level == CpuLevel::Avx2, "the AVX2 kernels run only where the CPU has the features");
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
        // SAFETY: a matrix's level is only `Avx2` when `CpuLevel::detected()` found AVX2, FMA and
        // F16C on this CPU.
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
/// The CPU must have AVX2, FMA and F16C.
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
        Packing::Nibbles => by_rows!(true, 1 => 4, 1 => 1, 2 => 2, 2 => 1, 3 => 1, 4 => 1),
        Packing::Bytes => by_rows!(false, 1 => 4, 1 => 1, 2 => 2, 2 => 1, 3 => 1, 4 => 1),
    }
}

/// Unsigned × signed bytes, 4 products summed per 32-bit lane (what `vpdpbusd` does without
/// accumulating). The i16 pair sums must not saturate: `unsigned` at most 128 per byte.
#[target_feature(enable = "avx2")]
fn dot4(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
}

/// Q4: the low and the high nibbles of 32 packed bytes.
#[target_feature(enable = "avx2")]
fn nibbles(packed: __m256i) -> (__m256i, __m256i) {
    let mask = _mm256_set1_epi8(0x0F);
    (_mm256_and_si256(packed, mask), _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask))
}

/// One register of weight codes, ready for [`Weights::dot`].
#[derive(Clone, Copy)]
struct Weights {
    /// Q4: the codes (0..15); Q8: the magnitudes of the signed codes.
    unsigned: __m256i,
    /// Q8: the signed codes (their signs go to the activations); unused for Q4.
    signed: __m256i,
}

impl Weights {
    /// Q4 codes.
    #[target_feature(enable = "avx2")]
    fn nibbles(codes: __m256i) -> Self {
        Self { unsigned: codes, signed: codes }
    }

    /// Q8 codes stored unsigned (q + 128).
    #[target_feature(enable = "avx2")]
    fn bytes(stored: __m256i) -> Self {
        let signed = _mm256_xor_si256(stored, _mm256_set1_epi8(i8::MIN));
        Self { unsigned: _mm256_sign_epi8(signed, signed), signed }
    }

    /// The sums of 4 products per 32-bit lane with the activation codes `activations`.
    #[target_feature(enable = "avx2")]
    fn dot<const NIBBLES: bool>(self, activations: __m256i) -> __m256i {
        if NIBBLES {
            dot4(self.unsigned, activations)
        } else {
            dot4(self.unsigned, _mm256_sign_epi8(activations, self.signed))
        }
    }
}

/// `R` activation rows (`output.len() == R`) times the output columns `columns`, `C` columns at
/// a time (`columns` is a multiple of `C` long). Groups of 16 blocks, half by half: 8 steps of
/// 4 products per lane leave each of 8 blocks' integer dot product in its own lane, then one
/// multiply by the 8 blocks' scales; tail pairs: one step per pair and row, lanes scaled per
/// block. `NIBBLES`: the matrix holds Q4 codes (the offsets are added at the end), else Q8.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let (group_vectors, pair_vectors) = if NIBBLES { (8, 1) } else { (16, 2) };
    // Everything in 32-byte vectors: activation vector `2v + h` is half `h` of 64-byte step `v`.
    let (code_rows, _) = activations.codes.as_chunks::<32>();
    let activation_vectors = activations.code_stride / 32;
    let activation_rows: [&[[u8; 32]]; R] =
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
    // Lane l of a tail pair's product belongs to block 0 for l in 0..4, else block 1.
    let lane_block = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for column_offset in columns.step_by(C) {
        let column0 = first + column_offset;
        if R <= 2 {
            prefetch_columns(matrix, column0 + PREFETCH_COLUMNS, C);
        }
        let codes: [&[[u8; 32]]; C] = std::array::from_fn(|column| {
            matrix.codes[(column0 + column) * matrix.code_stride..][..matrix.code_stride].as_chunks::<32>().0
        });
        let scales: [&[u16]; C] =
            std::array::from_fn(|column| &matrix.scales[(column0 + column) * scale_stride..][..scale_stride]);
        let mut accumulators = [[_mm256_setzero_ps(); R]; C];
        for group in 0..groups {
            for half in 0..2 {
                // Q4: i16 pair sums until the last step; Q8: i32 sums of 4.
                let mut dots = [[_mm256_setzero_si256(); R]; C];
                for step in 0..4 {
                    // Steps `step` and `step + 4`: weights 4·step.. and 16 + 4·step.. of each
                    // block. Column by column, so that one column's weights are in registers at
                    // a time (the activations' loads hit L1).
                    for column in 0..C {
                        let group_codes = &codes[column][group * group_vectors..][..group_vectors];
                        let (low, high) = if NIBBLES {
                            let (low, high) = nibbles(load_256(&group_codes[step * 2 + half]));
                            (Weights::nibbles(low), Weights::nibbles(high))
                        } else {
                            (
                                Weights::bytes(load_256(&group_codes[step * 2 + half])),
                                Weights::bytes(load_256(&group_codes[(step + 4) * 2 + half])),
                            )
                        };
                        for row in 0..R {
                            let activations = &activation_rows[row][group * 16..][..16];
                            let first_half = load_256(&activations[step * 2 + half]);
                            let second_half = load_256(&activations[(step + 4) * 2 + half]);
                            dots[column][row] = if NIBBLES {
                                // Pair sums of at most 2·15·127: the 8 steps' sum (30,480) fits
                                // an i16 lane, widened once after the last step.
                                let pairs = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(low.unsigned, first_half),
                                    _mm256_maddubs_epi16(high.unsigned, second_half),
                                );
                                _mm256_add_epi16(dots[column][row], pairs)
                            } else {
                                let dot =
                                    _mm256_add_epi32(low.dot::<NIBBLES>(first_half), high.dot::<NIBBLES>(second_half));
                                _mm256_add_epi32(dots[column][row], dot)
                            };
                        }
                    }
                }
                if NIBBLES {
                    let ones = _mm256_set1_epi16(1);
                    for column_dots in dots.iter_mut() {
                        for dot in column_dots.iter_mut() {
                            *dot = _mm256_madd_epi16(*dot, ones);
                        }
                    }
                }
                let weight_scales: [__m256; C] = std::array::from_fn(|column| {
                    _mm256_cvtph_ps(load_f16(&scales[column][group * LANES + half * 8..][..8]))
                });
                for row in 0..R {
                    let activation_scales = load_f32(&block_scale_rows[row][group][half * 8..][..8]);
                    for column in 0..C {
                        let scale = _mm256_mul_ps(weight_scales[column], activation_scales);
                        accumulators[column][row] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[column][row]), scale, accumulators[column][row]);
                    }
                }
            }
        }
        for pair in 0..tail_pairs {
            // [block 0: 0..16, block 1: 0..16] and [block 0: 16..32, block 1: 16..32].
            let weights: [(Weights, Weights); C] = std::array::from_fn(|column| {
                let pair_codes = &codes[column][groups * group_vectors + pair * pair_vectors..][..pair_vectors];
                if NIBBLES {
                    // Block 0's 16 bytes, then block 1's: the low nibbles are weights 0..16 of
                    // each block, the high nibbles 16..32.
                    let (low, high) = nibbles(load_256(&pair_codes[0]));
                    (Weights::nibbles(low), Weights::nibbles(high))
                } else {
                    (Weights::bytes(load_256(&pair_codes[0])), Weights::bytes(load_256(&pair_codes[1])))
                }
            });
            let weight_scales: [__m256; C] = std::array::from_fn(|column| {
                let pair_scales = &scales[column][groups * LANES + 2 * pair..][..2];
                let bits = pair_scales[0] as u32 | (pair_scales[1] as u32) << 16;
                let two_scales = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
                _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two_scales), lane_block)
            });
            let tail_vector = (groups * 8 + pair) * 2;
            for row in 0..R {
                let codes = &activation_rows[row][tail_vector..][..2];
                let (first_half, second_half) = (load_256(&codes[0]), load_256(&codes[1]));
                let activation_scales = load_f32(&tail_scale_rows[row][pair][..8]);
                for column in 0..C {
                    let (low, high) = weights[column];
                    let dot = _mm256_add_epi32(low.dot::<NIBBLES>(first_half), high.dot::<NIBBLES>(second_half));
                    let scale = _mm256_mul_ps(weight_scales[column], activation_scales);
                    accumulators[column][row] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, accumulators[column][row]);
                }
            }
        }
        if NIBBLES {
            for register in 0..offset_registers {
                for half in 0..2 {
                    let block_offsets: [__m256; C] = std::array::from_fn(|column| {
                        let bits = &offsets[(column0 + column) * offset_registers + register][half * 8..][..8];
                        _mm256_cvtph_ps(load_f16(bits))
                    });
                    for row in 0..R {
                        let block_sums = load_f32(&sum_rows[row][register][half * 8..][..8]);
                        for column in 0..C {
                            accumulators[column][row] =
                                _mm256_fmadd_ps(block_offsets[column], block_sums, accumulators[column][row]);
                        }
                    }
                }
            }
        }
        for (column, column_accumulators) in accumulators.iter().enumerate() {
            let (fours, rest) = column_accumulators.as_chunks::<4>();
            for (four, quad) in fours.iter().enumerate() {
                let mut sums = [0f32; 4];
                store_f32x4(&mut sums, sum_lanes_of_four(*quad));
                for (offset, sum) in sums.into_iter().enumerate() {
                    output[four * 4 + offset][column_offset + column] = sum;
                }
            }
            for (offset, accumulator) in rest.iter().enumerate() {
                output[fours.len() * 4 + offset][column_offset + column] = sum_lanes(*accumulator);
            }
        }
    }
}

/// The sum of a register's 8 lanes, added in [`sum_lanes_of_four`]'s order: a row's result has
/// the same bits whichever place it takes in a tile.
#[target_feature(enable = "avx2")]
fn sum_lanes(value: __m256) -> f32 {
    _mm_cvtss_f32(sum_lanes_of_four([value; 4]))
}

/// The sums of 4 registers' 8 lanes each, in one register's 4 lanes, each added in the order of
/// ggml's AVX2 `hsum_float_8` (`((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`), so that a product
/// rounds as llama.cpp's does where the lanes hold the same partial sums.
#[target_feature(enable = "avx2")]
fn sum_lanes_of_four(values: [__m256; 4]) -> __m128 {
    // Per register: [l0+l4, l1+l5, l2+l6, l3+l7], then [(l0+l4)+(l2+l6), (l1+l5)+(l3+l7), ..].
    let halves = values.map(|value| {
        let quad = _mm_add_ps(_mm256_extractf128_ps::<1>(value), _mm256_castps256_ps128(value));
        _mm_add_ps(quad, _mm_movehl_ps(quad, quad))
    });
    // Lanes 0 and 1 of each, gathered: [a0 b0 c0 d0] + [a1 b1 c1 d1].
    let (ab, cd) = (_mm_unpacklo_ps(halves[0], halves[1]), _mm_unpacklo_ps(halves[2], halves[3]));
    _mm_add_ps(_mm_movelh_ps(ab, cd), _mm_movehl_ps(cd, ab))
}

#[target_feature(enable = "sse")]
fn store_f32x4(values: &mut [f32; 4], value: __m128) {
    // SAFETY: the reference covers the 16 bytes written; unaligned stores are allowed.
    unsafe { _mm_storeu_ps(values.as_mut_ptr(), value) }
}

/// Quantises one block of 32 activations to signed 8-bit codes (rounding to nearest, ties to
/// even, as llama.cpp's SIMD code does): weights 0..16 into `low`, 16..32 into `high`; returns
/// the scale and the sum of the codes.
#[target_feature(enable = "avx2")]
fn quantize_block(values: &[f32; 32], low: &mut [u8; 16], high: &mut [u8; 16]) -> (f32, i32) {
    let (quarters, _) = values.as_chunks::<8>();
    let vectors: [__m256; 4] = std::array::from_fn(|index| load_f32(&quarters[index]));
    let magnitude = _mm256_set1_ps(f32::from_bits(0x7FFF_FFFF));
    let largest = vectors
        .iter()
        .fold(_mm256_setzero_ps(), |largest, &vector| _mm256_max_ps(largest, _mm256_and_ps(vector, magnitude)));
    let quad = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps::<1>(largest));
    let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
    let largest = _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)));
    let scale = largest / 127.0;
    let inverse = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    // Rounds to nearest, ties to even (the default MXCSR mode).
    let codes: [__m256i; 4] = std::array::from_fn(|index| _mm256_cvtps_epi32(_mm256_mul_ps(vectors[index], inverse)));
    let total = _mm256_add_epi32(_mm256_add_epi32(codes[0], codes[1]), _mm256_add_epi32(codes[2], codes[3]));
    let total = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256::<1>(total));
    let total = _mm_add_epi32(total, _mm_shuffle_epi32::<0b01_00_11_10>(total));
    let total = _mm_add_epi32(total, _mm_shuffle_epi32::<0b10_11_00_01>(total));
    // Packing interleaves the 128-bit lanes; the permutation puts the 32 codes back in order.
    let words = [_mm256_packs_epi32(codes[0], codes[1]), _mm256_packs_epi32(codes[2], codes[3])];
    let bytes =
        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words[0], words[1]), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    store_128(low, _mm256_castsi256_si128(bytes));
    store_128(high, _mm256_extracti128_si256::<1>(bytes));
    (scale, _mm_cvtsi128_si32(total))
}

#[target_feature(enable = "sse2")]
fn store_128(bytes: &mut [u8; 16], value: __m128i) {
    // SAFETY: the reference covers the 16 bytes written; unaligned stores are allowed.
    unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), value) }
}

/// [`quantize_block`] for an activation of `matrix` (whose level proves the CPU has AVX2).
pub(super) fn quantize_for(
    matrix: &QuantMatrix,
    values: &[f32; 32],
    low: &mut [u8; 16],
    high: &mut [u8; 16],
) -> (f32, i32) {
    assert!(matrix.level == CpuLevel::Avx2, "the AVX2 kernels run only where the CPU has the features");
    // SAFETY: a matrix's level is only `Avx2` when `CpuLevel::detected()` found AVX2 on this CPU.
    unsafe { quantize_block(values, low, high) }
}

/// [`crate::attention::attend`] compiled for AVX2 and FMA (its loops vectorised 8 lanes wide).
pub(super) fn attend(queries: &[f32], keys: &[f32], values: &[f32], head_dim: usize, scale: f32, output: &mut [f32]) {
    assert!(CpuLevel::detected() >= CpuLevel::Avx2, "the AVX2 kernels run only where the CPU has the features");
    // SAFETY: checked just above.
    unsafe { attend_avx2(queries, keys, values, head_dim, scale, output) }
}

#[target_feature(enable = "avx2,fma")]
fn attend_avx2(queries: &[f32], keys: &[f32], values: &[f32], head_dim: usize, scale: f32, output: &mut [f32]) {
    crate::attention::attend_portable(queries, keys, values, head_dim, scale, output);
}

/// How far ahead of the columns being multiplied their codes and scales are prefetched when
/// the tile has one or two rows (as in the AVX-512 kernel).
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

#[target_feature(enable = "avx")]
fn load_256(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: the reference covers the 32 bytes read; unaligned loads are allowed.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[target_feature(enable = "sse2")]
fn load_f16(bits: &[u16]) -> __m128i {
    let bits: &[u16; 8] = bits.try_into().expect("8 halves for a 128-bit load");
    // SAFETY: the reference covers the 16 bytes read; unaligned loads are allowed.
    unsafe { _mm_loadu_si128(bits.as_ptr().cast()) }
}

#[target_feature(enable = "avx")]
fn load_f32(values: &[f32]) -> __m256 {
    let values: &[f32; 8] = values.try_into().expect("8 values for a 256-bit load");
    // SAFETY: the reference covers the 32 bytes read; unaligned loads are allowed.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

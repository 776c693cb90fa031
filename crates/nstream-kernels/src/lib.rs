//! Quantised matrix products on the CPU, for the decode and prefill steps of causal LMs.
//!
//! A [`QuantMatrix`] holds a weight matrix in one of ggml's block formats (Q4_0, Q4_1, Q8_0: 32
//! weights per block, one f16 scale, Q4_1 one f16 offset too), repacked at load for the kernel;
//! [`QuantMatrix::matmul`] multiplies a batch of f32 activation rows by it. Activations are
//! quantised per 32-block to 8 bits (ggml's Q8_1: a scale and the sum of the codes), exactly as
//! llama.cpp does for these formats, so the arithmetic is the same as its CPU backend.
//!
//! Every block format becomes the same sum per block: `d_w·d_a·Σ u·q + c·d_a·Σ q`, where `u` are
//! the weight codes as unsigned bytes (Q4: the nibbles 0..15; Q8_0: the signed codes + 128), `q`
//! the activation's signed codes and `c` the weight block's offset (Q4_0: −8·d, Q4_1: its `m`,
//! Q8_0: −128·d). Unsigned × signed bytes is what AVX-512 VNNI's `vpdpbusd` multiplies, 64 pairs
//! per instruction.
//!
//! The kernel (x86-64 with AVX-512 F/BW/VNNI and F16C, detected at run time) lays 16 blocks side
//! by side, one per 32-bit lane, so that 8 `vpdpbusd` leave each block's dot product in its own
//! lane (the blocks left over go in pairs), and multiplies each weight register it loads with up
//! to 8 activation rows: a decode step with 16 sequences reads each weight once, not 16 times.
//! On CPUs with AVX2, FMA and F16C but not AVX-512 VNNI (Intel Haswell to Alder Lake, AMD Zen 1
//! to 3) an AVX2 kernel multiplies the same packing half a group at a time (`vpmaddubsw` and
//! `vpmaddwd` for `vpdpbusd`; Q8 weights by their signs and magnitudes, so no sum saturates).
//! Elsewhere a portable implementation with the same arithmetic runs. [`CpuLevel`] names the
//! three; [`cpu_level`] is the one the CPU has, lowered by the environment variable
//! `NSTREAM_CPU_LEVEL` (`portable`, `avx2`, `avx512`) so that every path can be tested and
//! timed on one machine. [`attend`] is the decode attention of one grouped-query head group.
//!
//! This is the workspace's one crate where `unsafe` is allowed (denied by default, allowed in
//! the SIMD modules only): calling a `#[target_feature]` function after checking the CPU has the
//! features, and loading SIMD registers from array references.
//!
//! [`dense`] holds the f32 kernels of encoder models (BERT): a matrix product against weights
//! packed once ([`dense::PackedMatrix`], AVX2 + FMA or portable), layer normalisation,
//! activations and bidirectional attention, at the same levels.

use std::fmt;
use std::ops::Range;
use std::sync::{Mutex, OnceLock, PoisonError};

use half::f16;

mod attention;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod dense;
#[cfg(target_arch = "x86_64")]
mod dense_avx2;
pub mod dense_bf16;

pub use attention::{attend, attend_at};

/// Weights per block in every supported format.
pub const BLOCK: usize = 32;
/// Activation rows multiplied with one weight register while it is loaded.
const ROW_TILE: usize = 8;
/// Lanes of one 512-bit register of f32.
const LANES: usize = 16;

/// A ggml block format this crate multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    /// `d: f16, qs: [u8; 16]`: value = d·(nibble − 8).
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]`: value = d·nibble + m.
    Q4_1,
    /// `d: f16, qs: [i8; 32]`: value = d·q.
    Q8_0,
}

impl BlockFormat {
    /// Bytes of one block of 32 weights in the ggml layout.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Why a matrix could not be built or multiplied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// The row length is not a whole number of blocks.
    ColumnsNotBlocks {
        /// The row length given.
        cols: usize,
    },
    /// The ggml data is not `rows × cols / 32` blocks.
    DataLength {
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A block's offset does not fit an f16 (a Q8_0 scale above 511 or a Q4_0 scale above 8187).
    ScaleOutOfRange,
    /// The activations or the output do not have the matrix's shape.
    Shape {
        /// What was wrong.
        message: String,
    },
    /// `NSTREAM_CPU_LEVEL` names no level.
    CpuLevel {
        /// The variable's value.
        value: String,
    },
    /// This CPU (or the level `NSTREAM_CPU_LEVEL` allows) lacks what a kernel needs.
    Unsupported {
        /// What is missing.
        message: String,
    },
}

impl fmt::Display for KernelError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ColumnsNotBlocks { cols } => {
                write!(formatter, "a row of {cols} weights is not a whole number of {BLOCK}-weight blocks")
            }
            Self::DataLength { expected, actual } => {
                write!(formatter, "expected {expected} bytes of quantised blocks, got {actual}")
            }
            Self::ScaleOutOfRange => write!(formatter, "a block scale is too large for the kernel's f16 offsets"),
            Self::Shape { message } | Self::Unsupported { message } => write!(formatter, "{message}"),
            Self::CpuLevel { value } => write!(
                formatter,
                "{CPU_LEVEL_VARIABLE}={value:?} names no CPU level: expected one of {}",
                CpuLevel::ALL.map(CpuLevel::name).join(", ")
            ),
        }
    }
}

impl std::error::Error for KernelError {}

/// Runs work items `0..items` on a thread pool: `work` is called with disjoint ranges covering
/// them all, possibly concurrently, and `run` returns when every item is done.
pub trait Parallel: Sync {
    /// Runs `work` over `0..items`.
    fn run(&self, items: usize, work: &(dyn Fn(Range<usize>) + Sync));
}

/// Every item on the calling thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequential;

impl Parallel for Sequential {
    fn run(&self, items: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
        if items > 0 {
            work(0..items);
        }
    }
}

/// Calls `work(index, row)` for every row of `row_len` values of `output`, spread over
/// `parallel` in contiguous groups of rows.
pub fn for_each_row(
    parallel: &dyn Parallel,
    output: &mut [f32],
    row_len: usize,
    work: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    if row_len == 0 || output.is_empty() {
        return;
    }
    let rows = output.len().div_ceil(row_len);
    let group = rows.div_ceil(rows.min(32));
    let groups: Vec<CacheLine<Mutex<&mut [f32]>>> =
        output.chunks_mut(group * row_len).map(|rows| CacheLine(Mutex::new(rows))).collect();
    parallel.run(groups.len(), &|range| {
        for index in range {
            let mut rows = groups[index].0.lock().unwrap_or_else(PoisonError::into_inner);
            for (offset, row) in rows.chunks_mut(row_len).enumerate() {
                work(index * group + offset, row);
            }
        }
    });
}

/// A value alone on its cache lines, so that threads taking neighbouring work items do not
/// bounce one line between their cores.
#[repr(align(128))]
struct CacheLine<T>(T);

/// How a matrix's codes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Packing {
    /// Q4: 16 bytes per block as in ggml (the low nibbles are weights 0..16, the high nibbles
    /// 16..32), arranged as described at [`QuantMatrix`].
    Nibbles,
    /// Q8: 32 bytes per block (the signed codes + 128), arranged as described at [`QuantMatrix`].
    Bytes,
}

impl Packing {
    /// Bytes of one block's codes.
    fn block_bytes(self) -> usize {
        match self {
            Self::Nibbles => BLOCK / 2,
            Self::Bytes => BLOCK,
        }
    }
}

/// Blocks in a group: one 32-bit lane of a 512-bit register per block.
const GROUP: usize = 16;

/// Where weight `index` (0..32) of block `half` (0 or 1) of a tail pair sits among the pair's
/// 64 codes: `[block 0: 0..16, block 1: 0..16, block 0: 16..32, block 1: 16..32]`, the order in
/// which unpacking Q4 nibbles yields them. Activations and Q8 weights are stored in it too.
fn pair_position(half: usize, index: usize) -> usize {
    if index < 16 { half * 16 + index } else { 32 + half * 16 + index - 16 }
}

/// Where weight `index` (0..32) of block `lane` (0..16) of a group sits among the group's 512
/// codes (Q8 weights, activations): in 8 steps of 64 bytes, step `s` holding weights
/// `4s..4s + 4` of every block, lane after lane; `vpdpbusd` then sums 4 products per lane, and
/// 8 of them leave each block's whole dot product in its own lane.
fn group_position(lane: usize, index: usize) -> usize {
    (index / 4) * 64 + lane * 4 + index % 4
}

/// A weight matrix of `rows × cols` (output features × input features) repacked for the kernel.
///
/// The blocks of a row (an output column of the product) come in groups of 16, then tail
/// pairs: a group is 16 blocks side by side, one per 32-bit lane (Q8: 512 bytes in
/// `group_position` order; Q4: 256 bytes, 4 vectors of 64 whose lane `l` holds bytes `4t..4t +
/// 4` of block `l`'s ggml nibbles, so that masking gives steps `t` and shifting steps `t + 4`);
/// the blocks left over (`blocks % 16`) go in pairs as two halves of a register (`pair_position`
/// order; Q4: the two blocks' 16 bytes side by side), an odd last one padded with a zero block.
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    /// Whole groups of 16 blocks per row.
    groups: usize,
    /// Pairs of blocks per row after the groups.
    tail_pairs: usize,
    packing: Packing,
    /// Code bytes per row: `groups × 16 + tail_pairs × 2` blocks' worth.
    code_stride: usize,
    /// The codes, `rows × code_stride`.
    codes: Vec<u8>,
    /// f16 bits of each block's scale, in block order, `rows × scale_stride`.
    scales: Vec<u16>,
    /// Scales per row: `groups × 16 + tail_pairs × 2` (a padding block's is 0).
    scale_stride: usize,
    /// f16 bits of each block's offset `c`, in block order, `rows × offset_stride`.
    offsets: Vec<u16>,
    /// Offsets per row: blocks rounded up to whole registers of 16 (zero padded).
    offset_stride: usize,
    /// The kernel that multiplies it.
    level: CpuLevel,
}

impl fmt::Debug for QuantMatrix {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("QuantMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("packing", &self.packing)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl QuantMatrix {
    /// Repacks `rows × cols` weights stored as ggml blocks of `format` (row-major, `cols / 32`
    /// blocks per row), for the kernel of [`cpu_level`] (an error if `NSTREAM_CPU_LEVEL` names no
    /// level).
    pub fn from_ggml(format: BlockFormat, data: &[u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        Self::from_ggml_at(format, data, rows, cols, cpu_level()?)
    }

    /// [`Self::from_ggml`] for the kernel of `level`, or of the CPU's level where that is lower.
    pub fn from_ggml_at(
        format: BlockFormat,
        data: &[u8],
        rows: usize,
        cols: usize,
        level: CpuLevel,
    ) -> Result<Self, KernelError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::ColumnsNotBlocks { cols });
        }
        let blocks = cols / BLOCK;
        let expected = rows * blocks * format.block_bytes();
        if data.len() != expected {
            return Err(KernelError::DataLength { expected, actual: data.len() });
        }
        let groups = blocks / GROUP;
        let tail_pairs = (blocks % GROUP).div_ceil(2);
        let scale_stride = groups * GROUP + tail_pairs * 2;
        let offset_stride = scale_stride.div_ceil(LANES) * LANES;
        let packing = if format == BlockFormat::Q8_0 { Packing::Bytes } else { Packing::Nibbles };
        let code_stride = scale_stride * packing.block_bytes();
        let mut matrix = Self {
            rows,
            cols,
            groups,
            tail_pairs,
            packing,
            code_stride,
            codes: vec![0u8; rows * code_stride],
            scales: vec![0u16; rows * scale_stride],
            scale_stride,
            offsets: vec![0u16; rows * offset_stride],
            offset_stride,
            level: level.min(CpuLevel::detected()),
        };
        for (index, block) in data.chunks_exact(format.block_bytes()).enumerate() {
            let (row, column_block) = (index / blocks, index % blocks);
            let scale = f16::from_bits(u16::from_le_bytes([block[0], block[1]]));
            let (offset, quants) = match format {
                BlockFormat::Q4_0 => (f16::from_f32(-8.0 * scale.to_f32()), &block[2..]),
                BlockFormat::Q4_1 => (f16::from_bits(u16::from_le_bytes([block[2], block[3]])), &block[4..]),
                BlockFormat::Q8_0 => (f16::from_f32(-128.0 * scale.to_f32()), &block[2..]),
            };
            if offset.is_infinite() {
                return Err(KernelError::ScaleOutOfRange);
            }
            matrix.scales[row * scale_stride + column_block] = scale.to_bits();
            matrix.offsets[row * offset_stride + column_block] = offset.to_bits();
            for (index, &quant) in quants.iter().enumerate() {
                let (position, byte) = match packing {
                    // Signed code q becomes the unsigned q + 128.
                    Packing::Bytes => (matrix.byte_position(column_block, index), (quant as i8 as i16 + 128) as u8),
                    Packing::Nibbles => (matrix.nibble_byte_position(column_block, index), quant),
                };
                matrix.codes[row * code_stride + position] = byte;
            }
        }
        Ok(matrix)
    }

    /// Q8: where code `index` of block `block` sits in a row's codes.
    fn byte_position(&self, block: usize, index: usize) -> usize {
        if block < self.groups * GROUP {
            (block / GROUP) * GROUP * BLOCK + group_position(block % GROUP, index)
        } else {
            let tail = block - self.groups * GROUP;
            self.groups * GROUP * BLOCK + (tail / 2) * 2 * BLOCK + pair_position(tail % 2, index)
        }
    }

    /// Q4: where byte `index` (0..16) of block `block`'s ggml nibbles sits in a row's codes.
    fn nibble_byte_position(&self, block: usize, index: usize) -> usize {
        if block < self.groups * GROUP {
            (block / GROUP) * GROUP * BLOCK / 2 + (index / 4) * 64 + (block % GROUP) * 4 + index % 4
        } else {
            let tail = block - self.groups * GROUP;
            self.groups * GROUP * BLOCK / 2 + (tail / 2) * BLOCK + (tail % 2) * 16 + index
        }
    }

    /// The unsigned code of weight `index` (0..32) of block `block` of row `row`.
    fn code(&self, row: usize, block: usize, index: usize) -> u8 {
        let codes = &self.codes[row * self.code_stride..][..self.code_stride];
        match self.packing {
            Packing::Bytes => codes[self.byte_position(block, index)],
            Packing::Nibbles => {
                let byte = codes[self.nibble_byte_position(block, index % 16)];
                if index < 16 { byte & 0x0F } else { byte >> 4 }
            }
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether a SIMD kernel multiplies this matrix (otherwise the portable one does).
    pub fn accelerated(&self) -> bool {
        self.level > CpuLevel::Portable
    }

    /// The kernel that multiplies this matrix.
    pub fn level(&self) -> CpuLevel {
        self.level
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.codes.len() + 2 * (self.scales.len() + self.offsets.len())
    }

    /// `output = input · selfᵀ` for `batch` rows: `input` is `batch × cols` row-major, `output`
    /// `batch × rows`. Column ranges of the output are spread over `parallel`.
    pub fn matmul(
        &self,
        input: &[f32],
        batch: usize,
        output: &mut [f32],
        parallel: &dyn Parallel,
    ) -> Result<(), KernelError> {
        if !crate::check_product_shape(input, output, batch, self.rows, self.cols)? {
            return Ok(());
        }
        let activations = Activations::quantize(input, batch, self);
        // Work items of about 4,096 block products (a few microseconds), 4 to 64 of them.
        let items = (self.rows * self.scale_stride * batch / 4096).clamp(4, 64);
        let width = self.rows.div_ceil(items).next_multiple_of(4);
        let chunks = self.rows.div_ceil(width);
        // Each work item owns one column range of every output row.
        let mut parts: Vec<Vec<&mut [f32]>> = (0..chunks).map(|_| Vec::with_capacity(batch)).collect();
        for output_row in output.chunks_mut(self.rows) {
            for (chunk, part) in output_row.chunks_mut(width).enumerate() {
                parts[chunk].push(part);
            }
        }
        let parts: Vec<CacheLine<Mutex<Vec<&mut [f32]>>>> =
            parts.into_iter().map(|part| CacheLine(Mutex::new(part))).collect();
        parallel.run(chunks, &|range| {
            for chunk in range {
                let mut rows = parts[chunk].0.lock().unwrap_or_else(PoisonError::into_inner);
                self.multiply_columns(&activations, chunk * width, &mut rows);
            }
        });
        Ok(())
    }

    /// Output columns `first..first + output[0].len()` of every activation row.
    fn multiply_columns(&self, activations: &Activations, first: usize, output: &mut [&mut [f32]]) {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            CpuLevel::Avx512Vnni => avx512::multiply_columns(self, activations, first, output),
            #[cfg(target_arch = "x86_64")]
            CpuLevel::Avx2 => avx2::multiply_columns(self, activations, first, output),
            _ => self.multiply_columns_portable(activations, first, output),
        }
    }

    /// The kernel's arithmetic without SIMD (per block: the integer dot product, then the scales).
    fn multiply_columns_portable(&self, activations: &Activations, first: usize, output: &mut [&mut [f32]]) {
        for (row, output_row) in output.iter_mut().enumerate() {
            for (offset, value) in output_row.iter_mut().enumerate() {
                let column = first + offset;
                let mut sum = 0f32;
                for block in 0..self.scale_stride {
                    let dot: i32 = (0..BLOCK)
                        .map(|index| {
                            self.code(column, block, index) as i32 * activations.code(self, row, block, index) as i32
                        })
                        .sum();
                    let weight_scale = f16::from_bits(self.scales[column * self.scale_stride + block]).to_f32();
                    let offset = f16::from_bits(self.offsets[column * self.offset_stride + block]).to_f32();
                    sum += weight_scale * activations.scales[row * self.offset_stride + block] * dot as f32
                        + offset * activations.sums[row * self.offset_stride + block];
                }
                *value = sum;
            }
        }
    }
}

/// A batch of activation rows quantised per 32-block (ggml's Q8_1), laid out like the matrix's
/// rows (groups of 16 blocks, then tail pairs; see [`QuantMatrix`]).
struct Activations {
    /// Code bytes per row (a Q8 row of the matrix's length).
    code_stride: usize,
    /// `rows × code_stride` signed codes (as bytes).
    codes: Vec<u8>,
    /// `rows × offset_stride`: each block's scale, in block order (zero padded).
    scales: Vec<f32>,
    /// `rows × tail_pairs × 16` lane scales of the tail pairs: the scale of the block each 4-byte
    /// lane of a pair's codes belongs to (lanes 0-3 and 8-11: block 0; 4-7 and 12-15: block 1).
    lane_scales: Vec<f32>,
    /// `rows × offset_stride`: each block's scale × the sum of its codes (zero padded).
    sums: Vec<f32>,
}

impl Activations {
    fn quantize(input: &[f32], batch: usize, matrix: &QuantMatrix) -> Self {
        let code_stride = matrix.scale_stride * BLOCK;
        let tail_pairs = matrix.tail_pairs;
        let mut codes = vec![0u8; batch * code_stride];
        let mut scales = vec![0f32; batch * matrix.offset_stride];
        let mut lane_scales = vec![0f32; batch * tail_pairs * LANES];
        let mut sums = vec![0f32; batch * matrix.offset_stride];
        let grouped = matrix.groups * GROUP;
        for (row, values) in input.chunks_exact(matrix.cols).enumerate() {
            let row_codes = &mut codes[row * code_stride..][..code_stride];
            let (blocks, _) = values.as_chunks::<BLOCK>();
            for (block, block_values) in blocks.iter().enumerate() {
                let (mut low, mut high) = ([0u8; 16], [0u8; 16]);
                let (scale, total) = quantize_block(matrix, block_values, &mut low, &mut high);
                scales[row * matrix.offset_stride + block] = scale;
                sums[row * matrix.offset_stride + block] = scale * total as f32;
                if block < grouped {
                    let group = &mut row_codes[(block / GROUP) * GROUP * BLOCK..][..GROUP * BLOCK];
                    let lane = block % GROUP;
                    for (step, four) in low.chunks_exact(4).chain(high.chunks_exact(4)).enumerate() {
                        group[step * 64 + lane * 4..][..4].copy_from_slice(four);
                    }
                } else {
                    let (pair, half) = ((block - grouped) / 2, (block - grouped) % 2);
                    let pair_codes = &mut row_codes[grouped * BLOCK + pair * 2 * BLOCK..][..2 * BLOCK];
                    pair_codes[half * 16..][..16].copy_from_slice(&low);
                    pair_codes[32 + half * 16..][..16].copy_from_slice(&high);
                    let lanes = &mut lane_scales[(row * tail_pairs + pair) * LANES..][..LANES];
                    for quarter in [0, 8] {
                        lanes[quarter + half * 4..quarter + half * 4 + 4].fill(scale);
                    }
                }
            }
        }
        Self { code_stride, codes, scales, lane_scales, sums }
    }

    /// The signed code of value `index` (0..32) of block `block` of row `row`.
    fn code(&self, matrix: &QuantMatrix, row: usize, block: usize, index: usize) -> i8 {
        self.codes[row * self.code_stride + matrix.byte_position(block, index)] as i8
    }
}

/// Quantises one block of 32 activations to signed 8-bit codes, rounding to nearest with ties
/// to even (llama.cpp's SIMD rounding): weights 0..16 into `low`, 16..32 into `high`; returns the
/// scale and the sum of the codes.
fn quantize_block(matrix: &QuantMatrix, values: &[f32; BLOCK], low: &mut [u8; 16], high: &mut [u8; 16]) -> (f32, i32) {
    match matrix.level {
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx512Vnni => return avx512::quantize_for(matrix, values, low, high),
        #[cfg(target_arch = "x86_64")]
        CpuLevel::Avx2 => return avx2::quantize_for(matrix, values, low, high),
        _ => {}
    }
    let largest = values.iter().fold(0f32, |largest, value| largest.max(value.abs()));
    let scale = largest / 127.0;
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut total = 0i32;
    for (index, value) in values.iter().enumerate() {
        let code = (value * inverse).round_ties_even() as i8;
        total += code as i32;
        if index < 16 {
            low[index] = code as u8;
        } else {
            high[index - 16] = code as u8;
        }
    }
    (scale, total)
}

/// The environment variable that lowers the kernels' level: `portable`, `avx2` or `avx512`
/// (a level above the CPU's runs at the CPU's).
pub const CPU_LEVEL_VARIABLE: &str = "NSTREAM_CPU_LEVEL";

/// Which kernels run: each level needs the CPU features of those below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuLevel {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F/BW/VNNI, FMA and F16C.
    Avx512Vnni,
}

impl CpuLevel {
    /// Every level, lowest first.
    pub const ALL: [Self; 3] = [Self::Portable, Self::Avx2, Self::Avx512Vnni];

    /// The level's name in `NSTREAM_CPU_LEVEL` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512",
        }
    }

    /// The level named `name` (as [`Self::name`] spells it, any case).
    pub fn from_name(name: &str) -> Result<Self, KernelError> {
        Self::ALL
            .into_iter()
            .find(|level| level.name().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| KernelError::CpuLevel { value: name.to_owned() })
    }

    /// The highest level this CPU has the features of.
    pub fn detected() -> Self {
        static DETECTED: OnceLock<CpuLevel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                let avx2 = has!("avx2") && has!("fma") && has!("f16c");
                if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                    return Self::Avx512Vnni;
                }
                if avx2 {
                    return Self::Avx2;
                }
            }
            Self::Portable
        })
    }
}

impl fmt::Display for CpuLevel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The level the kernels run at: the CPU's, lowered to `NSTREAM_CPU_LEVEL` where that names a
/// lower one; an error where it names none. Read once per process.
pub fn cpu_level() -> Result<CpuLevel, KernelError> {
    static LEVEL: OnceLock<Result<CpuLevel, KernelError>> = OnceLock::new();
    LEVEL.get_or_init(|| level_for(std::env::var(CPU_LEVEL_VARIABLE).ok().as_deref())).clone()
}

/// The level for a value of `NSTREAM_CPU_LEVEL` (`None`: unset; empty counts as unset).
fn level_for(requested: Option<&str>) -> Result<CpuLevel, KernelError> {
    match requested.filter(|value| !value.trim().is_empty()) {
        Some(value) => Ok(CpuLevel::from_name(value)?.min(CpuLevel::detected())),
        None => Ok(CpuLevel::detected()),
    }
}

/// Whether the kernels run faster than plain Rust here: [`cpu_level`] is above
/// [`CpuLevel::Portable`] (false where `NSTREAM_CPU_LEVEL` names no level).
pub fn accelerated() -> bool {
    cpu_level().is_ok_and(|level| level > CpuLevel::Portable)
}

/// Checks the buffers of a `rows` × `cols` matrix's product with `batch` input rows: the input
/// holds `batch × cols` values and the output `batch × rows`. False when there is nothing to
/// compute (no input row or no output column).
pub(crate) fn check_product_shape(
    input: &[f32],
    output: &[f32],
    batch: usize,
    rows: usize,
    cols: usize,
) -> Result<bool, KernelError> {
    if input.len() != batch * cols {
        return Err(KernelError::Shape {
            message: format!("expected {batch} × {cols} input values, got {}", input.len()),
        });
    }
    if output.len() != batch * rows {
        return Err(KernelError::Shape {
            message: format!("expected {batch} × {rows} output values, got {}", output.len()),
        });
    }
    Ok(batch != 0 && rows != 0)
}

#[cfg(test)]
mod tests;

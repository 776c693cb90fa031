//! The CPU glue of the model: nstream-kernels' quantised product as a candle op, run on
//! candle's own thread pool.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use nstream_kernels::{Parallel, QuantMatrix};

/// nstream-kernels' quantised product as a candle op (CPU, f32 activations `(.., cols)`).
pub(crate) struct QuantMatmul(QuantMatrix);

impl QuantMatmul {
    pub(crate) fn new(matrix: QuantMatrix) -> Self {
        Self(matrix)
    }
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "nstream-quant-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else { candle_core::bail!("{}: expected f32 activations", self.name()) };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: expected contiguous activations", self.name())
        };
        let matrix = &self.0;
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&matrix.cols()) {
            candle_core::bail!("{}: activations {dims:?} do not end in {} columns", self.name(), matrix.cols())
        }
        let input = &values[start..end];
        let batch = input.len() / matrix.cols();
        let mut output = vec![0f32; batch * matrix.rows()];
        matrix
            .matmul(input, batch, &mut output, &CandleThreads)
            .map_err(|error| candle_core::Error::Msg(format!("{}: {error}", self.name())))?;
        if let Some(last) = dims.last_mut() {
            *last = matrix.rows();
        }
        Ok((CpuStorage::F32(output), Shape::from(dims)))
    }
}

/// candle's CPU thread pool (the threads its own matrix products use; no second pool competes
/// for the cores).
pub(crate) struct CandleThreads;

impl Parallel for CandleThreads {
    fn run(&self, items: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        candle_core::utils::barrier_pool().execute_chunked(items, work);
    }
}

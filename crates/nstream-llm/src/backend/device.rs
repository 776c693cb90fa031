//! Where the model runs: the device and the CPU thread pool.

use candle_core::Device;

use crate::error::{Error, Result};

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (nstream-kernels and candle on candle's thread pool).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl DeviceSpec {
    pub(super) fn is_cpu(self) -> bool {
        self == Self::Cpu
    }

    /// The device; on the CPU, an error where `NSTREAM_CPU_LEVEL` names no kernel level.
    pub(super) fn device(self) -> Result<Device> {
        Ok(match self {
            Self::Cpu => {
                nstream_kernels::cpu_level().map_err(|error| Error::Unsupported(error.to_string()))?;
                Device::Cpu
            }
            Self::Cuda(ordinal) => Device::new_cuda(ordinal)?,
        })
    }
}

/// candle's thread pool for the model when `threads` is set (else candle's global one).
pub(super) fn thread_pool(threads: Option<usize>) -> Result<Option<rayon::ThreadPool>> {
    threads
        .map(|threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .thread_name(|index| format!("nstream-llm-{index}"))
                .build()
                .map_err(|error| Error::Inference(format!("cannot start the thread pool: {error}")))
        })
        .transpose()
}

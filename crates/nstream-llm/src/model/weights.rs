//! The weights of one layer as the matrix products use them: a matrix (candle's or
//! nstream-kernels'), a projection with its bias, and projections that read the same input,
//! stacked into one product where that changes no weight bit.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, Module, Tensor};
use nstream_kernels::{BlockFormat, QuantMatrix};

use crate::cpu::QuantMatmul;
use crate::error::Result;

/// A weight matrix as the matrix products use it.
pub(super) enum Weight {
    /// candle's (quantised or dense) matrix product.
    Candle(QMatMul),
    /// Q4_0/Q4_1/Q8_0 weights on a CPU with AVX2 or AVX-512 VNNI: nstream-kernels' product, which
    /// reads each weight once per step whatever the batch (candle's once per activation row).
    Kernel(QuantMatmul),
}

impl Weight {
    /// A quantised weight: nstream-kernels' product where it is faster than candle's (a CPU
    /// with AVX2 or AVX-512 VNNI, a format it multiplies), candle's otherwise.
    pub(super) fn quantised(weight: QTensor) -> Result<Self> {
        let format = match weight.dtype() {
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            _ => None,
        };
        if let (Some(format), true, &[rows, cols]) =
            (format, weight.device().is_cpu() && nstream_kernels::accelerated(), weight.shape().dims())
        {
            // A matrix the kernel cannot hold (a scale out of its range) stays with candle.
            if let Ok(matrix) = QuantMatrix::from_ggml(format, &weight.data()?, rows, cols) {
                return Ok(Self::Kernel(QuantMatmul::new(matrix)));
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(weight)?))
    }

    pub(super) fn forward(&self, input: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Candle(weight) => weight.forward(input)?,
            Self::Kernel(weight) => input.contiguous()?.apply_op1_no_bwd(weight)?,
        })
    }
}

/// A projection: a (possibly quantised) weight and an optional bias (Qwen2's q/k/v, from GGUF or
/// safetensors; Llama's `attention_bias`/`mlp_bias`).
pub(super) struct Linear {
    pub(super) weight: Weight,
    pub(super) bias: Option<Tensor>,
}

impl Linear {
    pub(super) fn new(weight: Weight) -> Self {
        Self { weight, bias: None }
    }

    pub(super) fn dense(weight: Tensor) -> Self {
        Self::new(Weight::Candle(QMatMul::Tensor(weight)))
    }

    pub(super) fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let output = self.weight.forward(input)?;
        Ok(match &self.bias {
            Some(bias) => output.broadcast_add(bias)?,
            None => output,
        })
    }
}

/// Projections that read the same input, as separate matrix products or as one over their
/// weights stacked by rows (one product, one quantisation of the activations, one thread-pool
/// dispatch instead of several), whose output columns are then split.
pub(super) enum Projections {
    /// One product per projection.
    Separate(Vec<Linear>),
    /// One product; the outputs are `widths` columns each, in order.
    Fused {
        /// The stacked projection.
        linear: Linear,
        /// Output columns of each part.
        widths: Vec<usize>,
    },
}

impl Projections {
    /// Each part's output, `(rows, width)`; fused parts are column slices of one product (strided:
    /// callers that need contiguous memory copy).
    pub(super) fn forward(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|part| part.forward(input)).collect(),
            Self::Fused { linear, widths } => {
                let output = linear.forward(input)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&width| {
                        let part = output.narrow(D::Minus1, start, width)?;
                        start += width;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }

    /// Gives each part its bias (`None`: no bias); a stacked projection gets them stacked, with
    /// zeros for the parts without one.
    pub(super) fn set_biases(&mut self, biases: Vec<Option<Tensor>>) -> Result<()> {
        match self {
            Self::Separate(parts) => {
                for (part, bias) in parts.iter_mut().zip(biases) {
                    part.bias = bias;
                }
            }
            Self::Fused { linear, widths } => {
                let reference = biases.iter().flatten().next().cloned();
                let Some(reference) = reference else { return Ok(()) };
                let stacked = biases
                    .into_iter()
                    .zip(widths.iter())
                    .map(|(bias, &width)| match bias {
                        Some(bias) => Ok(bias),
                        None => Tensor::zeros(width, reference.dtype(), reference.device()),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                linear.bias = Some(Tensor::cat(&stacked, 0)?);
            }
        }
        Ok(())
    }

    /// Stacks unquantised projections (`QMatMul::Tensor`) into one; they stay separate when a
    /// part is quantised or the dtypes differ. A missing bias stacks as zeros when another part
    /// has one.
    pub(super) fn fuse_tensors(parts: Vec<Linear>) -> Result<Self> {
        let weights: Option<Vec<Tensor>> = parts
            .iter()
            .map(|part| match &part.weight {
                Weight::Candle(QMatMul::Tensor(weight)) => Some(weight.clone()),
                _ => None,
            })
            .collect();
        let Some(weights) = weights else { return Ok(Self::Separate(parts)) };
        if weights.windows(2).any(|pair| pair[0].dtype() != pair[1].dtype()) {
            return Ok(Self::Separate(parts));
        }
        let widths: Vec<usize> = weights.iter().map(|weight| weight.dim(0)).collect::<candle_core::Result<_>>()?;
        let biases = parts.into_iter().map(|part| part.bias).collect();
        let mut fused = Self::Fused { linear: Linear::dense(Tensor::cat(&weights, 0)?), widths };
        fused.set_biases(biases)?;
        Ok(fused)
    }
}

/// One transformer block's weights.
pub(super) struct Layer {
    /// Q, K and V.
    pub(super) attention_qkv: Projections,
    pub(super) attention_output: Linear,
    pub(super) attention_norm: Tensor,
    /// The MLP's gate and up projections.
    pub(super) ffn_gate_up: Projections,
    pub(super) ffn_down: Linear,
    pub(super) ffn_norm: Tensor,
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn stacked_projections_with_biases_equal_separate_ones() {
        let device = Device::Cpu;
        let weight = |rows: usize, seed: f32| {
            let values: Vec<f32> = (0..rows * 4).map(|index| (index as f32 * 0.37 + seed).sin()).collect();
            Tensor::from_vec(values, (rows, 4), &device).unwrap()
        };
        let parts = || vec![Linear::dense(weight(3, 0.1)), Linear::dense(weight(2, 0.7))];
        let biases = || vec![Some(Tensor::new(&[1f32, 2., 3.], &device).unwrap()), None];
        let mut separate = Projections::Separate(parts());
        separate.set_biases(biases()).unwrap();
        let mut fused = Projections::fuse_tensors(parts()).unwrap();
        assert!(matches!(fused, Projections::Fused { .. }));
        fused.set_biases(biases()).unwrap();
        let input =
            Tensor::from_vec((0..8).map(|index| index as f32 / 8.0).collect::<Vec<_>>(), (2, 4), &device).unwrap();
        for (a, b) in separate.forward(&input).unwrap().iter().zip(fused.forward(&input).unwrap()) {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a.len(), b.len());
            assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-6), "{a:?} vs {b:?}");
        }
    }
}

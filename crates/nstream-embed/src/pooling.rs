//! Pooling token states into one vector per input, and L2 normalisation.

use candle_core::{D, DType, Device, Tensor};

use crate::error::{Error, Result};

/// How token states become one sentence vector (sentence-transformers' `Pooling` modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pooling {
    /// Mean of the non-padding token states.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
    /// Element-wise maximum over the non-padding token states.
    Max,
    /// Sum of the non-padding token states divided by the square root of their count.
    MeanSqrtLen,
    /// The last non-padding token's state.
    LastToken,
}

/// Pools `hidden` (batch, sequence, hidden; f32; right-padded) into (batch, hidden) given each
/// row's real length. Lengths must be in `1..=sequence`.
pub fn pool(hidden: &Tensor, lengths: &[usize], pooling: Pooling) -> Result<Tensor> {
    let (batch, sequence, _) = hidden.dims3()?;
    if lengths.len() != batch || lengths.iter().any(|&length| length == 0 || length > sequence) {
        return Err(Error::Inference(format!("pooling lengths {lengths:?} do not fit a batch of {batch}x{sequence}")));
    }
    let device = hidden.device();
    match pooling {
        Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?),
        Pooling::LastToken => {
            let rows = lengths
                .iter()
                .enumerate()
                .map(|(row, &length)| hidden.get(row)?.get(length - 1))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::stack(&rows, 0)?)
        }
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let all_full = lengths.iter().all(|&length| length == sequence);
            let summed = if all_full {
                hidden.sum(1)?
            } else {
                // (batch, 1, sequence) @ (batch, sequence, hidden): one batched product, no mask copy
                // of the hidden states.
                mask(lengths, sequence, device)?.unsqueeze(1)?.matmul(hidden)?.squeeze(1)?
            };
            let divisors: Vec<f32> = lengths
                .iter()
                .map(|&length| if pooling == Pooling::Mean { length as f32 } else { (length as f32).sqrt() })
                .collect();
            let divisors = Tensor::from_vec(divisors, (batch, 1), device)?;
            Ok(summed.broadcast_div(&divisors)?)
        }
        Pooling::Max => {
            // Padding gets -1e9 (as sentence-transformers) so it never wins the maximum.
            let penalty = ((mask(lengths, sequence, device)? - 1.0)? * 1e9)?.unsqueeze(2)?;
            Ok(hidden.broadcast_add(&penalty)?.max(1)?)
        }
    }
}

/// (batch, sequence) f32: 1 on real tokens, 0 on padding.
fn mask(lengths: &[usize], sequence: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = lengths
        .iter()
        .flat_map(|&length| (0..sequence).map(move |position| if position < length { 1.0 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (lengths.len(), sequence), device)?)
}

/// Scales each row of (batch, hidden) to unit L2 norm (rows of zeros stay zeros, as
/// `torch.nn.functional.normalize` with eps 1e-12).
pub fn normalize(pooled: &Tensor) -> Result<Tensor> {
    let norms = pooled.to_dtype(DType::F32)?.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(pooled.broadcast_div(&norms)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows, sequence 3, hidden 2; row 0 has 3 real tokens, row 1 has 2 (one pad of 100s).
    fn sample() -> Tensor {
        let values = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 0.0, 10.0, 20.0, -30.0, 40.0, 100.0, 100.0];
        Tensor::from_vec(values, (2, 3, 2), &Device::Cpu).expect("tensor")
    }

    fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
        tensor.to_vec2::<f32>().expect("2d")
    }

    #[test]
    fn mean_ignores_padding() {
        let pooled = pool(&sample(), &[3, 2], Pooling::Mean).expect("pool");
        assert_eq!(rows(&pooled), vec![vec![3.0, 2.0], vec![-10.0, 30.0]]);
        let full = pool(&sample(), &[3, 3], Pooling::Mean).expect("pool");
        assert_eq!(rows(&full)[1], vec![80.0 / 3.0, 160.0 / 3.0]);
    }

    #[test]
    fn cls_max_last_and_sqrt() {
        assert_eq!(rows(&pool(&sample(), &[3, 2], Pooling::Cls).expect("cls")), vec![vec![1.0, 2.0], vec![10.0, 20.0]]);
        assert_eq!(rows(&pool(&sample(), &[3, 2], Pooling::Max).expect("max")), vec![vec![5.0, 4.0], vec![10.0, 40.0]]);
        assert_eq!(
            rows(&pool(&sample(), &[3, 2], Pooling::LastToken).expect("last")),
            vec![vec![5.0, 0.0], vec![-30.0, 40.0]]
        );
        let sqrt = rows(&pool(&sample(), &[3, 2], Pooling::MeanSqrtLen).expect("sqrt"));
        assert!((sqrt[1][0] - (-20.0 / 2f32.sqrt())).abs() < 1e-5);
    }

    #[test]
    fn bad_lengths_are_errors_not_panics() {
        assert!(pool(&sample(), &[0, 2], Pooling::Mean).is_err());
        assert!(pool(&sample(), &[4, 2], Pooling::LastToken).is_err());
        assert!(pool(&sample(), &[3], Pooling::Cls).is_err());
    }

    #[test]
    fn normalize_gives_unit_rows_and_keeps_zeros() {
        let x = Tensor::from_vec(vec![3.0f32, 4.0, 0.0, 0.0], (2, 2), &Device::Cpu).expect("tensor");
        assert_eq!(rows(&normalize(&x).expect("normalize")), vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
    }
}

//! Loading a Llama-family GGUF: its quantised weights as stored, or re-quantised at load to a
//! format the CPU multiplies fast ([`Requantize`]).

use std::io::{Read, Seek};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};

use super::weights::{Layer, Linear, Projections, Weight};
use super::{LlamaConfig, LlamaModel, precompute_rope};
use crate::error::{Error, Result};

/// What to do at load with weights whose CPU matrix-product kernel is slow.
///
/// On a CPU with AVX-512 VNNI, nstream-kernels multiplies Q4_0, Q4_1 and Q8_0 weights as stored
/// (the arithmetic of llama.cpp's CPU backend); elsewhere candle's kernels run, and its CPU path
/// for Q4_1 (and the other non-K 4/5-bit formats) is scalar while Q8_0 and Q4_0 have SIMD dot
/// products. Re-quantising costs a little accuracy for Q4_0 and a little memory for Q8_0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Requantize {
    /// Keep what a fast kernel multiplies on this CPU; re-quantise the rest to Q8_0 (with
    /// AVX-512 VNNI: only Q5_0 and Q5_1; without: Q4_1, Q5_0 and Q5_1, as [`Requantize::Q8_0`]).
    #[default]
    Auto,
    /// Keep every weight as stored in the file.
    Keep,
    /// Re-quantise Q4_1, Q5_0 and Q5_1 weights to Q8_0 (the most faithful re-quantisation: Q8_0
    /// represents a 4/5-bit block almost exactly).
    Q8_0,
    /// Re-quantise Q4_1, Q5_0 and Q5_1 weights to Q4_0 (least memory).
    Q4_0,
}

impl Requantize {
    fn target(self, stored: GgmlDType) -> Option<GgmlDType> {
        let slow = matches!(stored, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
        match self {
            Self::Keep => None,
            Self::Auto if nstream_kernels::accelerated() => {
                matches!(stored, GgmlDType::Q5_0 | GgmlDType::Q5_1).then_some(GgmlDType::Q8_0)
            }
            Self::Auto | Self::Q8_0 if slow => Some(GgmlDType::Q8_0),
            Self::Q4_0 if slow => Some(GgmlDType::Q4_0),
            _ => None,
        }
    }
}

impl LlamaModel {
    /// Loads the weights of a Llama-family GGUF onto `device`, re-quantising slow formats as
    /// `requantize` says (only on CPU: the CUDA kernels are fast for every format).
    pub fn from_gguf<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        requantize: Requantize,
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(content)?;
        let requantize = if device.is_cpu() { requantize } else { Requantize::Keep };
        let embeddings_q = load_tensor(content, reader, device, "token_embd.weight")?;
        let embeddings = embeddings_q.dequantize(device)?;
        let norm = load_tensor(content, reader, device, "output_norm.weight")?.dequantize(device)?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            load_matmul(content, reader, device, requantize, "output.weight")?.weight
        } else {
            // Tied embeddings: the output head is the embedding matrix.
            match requantize.target(embeddings_q.dtype()) {
                Some(target) => Weight::quantised(QTensor::quantize(&embeddings, target)?)?,
                None => Weight::quantised(embeddings_q)?,
            }
        };
        let intermediate =
            content.tensor_infos.get("blk.0.ffn_gate.weight").map(|info| info.shape.dims()[0]).ok_or_else(|| {
                Error::InvalidModel { file: "gguf".into(), message: "tensor `blk.0.ffn_gate.weight` is missing".into() }
            })?;
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("blk.{index}.{part}.weight");
            let mut matmul = |part: &str| load_matmul(content, reader, device, requantize, &name(part));
            let attention_output = matmul("attn_output")?;
            let ffn_down = matmul("ffn_down")?;
            let mut attention_qkv = load_projections(
                content,
                reader,
                device,
                requantize,
                &[name("attn_q"), name("attn_k"), name("attn_v")],
            )?;
            // Qwen2 GGUFs carry q/k/v biases (`blk.N.attn_q.bias`...); stacked projections get
            // them stacked too (zeros for a part without one).
            let biases = ["attn_q", "attn_k", "attn_v"].map(|part| format!("blk.{index}.{part}.bias"));
            if biases.iter().any(|bias| content.tensor_infos.contains_key(bias)) {
                let mut loaded = Vec::with_capacity(biases.len());
                for bias in &biases {
                    loaded.push(match content.tensor_infos.contains_key(bias) {
                        true => Some(load_tensor(content, reader, device, bias)?.dequantize(device)?),
                        false => None,
                    });
                }
                attention_qkv.set_biases(loaded)?;
            }
            let ffn_gate_up =
                load_projections(content, reader, device, requantize, &[name("ffn_gate"), name("ffn_up")])?;
            layers.push(Layer {
                attention_qkv,
                attention_output,
                attention_norm: load_tensor(content, reader, device, &name("attn_norm"))?.dequantize(device)?,
                ffn_gate_up,
                ffn_down,
                ffn_norm: load_tensor(content, reader, device, &name("ffn_norm"))?.dequantize(device)?,
            });
        }
        let (cos, sin) = precompute_rope(&config, device, DType::F32)?;
        Ok(Self::assemble(config, intermediate, embeddings, layers, norm, output, (cos, sin), device, DType::F32))
    }
}

fn load_tensor<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    name: &str,
) -> Result<QTensor> {
    content
        .tensor(reader, name, device)
        .map_err(|error| Error::InvalidModel { file: "gguf".into(), message: format!("tensor `{name}`: {error}") })
}

fn load_matmul<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    requantize: Requantize,
    name: &str,
) -> Result<Linear> {
    let weight = load_tensor(content, reader, device, name)?;
    let weight = match requantize_target(&weight, requantize) {
        Some(target) => QTensor::quantize(&weight.dequantize(device)?, target)?,
        None => weight,
    };
    Ok(Linear::new(Weight::quantised(weight)?))
}

/// The format a weight is re-quantised to at load, if any (only whole blocks per row).
fn requantize_target(weight: &QTensor, requantize: Requantize) -> Option<GgmlDType> {
    requantize
        .target(weight.dtype())
        .filter(|target| weight.shape().dims().last().is_some_and(|cols| cols % target.block_size() == 0))
}

/// Projections that read the same input (q/k/v, gate/up). When every part is re-quantised at
/// load anyway, they are stacked by rows before quantising: the blocks of a row do not depend on
/// the other rows, so the fused weights hold exactly the bits the separate ones would. Weights
/// kept as stored stay separate (re-quantising them would change them).
fn load_projections<R: Read + Seek>(
    content: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    requantize: Requantize,
    names: &[String],
) -> Result<Projections> {
    let weights =
        names.iter().map(|name| load_tensor(content, reader, device, name)).collect::<Result<Vec<QTensor>>>()?;
    let targets: Vec<Option<GgmlDType>> = weights.iter().map(|weight| requantize_target(weight, requantize)).collect();
    if let Some(Some(target)) = targets.first()
        && targets.iter().all(|other| *other == Some(*target))
    {
        let widths = weights.iter().map(|weight| weight.shape().dims()[0]).collect();
        let dense =
            weights.iter().map(|weight| weight.dequantize(device)).collect::<candle_core::Result<Vec<Tensor>>>()?;
        let fused = QTensor::quantize(&Tensor::cat(&dense, 0)?, *target)?;
        return Ok(Projections::Fused { linear: Linear::new(Weight::quantised(fused)?), widths });
    }
    weights
        .into_iter()
        .zip(targets)
        .map(|(weight, target)| {
            let weight = match target {
                Some(target) => QTensor::quantize(&weight.dequantize(device)?, target)?,
                None => weight,
            };
            Ok(Linear::new(Weight::quantised(weight)?))
        })
        .collect::<Result<Vec<Linear>>>()
        .map(Projections::Separate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slow_formats_are_requantised() {
        assert_eq!(Requantize::Q8_0.target(GgmlDType::Q4_1), Some(GgmlDType::Q8_0));
        assert_eq!(Requantize::Q8_0.target(GgmlDType::Q4K), None);
        assert_eq!(Requantize::Q8_0.target(GgmlDType::F32), None);
        assert_eq!(Requantize::Keep.target(GgmlDType::Q4_1), None);
        assert_eq!(Requantize::Q4_0.target(GgmlDType::Q5_0), Some(GgmlDType::Q4_0));
        assert_eq!(Requantize::Auto.target(GgmlDType::Q5_1), Some(GgmlDType::Q8_0));
        assert_eq!(Requantize::Auto.target(GgmlDType::Q4K), None);
        let kernels = nstream_kernels::accelerated();
        assert_eq!(Requantize::Auto.target(GgmlDType::Q4_1), (!kernels).then_some(GgmlDType::Q8_0));
    }
}

//! Loading a Llama-family GGUF: its quantised weights as stored, or re-quantised at load to a
//! format the CPU multiplies fast ([`Requantize`]).

use std::io::{Read, Seek, SeekFrom};

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
        let invalid = |message: String| Error::InvalidModel { file: "gguf".into(), message };
        let length = reader.seek(SeekFrom::End(0)).map_err(|error| invalid(format!("cannot read: {error}")))?;
        check_tensors(content, length).map_err(invalid)?;
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
        let intermediate = content
            .tensor_infos
            .get("blk.0.ffn_gate.weight")
            .and_then(|info| info.shape.dims().first().copied())
            .ok_or_else(|| Error::InvalidModel {
                file: "gguf".into(),
                message: "tensor `blk.0.ffn_gate.weight` is missing".into(),
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

/// Reads a GGUF header with candle's reader and checks what that reader leaves unchecked, so a
/// malformed file is an error naming the problem, never a panic: a `general.alignment` of 0 (a
/// division by zero in candle), and every tensor's shape and data range.
/// `file` names the file in errors.
pub fn read_gguf<R: Read + Seek>(reader: &mut R, file: &str) -> Result<gguf_file::Content> {
    let invalid = |message: String| Error::InvalidModel { file: file.to_owned(), message };
    let start = reader.stream_position().map_err(|error| invalid(format!("cannot read: {error}")))?;
    let alignment = declared_alignment(reader);
    reader.seek(SeekFrom::Start(start)).map_err(|error| invalid(format!("cannot read: {error}")))?;
    if alignment == Some(0) {
        return Err(invalid("metadata `general.alignment` is 0 (expected a positive number of bytes)".into()));
    }
    let content = gguf_file::Content::read(reader).map_err(|error| invalid(error.to_string()))?;
    let length = reader.seek(SeekFrom::End(0)).map_err(|error| invalid(format!("cannot read: {error}")))?;
    check_tensors(&content, length).map_err(invalid)?;
    Ok(content)
}

/// Checks every tensor of a GGUF against a file of `length` bytes: at least one dimension, none
/// of size 0, an element count that fits in memory and is a whole number of blocks of its
/// format, and data that lies inside the file. Returns the first problem, naming the tensor.
pub(crate) fn check_tensors(content: &gguf_file::Content, length: u64) -> std::result::Result<(), String> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[name];
        let dims = info.shape.dims();
        if dims.is_empty() {
            return Err(format!("tensor `{name}` has no dimensions (expected at least one)"));
        }
        if dims.contains(&0) {
            return Err(format!("tensor `{name}` has a dimension of size 0 (shape {dims:?})"));
        }
        let elements = dims
            .iter()
            .try_fold(1usize, |product, dim| product.checked_mul(*dim))
            .ok_or_else(|| format!("tensor `{name}` has too many elements to address (shape {dims:?})"))?;
        let block = info.ggml_dtype.block_size();
        if elements % block != 0 {
            return Err(format!(
                "tensor `{name}` has {elements} elements, not a whole number of {:?} blocks of {block}",
                info.ggml_dtype
            ));
        }
        let too_large = || format!("tensor `{name}` is too large to address (shape {dims:?})");
        let bytes = (elements / block).checked_mul(info.ggml_dtype.type_size()).ok_or_else(too_large)?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(u64::try_from(bytes).ok()?))
            .ok_or_else(too_large)?;
        if end > length {
            return Err(format!(
                "tensor `{name}` ends at byte {end}, past the end of the file ({length} bytes): the file is \
                 truncated or its tensor offsets are wrong"
            ));
        }
    }
    Ok(())
}

/// The `general.alignment` candle's reader would use, when the header declares one as an integer
/// it reads (u8/u16/u32, or a non-negative i8/i16/i32; the last entry wins, as in its map); `None`
/// when there is none or the header cannot be walked (candle's reader then reports why).
fn declared_alignment<R: Read + Seek>(reader: &mut R) -> Option<u64> {
    fn read<const N: usize, R: Read>(reader: &mut R) -> Option<[u8; N]> {
        let mut bytes = [0; N];
        reader.read_exact(&mut bytes).ok().map(|()| bytes)
    }
    fn length<R: Read>(reader: &mut R, wide: bool) -> Option<u64> {
        match wide {
            true => read::<8, R>(reader).map(u64::from_le_bytes),
            false => read::<4, R>(reader).map(|bytes| u64::from(u32::from_le_bytes(bytes))),
        }
    }
    fn skip<R: Read + Seek>(reader: &mut R, bytes: u64) -> Option<()> {
        reader.seek(SeekFrom::Current(i64::try_from(bytes).ok()?)).ok().map(|_| ())
    }
    fn fixed_size(kind: u32) -> Option<u64> {
        match kind {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    fn skip_value<R: Read + Seek>(reader: &mut R, kind: u32, wide: bool, depth: usize) -> Option<()> {
        if let Some(size) = fixed_size(kind) {
            return skip(reader, size);
        }
        match kind {
            8 => {
                let bytes = length(reader, wide)?;
                skip(reader, bytes)
            }
            9 if depth < 8 => {
                let element = u32::from_le_bytes(read::<4, R>(reader)?);
                let count = length(reader, wide)?;
                if let Some(size) = fixed_size(element) {
                    return skip(reader, count.checked_mul(size)?);
                }
                // Strings and arrays read a length each: a count past the end fails there.
                for _ in 0..count {
                    skip_value(reader, element, wide, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
    let _magic = read::<4, R>(reader)?;
    let wide = u32::from_le_bytes(read::<4, R>(reader)?) >= 2;
    let _tensors = length(reader, wide)?;
    let entries = length(reader, wide)?;
    let mut alignment = None;
    for _ in 0..entries {
        let key_length = length(reader, wide)?;
        let is_alignment = key_length == 17 && &read::<17, R>(reader)? == b"general.alignment";
        if key_length != 17 {
            skip(reader, key_length)?;
        }
        let kind = u32::from_le_bytes(read::<4, R>(reader)?);
        if !is_alignment {
            skip_value(reader, kind, wide, 0)?;
            continue;
        }
        alignment = match kind {
            0 => Some(u64::from(read::<1, R>(reader)?[0])),
            1 => u64::try_from(i8::from_le_bytes(read::<1, R>(reader)?)).ok(),
            2 => Some(u64::from(u16::from_le_bytes(read::<2, R>(reader)?))),
            3 => u64::try_from(i16::from_le_bytes(read::<2, R>(reader)?)).ok(),
            4 => Some(u64::from(u32::from_le_bytes(read::<4, R>(reader)?))),
            5 => u64::try_from(i32::from_le_bytes(read::<4, R>(reader)?)).ok(),
            _ => {
                skip_value(reader, kind, wide, 0)?;
                None
            }
        };
    }
    alignment
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
    use std::io::Cursor;

    use super::*;

    /// A metadata value: its GGUF type and little-endian bytes.
    fn u32_value(value: u32) -> (u32, Vec<u8>) {
        (4, value.to_le_bytes().to_vec())
    }

    fn u64_value(value: u64) -> (u32, Vec<u8>) {
        (10, value.to_le_bytes().to_vec())
    }

    fn string_value(text: &str) -> (u32, Vec<u8>) {
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        (8, bytes)
    }

    /// A GGUF v3 file: metadata, tensors (name, dimensions innermost first as GGUF stores them,
    /// ggml type, data offset) and `data` at the default alignment of 32.
    fn gguf(metadata: &[(&str, (u32, Vec<u8>))], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, (kind, value)) in metadata {
            bytes.extend_from_slice(&string_value(key).1);
            bytes.extend_from_slice(&kind.to_le_bytes());
            bytes.extend_from_slice(value);
        }
        for (name, dims, kind, offset) in tensors {
            bytes.extend_from_slice(&string_value(name).1);
            bytes.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for dim in *dims {
                bytes.extend_from_slice(&dim.to_le_bytes());
            }
            bytes.extend_from_slice(&kind.to_le_bytes());
            bytes.extend_from_slice(&offset.to_le_bytes());
        }
        bytes.resize(bytes.len().div_ceil(32) * 32, 0);
        bytes.extend_from_slice(data);
        bytes
    }

    /// A one-block Llama header (2 wide, 1 head, vocabulary 4) with `block_count` blocks and the
    /// embedding tensor of the given dimensions at `offset`, followed by 32 bytes of data.
    fn llama(block_count: (u32, Vec<u8>), embedding_dims: &[u64], offset: u64) -> Vec<u8> {
        gguf(
            &[
                ("general.architecture", string_value("llama")),
                ("llama.attention.head_count", u32_value(1)),
                ("llama.embedding_length", u32_value(2)),
                ("llama.block_count", block_count),
            ],
            &[("token_embd.weight", embedding_dims, 0, offset)],
            &[0; 32],
        )
    }

    /// What loading `bytes` says: candle's header reader, then the model (which panicked on
    /// each malformed file below before it checked them).
    fn load_error(bytes: &[u8]) -> String {
        let mut reader = Cursor::new(bytes);
        let content = gguf_file::Content::read(&mut reader).expect("candle reads the header");
        let error = LlamaModel::from_gguf(&content, &mut reader, &Device::Cpu, Requantize::Keep).unwrap_err();
        let read_error = read_gguf(&mut Cursor::new(bytes), "model.gguf").err().map(|error| error.to_string());
        let error = error.to_string();
        // read_gguf finds the tensor problems before any model is built, naming the file.
        if let Some(read_error) = read_error {
            assert!(read_error.contains("model.gguf"), "{read_error}");
            assert!(error.contains(read_error.split(": ").last().unwrap()), "{error} vs {read_error}");
        }
        error
    }

    #[test]
    fn a_tensor_without_dimensions_is_an_error_naming_it() {
        let error = load_error(&llama(u32_value(1), &[], 0));
        assert!(error.contains("tensor `token_embd.weight` has no dimensions"), "{error}");
    }

    #[test]
    fn a_dimension_of_size_zero_is_an_error_naming_the_tensor() {
        let error = load_error(&llama(u32_value(1), &[2, 0], 0));
        assert!(error.contains("tensor `token_embd.weight` has a dimension of size 0 (shape [0, 2])"), "{error}");
    }

    #[test]
    fn dimensions_whose_product_overflows_are_an_error() {
        let error = load_error(&llama(u32_value(1), &[1 << 32, 1 << 32], 0));
        assert!(error.contains("tensor `token_embd.weight` has too many elements"), "{error}");
    }

    #[test]
    fn tensor_data_past_the_end_of_the_file_is_an_error() {
        let error = load_error(&llama(u32_value(1), &[2, 4], 1 << 20));
        assert!(error.contains("tensor `token_embd.weight` ends at byte"), "{error}");
        assert!(error.contains("past the end of the file"), "{error}");
        let error = load_error(&llama(u32_value(1), &[2, 4], u64::MAX));
        assert!(error.contains("tensor `token_embd.weight` is too large to address"), "{error}");
    }

    #[test]
    fn an_absurd_block_count_is_an_error_naming_the_key() {
        let error = load_error(&llama(u64_value(u64::MAX), &[2, 4], 0));
        assert!(error.contains("`llama.block_count` is 18446744073709551615"), "{error}");
        assert!(error.contains("only 1 tensors"), "{error}");
    }

    #[test]
    fn an_embedding_width_other_than_the_declared_one_is_an_error() {
        let error = load_error(&llama(u32_value(1), &[4, 2], 0));
        assert!(error.contains("`llama.embedding_length` is 2, but tensor `token_embd.weight` is 4 wide"), "{error}");
    }

    #[test]
    fn an_alignment_of_zero_is_an_error_not_a_division_by_zero() {
        // candle's reader divides by the alignment: it panicked on this header.
        for kind in [0u32, 1, 2, 3, 4, 5] {
            let size = [1, 1, 2, 2, 4, 4][kind as usize];
            let mut bytes =
                gguf(&[("general.name", string_value("x")), ("general.alignment", (kind, vec![0; size]))], &[], &[]);
            let error = read_gguf(&mut Cursor::new(&bytes), "model.gguf").unwrap_err().to_string();
            assert!(error.contains("model.gguf") && error.contains("`general.alignment` is 0"), "{kind}: {error}");
            // A later non-zero entry wins, as in candle's map.
            bytes =
                gguf(&[("general.alignment", (kind, vec![0; size])), ("general.alignment", u32_value(64))], &[], &[]);
            read_gguf(&mut Cursor::new(&bytes), "model.gguf").unwrap();
        }
    }

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

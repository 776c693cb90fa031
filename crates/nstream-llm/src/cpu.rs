//! The CPU glue of the model: nstream-kernels' quantised product as a candle op, run on
//! candle's own thread pool, and fused ops for the decode step's small tensors (each candle op
//! allocates and dispatches; a 135M model's step is hundreds of them).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
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

/// The step's fused q/k/v product `(rows, q + k + v)` split into three contiguous tensors, with
/// RoPE applied to q and k on the way (one pass instead of three copies and two RoPE ops).
/// Numerically the same as candle's `rope_i` (interleaved pairs) or `rope` (halves, `neox`).
pub(crate) struct SplitRope {
    /// Columns of q, k and v.
    pub widths: [usize; 3],
    /// Values per head.
    pub head_dim: usize,
    /// RoPE on the two halves of a head (Hugging Face layout) rather than on interleaved pairs
    /// (GGUF).
    pub neox: bool,
}

impl SplitRope {
    /// `(queries (rows, q), keys (rows, k), values (rows, v))`; `cos`/`sin` are `(rows, head_dim / 2)`.
    pub(crate) fn apply(&self, qkv: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<[Tensor; 3]> {
        let rows = qkv.dim(0)?;
        let flat = qkv.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, self)?;
        let mut start = 0;
        let parts = self.widths.map(|width| {
            let part = flat.narrow(0, start, rows * width).and_then(|part| part.reshape((rows, width)));
            start += rows * width;
            part
        });
        let [queries, keys, values] = parts;
        Ok([queries?, keys?, values?])
    }
}

impl CustomOp3 for SplitRope {
    fn name(&self) -> &'static str {
        "nstream-split-rope"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some(qkv), Some(cos), Some(sin)) =
            (f32_slice(qkv, qkv_layout), f32_slice(cos, cos_layout), f32_slice(sin, sin_layout))
        else {
            candle_core::bail!("{}: expected contiguous f32 tensors", self.name())
        };
        let total: usize = self.widths.iter().sum();
        let (head_dim, half) = (self.head_dim, self.head_dim / 2);
        let rows = qkv.len() / total.max(1);
        if total == 0
            || head_dim == 0
            || self.widths.iter().any(|width| width % head_dim != 0)
            || qkv.len() != rows * total
            || cos.len() != rows * half
            || sin.len() != rows * half
        {
            candle_core::bail!("{}: shapes do not match ({rows} rows of {total}, head_dim {head_dim})", self.name())
        }
        // The output is a sequence of head vectors: q's (rows × q heads), then k's, then v's.
        let heads = self.widths.map(|width| width / head_dim);
        let mut output = vec![0f32; qkv.len()];
        let rotate = |index: usize, out: &mut [f32]| {
            let (mut part, mut index) = (0, index);
            while part < 2 && index >= rows * heads[part] {
                index -= rows * heads[part];
                part += 1;
            }
            let (row, head) = (index / heads[part], index % heads[part]);
            let start = self.widths[..part].iter().sum::<usize>() + head * head_dim;
            let values = &qkv[row * total + start..][..head_dim];
            if part == 2 {
                out.copy_from_slice(values);
                return;
            }
            let (cos, sin) = (&cos[row * half..][..half], &sin[row * half..][..half]);
            for index in 0..half {
                let (first, second) = if self.neox { (index, index + half) } else { (2 * index, 2 * index + 1) };
                let (x1, x2) = (values[first], values[second]);
                out[first] = x1 * cos[index] - x2 * sin[index];
                out[second] = x1 * sin[index] + x2 * cos[index];
            }
        };
        nstream_kernels::for_each_row(threads_for(qkv.len()), &mut output, head_dim, &rotate);
        Ok((CpuStorage::F32(output), Shape::from(qkv.len())))
    }
}

/// SwiGLU on the fused gate/up product `(rows, 2 × width)`: `silu(gate) × up`, `(rows, width)`
/// (one pass instead of a SiLU over a strided view and a product), numerically candle's
/// `silu(gate) * up`.
pub(crate) struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "nstream-swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some(values) = f32_slice(storage, layout) else {
            candle_core::bail!("{}: expected contiguous f32 activations", self.name())
        };
        let (rows, columns) = layout.shape().dims2()?;
        if columns % 2 != 0 {
            candle_core::bail!("{}: {columns} columns is not a gate and an up of equal width", self.name())
        }
        let width = columns / 2;
        let mut output = vec![0f32; rows * width];
        nstream_kernels::for_each_row(threads_for(values.len()), &mut output, width, &|row, out| {
            let (gate, up) = values[row * columns..][..columns].split_at(width);
            for ((out, &gate), &up) in out.iter_mut().zip(gate).zip(up) {
                *out = gate / (1.0 + (-gate).exp()) * up;
            }
        });
        Ok((CpuStorage::F32(output), Shape::from((rows, width))))
    }
}

/// candle's threads for an op over `elements` values, or the calling thread alone below candle's
/// own threshold for splitting element-wise ops (64 Ki values: dispatch would cost more).
fn threads_for(elements: usize) -> &'static dyn Parallel {
    if elements >= 64 * 1024 { &CandleThreads } else { &nstream_kernels::Sequential }
}

/// The f32 values of a contiguous CPU tensor.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    let CpuStorage::F32(values) = storage else { return None };
    let (start, end) = layout.contiguous_offsets()?;
    values.get(start..end)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn random(rows: usize, columns: usize, seed: u64) -> Tensor {
        let mut rng = fastrand::Rng::with_seed(seed);
        let values: Vec<f32> = (0..rows * columns).map(|_| rng.f32() * 4.0 - 2.0).collect();
        Tensor::from_vec(values, (rows, columns), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn split_rope_equals_candles_split_and_rope_bit_for_bit() {
        let (heads, kv_heads, head_dim) = (6, 2, 8);
        // 5 rows: the calling thread; 2,000 rows: over candle's threads.
        for rows in [5, 2000] {
            let qkv = random(rows, (heads + 2 * kv_heads) * head_dim, 1);
            let cos = random(rows, head_dim / 2, 2);
            let sin = random(rows, head_dim / 2, 3);
            for neox in [false, true] {
                let split =
                    SplitRope { widths: [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], head_dim, neox };
                let [queries, keys, values] = split.apply(&qkv, &cos, &sin).expect("split");
                let rope = |start: usize, count: usize| {
                    let part = qkv.narrow(1, start * head_dim, count * head_dim).unwrap().contiguous().unwrap();
                    let part = part.reshape((rows, count, 1, head_dim)).unwrap();
                    let (cos, sin) =
                        (cos.reshape((rows, 1, head_dim / 2)).unwrap(), sin.reshape((rows, 1, head_dim / 2)).unwrap());
                    let rotated = if neox {
                        candle_nn::rotary_emb::rope(&part, &cos, &sin).unwrap()
                    } else {
                        candle_nn::rotary_emb::rope_i(&part, &cos, &sin).unwrap()
                    };
                    rotated.reshape((rows, count * head_dim)).unwrap().to_vec2::<f32>().unwrap()
                };
                assert_eq!(queries.to_vec2::<f32>().unwrap(), rope(0, heads));
                assert_eq!(keys.to_vec2::<f32>().unwrap(), rope(heads, kv_heads));
                let expected_values = qkv.narrow(1, (heads + kv_heads) * head_dim, kv_heads * head_dim).unwrap();
                assert_eq!(values.to_vec2::<f32>().unwrap(), expected_values.to_vec2::<f32>().unwrap());
            }
        }
    }

    #[test]
    fn swiglu_equals_candles_silu_times_up_bit_for_bit() {
        for rows in [3, 200] {
            let gate_up = random(rows, 2 * 384, 4);
            let fused = gate_up.apply_op1_no_bwd(&SwiGlu).expect("swiglu");
            let gate = gate_up.narrow(1, 0, 384).unwrap();
            let up = gate_up.narrow(1, 384, 384).unwrap();
            let expected = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
            assert_eq!(fused.to_vec2::<f32>().unwrap(), expected.to_vec2::<f32>().unwrap());
        }
        let odd = random(2, 5, 5);
        let error = odd.apply_op1_no_bwd(&SwiGlu).unwrap_err().to_string();
        assert!(error.contains("not a gate and an up of equal width"), "{error}");
    }
}

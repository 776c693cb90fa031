//! Weight gradients summed in place, outside candle's gradient store.
//!
//! candle's backward pass adds every gradient it computes into its store as
//! `zeros_like(tensor) + gradient`: for each weight a zeroed allocation and a new sum, element-wise
//! work that runs on one thread while the other cores wait. In full fine-tuning that is every
//! weight of the model, every step (two passes over 135M values for SmolLM2-135M, plus the
//! page faults of the new allocations). So in full fine-tuning on the CPU the fused kernels hold
//! the matrices themselves, out of candle's graph, and their backward passes hand each matrix's
//! gradient to a [`GradientSink`]: the first contribution is kept as it is (a product's fresh
//! output), later ones (a tied embedding's second use, the next micro-batch) are added into it in
//! place, in parallel. The model's other trainable tensors (norm weights, biases) stay with
//! candle's store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, InplaceOp2, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Elements per parallel task of the in-place sums.
const ELEMENTS_PER_TASK: usize = 1 << 15;

fn error(message: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(message.into())
}

/// Where the backward passes of one training forward put the gradients of the matrices they
/// hold, by trainable name. Cloning shares the sink.
#[derive(Clone, Debug, Default)]
pub(crate) struct GradientSink(Arc<Mutex<HashMap<String, Tensor>>>);

impl GradientSink {
    fn slots(&self) -> candle_core::Result<std::sync::MutexGuard<'_, HashMap<String, Tensor>>> {
        self.0.lock().map_err(|_| error("the gradient sink's lock was poisoned"))
    }

    /// Adds `gradient` (a tensor no one else holds, such as a product's output) to `name`'s sum.
    pub fn add(&self, name: &str, gradient: Tensor) -> candle_core::Result<()> {
        let mut slots = self.slots()?;
        match slots.get(name) {
            Some(sum) => add_in_place(sum, &gradient),
            None => {
                slots.insert(name.to_owned(), gradient.contiguous()?);
                Ok(())
            }
        }
    }

    /// Adds each row of `gradient` (`(ids.len(), width)`) to row `ids[i]` of `name`'s sum, a
    /// `shape` matrix (zeros when `name` has no sum yet): the backward pass of an embedding lookup.
    pub fn add_rows(&self, name: &str, shape: &Shape, ids: &[u32], gradient: &Tensor) -> candle_core::Result<()> {
        let mut slots = self.slots()?;
        if !slots.contains_key(name) {
            slots.insert(name.to_owned(), Tensor::zeros(shape, gradient.dtype(), gradient.device())?);
        }
        let sum = &slots[name];
        sum.inplace_op2(&gradient.contiguous()?, &Accumulate { rows: Some(ids) })
    }

    /// Takes every sum out of the sink (which is then empty, ready for the next step).
    pub fn take(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        Ok(std::mem::take(&mut *self.slots()?))
    }
}

/// A matrix a fused kernel holds for training: its values (outside candle's graph) and where
/// the backward pass puts its gradient.
#[derive(Clone, Debug)]
pub(crate) struct TrainedMatrix {
    pub sink: GradientSink,
    /// The trainable name the gradient is summed under.
    pub name: String,
}

/// `sum += gradient`, element-wise, in place.
pub(crate) fn add_in_place(sum: &Tensor, gradient: &Tensor) -> candle_core::Result<()> {
    if sum.shape() != gradient.shape() {
        return Err(error(format!("a gradient of shape {:?} added to a sum of {:?}", gradient.dims(), sum.dims())));
    }
    sum.inplace_op2(&gradient.contiguous()?, &Accumulate { rows: None })
}

/// The float types of the in-place sums, with their mutable view of a CPU storage.
trait Summed: WithDType + std::ops::AddAssign {
    fn values_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl Summed for f32 {
    fn values_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F32(values) => Some(values),
            _ => None,
        }
    }
}

impl Summed for f64 {
    fn values_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F64(values) => Some(values),
            _ => None,
        }
    }
}

fn contiguous_mut<'a, T: Summed>(storage: &'a mut CpuStorage, layout: &Layout) -> candle_core::Result<&'a mut [T]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| error("an in-place sum needs contiguous tensors"))?;
    let values = T::values_mut(storage).ok_or_else(|| error("an in-place sum of tensors of different types"))?;
    Ok(&mut values[start..end])
}

fn contiguous<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [T]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| error("an in-place sum needs contiguous tensors"))?;
    Ok(&T::cpu_storage_as_slice(storage)?[start..end])
}

/// `dst += src` in place: element-wise over tensors of the same shape (in parallel), or, with
/// `rows`, `dst[rows[i]] += src[i]` for the rows of `(vocab, width)` and `(rows.len(), width)`
/// matrices (an embedding's gradient).
struct Accumulate<'a> {
    rows: Option<&'a [u32]>,
}

fn accumulate<T: Summed>(
    rows: Option<&[u32]>,
    dst: &mut CpuStorage,
    dst_layout: &Layout,
    src: &CpuStorage,
    src_layout: &Layout,
) -> candle_core::Result<()> {
    let shape = dst_layout.shape().clone();
    let dst = contiguous_mut::<T>(dst, dst_layout)?;
    let src = contiguous::<T>(src, src_layout)?;
    let Some(ids) = rows else {
        if dst.len() != src.len() {
            return Err(error("an in-place sum of tensors of different sizes"));
        }
        dst.par_chunks_mut(ELEMENTS_PER_TASK).zip(src.par_chunks(ELEMENTS_PER_TASK)).for_each(|(dst, src)| {
            dst.iter_mut().zip(src).for_each(|(sum, &value)| *sum += value);
        });
        return Ok(());
    };
    let (vocab, width) = shape.dims2()?;
    if src.len() != ids.len() * width {
        return Err(error("an embedding gradient with another row count than its ids"));
    }
    for (&id, row) in ids.iter().zip(src.chunks_exact(width.max(1))) {
        let id = id as usize;
        if id >= vocab {
            return Err(error(format!("token id {id} outside an embedding of {vocab} rows")));
        }
        dst[id * width..(id + 1) * width].iter_mut().zip(row).for_each(|(sum, &value)| *sum += value);
    }
    Ok(())
}

impl InplaceOp2 for Accumulate<'_> {
    fn name(&self) -> &'static str {
        "accumulate"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_layout: &Layout,
        src: &CpuStorage,
        src_layout: &Layout,
    ) -> candle_core::Result<()> {
        match dst {
            CpuStorage::F32(_) => accumulate::<f32>(self.rows, dst, dst_layout, src, src_layout),
            CpuStorage::F64(_) => accumulate::<f64>(self.rows, dst, dst_layout, src, src_layout),
            _ => Err(error("in-place gradient sums run in f32 or f64")),
        }
    }
}

/// The rows `ids` of an embedding matrix held outside the graph, as an operation on `anchor` (a
/// one-element trainable tensor that only puts the lookup into the graph: the lookup has no
/// floating-point argument of its own). Its backward pass adds the rows' gradients to the sink
/// and gives the anchor none.
pub(crate) struct EmbeddingLookup {
    pub weight: Tensor,
    pub ids: Vec<u32>,
    pub matrix: TrainedMatrix,
}

fn lookup<T: WithDType>(weight: &Tensor, ids: &[u32]) -> candle_core::Result<(CpuStorage, Shape)> {
    let (guard, layout) = weight.storage_and_layout();
    let Storage::Cpu(storage) = &*guard else { return Err(error("the embedding lookup runs on the CPU")) };
    let (vocab, width) = layout.shape().dims2()?;
    let table = contiguous::<T>(storage, layout)?;
    let mut rows = Vec::with_capacity(ids.len() * width);
    for &id in ids {
        let id = id as usize;
        if id >= vocab {
            return Err(error(format!("token id {id} outside an embedding of {vocab} rows")));
        }
        rows.extend_from_slice(&table[id * width..(id + 1) * width]);
    }
    Ok((T::to_cpu_storage_owned(rows), Shape::from((ids.len(), width))))
}

impl CustomOp1 for EmbeddingLookup {
    fn name(&self) -> &'static str {
        "embedding-lookup"
    }

    fn cpu_fwd(&self, _anchor: &CpuStorage, _layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.weight.dtype() {
            candle_core::DType::F32 => lookup::<f32>(&self.weight, &self.ids),
            candle_core::DType::F64 => lookup::<f64>(&self.weight, &self.ids),
            _ => Err(error("the embedding lookup runs in f32 or f64")),
        }
    }

    fn bwd(&self, _anchor: &Tensor, _result: &Tensor, gradient: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.matrix.sink.add_rows(&self.matrix.name, self.weight.shape(), &self.ids, gradient)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn the_first_gradient_is_kept_and_later_ones_are_added_in_place() {
        let sink = GradientSink::default();
        let first = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        sink.add("w", first).unwrap();
        sink.add("w", Tensor::new(&[[0.5f32, 0.5], [0.5, 0.5]], &Device::Cpu).unwrap()).unwrap();
        sink.add_rows(
            "w",
            &Shape::from((2, 2)),
            &[1, 1],
            &Tensor::new(&[[1.0f32, 1.0], [2.0, 2.0]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let sums = sink.take().unwrap();
        assert_eq!(sums["w"].to_vec2::<f32>().unwrap(), vec![vec![1.5, 2.5], vec![6.5, 7.5]]);
        assert!(sink.take().unwrap().is_empty());
        let wrong = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        sink.add("v", Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(sink.add("v", wrong).is_err());
    }

    #[test]
    fn an_embedding_lookup_reads_rows_and_sends_their_gradients_to_the_sink() {
        let sink = GradientSink::default();
        let weight = Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
        let anchor = Var::zeros(1, candle_core::DType::F64, &Device::Cpu).unwrap();
        let matrix = TrainedMatrix { sink: sink.clone(), name: "embed".into() };
        let rows = anchor.apply_op1(EmbeddingLookup { weight, ids: vec![2, 0, 2], matrix }).unwrap();
        assert_eq!(rows.to_vec2::<f64>().unwrap(), vec![vec![5.0, 6.0], vec![1.0, 2.0], vec![5.0, 6.0]]);
        let upstream = Tensor::new(&[[1.0f64, 10.0], [2.0, 20.0], [3.0, 30.0]], &Device::Cpu).unwrap();
        let store = (rows * upstream).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(store.get(anchor.as_tensor()).is_none());
        let sums = sink.take().unwrap();
        assert_eq!(sums["embed"].to_vec2::<f64>().unwrap(), vec![vec![2.0, 20.0], vec![0.0, 0.0], vec![4.0, 40.0]]);
    }
}

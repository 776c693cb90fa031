//! LoRA adapters applied at run time, unmerged: each adapted projection adds
//! `scale * B (A x)` to `W x` for the rows of the sequences that use the adapter, so a quantised
//! base keeps its weights and sequences of different adapters (and of the bare base) share one
//! batch.
//!
//! An adapter is read in the Hugging Face PEFT layout (nstream-peft) and laid out once at load
//! for the model's stacked projections: per layer and per group of projections that read the same
//! input (q/k/v, o, gate/up, down) one `down` matrix `(in, R)` (the groups' `A`s side by side,
//! transposed) and one `up` matrix `(R, out)` (the `B`s, transposed, scaled, each at its own
//! output columns, zero elsewhere), so a group costs two small products whatever its modules.
//!
//! GGUF Llama weights have llama.cpp's Q/K row permutation (interleaved RoPE pairs), while PEFT
//! adapters are in the Hugging Face row order: the rows of `B` for q and k are permuted the same
//! way here, so the update lands on the rows the base's permuted weights produce.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use nstream_peft::Module;

use super::LlamaModel;
use crate::error::{Error, Result};

/// A group of projections that read the same input and run as one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Group {
    /// q, k and v.
    Qkv,
    /// The attention output projection.
    Output,
    /// The MLP's gate and up projections.
    GateUp,
    /// The MLP's down projection.
    Down,
}

impl Group {
    fn modules(self) -> &'static [Module] {
        match self {
            Group::Qkv => &[Module::QProj, Module::KProj, Module::VProj],
            Group::Output => &[Module::OProj],
            Group::GateUp => &[Module::GateProj, Module::UpProj],
            Group::Down => &[Module::DownProj],
        }
    }
}

/// One group's update: `input (rows, in) -> input · down · up (rows, out)`.
pub(super) struct LoraDelta {
    down: Tensor,
    up: Tensor,
}

impl LoraDelta {
    fn apply(&self, input: &Tensor) -> Result<Tensor> {
        Ok(input.matmul(&self.down)?.matmul(&self.up)?)
    }
}

/// One layer's updates, by group (`None`: the adapter leaves the group alone).
#[derive(Default)]
struct LayerLora {
    qkv: Option<LoraDelta>,
    output: Option<LoraDelta>,
    gate_up: Option<LoraDelta>,
    down: Option<LoraDelta>,
}

impl LayerLora {
    fn group(&self, group: Group) -> Option<&LoraDelta> {
        match group {
            Group::Qkv => self.qkv.as_ref(),
            Group::Output => self.output.as_ref(),
            Group::GateUp => self.gate_up.as_ref(),
            Group::Down => self.down.as_ref(),
        }
    }

    fn set(&mut self, group: Group, delta: LoraDelta) {
        match group {
            Group::Qkv => self.qkv = Some(delta),
            Group::Output => self.output = Some(delta),
            Group::GateUp => self.gate_up = Some(delta),
            Group::Down => self.down = Some(delta),
        }
    }
}

/// A LoRA adapter laid out for one model ([`LoraAdapter::new`]); attach it to a sequence with
/// [`super::SequenceCache::set_adapter`].
pub struct LoraAdapter {
    name: String,
    rank: usize,
    scale: f64,
    base_model: Option<String>,
    modules: Vec<Module>,
    layers: Vec<LayerLora>,
    /// The model's K/V pool, identifying the model the adapter was laid out for.
    model: usize,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LoraAdapter")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("scale", &self.scale)
            .field("base_model", &self.base_model)
            .field("modules", &self.modules)
            .finish_non_exhaustive()
    }
}

/// `(out, in)` of a module's weight in `model`.
fn module_shape(model: &LlamaModel, module: Module) -> (usize, usize) {
    let config = model.config();
    let (hidden, q, kv) = (config.hidden_size, config.heads * config.head_dim, config.kv_heads * config.head_dim);
    let intermediate = model.intermediate_size;
    match module {
        Module::QProj => (q, hidden),
        Module::KProj | Module::VProj => (kv, hidden),
        Module::OProj => (hidden, q),
        Module::GateProj | Module::UpProj => (intermediate, hidden),
        Module::DownProj => (hidden, intermediate),
    }
}

/// The Hugging Face row of GGUF row `row` of a Q/K weight permuted by llama.cpp's converter
/// (`reshape(heads, 2, d/2, ..).swapaxes(1, 2)`): inside a head, GGUF rows are `(pair, half)`,
/// Hugging Face rows `(half, pair)`.
fn hf_row(row: usize, head_dim: usize) -> usize {
    let (head, within) = (row / head_dim, row % head_dim);
    head * head_dim + (within % 2) * (head_dim / 2) + within / 2
}

impl LoraAdapter {
    /// Lays out `adapter` for `model`, checking every matrix against the model's shapes (an
    /// adapter of another base, or of another rank than its config says, is refused with the
    /// layer and module at fault).
    pub fn new(name: impl Into<String>, adapter: &nstream_peft::Adapter, model: &LlamaModel) -> Result<Self> {
        let name = name.into();
        let config = model.config();
        let invalid = |message: String| Error::InvalidModel { file: format!("adapter `{name}`"), message };
        let scale = adapter.config.scale();
        let modules = adapter.config.modules().map_err(invalid)?;
        let permuted = !config.rope_is_neox;
        let mut layers: Vec<LayerLora> = (0..config.layers).map(|_| LayerLora::default()).collect();
        for &(layer, _) in adapter.pairs.keys() {
            if layer >= config.layers {
                return Err(invalid(format!("it adapts layer {layer} but the base has {} layers", config.layers)));
            }
        }
        for (layer_index, layer) in layers.iter_mut().enumerate() {
            for group in [Group::Qkv, Group::Output, Group::GateUp, Group::Down] {
                let present: Vec<(usize, Module)> = group
                    .modules()
                    .iter()
                    .enumerate()
                    .filter(|(_, module)| adapter.pairs.contains_key(&(layer_index, **module)))
                    .map(|(position, module)| (position, *module))
                    .collect();
                if present.is_empty() {
                    continue;
                }
                let widths: Vec<usize> = group.modules().iter().map(|&module| module_shape(model, module).0).collect();
                let input = module_shape(model, group.modules()[0]).1;
                let out_total: usize = widths.iter().sum();
                let mut ranks = Vec::new();
                for &(_, module) in &present {
                    let pair = &adapter.pairs[&(layer_index, module)];
                    let (out, expected_in) = module_shape(model, module);
                    let rank = pair.a.shape[0];
                    if pair.a.shape[1] != expected_in || pair.b.shape[0] != out || pair.b.shape[1] != rank {
                        return Err(invalid(format!(
                            "layer {layer_index} {}: lora_A {:?} and lora_B {:?} do not fit the base's weight \
                             ({out}, {expected_in}) at rank {rank} (an adapter of another base model?)",
                            module.name(),
                            pair.a.shape,
                            pair.b.shape
                        )));
                    }
                    ranks.push(rank);
                }
                let rank_total: usize = ranks.iter().sum();
                let mut down = vec![0f32; input * rank_total];
                let mut up = vec![0f32; rank_total * out_total];
                let mut rank_offset = 0;
                for (&(position, module), &rank) in present.iter().zip(&ranks) {
                    let pair = &adapter.pairs[&(layer_index, module)];
                    let column_offset: usize = widths[..position].iter().sum();
                    // down[i][offset + j] = A[j][i]
                    for j in 0..rank {
                        for i in 0..input {
                            down[i * rank_total + rank_offset + j] = pair.a.data[j * input + i];
                        }
                    }
                    let heads = match module {
                        Module::QProj if permuted => Some(config.heads),
                        Module::KProj if permuted => Some(config.kv_heads),
                        _ => None,
                    };
                    let out = widths[position];
                    for row in 0..out {
                        let source_row = match heads {
                            Some(_) => hf_row(row, config.head_dim),
                            None => row,
                        };
                        for j in 0..rank {
                            up[(rank_offset + j) * out_total + column_offset + row] =
                                (scale * f64::from(pair.b.data[source_row * rank + j])) as f32;
                        }
                    }
                    rank_offset += rank;
                }
                let tensor =
                    |values: Vec<f32>, shape: (usize, usize), device: &Device, dtype: DType| -> Result<Tensor> {
                        Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
                    };
                layer.set(
                    group,
                    LoraDelta {
                        down: tensor(down, (input, rank_total), model.device(), model.dtype())?,
                        up: tensor(up, (rank_total, out_total), model.device(), model.dtype())?,
                    },
                );
            }
        }
        Ok(Self {
            name,
            rank: adapter.config.r,
            scale,
            base_model: adapter.config.base_model_name_or_path.clone(),
            modules,
            layers,
            model: model.identity(),
        })
    }

    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The factor of `B A` (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The base model recorded in its config (`base_model_name_or_path`).
    pub fn base_model(&self) -> Option<&str> {
        self.base_model.as_deref()
    }

    /// The adapted modules.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }

    pub(super) fn model(&self) -> usize {
        self.model
    }
}

/// The rows of one step that use one adapter.
pub(super) struct LoraRows {
    adapter: Arc<LoraAdapter>,
    /// `None`: every row of the step.
    rows: Option<Tensor>,
}

/// The step's adapters and their rows (empty when no sequence of the step has one).
#[derive(Default)]
pub(super) struct StepLora {
    parts: Vec<LoraRows>,
}

impl StepLora {
    /// Groups the step's rows by adapter; `adapters[i]` and `lengths[i]` are input `i`'s adapter
    /// and token count.
    pub(super) fn new(adapters: &[Option<&Arc<LoraAdapter>>], lengths: &[usize], device: &Device) -> Result<Self> {
        let mut groups: Vec<(Arc<LoraAdapter>, Vec<u32>)> = Vec::new();
        let mut row = 0u32;
        for (adapter, &length) in adapters.iter().zip(lengths) {
            let rows = row..row + length as u32;
            row += length as u32;
            let Some(adapter) = adapter else { continue };
            match groups.iter_mut().find(|(known, _)| Arc::ptr_eq(known, adapter)) {
                Some((_, known_rows)) => known_rows.extend(rows),
                None => groups.push((Arc::clone(adapter), rows.collect())),
            }
        }
        let total = row as usize;
        let parts = groups
            .into_iter()
            .map(|(adapter, rows)| {
                let rows = match rows.len() == total {
                    true => None,
                    false => {
                        let count = rows.len();
                        Some(Tensor::from_vec(rows, count, device)?)
                    }
                };
                Ok(LoraRows { adapter, rows })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { parts })
    }

    /// Whether no sequence of the step has an adapter.
    pub(super) fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// `output` plus each adapter's update of `group` in `layer` on its rows of `input`.
    pub(super) fn apply(&self, mut output: Tensor, input: &Tensor, layer: usize, group: Group) -> Result<Tensor> {
        for part in &self.parts {
            let Some(delta) = part.adapter.layers.get(layer).and_then(|lora| lora.group(group)) else { continue };
            output = match &part.rows {
                None => (output + delta.apply(&input.contiguous()?)?)?,
                Some(rows) => {
                    let update = delta.apply(&input.index_select(rows, 0)?)?;
                    output.index_add(rows, &update, 0)?
                }
            };
        }
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::hf_row;

    #[test]
    fn gguf_rows_map_back_to_hugging_face_rows() {
        // head_dim 4: GGUF rows (pair, half) = (0,0) (0,1) (1,0) (1,1) are HF rows 0, 2, 1, 3.
        let rows: Vec<usize> = (0..8).map(|row| hf_row(row, 4)).collect();
        assert_eq!(rows, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }
}

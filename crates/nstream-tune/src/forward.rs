//! The training forward: a Llama-family decoder built only from candle operations that have a
//! backward pass.
//!
//! candle's fused kernels (`softmax_last_dim`, `rms_norm`, `rope`, quantised `QMatMul`) and
//! nstream-llm's fused CPU operations are recorded without a backward pass: gradients would
//! silently stop at them. Here RMSNorm, RoPE, softmax, SiLU and attention are written out with
//! matrix products, element-wise arithmetic, `exp`, sums and maxima, every one of which candle
//! differentiates. The layout is the Hugging Face one (NeoX RoPE pairs `(i, i + d/2)`).
//!
//! Trainable tensors are candle [`Var`]s: LoRA's A and B (frozen base weights), or every weight
//! (full fine-tuning).

use std::collections::{BTreeMap, HashMap};

use candle_core::{D, DType, Device, Tensor, Var};
use nstream_llm::model::{LlamaConfig, RopeScaling};
use nstream_peft::Module;

use crate::error::{Error, Result};
use crate::kernels::{Attention, LoraLinear, OutputLoss, RmsNorm, SwiGlu, product_with_transposed};
use crate::simd::Level;
use crate::sink::{EmbeddingLookup, GradientSink, TrainedMatrix};

/// How LoRA adapts the target modules.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// The rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// rsLoRA scaling (`alpha / sqrt(r)`).
    pub rslora: bool,
    /// The adapted modules.
    pub targets: Vec<Module>,
}

impl LoraSpec {
    /// The factor of `B A`.
    pub fn scale(&self) -> f64 {
        let rank = self.rank.max(1) as f64;
        if self.rslora { self.alpha / rank.sqrt() } else { self.alpha / rank }
    }
}

/// One adapted module's matrices.
pub struct LoraWeights {
    /// `(r, in)`.
    pub a: Var,
    /// `(out, r)`.
    pub b: Var,
}

/// The model being trained: weights (some of them [`Var`]s) and the LoRA matrices.
pub struct TrainModel {
    config: LlamaConfig,
    weights: HashMap<String, Tensor>,
    /// Trainable tensors by name, in a fixed order (the optimiser's and the checkpoint's order).
    trainable: BTreeMap<String, Var>,
    lora: BTreeMap<(usize, Module), LoraWeights>,
    lora_spec: Option<LoraSpec>,
    inverse_frequencies: Vec<f32>,
    device: Device,
    dtype: DType,
    /// Whether the forward runs the fused CPU kernels (else the composite reference).
    fused: bool,
    /// The instruction set the fused kernels run with.
    level: Level,
    /// Where the fused kernels put the gradients of the matrices they hold in full fine-tuning
    /// (see [`crate::sink`]).
    sink: GradientSink,
    /// A one-element trainable tensor that puts the embedding lookup into the graph when the
    /// kernels hold the embedding matrix.
    anchor: Var,
}

/// Randomness of one forward pass (LoRA dropout): `None` is evaluation.
#[derive(Clone, Copy, Debug)]
pub struct DropoutSeed(pub u64);

/// Token ids laid out as a padded `(batch, length)` grid with the positions the loss reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `batch * length` ids, row-major, padded with id 0 at the end of short rows (padding is
    /// never attended to by real tokens: attention is causal).
    pub tokens: Vec<u32>,
    /// Rows.
    pub batch: usize,
    /// Columns (the longest sequence).
    pub length: usize,
    /// Flat indices into `tokens` of the positions whose next token is a target.
    pub target_rows: Vec<u32>,
    /// The target token of each position in `target_rows`.
    pub targets: Vec<u32>,
}

impl Batch {
    /// Lays out sequences with their per-token loss masks (`mask[i]`: token `i` is a target).
    pub fn new(sequences: &[(&[u32], &[bool])]) -> Self {
        let length = sequences.iter().map(|(tokens, _)| tokens.len()).max().unwrap_or(0);
        let mut tokens = vec![0u32; sequences.len() * length];
        let mut target_rows = Vec::new();
        let mut targets = Vec::new();
        for (row, (ids, mask)) in sequences.iter().enumerate() {
            tokens[row * length..row * length + ids.len()].copy_from_slice(ids);
            for position in 1..ids.len() {
                if mask[position] {
                    target_rows.push((row * length + position - 1) as u32);
                    targets.push(ids[position]);
                }
            }
        }
        Self { tokens, batch: sequences.len(), length, target_rows, targets }
    }

    /// The number of target tokens.
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }
}

/// `x W^T` for a `W` held by the operation, outside candle's graph. For a frozen `W` (LoRA) the
/// backward pass computes only the input's gradient: candle's matrix-product backward also
/// computes (and allocates) the gradient of a frozen weight, which in LoRA training cost more than
/// the rest of the step. For a trained `W` (full fine-tuning, `matrix`) it also computes `W`'s
/// gradient and hands it to the sink (see [`crate::sink`]).
struct HeldLinear {
    weight: Tensor,
    matrix: Option<TrainedMatrix>,
}

impl candle_core::CustomOp1 for HeldLinear {
    fn name(&self) -> &'static str {
        "held-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        match storage {
            candle_core::CpuStorage::F32(_) | candle_core::CpuStorage::F64(_) => {
                product_with_transposed(storage, layout, &self.weight)
            }
            _ => Err(candle_core::Error::Msg("frozen-linear runs in f32 or f64".into())),
        }
    }

    fn bwd(&self, arg: &Tensor, _result: &Tensor, gradient: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if let Some(matrix) = &self.matrix {
            matrix.sink.add(&matrix.name, gradient.t()?.matmul(&arg.detach())?)?;
        }
        Ok(Some(gradient.matmul(&self.weight)?))
    }
}

/// Square root of the mean of squares, as Llama's RMSNorm, from differentiable operations.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inverse = (mean_square + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inverse)?.broadcast_mul(weight)?)
}

/// Softmax over the last dimension; the maximum subtracted for stability is detached (softmax is
/// invariant to it, so its gradient is zero anyway).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exponentials = x.broadcast_sub(&max)?.exp()?;
    let sums = exponentials.sum_keepdim(D::Minus1)?;
    Ok(exponentials.broadcast_div(&sums)?)
}

/// `x * sigmoid(x)`.
fn silu(x: &Tensor) -> Result<Tensor> {
    let sigmoid = (x.neg()?.exp()? + 1.0)?.recip()?;
    Ok((x * sigmoid)?)
}

/// NeoX RoPE on `(batch, heads, length, head_dim)` with `cos`/`sin` of shape `(length, head_dim)`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// The RoPE inverse frequencies after scaling (as nstream-llm and transformers compute them).
fn inverse_frequencies(config: &LlamaConfig) -> Vec<f32> {
    let mut frequencies: Vec<f32> = (0..config.head_dim)
        .step_by(2)
        .map(|index| 1.0 / config.rope_theta.powf(index as f32 / config.head_dim as f32))
        .collect();
    match config.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => frequencies.iter_mut().for_each(|frequency| *frequency /= factor),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: original,
        } => {
            let low_wavelength = original / low_freq_factor;
            let high_wavelength = original / high_freq_factor;
            for frequency in frequencies.iter_mut() {
                let wavelength = 2.0 * std::f32::consts::PI / *frequency;
                if wavelength < high_wavelength {
                    continue;
                }
                if wavelength > low_wavelength {
                    *frequency /= factor;
                } else {
                    let smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    *frequency = (1.0 - smooth) * *frequency / factor + smooth * *frequency;
                }
            }
        }
        // Newer scalings nstream-llm may add are refused by from_hf_config before we get here.
        #[allow(unreachable_patterns)]
        _ => {}
    }
    frequencies
}

impl TrainModel {
    /// Builds the model from base weights (Hugging Face names). With `lora`, the base is frozen
    /// and the targets get A (Kaiming-uniform, as PEFT) and B (zeros) drawn from `seed`; without,
    /// every weight is trainable.
    pub fn new(
        config: LlamaConfig,
        weights: HashMap<String, Tensor>,
        lora: Option<LoraSpec>,
        seed: u64,
    ) -> Result<Self> {
        let embeddings = weights
            .get("model.embed_tokens.weight")
            .ok_or_else(|| Error::Tensor("the weights lack model.embed_tokens.weight".into()))?;
        let device = embeddings.device().clone();
        let dtype = embeddings.dtype();
        let mut weights = weights;
        let mut trainable = BTreeMap::new();
        let mut adapters = BTreeMap::new();
        match &lora {
            None => {
                let mut names: Vec<String> = weights.keys().cloned().collect();
                names.sort();
                for name in names {
                    let Some(tensor) = weights.remove(&name) else { continue };
                    let var = Var::from_tensor(&tensor)?;
                    weights.insert(name.clone(), var.as_tensor().clone());
                    trainable.insert(name, var);
                }
            }
            Some(spec) => {
                if spec.rank == 0 {
                    return Err(Error::setting("rank", "must be at least 1"));
                }
                let mut rng = fastrand::Rng::with_seed(seed);
                for layer in 0..config.layers {
                    for &module in &spec.targets {
                        let name = format!("model.layers.{layer}.{}.weight", module.path());
                        let weight =
                            weights.get(&name).ok_or_else(|| Error::Tensor(format!("the weights lack {name}")))?;
                        let (out, input) = weight.dims2()?;
                        // PEFT: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(in), 1/sqrt(in)).
                        let bound = 1.0 / (input as f64).sqrt();
                        let values: Vec<f32> =
                            (0..spec.rank * input).map(|_| ((rng.f64() * 2.0 - 1.0) * bound) as f32).collect();
                        let a =
                            Var::from_tensor(&Tensor::from_vec(values, (spec.rank, input), &device)?.to_dtype(dtype)?)?;
                        let b = Var::from_tensor(&Tensor::zeros((out, spec.rank), dtype, &device)?)?;
                        trainable.insert(lora_name(layer, module, nstream_peft::Part::A), a.clone());
                        trainable.insert(lora_name(layer, module, nstream_peft::Part::B), b.clone());
                        adapters.insert((layer, module), LoraWeights { a, b });
                    }
                }
            }
        }
        let inverse_frequencies = inverse_frequencies(&config);
        let fused = device.is_cpu() && matches!(dtype, DType::F32 | DType::F64);
        let anchor = Var::zeros(1, dtype, &device)?;
        Ok(Self {
            config,
            weights,
            trainable,
            lora: adapters,
            lora_spec: lora,
            inverse_frequencies,
            device,
            dtype,
            fused,
            level: Level::detected(),
            sink: GradientSink::default(),
            anchor,
        })
    }

    /// Chooses between the fused CPU kernels (the default on the CPU in f32 and f64) and the
    /// forward composed of candle's differentiable operations (the reference, and the path on
    /// other devices). The two compute the same function; the tests compare them.
    pub fn with_fused_kernels(mut self, fused: bool) -> Result<Self> {
        if fused && !(self.device.is_cpu() && matches!(self.dtype, DType::F32 | DType::F64)) {
            return Err(Error::Tensor("the fused training kernels run on the CPU in f32 or f64".into()));
        }
        self.fused = fused;
        Ok(self)
    }

    /// Whether the fused kernels hold the trained matrices (full fine-tuning on the CPU) and sum
    /// their gradients in the sink rather than in candle's store.
    fn kernels_hold_matrices(&self) -> bool {
        self.fused && self.lora_spec.is_none()
    }

    /// The matrix `name` as a kernel holds it for training: its values outside the graph (the
    /// same storage as the trainable tensor) and where its gradient goes.
    fn held(&self, name: &str, weight: &Tensor) -> (Tensor, TrainedMatrix) {
        (weight.detach(), TrainedMatrix { sink: self.sink.clone(), name: name.to_owned() })
    }

    /// Runs the backward pass of `loss` (from [`Self::summed_loss`]) and returns the gradient of
    /// each trainable tensor, in [`Self::trainable`]'s order; an error names a tensor no gradient
    /// reached.
    pub fn backward(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        // Whatever an earlier, failed pass left in the sink is not this loss's.
        self.sink.take()?;
        let store = loss.backward()?;
        let mut held = self.sink.take()?;
        self.trainable
            .iter()
            .map(|(name, var)| match held.remove(name) {
                Some(gradient) => Ok(gradient),
                None => store
                    .get(var.as_tensor())
                    .cloned()
                    .ok_or_else(|| Error::Tensor(format!("no gradient reached {name}"))),
            })
            .collect()
    }

    /// RMSNorm of `(rows, hidden)` rows.
    fn norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if self.fused {
            Ok(x.contiguous()?.apply_op2(weight, RmsNorm { eps, level: self.level })?)
        } else {
            rms_norm(x, weight, eps)
        }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable tensors by name (PEFT names for LoRA, Hugging Face names in full
    /// fine-tuning), in a fixed order.
    pub fn trainable(&self) -> &BTreeMap<String, Var> {
        &self.trainable
    }

    /// The LoRA settings, when this is a LoRA model.
    pub fn lora_spec(&self) -> Option<&LoraSpec> {
        self.lora_spec.as_ref()
    }

    /// The LoRA matrices.
    pub fn lora(&self) -> &BTreeMap<(usize, Module), LoraWeights> {
        &self.lora
    }

    /// The base (or fully trained) weights by Hugging Face name.
    pub fn weights(&self) -> &HashMap<String, Tensor> {
        &self.weights
    }

    /// Parameters in the model (base and adapters).
    pub fn parameter_count(&self) -> usize {
        let base: usize = self.weights.values().map(Tensor::elem_count).sum();
        let adapters: usize = self.lora.values().map(|pair| pair.a.elem_count() + pair.b.elem_count()).sum();
        base + adapters
    }

    /// Trainable parameters.
    pub fn trainable_count(&self) -> usize {
        self.trainable.values().map(|var| var.elem_count()).sum()
    }

    fn weight(&self, name: &str) -> Result<&Tensor> {
        self.weights.get(name).ok_or_else(|| Error::Tensor(format!("missing weight {name}")))
    }

    /// `x W^T (+ bias) + scale * dropout(x) A^T B^T` for a block's module; `x` is `(rows, in)`.
    fn linear(&self, x: &Tensor, layer: usize, module: Module, dropout: Option<u64>) -> Result<Tensor> {
        let prefix = format!("model.layers.{layer}.{}", module.path());
        let weight = self.weight(&format!("{prefix}.weight"))?;
        let bias = self.weights.get(&format!("{prefix}.bias"));
        let adapter = match (self.lora.get(&(layer, module)), &self.lora_spec) {
            (Some(pair), Some(spec)) => Some((pair, spec)),
            _ => None,
        };
        let mask = match (adapter, dropout) {
            (Some((_, spec)), Some(seed)) if spec.dropout > 0.0 => {
                // Inverted dropout with a mask drawn from a seed that depends only on the
                // step, micro-batch, layer and module: a resumed run draws the same masks.
                let mut rng = fastrand::Rng::with_seed(seed ^ ((layer as u64) << 32) ^ (module as u64) << 48);
                let keep = 1.0 - spec.dropout;
                let mask: Vec<f32> = (0..x.elem_count())
                    .map(|_| if rng.f64() < spec.dropout { 0.0 } else { (1.0 / keep) as f32 })
                    .collect();
                Some(Tensor::from_vec(mask, x.dims(), &self.device)?.to_dtype(self.dtype)?)
            }
            _ => None,
        };
        let mut y = match adapter {
            // One operation for the frozen product and the adapter (the base is frozen in LoRA).
            Some((pair, spec)) if self.fused => x.contiguous()?.apply_op3(
                pair.a.as_tensor(),
                pair.b.as_tensor(),
                LoraLinear { weight: weight.clone(), scale: spec.scale(), mask: mask.clone() },
            )?,
            _ => self.frozen_or_trained_product(x, &format!("{prefix}.weight"), weight)?,
        };
        if let Some(bias) = bias {
            y = y.broadcast_add(bias)?;
        }
        if let Some((pair, spec)) = adapter
            && !self.fused
        {
            let input = match &mask {
                Some(mask) => (x * mask)?,
                None => x.clone(),
            };
            let update = input.matmul(&pair.a.as_tensor().t()?)?.matmul(&pair.b.as_tensor().t()?)?;
            y = (y + (update * spec.scale())?)?;
        }
        Ok(y)
    }

    /// The final hidden states (after the last norm), `(batch * length, hidden)`.
    fn hidden_states(&self, batch: &Batch, dropout: Option<DropoutSeed>) -> Result<Tensor> {
        let config = &self.config;
        let (rows, length) = (batch.batch, batch.length);
        if rows == 0 || length == 0 {
            return Err(Error::Tensor("an empty batch".into()));
        }
        if let Some(&bad) = batch.tokens.iter().find(|&&token| token as usize >= config.vocab_size) {
            return Err(Error::Tensor(format!("token id {bad} is outside the vocabulary of {}", config.vocab_size)));
        }
        let (heads, kv_heads, head_dim) = (config.heads, config.kv_heads, config.head_dim);
        let group = heads / kv_heads;
        let ids = Tensor::from_vec(batch.tokens.clone(), rows * length, &self.device)?;
        let embeddings_name = "model.embed_tokens.weight";
        let embeddings = self.weight(embeddings_name)?;
        let mut hidden = if self.kernels_hold_matrices() {
            let (weight, matrix) = self.held(embeddings_name, embeddings);
            self.anchor.apply_op1(EmbeddingLookup { weight, ids: batch.tokens.clone(), matrix })?
        } else {
            embeddings.index_select(&ids, 0)?
        };

        // RoPE tables for positions 0..length (every row starts at position 0).
        let half = self.inverse_frequencies.len();
        let frequencies = Tensor::from_vec(self.inverse_frequencies.clone(), (1, half), &self.device)?;
        let positions =
            Tensor::arange(0u32, length as u32, &self.device)?.to_dtype(DType::F32)?.reshape((length, 1))?;
        let angles = positions.matmul(&frequencies)?;
        let angles = Tensor::cat(&[&angles, &angles], 1)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let mask: Vec<f32> = (0..length * length)
            .map(|index| if index % length > index / length { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (length, length), &self.device)?.to_dtype(self.dtype)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let seed = |layer: usize, module: Module| {
            dropout.map(|DropoutSeed(seed)| seed.wrapping_add((layer * 8 + module as usize) as u64))
        };

        let (cos_table, sin_table) = if self.fused {
            (cos.flatten_all()?.to_vec1::<f32>()?, sin.flatten_all()?.to_vec1::<f32>()?)
        } else {
            (Vec::new(), Vec::new())
        };
        let (cos, sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);

        for layer in 0..config.layers {
            let name = |part: &str| format!("model.layers.{layer}.{part}");
            let normed = self.norm(&hidden, self.weight(&name("input_layernorm.weight"))?)?;
            let queries = self.linear(&normed, layer, Module::QProj, seed(layer, Module::QProj))?;
            let keys = self.linear(&normed, layer, Module::KProj, seed(layer, Module::KProj))?;
            let values = self.linear(&normed, layer, Module::VProj, seed(layer, Module::VProj))?;
            let attended = if self.fused {
                let attention = Attention {
                    batch: rows,
                    length,
                    heads,
                    kv_heads,
                    head_dim,
                    scale,
                    cos: cos_table.clone(),
                    sin: sin_table.clone(),
                    level: self.level,
                };
                queries.contiguous()?.apply_op3(&keys.contiguous()?, &values.contiguous()?, attention)?
            } else {
                let split = |x: Tensor, count: usize| -> Result<Tensor> {
                    Ok(x.reshape((rows, length, count, head_dim))?.transpose(1, 2)?.contiguous()?)
                };
                let queries = rope(&split(queries, heads)?, &cos, &sin)?;
                let keys = rope(&split(keys, kv_heads)?, &cos, &sin)?;
                let values = split(values, kv_heads)?;
                // Grouped-query attention: each key/value head serves `group` query heads.
                let repeat = |x: Tensor| -> Result<Tensor> {
                    if group == 1 {
                        return Ok(x);
                    }
                    Ok(x.unsqueeze(2)?
                        .broadcast_as((rows, kv_heads, group, length, head_dim))?
                        .reshape((rows, heads, length, head_dim))?)
                };
                let (keys, values) = (repeat(keys)?, repeat(values)?);
                let scores = (queries.matmul(&keys.t()?)? * scale)?.broadcast_add(&mask)?;
                let weights = softmax_last_dim(&scores)?;
                weights.matmul(&values)?.transpose(1, 2)?.contiguous()?.reshape((rows * length, heads * head_dim))?
            };
            hidden = (self.linear(&attended, layer, Module::OProj, seed(layer, Module::OProj))? + &hidden)?;
            let normed = self.norm(&hidden, self.weight(&name("post_attention_layernorm.weight"))?)?;
            let gate = self.linear(&normed, layer, Module::GateProj, seed(layer, Module::GateProj))?;
            let up = self.linear(&normed, layer, Module::UpProj, seed(layer, Module::UpProj))?;
            let activated = if self.fused {
                gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu { level: self.level })?
            } else {
                (silu(&gate)? * up)?
            };
            hidden = (self.linear(&activated, layer, Module::DownProj, seed(layer, Module::DownProj))? + &hidden)?;
        }
        self.norm(&hidden, self.weight("model.norm.weight")?)
    }

    /// `x W^T` for the weight `name`: through [`HeldLinear`] when `W` is frozen (LoRA) on the
    /// CPU or the kernels hold it, else candle's product (whose backward computes `W`'s gradient
    /// too).
    fn frozen_or_trained_product(&self, x: &Tensor, name: &str, weight: &Tensor) -> Result<Tensor> {
        if self.kernels_hold_matrices() {
            let (weight, matrix) = self.held(name, weight);
            Ok(x.contiguous()?.apply_op1(HeldLinear { weight, matrix: Some(matrix) })?)
        } else if self.lora_spec.is_some() && self.device.is_cpu() && matches!(self.dtype, DType::F32 | DType::F64) {
            Ok(x.contiguous()?.apply_op1(HeldLinear { weight: weight.clone(), matrix: None })?)
        } else {
            Ok(x.matmul(&weight.t()?)?)
        }
    }

    /// The output head's name and matrix (the embeddings' when they are tied).
    fn output_head(&self) -> Result<(&'static str, &Tensor)> {
        match self.weights.get("lm_head.weight") {
            Some(head) => Ok(("lm_head.weight", head)),
            None => Ok(("model.embed_tokens.weight", self.weight("model.embed_tokens.weight")?)),
        }
    }

    /// The logits at every position, `(batch, length, vocab)`, in the model's dtype.
    pub fn logits(&self, batch: &Batch) -> Result<Tensor> {
        let hidden = self.hidden_states(batch, None)?;
        let logits = hidden.matmul(&self.output_head()?.1.t()?)?;
        Ok(logits.reshape((batch.batch, batch.length, self.config.vocab_size))?)
    }

    /// The summed negative log-likelihood of the batch's targets (a scalar tensor that can be
    /// differentiated), computing the output head only at the target positions.
    pub fn summed_loss(&self, batch: &Batch, dropout: Option<DropoutSeed>) -> Result<Tensor> {
        if batch.targets.is_empty() {
            return Err(Error::Tensor("a batch without target tokens".into()));
        }
        let hidden = self.hidden_states(batch, dropout)?;
        let rows = Tensor::from_vec(batch.target_rows.clone(), batch.target_rows.len(), &self.device)?;
        let selected = hidden.index_select(&rows, 0)?;
        let (head_name, head) = self.output_head()?;
        if self.fused {
            let (head, matrix) = if self.kernels_hold_matrices() {
                let (head, matrix) = self.held(head_name, head);
                (head, Some(matrix))
            } else {
                (head.clone(), None)
            };
            let loss = OutputLoss {
                weight: head.clone(),
                matrix,
                targets: batch.targets.clone(),
                logits: std::sync::Mutex::new(None),
                level: self.level,
            };
            return Ok(selected.contiguous()?.apply_op2(&head, loss)?.sum_all()?);
        }
        let mut logits = self.frozen_or_trained_product(&selected, head_name, head)?;
        // The loss of a half-precision model in f32 (bf16's 8 bits of mantissa would round the
        // log-sum-exp of a 50k vocabulary).
        if matches!(self.dtype, DType::BF16 | DType::F16) {
            logits = logits.to_dtype(DType::F32)?;
        }
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let targets = Tensor::from_vec(batch.targets.clone(), (batch.targets.len(), 1), &self.device)?;
        let picked = shifted.gather(&targets, 1)?;
        Ok((log_sum - picked)?.sum_all()?)
    }

    /// The LoRA matrices as PEFT's adapter (f32).
    pub fn adapter(
        &self,
        base_model: Option<String>,
        revision: Option<String>,
    ) -> Result<Option<nstream_peft::Adapter>> {
        self.adapter_from(base_model, revision, None)
    }

    /// [`Self::adapter`], with the values of `master` (one f32 vector per trainable tensor, in
    /// [`Self::trainable`]'s order: the optimiser's master copy) instead of the model's own,
    /// which are rounded when the model runs in bf16.
    pub fn adapter_from(
        &self,
        base_model: Option<String>,
        revision: Option<String>,
        master: Option<&[Vec<f32>]>,
    ) -> Result<Option<nstream_peft::Adapter>> {
        let Some(spec) = &self.lora_spec else { return Ok(None) };
        let positions: BTreeMap<&str, usize> =
            self.trainable.keys().enumerate().map(|(position, name)| (name.as_str(), position)).collect();
        let tensor =
            |var: &Var, layer: usize, module: Module, part: nstream_peft::Part| -> Result<nstream_peft::Tensor> {
                let name = lora_name(layer, module, part);
                match (master, positions.get(name.as_str())) {
                    (Some(master), Some(&position))
                        if master.get(position).is_some_and(|v| v.len() == var.elem_count()) =>
                    {
                        Ok(nstream_peft::Tensor::new(var.dims().to_vec(), master[position].clone()))
                    }
                    _ => to_peft(var.as_tensor()),
                }
            };
        let mut config = nstream_peft::LoraConfig::new(spec.rank, spec.alpha, &spec.targets);
        config.lora_dropout = spec.dropout;
        config.use_rslora = spec.rslora;
        config.base_model_name_or_path = base_model;
        config.revision = revision;
        let mut pairs = BTreeMap::new();
        for (&(layer, module), weights) in &self.lora {
            pairs.insert(
                (layer, module),
                nstream_peft::LoraPair {
                    a: tensor(&weights.a, layer, module, nstream_peft::Part::A)?,
                    b: tensor(&weights.b, layer, module, nstream_peft::Part::B)?,
                },
            );
        }
        Ok(Some(nstream_peft::Adapter { config, pairs }))
    }

    /// The base weights with `scale * B A` added to every adapted module (Hugging Face names).
    pub fn merged_weights(&self) -> Result<BTreeMap<String, nstream_peft::Tensor>> {
        let mut merged = BTreeMap::new();
        for (name, tensor) in &self.weights {
            merged.insert(name.clone(), to_peft(tensor)?);
        }
        if let Some(spec) = &self.lora_spec {
            for (&(layer, module), pair) in &self.lora {
                let name = format!("model.layers.{layer}.{}.weight", module.path());
                let weight = self.weight(&name)?;
                let update = (pair.b.as_tensor().matmul(pair.a.as_tensor())? * spec.scale())?;
                merged.insert(name, to_peft(&(weight + update)?)?);
            }
        }
        Ok(merged)
    }
}

/// The trainable name of a LoRA matrix (its PEFT tensor name).
pub fn lora_name(layer: usize, module: Module, part: nstream_peft::Part) -> String {
    nstream_peft::tensor_name(layer, module, part)
}

/// A tensor as nstream-peft's f32 array.
pub fn to_peft(tensor: &Tensor) -> Result<nstream_peft::Tensor> {
    let data = tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(nstream_peft::Tensor::new(tensor.dims().to_vec(), data))
}

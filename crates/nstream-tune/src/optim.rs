//! AdamW with f32 state, the learning-rate schedule and gradient clipping, as PyTorch's
//! `torch.optim.AdamW`, transformers' `get_cosine_schedule_with_warmup` and
//! `torch.nn.utils.clip_grad_norm_` compute them, so that runs agree with theirs step for step.

use rayon::prelude::*;

/// AdamW's hyper-parameters.
///
/// `#[non_exhaustive]`: start from [`AdamWConfig::default`] (PyTorch's defaults, no weight decay)
/// and use the `with_*` methods.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamWConfig {
    /// Sets β₁ and β₂.
    pub fn with_betas(mut self, beta1: f32, beta2: f32) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }

    /// Sets ε.
    pub fn with_epsilon(mut self, epsilon: f32) -> Self {
        self.epsilon = epsilon;
        self
    }

    /// Sets the decoupled weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

/// The moments of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Moments {
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

/// AdamW over flat f32 parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// The hyper-parameters.
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    /// One entry per parameter, in the model's trainable order.
    pub moments: Vec<Moments>,
}

impl AdamW {
    /// A fresh optimiser for parameters of the given sizes.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        let moments = sizes.iter().map(|&size| Moments { m: vec![0.0; size], v: vec![0.0; size] }).collect();
        Self { config, step: 0, moments }
    }

    /// One step at `learning_rate`: updates `parameters` in place from `gradients`.
    pub fn update(&mut self, learning_rate: f32, parameters: &mut [Vec<f32>], gradients: &[Vec<f32>]) {
        let step = self.begin_step(learning_rate);
        for ((parameter, gradient), moments) in parameters.iter_mut().zip(gradients).zip(&mut self.moments) {
            step.apply(moments, parameter, gradient, 1.0);
        }
    }

    /// Counts one more step and returns its coefficients; apply them to every parameter with
    /// [`AdamWStep::apply`] (with that parameter's entry of [`AdamW::moments`]).
    pub fn begin_step(&mut self, learning_rate: f32) -> AdamWStep {
        self.step += 1;
        let AdamWConfig { beta1, beta2, epsilon, weight_decay } = self.config;
        let step = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(step);
        let bias_correction2 = 1.0 - beta2.powi(step);
        AdamWStep {
            beta1,
            beta2,
            epsilon,
            step_size: learning_rate / bias_correction1,
            bias_correction2_sqrt: bias_correction2.sqrt(),
            decay: 1.0 - learning_rate * weight_decay,
        }
    }
}

/// Elements per parallel task of the optimiser's passes: large enough that rayon's overhead
/// vanishes, small enough that both cores get work on the smallest parameters (a norm's weight).
const ELEMENTS_PER_TASK: usize = 1 << 16;

/// The coefficients of one AdamW step (from [`AdamW::begin_step`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    decay: f32,
}

impl AdamWStep {
    /// Updates one parameter in place from its gradient times `gradient_scale` (the clipping
    /// coefficient, 1 when not clipped), in one pass over the values, the gradient and the
    /// moments, spread over rayon's threads. Each element's arithmetic is PyTorch's
    /// `torch.optim.AdamW` (single-tensor form) in the same order.
    pub fn apply(&self, moments: &mut Moments, parameter: &mut [f32], gradient: &[f32], gradient_scale: f32) {
        let Self { beta1, beta2, epsilon, step_size, bias_correction2_sqrt, decay } = *self;
        let scaled = gradient_scale != 1.0;
        parameter
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(gradient.par_chunks(ELEMENTS_PER_TASK))
            .zip(moments.m.par_chunks_mut(ELEMENTS_PER_TASK).zip(moments.v.par_chunks_mut(ELEMENTS_PER_TASK)))
            .for_each(|((parameter, gradient), (m, v))| {
                let values = parameter.iter_mut().zip(gradient).zip(m.iter_mut().zip(v.iter_mut()));
                for ((value, &g), (m, v)) in values {
                    let g = if scaled { g * gradient_scale } else { g };
                    *value *= decay;
                    *m = *m * beta1 + (1.0 - beta1) * g;
                    *v = *v * beta2 + (1.0 - beta2) * g * g;
                    let denominator = v.sqrt() / bias_correction2_sqrt + epsilon;
                    *value -= step_size * *m / denominator;
                }
            });
    }
}

/// Linear warmup from 0 then cosine decay to 0 (transformers' `get_cosine_schedule_with_warmup`):
/// the rate of the step taken after `completed` steps out of `total`.
pub fn learning_rate(peak: f64, completed: usize, warmup: usize, total: usize) -> f64 {
    if completed < warmup {
        return peak * completed as f64 / warmup.max(1) as f64;
    }
    let progress = (completed - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

/// The global L2 norm of the gradients (PyTorch's `clip_grad_norm_` before it clips), summed in
/// f64 over fixed-size pieces in parallel (the same pieces, so the same value, on every run).
pub fn global_norm(gradients: &[&[f32]]) -> f32 {
    let squares: f64 = gradients
        .iter()
        .map(|gradient| {
            let pieces: Vec<f64> = gradient
                .par_chunks(ELEMENTS_PER_TASK)
                .map(|piece| piece.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>())
                .collect();
            pieces.into_iter().sum::<f64>()
        })
        .sum();
    squares.sqrt() as f32
}

/// The factor that brings a gradient of global norm `norm` down to `max_norm` (PyTorch's
/// `clip_grad_norm_`): 1 when it is not above (or `max_norm` is 0, no clipping).
pub fn clip_coefficient(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 }
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_global_norm(gradients: &mut [Vec<f32>], max_norm: f32) -> f32 {
    let norm = global_norm(&gradients.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let coefficient = clip_coefficient(norm, max_norm);
    if coefficient < 1.0 {
        gradients.iter_mut().flatten().for_each(|g| *g *= coefficient);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_linearly_then_decays_to_zero() {
        assert_eq!(learning_rate(1.0, 0, 4, 20), 0.0);
        assert_eq!(learning_rate(1.0, 2, 4, 20), 0.5);
        assert_eq!(learning_rate(1.0, 4, 4, 20), 1.0);
        assert!((learning_rate(1.0, 12, 4, 20) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, 20, 4, 20).abs() < 1e-12);
        assert_eq!(learning_rate(2.0, 0, 0, 10), 2.0);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_the_learning_rate() {
        // After one step m̂ = g and v̂ = g², so the update is lr * g / (|g| + ε) ≈ lr * sign(g).
        let mut optimizer = AdamW::new(AdamWConfig::default(), &[3]);
        let mut parameters = vec![vec![1.0f32, 2.0, 3.0]];
        optimizer.update(0.1, &mut parameters, &[vec![0.5, -2.0, 0.0]]);
        let expected = [0.9f32, 2.1, 3.0];
        for (value, expected) in parameters[0].iter().zip(expected) {
            assert!((value - expected).abs() < 1e-6, "{value} vs {expected}");
        }
        // Decoupled weight decay shrinks the weight by lr * decay first.
        let mut optimizer = AdamW::new(AdamWConfig { weight_decay: 0.5, ..AdamWConfig::default() }, &[1]);
        let mut parameters = vec![vec![2.0f32]];
        optimizer.update(0.1, &mut parameters, &[vec![0.0]]);
        assert!((parameters[0][0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_max_norm_only_above_it() {
        let mut gradients = vec![vec![3.0f32], vec![4.0]];
        assert_eq!(clip_global_norm(&mut gradients, 1.0), 5.0);
        assert!((gradients[0][0] - 0.6).abs() < 1e-6 && (gradients[1][0] - 0.8).abs() < 1e-6);
        let mut small = vec![vec![0.3f32, 0.4]];
        clip_global_norm(&mut small, 1.0);
        assert_eq!(small, vec![vec![0.3f32, 0.4]]);
    }
}

//! AdamW with f32 state, the learning-rate schedule and gradient clipping, as PyTorch's
//! `torch.optim.AdamW`, transformers' `get_cosine_schedule_with_warmup` and
//! `torch.nn.utils.clip_grad_norm_` compute them, so that runs agree with theirs step for step.

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
        self.step += 1;
        let AdamWConfig { beta1, beta2, epsilon, weight_decay } = self.config;
        let step = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(step);
        let bias_correction2 = 1.0 - beta2.powi(step);
        let step_size = learning_rate / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        let decay = 1.0 - learning_rate * weight_decay;
        for ((parameter, gradient), moments) in parameters.iter_mut().zip(gradients).zip(&mut self.moments) {
            let values = parameter.iter_mut().zip(gradient).zip(moments.m.iter_mut().zip(moments.v.iter_mut()));
            for ((value, &g), (m, v)) in values {
                *value *= decay;
                *m = *m * beta1 + (1.0 - beta1) * g;
                *v = *v * beta2 + (1.0 - beta2) * g * g;
                let denominator = v.sqrt() / bias_correction2_sqrt + epsilon;
                *value -= step_size * *m / denominator;
            }
        }
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

/// Scales the gradients so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_global_norm(gradients: &mut [Vec<f32>], max_norm: f32) -> f32 {
    let norm = gradients.iter().flatten().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt() as f32;
    if max_norm > 0.0 {
        let coefficient = (max_norm / (norm + 1e-6)).min(1.0);
        if coefficient < 1.0 {
            gradients.iter_mut().flatten().for_each(|g| *g *= coefficient);
        }
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

//! Choosing the next token from logits, and finding stop strings in streamed text. Pure logic.
//!
//! The order follows the common servers (vLLM, llama.cpp, Hugging Face): penalties and
//! `logit_bias` on the raw logits, then greedy when the temperature is 0, else temperature,
//! top-k, softmax, top-p and a draw from a seeded generator. The generator is a small
//! SplitMix64 owned by each sequence, so a seed reproduces a completion whatever else the server
//! is running and whatever version of a `rand` crate is linked.

use std::collections::HashMap;

/// The sampling settings of one sequence (already validated by the request types).
///
/// `#[non_exhaustive]`: start from [`SamplingParams::default`] (OpenAI's defaults) or
/// [`SamplingParams::greedy`] and use the `with_*` methods.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SamplingParams {
    /// 0 means greedy (deterministic); OpenAI's default is 1.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// Seed of the generator; `None` draws one.
    pub seed: Option<u64>,
    /// OpenAI presence penalty: subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted per occurrence of a generated token.
    pub frequency_penalty: f32,
    /// Hugging Face repetition penalty over prompt and generated tokens (1 = off): positive
    /// logits are divided by it, negative ones multiplied.
    pub repetition_penalty: f32,
    /// Added to the logits of the given token ids (-100 bans, 100 forces).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Sets the temperature (0: greedy).
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets the nucleus mass, in (0, 1].
    pub fn with_top_p(mut self, top_p: f32) -> Self {
        self.top_p = top_p;
        self
    }

    /// Keeps only the `top_k` most likely tokens (`None`: all).
    pub fn with_top_k(mut self, top_k: Option<usize>) -> Self {
        self.top_k = top_k;
        self
    }

    /// Seeds the generator (`None`: a fresh seed per sequence).
    pub fn with_seed(mut self, seed: Option<u64>) -> Self {
        self.seed = seed;
        self
    }

    /// Sets OpenAI's presence and frequency penalties.
    pub fn with_penalties(mut self, presence_penalty: f32, frequency_penalty: f32) -> Self {
        self.presence_penalty = presence_penalty;
        self.frequency_penalty = frequency_penalty;
        self
    }

    /// Sets the Hugging Face repetition penalty (1: off).
    pub fn with_repetition_penalty(mut self, repetition_penalty: f32) -> Self {
        self.repetition_penalty = repetition_penalty;
        self
    }

    /// Adds `bias` to the logits of the given token ids.
    pub fn with_logit_bias(mut self, logit_bias: Vec<(u32, f32)>) -> Self {
        self.logit_bias = logit_bias;
        self
    }
}

/// SplitMix64: tiny, fast, good enough statistically for sampling, and stable forever.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A seed from the clock and the process's hasher keys, for requests without one.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.finish()
}

/// One sequence's sampler: its settings, its generator and the counts the penalties need.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Occurrences of each generated token.
    generated: HashMap<u32, u32>,
    /// Tokens seen in the prompt or generated, for the repetition penalty.
    seen: Vec<u32>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt` (used by the repetition penalty).
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(random_seed);
        let mut seen = if params.repetition_penalty == 1.0 { Vec::new() } else { prompt.to_vec() };
        seen.sort_unstable();
        seen.dedup();
        Self { params, rng: SplitMix64(seed), generated: HashMap::new(), seen }
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the next token is simply the largest logit (temperature 0, no penalty, no bias),
    /// so the caller may pick it where the logits are (on the GPU) and [`Sampler::record`] it.
    pub fn is_plain_greedy(&self) -> bool {
        let params = &self.params;
        params.temperature <= 0.0
            && params.repetition_penalty == 1.0
            && params.presence_penalty == 0.0
            && params.frequency_penalty == 0.0
            && params.logit_bias.is_empty()
    }

    /// Picks the next token from `logits` (modified in place) and records it for the penalties.
    /// Returns 0 only if `logits` is empty.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let token = if self.params.temperature <= 0.0 { argmax(logits) } else { self.draw(logits) };
        self.record(token);
        token
    }

    /// Records a token chosen elsewhere (for example forced by a caller) for the penalties.
    pub fn record(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0
            && let Err(position) = self.seen.binary_search(&token)
        {
            self.seen.insert(position, token);
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let params = &self.params;
        if params.repetition_penalty != 1.0 {
            for &token in &self.seen {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / params.repetition_penalty
                    } else {
                        *logit * params.repetition_penalty
                    };
                }
            }
        }
        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit -= params.presence_penalty + params.frequency_penalty * count as f32;
                }
            }
        }
        for &(token, bias) in &params.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let temperature = self.params.temperature;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, logit)| logit.is_finite() || **logit == f32::INFINITY)
            .map(|(token, &logit)| (token as u32, logit / temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        // Highest first; equal logits keep the lower id first so the order is deterministic.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(top_k) = self.params.top_k {
            candidates.truncate(top_k.max(1));
        }
        let max = candidates[0].1;
        let mut probabilities: Vec<f64> =
            candidates
                .iter()
                .map(|&(_, logit)| {
                    if max == f32::INFINITY { f64::from(u8::from(logit == max)) } else { f64::from(logit - max).exp() }
                })
                .collect();
        let total: f64 = probabilities.iter().sum();
        probabilities.iter_mut().for_each(|probability| *probability /= total);
        let top_p = f64::from(self.params.top_p);
        if top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probabilities
                .iter()
                .position(|probability| {
                    mass += probability;
                    mass >= top_p
                })
                .map_or(probabilities.len(), |index| index + 1);
            probabilities.truncate(keep);
        }
        let kept: f64 = probabilities.iter().sum();
        let mut target = self.rng.next_f64() * kept;
        for (index, probability) in probabilities.iter().enumerate() {
            if target < *probability {
                return candidates[index].0;
            }
            target -= probability;
        }
        candidates[probabilities.len() - 1].0
    }
}

/// The index of the largest logit, the lowest index on ties; NaN never wins. 0 when empty.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (index, &logit) in logits.iter().enumerate() {
        if logit.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, value)| logit > value) {
            best = Some((index, logit));
        }
    }
    best.map_or(0, |(index, _)| index as u32)
}

/// Finds stop strings in streamed text and holds back what might be the start of one.
///
/// Feed each decoded piece to [`StopMatcher::push`]; it returns the text safe to send now and
/// whether a stop string was found (the text before it is returned, the stop string is not).
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty ones are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|stop| !stop.is_empty()).collect(), pending: String::new() }
    }

    /// Adds `text`; returns `(text to emit, stopped)`.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        let earliest = self.stops.iter().filter_map(|stop| self.pending.find(stop.as_str())).min();
        if let Some(position) = earliest {
            let emitted = self.pending[..position].to_owned();
            self.pending.clear();
            return (emitted, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for stop in &self.stops {
            for (length, _) in stop.char_indices().skip(1) {
                if length > hold && self.pending.ends_with(&stop[..length]) {
                    hold = length;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let emitted = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (emitted, false)
    }

    /// What is still held back, once generation has ended without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 3.0, -1.0]
    }

    #[test]
    fn greedy_picks_the_lowest_index_among_the_best() {
        let mut sampler = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(sampler.sample(&mut logits()), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_temperature_spreads_them() {
        let params = SamplingParams { temperature: 1.5, seed: Some(7), ..SamplingParams::default() };
        let run = |params: &SamplingParams| -> Vec<u32> {
            let mut sampler = Sampler::new(params.clone(), &[]);
            (0..64).map(|_| sampler.sample(&mut logits())).collect()
        };
        assert_eq!(run(&params), run(&params));
        let other = run(&SamplingParams { seed: Some(8), ..params.clone() });
        assert_ne!(run(&params), other);
        let distinct: std::collections::BTreeSet<u32> = run(&params).into_iter().collect();
        assert!(distinct.len() >= 3, "{distinct:?}");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let top_k = SamplingParams { temperature: 1.0, top_k: Some(2), seed: Some(1), ..SamplingParams::default() };
        let mut sampler = Sampler::new(top_k, &[]);
        for _ in 0..100 {
            assert!([1, 3].contains(&sampler.sample(&mut logits())));
        }
        // Token 0 holds ~97% of the mass: top_p 0.9 keeps it alone.
        let top_p = SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(1), ..SamplingParams::default() };
        let mut sampler = Sampler::new(top_p, &[]);
        for _ in 0..100 {
            assert_eq!(sampler.sample(&mut [10.0, 6.0, 5.0]), 0);
        }
    }

    #[test]
    fn penalties_and_bias_change_the_greedy_choice() {
        // Frequency: token 1 was generated once, so its 3.0 drops to 2.5, below token 3.
        let params = SamplingParams { frequency_penalty: 0.5, ..SamplingParams::greedy() };
        let mut sampler = Sampler::new(params, &[]);
        sampler.record(1);
        assert_eq!(sampler.sample(&mut logits()), 3);

        let params = SamplingParams { presence_penalty: 2.0, ..SamplingParams::greedy() };
        let mut sampler = Sampler::new(params, &[]);
        sampler.record(1);
        sampler.record(3);
        assert_eq!(sampler.sample(&mut logits()), 2);

        // Repetition penalty covers the prompt: 3.0 / 2 = 1.5 < 2.0.
        let params = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        let mut sampler = Sampler::new(params, &[1, 3]);
        assert_eq!(sampler.sample(&mut logits()), 2);
        // Negative logits get more negative, not less.
        let mut negative = vec![-1.0, -1.5];
        let mut sampler = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() }, &[0]);
        assert_eq!(sampler.sample(&mut negative), 1);

        let params = SamplingParams { logit_bias: vec![(4, 100.0), (99, 5.0)], ..SamplingParams::greedy() };
        assert_eq!(Sampler::new(params, &[]).sample(&mut logits()), 4);
        let params = SamplingParams { logit_bias: vec![(1, -100.0), (3, -100.0)], ..SamplingParams::greedy() };
        assert_eq!(Sampler::new(params, &[]).sample(&mut logits()), 2);
    }

    #[test]
    fn sampling_survives_degenerate_logits() {
        let mut sampler = Sampler::new(SamplingParams { seed: Some(3), ..SamplingParams::default() }, &[]);
        assert_eq!(sampler.sample(&mut [f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(sampler.sample(&mut [f32::NAN, 1.0]), 1);
        assert_eq!(sampler.sample(&mut [0.0, f32::INFINITY]), 1);
        assert_eq!(sampler.sample(&mut []), 0);
    }

    #[test]
    fn stop_strings_are_cut_and_their_prefixes_held_back() {
        let mut matcher = StopMatcher::new(vec!["###".into(), "\n\n".into()]);
        assert_eq!(matcher.push("Hello #"), ("Hello ".into(), false));
        assert_eq!(matcher.push("# wor"), ("## wor".into(), false));
        assert_eq!(matcher.push("ld\n"), ("ld".into(), false));
        assert_eq!(matcher.push("\nafter"), (String::new(), true));

        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("abcEN"), ("abc".into(), false));
        assert_eq!(matcher.finish(), "EN");

        let mut matcher = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(matcher.push("café"), ("caf".into(), false));
        assert_eq!(matcher.push("!x"), (String::new(), true));

        let mut none = StopMatcher::new(vec![String::new()]);
        assert_eq!(none.push("abc"), ("abc".into(), false));
    }
}

//! Decode attention of one query head over its cached keys and values.

/// `output = softmax(query · keysᵀ · scale) · values` for one head: `keys` and `values` hold
/// the cached rows of `query.len()` values each, `output` is `query.len()` long and is
/// overwritten. The sums run in a fixed order whatever else runs, so the same inputs give the
/// same bits (seeded sampling reproduces under any load).
pub fn attend(query: &[f32], keys: &[f32], values: &[f32], scale: f32, output: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::avx512_available() {
        crate::avx512::attend(query, keys, values, scale, output);
        return;
    }
    attend_portable(query, keys, values, scale, output);
}

/// [`attend`]'s body: plain loops that the compiler vectorises for whichever target features
/// the function it is inlined into is compiled with.
#[inline(always)]
pub(crate) fn attend_portable(query: &[f32], keys: &[f32], values: &[f32], scale: f32, output: &mut [f32]) {
    let head_dim = query.len();
    output.fill(0.0);
    if head_dim == 0 {
        return;
    }
    // Plain loops rather than iterator adaptors: those may not be inlined, and then do not get
    // the target features of the function this body is compiled into.
    let mut scores = vec![0f32; keys.len() / head_dim];
    for (score, key) in scores.iter_mut().zip(keys.chunks_exact(head_dim)) {
        *score = dot(query, key) * scale;
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for score in scores.iter_mut() {
        *score = (*score - max).exp();
        sum += *score;
    }
    for (weight, value) in scores.iter().zip(values.chunks_exact(head_dim)) {
        let weight = weight / sum;
        for (out, value) in output.iter_mut().zip(value) {
            *out += weight * value;
        }
    }
}

/// A dot product in 16 independent lanes (one 512-bit register, or several narrower ones),
/// summed in a fixed order.
#[inline(always)]
fn dot(left: &[f32], right: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (left_chunks, left_tail) = left.as_chunks::<16>();
    let (right_chunks, right_tail) = right.as_chunks::<16>();
    for (a, b) in left_chunks.iter().zip(right_chunks) {
        for lane in 0..16 {
            lanes[lane] += a[lane] * b[lane];
        }
    }
    let mut total = 0f32;
    for lane in lanes {
        total += lane;
    }
    for (a, b) in left_tail.iter().zip(right_tail) {
        total += a * b;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_weights_values_by_the_softmax_of_the_scores() {
        let query = [1.0, 0.0, 2.0, 0.5];
        let keys = [1.0, 1.0, 0.0, 0.0, /* */ 0.0, 0.0, 1.0, 1.0, /* */ -1.0, 0.0, 0.0, 2.0];
        let values = [1.0, 2.0, 3.0, 4.0, /* */ -1.0, 0.0, 1.0, 0.0, /* */ 0.5, 0.5, 0.5, 0.5];
        let scale = 0.5;
        let scores: Vec<f64> = keys
            .chunks(4)
            .map(|key| key.iter().zip(&query).map(|(k, q)| (k * q) as f64).sum::<f64>() * scale as f64)
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|score| (score - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut output = [f32::NAN; 4];
        attend(&query, &keys, &values, scale, &mut output);
        for (index, out) in output.iter().enumerate() {
            let expected: f64 =
                weights.iter().zip(values.chunks(4)).map(|(weight, value)| weight / total * value[index] as f64).sum();
            assert!((*out as f64 - expected).abs() < 1e-6, "{index}: {out} vs {expected}");
        }
        let mut portable = [f32::NAN; 4];
        attend_portable(&query, &keys, &values, scale, &mut portable);
        for (a, b) in output.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-6);
        }
        // Same inputs, same bits.
        let mut again = [0.0; 4];
        attend(&query, &keys, &values, scale, &mut again);
        assert_eq!(output, again);
    }

    #[test]
    fn a_long_head_matches_the_portable_loops() {
        let mut rng = fastrand::Rng::with_seed(3);
        let head_dim = 64;
        let length = 301;
        let query: Vec<f32> = (0..head_dim).map(|_| rng.f32() - 0.5).collect();
        let keys: Vec<f32> = (0..head_dim * length).map(|_| rng.f32() - 0.5).collect();
        let values: Vec<f32> = (0..head_dim * length).map(|_| rng.f32() - 0.5).collect();
        let mut output = vec![0.0; head_dim];
        let mut portable = vec![0.0; head_dim];
        attend(&query, &keys, &values, 0.125, &mut output);
        attend_portable(&query, &keys, &values, 0.125, &mut portable);
        for (a, b) in output.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

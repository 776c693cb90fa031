//! Decode attention of one query head over its cached keys and values.

/// Decode attention of the query heads that share one key/value head (grouped-query attention):
/// for each query `q` of `head_dim` values in `queries`, `softmax(q · keysᵀ · scale) · values`
/// into the same place of `output` (as long as `queries`, overwritten). `keys` and `values` hold
/// the cached rows, `head_dim` values each; each row is read once for the whole group. Every
/// query's sums run in a fixed order whatever else runs or is in the group, so the same inputs
/// give the same bits (seeded sampling reproduces under any load).
pub fn attend(queries: &[f32], keys: &[f32], values: &[f32], head_dim: usize, scale: f32, output: &mut [f32]) {
    attend_at(crate::cpu_level().unwrap_or(crate::CpuLevel::Portable), queries, keys, values, head_dim, scale, output);
}

/// [`attend`] compiled for `level` (or the CPU's level where that is lower). Every level gives
/// the same bits: the sums run in the same order, only wider at a time.
pub fn attend_at(
    level: crate::CpuLevel,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    scale: f32,
    output: &mut [f32],
) {
    match level.min(crate::CpuLevel::detected()) {
        #[cfg(target_arch = "x86_64")]
        crate::CpuLevel::Avx512Vnni => crate::avx512::attend(queries, keys, values, head_dim, scale, output),
        #[cfg(target_arch = "x86_64")]
        crate::CpuLevel::Avx2 => crate::avx2::attend(queries, keys, values, head_dim, scale, output),
        _ => attend_portable(queries, keys, values, head_dim, scale, output),
    }
}

/// [`attend`]'s body: plain loops (not iterator adaptors, which may not be inlined and then do
/// not get the target features of the function this body is compiled into) that the compiler
/// vectorises for whichever features that function has.
#[inline(always)]
pub(crate) fn attend_portable(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    scale: f32,
    output: &mut [f32],
) {
    output.fill(0.0);
    if head_dim == 0 {
        return;
    }
    let group = queries.len() / head_dim;
    let length = keys.len() / head_dim;
    let mut scores = vec![0f32; group * length];
    for (position, key) in keys.chunks_exact(head_dim).enumerate() {
        for (query_index, query) in queries.chunks_exact(head_dim).enumerate() {
            scores[query_index * length + position] = dot(query, key) * scale;
        }
    }
    let mut sums = vec![0f32; group];
    for (query_scores, sum) in scores.chunks_exact_mut(length.max(1)).zip(sums.iter_mut()) {
        let mut max = f32::NEG_INFINITY;
        for &score in query_scores.iter() {
            max = max.max(score);
        }
        for score in query_scores.iter_mut() {
            *score = (*score - max).exp();
            *sum += *score;
        }
    }
    for (position, value) in values.chunks_exact(head_dim).enumerate() {
        for (query_index, out) in output.chunks_exact_mut(head_dim).enumerate() {
            let weight = scores[query_index * length + position] / sums[query_index];
            for (out, value) in out.iter_mut().zip(value) {
                *out += weight * value;
            }
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
        attend(&query, &keys, &values, 4, scale, &mut output);
        for (index, out) in output.iter().enumerate() {
            let expected: f64 =
                weights.iter().zip(values.chunks(4)).map(|(weight, value)| weight / total * value[index] as f64).sum();
            assert!((*out as f64 - expected).abs() < 1e-6, "{index}: {out} vs {expected}");
        }
        let mut portable = [f32::NAN; 4];
        attend_portable(&query, &keys, &values, 4, scale, &mut portable);
        for (a, b) in output.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-6);
        }
        // Same inputs, same bits.
        let mut again = [0.0; 4];
        attend(&query, &keys, &values, 4, scale, &mut again);
        assert_eq!(output, again);
    }

    #[test]
    fn a_group_of_heads_gives_each_head_what_it_gets_alone() {
        let mut rng = fastrand::Rng::with_seed(3);
        for length in [1, 2, 3, 7, 8, 9, 16, 17, 301] {
            let (head_dim, group) = (64, 3);
            let queries: Vec<f32> = (0..group * head_dim).map(|_| rng.f32() - 0.5).collect();
            let keys: Vec<f32> = (0..head_dim * length).map(|_| rng.f32() - 0.5).collect();
            let values: Vec<f32> = (0..head_dim * length).map(|_| rng.f32() - 0.5).collect();
            let mut together = vec![0.0; group * head_dim];
            attend(&queries, &keys, &values, head_dim, 0.125, &mut together);
            let mut portable = vec![0.0; group * head_dim];
            attend_portable(&queries, &keys, &values, head_dim, 0.125, &mut portable);
            // Every level the CPU has gives the portable code's bits (the same sums in the same order).
            for level in crate::CpuLevel::ALL {
                let mut at_level = vec![f32::NAN; group * head_dim];
                attend_at(level, &queries, &keys, &values, head_dim, 0.125, &mut at_level);
                assert_eq!(at_level, portable, "{level}");
            }
            for (head, query) in queries.chunks(head_dim).enumerate() {
                let mut alone = vec![0.0; head_dim];
                attend(query, &keys, &values, head_dim, 0.125, &mut alone);
                // Bit for bit: a head's numbers do not depend on the rest of its group.
                assert_eq!(&together[head * head_dim..][..head_dim], &alone[..]);
                for (a, b) in alone.iter().zip(&portable[head * head_dim..][..head_dim]) {
                    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }
}

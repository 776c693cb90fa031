//! Times the encoder kernels (`PackedMatrix`, `PackedMatrixBf16`, `encoder_attention`) on one
//! thread at all-MiniLM-L6-v2's shapes (hidden 384, 12 heads, intermediate 1536) for a batch of
//! 20 sequences of 64 tokens: `cargo run --release -p nstream-kernels --example dense [attention]`
//! (`attention`: only the attention, many times, for a profiler).
//! Prints GFLOP/s (two per multiply-add) so that the figures compare with the CPU's FMA peak; the
//! intermediate product includes its GELU, as in the model.

use std::time::Instant;

use nstream_kernels::Sequential;
use nstream_kernels::dense::{Activation, AttentionShape, PackedMatrix, encoder_attention};
use nstream_kernels::dense_bf16::{PackedMatrixBf16, bf16_available};

/// The fastest of `repeats` runs (after one warm-up): the figure least disturbed by other work.
fn time(repeats: usize, mut work: impl FnMut()) -> f64 {
    work();
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut rng = fastrand::Rng::with_seed(1);
    let (sequences, length) = (20, 64);
    let batch = sequences * length;
    let attention_only = std::env::args().nth(1).as_deref() == Some("attention");
    for (name, rows, cols, activation) in [
        ("qkv", 1152, 384, Activation::Identity),
        ("attn_out", 384, 384, Activation::Identity),
        ("intermediate", 1536, 384, Activation::GeluErf),
        ("output", 384, 1536, Activation::Identity),
    ] {
        if attention_only {
            break;
        }
        let weights: Vec<f32> = (0..rows * cols).map(|_| rng.f32() - 0.5).collect();
        let bias: Vec<f32> = (0..rows).map(|_| rng.f32()).collect();
        let input: Vec<f32> = (0..batch * cols).map(|_| rng.f32() - 0.5).collect();
        let mut output = vec![0f32; batch * rows];
        let flops = 2.0 * (rows * cols * batch) as f64;
        let matrix = PackedMatrix::new(&weights, rows, cols, Some(&bias)).expect("matrix");
        let seconds = time(20, || matrix.matmul(&input, batch, &mut output, activation, &Sequential).expect("matmul"));
        println!(
            "f32  {name:12} {rows:4}x{cols:4} batch {batch}: {:7.2} ms {:6.1} GFLOP/s",
            seconds * 1e3,
            flops / seconds / 1e9
        );
        if bf16_available() {
            let matrix = PackedMatrixBf16::new(&weights, rows, cols, Some(&bias)).expect("matrix");
            let seconds =
                time(20, || matrix.matmul(&input, batch, &mut output, activation, &Sequential).expect("matmul"));
            println!(
                "bf16 {name:12} {rows:4}x{cols:4} batch {batch}: {:7.2} ms {:6.1} GFLOP/s",
                seconds * 1e3,
                flops / seconds / 1e9
            );
        }
    }
    let shape = AttentionShape { batch: sequences, sequence: length, heads: 12, head_dim: 32 };
    let qkv: Vec<f32> = (0..batch * 3 * 384).map(|_| rng.f32() - 0.5).collect();
    let mut context = vec![0f32; batch * 384];
    let lengths = vec![length; sequences];
    let flops = 2.0 * 2.0 * (sequences * length * length * 384) as f64;
    let seconds = time(if attention_only { 200 } else { 10 }, || {
        encoder_attention(&qkv, shape, &lengths, &mut context, &Sequential).expect("attention")
    });
    println!("attention {sequences} x {length} tokens: {:7.2} ms {:6.1} GFLOP/s", seconds * 1e3, flops / seconds / 1e9);
}

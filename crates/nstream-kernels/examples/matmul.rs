//! Times `QuantMatrix::matmul` on one thread for the shapes of SmolLM2-135M's projections and a
//! few batch sizes: `cargo run --release -p nstream-kernels --example matmul`.

use std::time::Instant;

use nstream_kernels::{BlockFormat, QuantMatrix, Sequential};

fn main() {
    let mut rng = fastrand::Rng::with_seed(1);
    for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
        for (name, rows, cols) in [("qkv", 960, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("head", 49152, 576)]
        {
            let blocks = rows * cols / 32;
            let mut data = Vec::with_capacity(blocks * format.block_bytes());
            for _ in 0..blocks {
                data.extend_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
                if format == BlockFormat::Q4_1 {
                    data.extend_from_slice(&half::f16::from_f32(-0.05).to_bits().to_le_bytes());
                }
                data.extend((0..format.block_bytes() - data.len() % format.block_bytes()).map(|_| rng.u8(..)));
            }
            let matrix = QuantMatrix::from_ggml(format, &data, rows, cols).expect("matrix");
            if name == "qkv" {
                println!("kernel level: {} (NSTREAM_CPU_LEVEL lowers it)", matrix.level());
            }
            for batch in [1, 16, 256] {
                let input: Vec<f32> = (0..batch * cols).map(|_| rng.f32() - 0.5).collect();
                let mut output = vec![0f32; batch * rows];
                let repeats = (200_000_000 / (rows * cols * batch)).max(3);
                matrix.matmul(&input, batch, &mut output, &Sequential).expect("matmul");
                let start = Instant::now();
                for _ in 0..repeats {
                    matrix.matmul(&input, batch, &mut output, &Sequential).expect("matmul");
                }
                let seconds = start.elapsed().as_secs_f64() / repeats as f64;
                println!(
                    "{format:?} {name:8} {rows:5}x{cols:4} batch {batch:3}: {:8.1} us, {:6.1} GB/s of weights, {:6.1} GMAC/s",
                    seconds * 1e6,
                    matrix.size_in_bytes() as f64 / seconds / 1e9,
                    (rows * cols * batch) as f64 / seconds / 1e9
                );
            }
        }
    }
}

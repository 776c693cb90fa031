use super::*;

/// Random ggml blocks of `format` for a `rows × cols` matrix, and their dequantised values.
fn random_matrix(format: BlockFormat, rows: usize, cols: usize, rng: &mut fastrand::Rng) -> (Vec<u8>, Vec<f32>) {
    let mut data = Vec::new();
    let mut values = Vec::new();
    for _ in 0..rows * cols / BLOCK {
        let scale = f16::from_f32(rng.f32() * 0.02 + 0.001);
        data.extend_from_slice(&scale.to_bits().to_le_bytes());
        let d = scale.to_f32();
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let offset = if format == BlockFormat::Q4_1 {
                    let m = f16::from_f32(-rng.f32() * 0.1);
                    data.extend_from_slice(&m.to_bits().to_le_bytes());
                    m.to_f32()
                } else {
                    -8.0 * d
                };
                let nibbles: Vec<u8> = (0..BLOCK).map(|_| rng.u8(0..16)).collect();
                for index in 0..16 {
                    data.push(nibbles[index] | nibbles[index + 16] << 4);
                }
                values.extend(nibbles.iter().map(|&nibble| d * nibble as f32 + offset));
            }
            BlockFormat::Q8_0 => {
                let quants: Vec<i8> = (0..BLOCK).map(|_| rng.i8(-127..=127)).collect();
                data.extend(quants.iter().map(|&quant| quant as u8));
                values.extend(quants.iter().map(|&quant| d * quant as f32));
            }
        }
    }
    (data, values)
}

/// The product computed independently: weights dequantised, activations quantised per block as
/// ggml's Q8_1 and dequantised, summed in f64.
fn expected(weights: &[f32], input: &[f32], batch: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut quantised = Vec::with_capacity(input.len());
    for block in input.chunks(BLOCK) {
        let scale = block.iter().fold(0f32, |largest, value| largest.max(value.abs())) / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        quantised.extend(block.iter().map(|value| (value * inverse).round_ties_even() * scale));
    }
    let mut output = vec![0f32; batch * rows];
    for row in 0..batch {
        for column in 0..rows {
            let sum: f64 = (0..cols)
                .map(|index| quantised[row * cols + index] as f64 * weights[column * cols + index] as f64)
                .sum();
            output[row * rows + column] = sum as f32;
        }
    }
    output
}

fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len());
    let scale = expected.iter().fold(0f32, |largest, value| largest.max(value.abs())).max(1e-6);
    for (index, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= 2e-5 * scale + 1e-6, "{what}: element {index}: {a} vs {e} (scale {scale})");
    }
}

/// Two scoped threads taking items in turn.
struct TwoThreads;

impl Parallel for TwoThreads {
    fn run(&self, items: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
        std::thread::scope(|scope| {
            for parity in 0..2 {
                scope.spawn(move || {
                    for item in (parity..items).step_by(2) {
                        work(item..item + 1);
                    }
                });
            }
        });
    }
}

/// The levels this CPU can run, lowest first.
fn runnable_levels() -> Vec<CpuLevel> {
    CpuLevel::ALL.into_iter().filter(|&level| level <= CpuLevel::detected()).collect()
}

#[test]
fn every_level_format_batch_and_shape_matches_the_dequantised_product() {
    let mut rng = fastrand::Rng::with_seed(7);
    for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
        // 3 blocks per row (an odd block padded), 18 (SmolLM2's 576), 48 (1536); rows not a
        // multiple of the column chunk; batches around the row tiles (4 for AVX2, 8 for AVX-512).
        for (rows, cols) in [(5, 96), (70, 576), (33, 1536)] {
            let (mut data, mut weights) = random_matrix(format, rows, cols, &mut rng);
            if format == BlockFormat::Q8_0 {
                // Codes of −128 (the one magnitude AVX2's sign trick holds as 128) in the first
                // row's every block: where a sum could saturate.
                for block in 0..cols / BLOCK {
                    data[block * 34 + 2..][..32].fill(0x80);
                    let scale = f16::from_le_bytes([data[block * 34], data[block * 34 + 1]]).to_f32();
                    weights[block * BLOCK..][..BLOCK].fill(-128.0 * scale);
                }
            }
            for batch in [1, 2, 3, 4, 5, 8, 9, 17] {
                let mut input: Vec<f32> = (0..batch * cols).map(|_| rng.f32() * 2.0 - 1.0).collect();
                // A block of zeros, a block with one large value and a block at ±the largest (codes
                // of ±127 against the weights of −128).
                input[..BLOCK].fill(0.0);
                input[cols - 1] = 40.0;
                for (index, value) in input[BLOCK..2 * BLOCK].iter_mut().enumerate() {
                    *value = if index % 2 == 0 { 3.0 } else { -3.0 };
                }
                let want = expected(&weights, &input, batch, rows, cols);
                for level in runnable_levels() {
                    let matrix = QuantMatrix::from_ggml_at(format, &data, rows, cols, level).unwrap();
                    assert_eq!(matrix.level(), level);
                    let what = format!("{format:?} {rows}x{cols} batch {batch} at {level}");
                    for parallel in [&TwoThreads as &dyn Parallel, &Sequential] {
                        let mut output = vec![f32::NAN; batch * rows];
                        matrix.matmul(&input, batch, &mut output, parallel).unwrap();
                        assert_close(&output, &want, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn a_row_has_the_same_bits_in_every_batch_and_tile() {
    // Seeded sampling reproduces under any load only if a sequence's logits do not depend on
    // what it is batched with: each row's sums must run in the same order in every tile shape.
    let mut rng = fastrand::Rng::with_seed(5);
    for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
        let (rows, cols) = (37, 576);
        let (data, _) = random_matrix(format, rows, cols, &mut rng);
        let input: Vec<f32> = (0..17 * cols).map(|_| rng.f32() * 2.0 - 1.0).collect();
        for level in runnable_levels() {
            let matrix = QuantMatrix::from_ggml_at(format, &data, rows, cols, level).unwrap();
            let mut alone = vec![0f32; rows];
            matrix.matmul(&input[..cols], 1, &mut alone, &Sequential).unwrap();
            for batch in 1..=17 {
                let mut output = vec![0f32; batch * rows];
                matrix.matmul(&input[..batch * cols], batch, &mut output, &TwoThreads).unwrap();
                for row in 0..batch {
                    let mut single = vec![0f32; rows];
                    matrix.matmul(&input[row * cols..][..cols], 1, &mut single, &Sequential).unwrap();
                    assert_eq!(&output[row * rows..][..rows], &single[..], "{format:?} {level} row {row} of {batch}");
                }
                assert_eq!(&output[..rows], &alone[..]);
            }
        }
    }
}

#[test]
fn every_level_quantises_activations_to_the_same_codes() {
    let mut rng = fastrand::Rng::with_seed(11);
    let (data, _) = random_matrix(BlockFormat::Q4_1, 2, 64, &mut rng);
    let matrices: Vec<QuantMatrix> = runnable_levels()
        .into_iter()
        .map(|level| QuantMatrix::from_ggml_at(BlockFormat::Q4_1, &data, 2, 64, level).unwrap())
        .collect();
    let mut blocks: Vec<[f32; BLOCK]> = (0..200).map(|_| std::array::from_fn(|_| rng.f32() * 8.0 - 4.0)).collect();
    blocks.push([0.0; BLOCK]);
    // Exact ties (x.5 after scaling) round to even at every level.
    blocks.push(std::array::from_fn(|index| if index == 0 { 127.0 } else { index as f32 + 0.5 }));
    for values in &blocks {
        let results: Vec<_> = matrices
            .iter()
            .map(|matrix| {
                let (mut low, mut high) = ([0u8; 16], [0u8; 16]);
                let (scale, total) = quantize_block(matrix, values, &mut low, &mut high);
                (scale.to_bits(), total, low, high)
            })
            .collect();
        for (matrix, result) in matrices.iter().zip(&results) {
            assert_eq!(result, &results[0], "{} vs portable on {values:?}", matrix.level());
        }
    }
}

#[test]
fn a_level_above_the_cpu_runs_at_the_cpu_level_and_names_parse() {
    let matrix = QuantMatrix::from_ggml_at(BlockFormat::Q8_0, &[0; 34], 1, 32, CpuLevel::Avx512Vnni).unwrap();
    assert_eq!(matrix.level(), CpuLevel::detected());
    assert_eq!(matrix.accelerated(), CpuLevel::detected() > CpuLevel::Portable);
    for level in CpuLevel::ALL {
        assert_eq!(CpuLevel::from_name(level.name()), Ok(level));
        assert_eq!(CpuLevel::from_name(&level.name().to_uppercase()), Ok(level));
        assert_eq!(level_for(Some(level.name())), Ok(level.min(CpuLevel::detected())));
    }
    assert_eq!(level_for(None), Ok(CpuLevel::detected()));
    assert_eq!(level_for(Some(" ")), Ok(CpuLevel::detected()));
    let error = level_for(Some("avx3")).unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"NSTREAM_CPU_LEVEL="avx3" names no CPU level: expected one of portable, avx2, avx512"#
    );
    if std::env::var_os("NSTREAM_EXPECT_AVX512").is_some() {
        assert_eq!(CpuLevel::detected(), CpuLevel::Avx512Vnni, "NSTREAM_EXPECT_AVX512 is set");
    }
}

#[test]
fn bad_shapes_are_refused_with_what_was_expected() {
    assert_eq!(
        QuantMatrix::from_ggml(BlockFormat::Q4_1, &[0; 20], 1, 33).unwrap_err(),
        KernelError::ColumnsNotBlocks { cols: 33 }
    );
    assert_eq!(
        QuantMatrix::from_ggml(BlockFormat::Q4_1, &[0; 19], 1, 32).unwrap_err(),
        KernelError::DataLength { expected: 20, actual: 19 }
    );
    let mut huge = vec![0u8; 34];
    huge[..2].copy_from_slice(&f16::from_f32(1000.0).to_bits().to_le_bytes());
    assert_eq!(QuantMatrix::from_ggml(BlockFormat::Q8_0, &huge, 1, 32).unwrap_err(), KernelError::ScaleOutOfRange);
    let matrix = QuantMatrix::from_ggml(BlockFormat::Q8_0, &[0; 68], 2, 32).unwrap();
    let error = matrix.matmul(&[0.0; 31], 1, &mut [0.0; 2], &Sequential).unwrap_err();
    assert_eq!(error.to_string(), "expected 1 × 32 input values, got 31");
    let error = matrix.matmul(&[0.0; 32], 1, &mut [0.0; 3], &Sequential).unwrap_err();
    assert_eq!(error.to_string(), "expected 1 × 2 output values, got 3");
    matrix.matmul(&[], 0, &mut [], &Sequential).unwrap();
}

#[test]
fn for_each_row_visits_every_row_once_with_its_index() {
    for rows in [0, 1, 5, 33, 100] {
        let mut output = vec![0f32; rows * 3];
        for_each_row(&TwoThreads, &mut output, 3, &|index, row| {
            assert_eq!(row.len(), 3);
            for value in row.iter_mut() {
                *value += index as f32 + 1.0;
            }
        });
        let expected: Vec<f32> = (0..rows).flat_map(|index| [index as f32 + 1.0; 3]).collect();
        assert_eq!(output, expected);
    }
}

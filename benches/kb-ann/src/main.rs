//! Build time, query latency and recall@10 against exact search for hannoy and usearch on the
//! same clustered unit vectors (a stand-in for sentence embeddings: random directions around
//! topic centres). Usage: kb-ann-bench [COUNT] [DIMENSION] [QUERIES]
#![allow(unsafe_code)]

use std::time::Instant;

use hannoy::distances::Cosine;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn unit(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
    vector.iter_mut().for_each(|value| *value /= norm);
    vector
}

fn dataset(count: usize, dimension: usize, rng: &mut StdRng) -> Vec<Vec<f32>> {
    let centres: Vec<Vec<f32>> =
        (0..64).map(|_| unit((0..dimension).map(|_| rng.random::<f32>() - 0.5).collect())).collect();
    (0..count)
        .map(|index| {
            let centre = &centres[index % centres.len()];
            unit(centre.iter().map(|value| value + 0.08 * (rng.random::<f32>() - 0.5)).collect())
        })
        .collect()
}

fn dot(left: &[f32], right: &[f32]) -> f32 {
    left.iter().zip(right).map(|(a, b)| a * b).sum()
}

fn exact(vectors: &[Vec<f32>], query: &[f32], k: usize) -> Vec<u32> {
    let mut scored: Vec<(u32, f32)> = vectors.iter().enumerate().map(|(index, vector)| (index as u32, dot(query, vector))).collect();
    scored.sort_by(|left, right| right.1.total_cmp(&left.1));
    scored.into_iter().take(k).map(|(index, _)| index).collect()
}

fn percentile(samples: &mut [f64], fraction: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 - 1.0) * fraction).round() as usize]
}

fn report(name: &str, build: f64, latencies: &mut [f64], recall: f64) {
    let p50 = percentile(latencies, 0.5);
    let p99 = percentile(latencies, 0.99);
    println!("{name:8} build {build:8.2} s   query p50 {p50:7.3} ms  p99 {p99:7.3} ms   recall@10 {recall:.4}");
}

fn main() {
    let arguments: Vec<usize> = std::env::args().skip(1).filter_map(|argument| argument.parse().ok()).collect();
    let count = arguments.first().copied().unwrap_or(10_000);
    let dimension = arguments.get(1).copied().unwrap_or(384);
    let query_count = arguments.get(2).copied().unwrap_or(200);
    let mut rng = StdRng::seed_from_u64(7);
    let vectors = dataset(count, dimension, &mut rng);
    let queries = dataset(query_count, dimension, &mut rng);
    let truth: Vec<Vec<u32>> = queries.iter().map(|query| exact(&vectors, query, 10)).collect();
    println!("{count} vectors of {dimension} dimensions, {query_count} queries, k = 10");

    // exact search
    let mut latencies = Vec::new();
    for query in &queries {
        let started = Instant::now();
        std::hint::black_box(exact(&vectors, query, 10));
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    report("exact", 0.0, &mut latencies, 1.0);

    // hannoy: one write transaction with every item, then one build (M = 16, M0 = 32, ef 128).
    let folder = std::env::temp_dir().join(format!("kb-ann-hannoy-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    let env = unsafe { heed::EnvOpenOptions::new().map_size(16 << 30).max_dbs(2).open(&folder) }.unwrap();
    let wtxn = env.write_txn().unwrap();
    let database: hannoy::Database<Cosine> = env
        .create_databases_and_commit(wtxn, |opener, wtxn| -> heed::Result<_> {
            opener.create_database(wtxn, Some("vectors")).map(heed::CommitOrAbort::<_, ()>::Commit)
        })
        .unwrap()
        .unwrap_commit();
    let started = Instant::now();
    let mut wtxn = env.write_txn().unwrap();
    let writer = hannoy::Writer::new(database, 0, dimension);
    for (index, vector) in vectors.iter().enumerate() {
        writer.add_item(&mut wtxn, index as u32, vector).unwrap();
    }
    let mut build_rng = StdRng::seed_from_u64(1);
    writer.builder(&mut build_rng).ef_construction(128).build::<16, 32>(&mut wtxn).unwrap();
    wtxn.commit().unwrap();
    let build = started.elapsed().as_secs_f64();
    let rtxn = env.read_txn().unwrap();
    let reader = hannoy::Reader::<Cosine>::open(&rtxn, 0, database).unwrap();
    let mut latencies = Vec::new();
    let mut found = 0;
    for (query, truth) in queries.iter().zip(&truth) {
        let started = Instant::now();
        let mut builder = reader.nns(10);
        builder.ef_search(64);
        let hits = builder.by_vector(&rtxn, query).unwrap().into_nns();
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        found += hits.iter().filter(|(item, _)| truth.contains(item)).count();
    }
    report("hannoy", build, &mut latencies, found as f64 / (10.0 * queries.len() as f64));
    drop(rtxn);
    let _ = std::fs::remove_dir_all(&folder);

    // usearch: the same graph parameters (connectivity 16, expansion 128 / 64).
    let options = usearch::IndexOptions {
        dimensions: dimension,
        metric: usearch::MetricKind::Cos,
        quantization: usearch::ScalarKind::F32,
        connectivity: 16,
        expansion_add: 128,
        expansion_search: 64,
        multi: false,
    };
    let started = Instant::now();
    let index = usearch::Index::new(&options).unwrap();
    index.reserve(count).unwrap();
    for (key, vector) in vectors.iter().enumerate() {
        index.add(key as u64, vector).unwrap();
    }
    let file = std::env::temp_dir().join(format!("kb-ann-usearch-{}.index", std::process::id()));
    index.save(file.to_str().unwrap()).unwrap();
    let build = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut found = 0;
    for (query, truth) in queries.iter().zip(&truth) {
        let started = Instant::now();
        let matches = index.search(query, 10).unwrap();
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        found += matches.keys.iter().filter(|key| truth.contains(&(**key as u32))).count();
    }
    report("usearch", build, &mut latencies, found as f64 / (10.0 * queries.len() as f64));
    let _ = std::fs::remove_file(&file);
}

//! The PostgreSQL + pgvector store against a real server (scripts/pg-test-server.sh): atomic
//! replacement without orphans, the same results as the embedded store under filters, dimension
//! mismatches, and an unreachable server.

mod common;

use nstream_kb::store::{ChunkRecord, DocumentWrite};
use nstream_kb::{DocumentEntry, EmbeddedStore, Error, Filter, PostgresStore, Store, VectorQuery};
use serde_json::{Map, Value, json};

fn vector(seed: u64, dimension: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(7);
    let mut values: Vec<f32> = (0..dimension)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let norm = values.iter().map(|value| value * value).sum::<f32>().sqrt();
    values.iter_mut().for_each(|value| *value /= norm);
    values
}

fn document(id: &str, seeds: &[u64], metadata: Value) -> DocumentWrite {
    let metadata: Map<String, Value> = metadata.as_object().cloned().unwrap_or_default();
    let chunks: Vec<ChunkRecord> = seeds
        .iter()
        .enumerate()
        .map(|(index, seed)| ChunkRecord {
            index: index as u32,
            text: format!("{id}/{index}"),
            vector: vector(*seed, 24),
        })
        .collect();
    let entry = DocumentEntry {
        id: id.into(),
        content_hash: format!("{id}-{}", chunks.len()),
        metadata,
        chunk_count: chunks.len() as u32,
        bytes: 0,
        indexed_at: 0,
    };
    DocumentWrite { entry, chunks }
}

#[tokio::test]
async fn replacement_deletion_and_the_same_results_as_the_embedded_store() {
    let Some(url) = common::postgres_url() else { return };
    let postgres = PostgresStore::connect(&url, &common::unique_table("kb_pg")).await.unwrap();
    let folder = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(folder.path()).unwrap();
    let writes: Vec<DocumentWrite> = (0..60u64)
        .map(|index| {
            document(
                &format!("d{index:02}"),
                &[index * 3, index * 3 + 1],
                json!({"n": index, "kind": if index % 3 == 0 { "a" } else { "b" }}),
            )
        })
        .collect();
    for store in [&postgres as &dyn Store, &embedded as &dyn Store] {
        store.write(writes.clone()).await.unwrap();
        store.write(vec![document("d00", &[999], json!({"n": 0, "kind": "a"}))]).await.unwrap();
        assert!(store.delete("d01").await.unwrap());
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.documents, stats.chunks, stats.dimension), (59, 117, Some(24)), "{}", store.describe());
    }
    let filters = [
        None,
        Some(json!({"type": "eq", "key": "kind", "value": "a"})),
        Some(
            json!({"type": "or", "filters": [{"type": "lt", "key": "n", "value": 5}, {"type": "in", "key": "n", "value": [40, 41]}]}),
        ),
        Some(json!({"type": "ne", "key": "kind", "value": "a"})),
    ];
    for filter in filters {
        let filter = filter.map(|filter| Filter::parse(&filter, "filters").unwrap());
        for seed in [5u64, 77, 140, 999] {
            let query = VectorQuery::new(vector(seed, 24), 8).with_filter(filter.clone());
            let from_postgres = postgres.search(&query).await.unwrap();
            let from_embedded = embedded.search(&query).await.unwrap();
            let ids = |hits: &[nstream_kb::SearchHit]| {
                hits.iter().map(|hit| (hit.document_id.clone(), hit.chunk_index)).collect::<Vec<_>>()
            };
            assert_eq!(ids(&from_postgres), ids(&from_embedded), "filter {filter:?}, seed {seed}");
            for (left, right) in from_postgres.iter().zip(&from_embedded) {
                assert!((left.score - right.score).abs() < 1e-4, "{} vs {}", left.score, right.score);
                assert_eq!(left.metadata, right.metadata);
            }
        }
    }
    let mismatched = DocumentWrite {
        chunks: vec![ChunkRecord { index: 0, text: "x".into(), vector: vec![0.5; 12] }],
        ..document("d02", &[], json!({}))
    };
    let message = postgres.write(vec![mismatched]).await.unwrap_err().to_string();
    assert!(message.contains("12-dimensional") && message.contains("24-dimensional"), "{message}");
    assert_eq!(postgres.stats().await.unwrap().chunks, 117, "the failed write changed nothing");
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error_without_the_password() {
    let error = PostgresStore::connect("postgres://user:s3cret-pass@127.0.0.1:1/db", "chunks").await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Postgres { .. }));
    assert!(message.contains("cannot connect to PostgreSQL at 127.0.0.1:1/db"), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
    let error = PostgresStore::connect("mysql://x", "chunks").await.unwrap_err().to_string();
    assert!(error.contains("not a postgres:// URL"), "{error}");
    let error = PostgresStore::connect("postgres://x@127.0.0.1:1/db", "Bad-Name").await.unwrap_err().to_string();
    assert!(error.contains("not a table name"), "{error}");
}

/// Whether the session of a fresh connection to `url` runs over TLS (`pg_stat_ssl`).
async fn session_uses_tls(url: &str) -> bool {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar::<_, bool>("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut connection)
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_is_verified_against_the_named_certificate_authority() {
    let Some(url) = common::postgres_url() else { return };
    let Ok(authority) = std::env::var("NSTREAM_TEST_PG_CA") else {
        eprintln!("SKIPPED: NSTREAM_TEST_PG_CA is unset (scripts/pg-test-server.sh prints it)");
        return;
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    // verify-full: the certificate chains to the CA and names the host.
    let verified = format!("{url}{separator}sslmode=verify-full&sslrootcert={authority}");
    assert!(session_uses_tls(&verified).await, "sslmode=verify-full did not give a TLS session");
    let store = PostgresStore::connect(&verified, &common::unique_table("kb_tls")).await.unwrap();
    store.write(vec![document("tls", &[1, 2], json!({}))]).await.unwrap();
    assert_eq!(store.stats().await.unwrap().chunks, 2);
    // The server's certificate is not signed by any system root: verification fails, clearly,
    // and the URL (its password) stays out of the message.
    let unverifiable = format!("{url}{separator}sslmode=verify-full").replace("postgres@", "postgres:s3cret@");
    let error = PostgresStore::connect(&unverifiable, "chunks").await.unwrap_err().to_string();
    assert!(error.contains("cannot connect to PostgreSQL at 127.0.0.1"), "{error}");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");
    // Without sslmode the connection prefers TLS when the server offers it (libpq's default).
    assert!(session_uses_tls(&url).await);
    assert!(!session_uses_tls(&format!("{url}{separator}sslmode=disable")).await);
}

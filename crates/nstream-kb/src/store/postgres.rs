//! The PostgreSQL + pgvector store: a documents table and a chunks table with a `vector(N)`
//! column under an HNSW index (cosine). A write is one SQL transaction; deleting a document
//! cascades to its chunks. Needs pgvector >= 0.7 (0.8's iterative scans keep filtered searches
//! full; older versions may return fewer results under a filter).

use std::fmt::Write as _;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use crate::error::{Error, Result};
use crate::filter::{Comparison, Filter};
use crate::store::{DocumentEntry, DocumentWrite, SearchHit, Store, StoreStats, VectorQuery};

/// The HNSW candidate list of a search (pgvector's default is 40).
const EF_SEARCH: usize = 100;

/// A knowledge base in PostgreSQL.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    table: String,
    documents_table: String,
    server: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("PostgresStore").field("server", &self.server).field("table", &self.table).finish()
    }
}

fn valid_table(table: &str) -> bool {
    let mut characters = table.chars();
    characters.next().is_some_and(|first| first.is_ascii_lowercase() || first == '_')
        && characters.all(|character| character.is_ascii_lowercase() || character.is_ascii_digit() || character == '_')
        && table.len() <= 53
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and creates the tables
    /// when missing. The URL is never shown in errors or logs.
    pub async fn connect(url: &str, table: &str) -> Result<Self> {
        let error = |cause: String| Error::Postgres { table: table.to_string(), cause };
        if !valid_table(table) {
            return Err(error(format!(
                "{table:?} is not a table name nstream creates: lower-case letters, digits and `_`, at most 53 characters"
            )));
        }
        let not_postgres = || error("the connection URL is not a postgres:// URL".to_string());
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(not_postgres());
        }
        let options: PgConnectOptions = url.parse().map_err(|_| not_postgres())?;
        let server = format!("{}:{}/{}", options.get_host(), options.get_port(), options.get_database().unwrap_or(""));
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|cause| error(format!("cannot connect to PostgreSQL at {server}: {}", describe(&cause))))?;
        let store = Self { pool, table: table.to_string(), documents_table: format!("{table}_documents"), server };
        store.create_schema().await?;
        Ok(store)
    }

    fn error(&self, cause: impl std::fmt::Display) -> Error {
        Error::Postgres { table: self.table.clone(), cause: cause.to_string() }
    }

    fn sql_error(&self, cause: sqlx::Error) -> Error {
        self.error(describe(&cause))
    }

    async fn create_schema(&self) -> Result<()> {
        let installed: Option<String> =
            sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                .fetch_optional(&self.pool)
                .await
                .map_err(|cause| self.sql_error(cause))?;
        if installed.is_none() {
            sqlx::query("CREATE EXTENSION IF NOT EXISTS vector").execute(&self.pool).await.map_err(|cause| {
                self.error(format!(
                    "the pgvector extension is not installed and could not be created ({}); run `CREATE EXTENSION vector` as a superuser",
                    describe(&cause)
                ))
            })?;
        }
        let statement = format!(
            "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, content_hash text NOT NULL, metadata jsonb NOT NULL, \
             chunk_count integer NOT NULL, bytes bigint NOT NULL, indexed_at bigint NOT NULL)",
            self.documents_table
        );
        sqlx::query(&statement).execute(&self.pool).await.map_err(|cause| self.sql_error(cause))?;
        Ok(())
    }

    /// Creates the chunks table for `dimension`-long vectors, in the caller's transaction.
    async fn create_chunks_table(&self, transaction: &mut Transaction<'_, Postgres>, dimension: usize) -> Result<()> {
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (document_id text NOT NULL REFERENCES {documents}(id) ON DELETE CASCADE, \
                 chunk_index integer NOT NULL, text text NOT NULL, embedding vector({dimension}) NOT NULL, \
                 PRIMARY KEY (document_id, chunk_index))",
                table = self.table,
                documents = self.documents_table
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {table}_embedding ON {table} USING hnsw (embedding vector_cosine_ops) \
                 WITH (m = 16, ef_construction = 128)",
                table = self.table
            ),
        ];
        for statement in statements {
            sqlx::query(&statement).execute(&mut **transaction).await.map_err(|cause| self.sql_error(cause))?;
        }
        Ok(())
    }

    async fn stored_dimension(&self) -> Result<Option<usize>> {
        let modifier: Option<i32> = sqlx::query_scalar(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'embedding'",
        )
        .bind(&self.table)
        .fetch_optional(&self.pool)
        .await
        .map_err(|cause| self.sql_error(cause))?;
        Ok(modifier.and_then(|modifier| usize::try_from(modifier).ok()))
    }

    fn entry(&self, row: &PgRow) -> Result<DocumentEntry> {
        let metadata: String = row.try_get("metadata").map_err(|cause| self.sql_error(cause))?;
        let metadata = match serde_json::from_str(&metadata).map_err(|cause| self.error(cause))? {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        let get_i64 = |column: &str| row.try_get::<i64, _>(column).map_err(|cause| self.sql_error(cause));
        Ok(DocumentEntry {
            id: row.try_get("id").map_err(|cause| self.sql_error(cause))?,
            content_hash: row.try_get("content_hash").map_err(|cause| self.sql_error(cause))?,
            metadata,
            chunk_count: u32::try_from(get_i64("chunk_count")?).unwrap_or(0),
            bytes: u64::try_from(get_i64("bytes")?).unwrap_or(0),
            indexed_at: u64::try_from(get_i64("indexed_at")?).unwrap_or(0),
        })
    }

    fn select_documents(&self) -> String {
        format!(
            "SELECT id, content_hash, metadata::text AS metadata, chunk_count::bigint AS chunk_count, bytes, indexed_at FROM {}",
            self.documents_table
        )
    }
}

/// A sqlx error in words, without connection strings.
fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database) => database.message().to_string(),
        sqlx::Error::Io(io) => format!("connection failed: {io}"),
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection".to_string(),
        other => other.to_string(),
    }
}

fn vector_literal(vector: &[f32]) -> String {
    let mut text = String::with_capacity(vector.len() * 10 + 2);
    text.push('[');
    for (index, value) in vector.iter().enumerate() {
        if index > 0 {
            text.push(',');
        }
        let _ = write!(text, "{value}");
    }
    text.push(']');
    text
}

/// A bound parameter of a generated filter.
enum Parameter {
    Text(String),
    Number(f64),
}

/// Writes `filter` as SQL over `d.metadata`, adding parameters from `$first`.
fn filter_sql(filter: &Filter, parameters: &mut Vec<Parameter>, first: usize) -> String {
    let mut bind = |parameter: Parameter| {
        parameters.push(parameter);
        format!("${}", first + parameters.len() - 1)
    };
    match filter {
        Filter::And(filters) | Filter::Or(filters) => {
            let joiner = if matches!(filter, Filter::And(_)) { " AND " } else { " OR " };
            let parts: Vec<String> = filters.iter().map(|filter| filter_sql(filter, parameters, first)).collect();
            format!("({})", parts.join(joiner))
        }
        Filter::Compare { operator, key, value } => {
            let key = bind(Parameter::Text(key.clone()));
            let field = format!("(d.metadata -> {key})");
            let json = |value: &Value, bind: &mut dyn FnMut(Parameter) -> String| {
                format!("{}::text::jsonb", bind(Parameter::Text(value.to_string())))
            };
            match operator {
                Comparison::Eq => format!("COALESCE({field} = {}, false)", json(value, &mut bind)),
                Comparison::Ne => format!("NOT COALESCE({field} = {}, false)", json(value, &mut bind)),
                Comparison::In | Comparison::Nin => {
                    let items: Vec<String> =
                        value.as_array().into_iter().flatten().map(|item| json(item, &mut bind)).collect();
                    let test = format!("COALESCE({field} IN ({}), false)", items.join(", "));
                    if *operator == Comparison::In { test } else { format!("NOT {test}") }
                }
                Comparison::Gt | Comparison::Gte | Comparison::Lt | Comparison::Lte => {
                    let symbol = match operator {
                        Comparison::Gt => ">",
                        Comparison::Gte => ">=",
                        Comparison::Lt => "<",
                        _ => "<=",
                    };
                    match value {
                        Value::Number(number) => {
                            let bound = bind(Parameter::Number(number.as_f64().unwrap_or(f64::NAN)));
                            format!(
                                "CASE WHEN jsonb_typeof({field}) = 'number' THEN ({field} #>> '{{}}')::float8 {symbol} {bound} ELSE false END"
                            )
                        }
                        Value::String(text) => {
                            let bound = bind(Parameter::Text(text.clone()));
                            format!(
                                "CASE WHEN jsonb_typeof({field}) = 'string' THEN ({field} #>> '{{}}') COLLATE \"C\" {symbol} {bound} ELSE false END"
                            )
                        }
                        _ => "false".to_string(),
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn describe(&self) -> String {
        format!("postgres {} table {}", self.server, self.table)
    }

    async fn dimension(&self) -> Result<Option<usize>> {
        self.stored_dimension().await
    }

    async fn document(&self, id: &str) -> Result<Option<DocumentEntry>> {
        let statement = format!("{} WHERE id = $1", self.select_documents());
        let row =
            sqlx::query(&statement).bind(id).fetch_optional(&self.pool).await.map_err(|cause| self.sql_error(cause))?;
        row.map(|row| self.entry(&row)).transpose()
    }

    async fn documents(&self) -> Result<Vec<DocumentEntry>> {
        let statement = format!("{} ORDER BY id", self.select_documents());
        let rows = sqlx::query(&statement).fetch_all(&self.pool).await.map_err(|cause| self.sql_error(cause))?;
        rows.iter().map(|row| self.entry(row)).collect()
    }

    async fn write(&self, documents: Vec<DocumentWrite>) -> Result<()> {
        let incoming = documents.iter().flat_map(|document| &document.chunks).map(|chunk| chunk.vector.len()).next();
        let mut transaction = self.pool.begin().await.map_err(|cause| self.sql_error(cause))?;
        // One writer at a time creates the table and checks the dimension.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&self.table)
            .execute(&mut *transaction)
            .await
            .map_err(|cause| self.sql_error(cause))?;
        let stored = self.stored_dimension().await?;
        match (stored, incoming) {
            (Some(stored), Some(incoming)) if stored != incoming => {
                return Err(Error::DimensionMismatch {
                    model: "the EmbeddingModel".to_string(),
                    model_dimension: incoming,
                    store: self.describe(),
                    store_dimension: stored,
                });
            }
            (None, Some(incoming)) => self.create_chunks_table(&mut transaction, incoming).await?,
            _ => {}
        }
        let delete = format!("DELETE FROM {} WHERE id = $1", self.documents_table);
        let insert_document = format!(
            "INSERT INTO {} (id, content_hash, metadata, chunk_count, bytes, indexed_at) VALUES ($1, $2, $3::jsonb, $4, $5, $6)",
            self.documents_table
        );
        let insert_chunk = format!(
            "INSERT INTO {} (document_id, chunk_index, text, embedding) SELECT $1, index, text, embedding::text::vector \
             FROM unnest($2::integer[], $3::text[], $4::text[]) AS chunk(index, text, embedding)",
            self.table
        );
        for document in documents {
            let entry = &document.entry;
            sqlx::query(&delete)
                .bind(&entry.id)
                .execute(&mut *transaction)
                .await
                .map_err(|cause| self.sql_error(cause))?;
            sqlx::query(&insert_document)
                .bind(&entry.id)
                .bind(&entry.content_hash)
                .bind(Value::Object(entry.metadata.clone()).to_string())
                .bind(i32::try_from(entry.chunk_count).unwrap_or(i32::MAX))
                .bind(i64::try_from(entry.bytes).unwrap_or(i64::MAX))
                .bind(i64::try_from(entry.indexed_at).unwrap_or(i64::MAX))
                .execute(&mut *transaction)
                .await
                .map_err(|cause| self.sql_error(cause))?;
            if document.chunks.is_empty() {
                continue;
            }
            let indexes: Vec<i32> =
                document.chunks.iter().map(|chunk| i32::try_from(chunk.index).unwrap_or(i32::MAX)).collect();
            let texts: Vec<String> = document.chunks.iter().map(|chunk| chunk.text.replace('\0', "")).collect();
            let vectors: Vec<String> = document.chunks.iter().map(|chunk| vector_literal(&chunk.vector)).collect();
            sqlx::query(&insert_chunk)
                .bind(&entry.id)
                .bind(indexes)
                .bind(texts)
                .bind(vectors)
                .execute(&mut *transaction)
                .await
                .map_err(|cause| self.sql_error(cause))?;
        }
        transaction.commit().await.map_err(|cause| self.sql_error(cause))
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        let statement = format!("DELETE FROM {} WHERE id = $1", self.documents_table);
        let result =
            sqlx::query(&statement).bind(id).execute(&self.pool).await.map_err(|cause| self.sql_error(cause))?;
        Ok(result.rows_affected() > 0)
    }

    async fn search(&self, query: &VectorQuery) -> Result<Vec<SearchHit>> {
        let Some(dimension) = self.stored_dimension().await? else { return Ok(Vec::new()) };
        if query.vector.len() != dimension {
            return Err(Error::DimensionMismatch {
                model: "the query's EmbeddingModel".to_string(),
                model_dimension: query.vector.len(),
                store: self.describe(),
                store_dimension: dimension,
            });
        }
        let mut parameters = Vec::new();
        let condition = query.filter.as_ref().map(|filter| filter_sql(filter, &mut parameters, 3));
        let statement = format!(
            "SELECT c.document_id, c.chunk_index, c.text, d.metadata::text AS metadata, \
             (1 - (c.embedding <=> $1::text::vector))::float4 AS score \
             FROM {table} c JOIN {documents} d ON d.id = c.document_id {filter} \
             ORDER BY c.embedding <=> $1::text::vector LIMIT $2",
            table = self.table,
            documents = self.documents_table,
            filter = condition.map(|condition| format!("WHERE {condition}")).unwrap_or_default()
        );
        let mut transaction = self.pool.begin().await.map_err(|cause| self.sql_error(cause))?;
        for setting in [
            format!("SET LOCAL hnsw.ef_search = {}", EF_SEARCH.max(query.limit * 2)),
            "SET LOCAL hnsw.iterative_scan = relaxed_order".to_string(),
        ] {
            // iterative_scan is pgvector >= 0.8; older servers search without it.
            let _ = sqlx::query("SAVEPOINT setting").execute(&mut *transaction).await;
            if sqlx::query(&setting).execute(&mut *transaction).await.is_err() {
                let _ = sqlx::query("ROLLBACK TO SAVEPOINT setting").execute(&mut *transaction).await;
            }
        }
        let mut sql = sqlx::query(&statement)
            .bind(vector_literal(&query.vector))
            .bind(i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX));
        for parameter in parameters {
            sql = match parameter {
                Parameter::Text(text) => sql.bind(text),
                Parameter::Number(number) => sql.bind(number),
            };
        }
        let rows = sql.fetch_all(&mut *transaction).await.map_err(|cause| self.sql_error(cause))?;
        transaction.commit().await.map_err(|cause| self.sql_error(cause))?;
        let mut hits = Vec::with_capacity(rows.len());
        for row in rows {
            let score: f32 = row.try_get("score").map_err(|cause| self.sql_error(cause))?;
            if query.score_threshold.is_some_and(|threshold| score < threshold) {
                continue;
            }
            let metadata: String = row.try_get("metadata").map_err(|cause| self.sql_error(cause))?;
            let metadata = match serde_json::from_str(&metadata).map_err(|cause| self.error(cause))? {
                Value::Object(map) => map,
                _ => serde_json::Map::new(),
            };
            hits.push(SearchHit {
                document_id: row.try_get("document_id").map_err(|cause| self.sql_error(cause))?,
                chunk_index: u32::try_from(
                    row.try_get::<i32, _>("chunk_index").map_err(|cause| self.sql_error(cause))?,
                )
                .unwrap_or(0),
                score,
                text: row.try_get("text").map_err(|cause| self.sql_error(cause))?,
                metadata,
            });
        }
        Ok(hits)
    }

    async fn stats(&self) -> Result<StoreStats> {
        let documents: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.documents_table))
            .fetch_one(&self.pool)
            .await
            .map_err(|cause| self.sql_error(cause))?;
        let dimension = self.stored_dimension().await?;
        let chunks: i64 = if dimension.is_some() {
            sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.table))
                .fetch_one(&self.pool)
                .await
                .map_err(|cause| self.sql_error(cause))?
        } else {
            0
        };
        Ok(StoreStats {
            documents: u64::try_from(documents).unwrap_or(0),
            chunks: u64::try_from(chunks).unwrap_or(0),
            dimension,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn filters_become_parameterised_sql() {
        let filter = Filter::parse(
            &json!({"type": "and", "filters": [
                {"type": "eq", "key": "lang", "value": "en"},
                {"type": "gte", "key": "year", "value": 2020},
                {"type": "nin", "key": "tag", "value": ["a", "b"]}
            ]}),
            "filters",
        )
        .unwrap();
        let mut parameters = Vec::new();
        let sql = filter_sql(&filter, &mut parameters, 3);
        assert_eq!(parameters.len(), 7);
        assert!(sql.starts_with("(COALESCE((d.metadata -> $3) = $4::text::jsonb, false) AND CASE"), "{sql}");
        assert!(sql.contains("NOT COALESCE((d.metadata -> $7) IN ($8::text::jsonb, $9::text::jsonb), false)"), "{sql}");
        assert!(!sql.contains("en"), "values are parameters, never SQL text: {sql}");
    }

    #[test]
    fn table_names_are_checked() {
        assert!(valid_table("docs_chunks"));
        assert!(!valid_table("Docs"));
        assert!(!valid_table("x; drop table y"));
        assert!(!valid_table(""));
    }
}

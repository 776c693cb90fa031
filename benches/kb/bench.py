"""nstream's vector stores vs Chroma (embedded), same corpus, same model (all-MiniLM-L6-v2), same run.

For each size (10k and 100k chunks by default):
  - ingest throughput, chunks/s including embedding: nstream through the OpenAI files/vector-stores
    API (one JSONL upload, attach, poll to completed); Chroma through `collection.add` with its
    SentenceTransformerEmbeddingFunction, in batches.
  - query latency p50/p99 of a top-10 search (nstream: POST /v1/vector_stores/{id}/search over
    HTTP, embedding included; Chroma: `collection.query` in process, embedding included).
  - recall@10 of each side's results against exact search over sentence-transformers' vectors, and
    for nstream also against exact search over its own vectors (the index's recall alone).

Prints one markdown table with the ratios and writes results/<date>.json. Run through run.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "tests" / "fixtures" / "kb" / "docs"
MODEL_FILE = ROOT / "examples" / "knowledge-base.yaml"


def corpus(size: int, seed: int = 7) -> list[str]:
    """`size` distinct passages of one to three sentences from the fixture documents, shuffled."""
    sentences = []
    for path in sorted(DOCS.glob("*.md")):
        for line in path.read_text().splitlines():
            for sentence in line.replace("# ", "").split(". "):
                if len(sentence.split()) >= 5:
                    sentences.append(sentence.strip().rstrip("."))
    rng = random.Random(seed)
    passages = []
    for index in range(size):
        picked = rng.sample(sentences, rng.randint(1, 3))
        passages.append(f"{'. '.join(picked)}. (passage {index})")
    return passages


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# Extra nstream-server flags (`--server-flags`), e.g. `--dtype bf16`.
SERVER_FLAGS: list[str] = []


def start_server(binary: Path, data_dir: Path, model_file: Path = MODEL_FILE, env: dict | None = None):
    process = subprocess.Popen(
        [str(binary), "--model-file", str(model_file), "--port", "0", "--data-dir", str(data_dir), *SERVER_FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", RUST_LOG="info", NO_COLOR="1", **(env or {})),
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "serving on http://" in line:
            address = line.split("serving on http://", 1)[1].split("/", 1)[0]
            return process, f"http://{address}"
    raise RuntimeError("nstream-server did not start")


def pg_model_file(folder: Path, table: str) -> Path:
    """The example's EmbeddingModel and a KnowledgeBase `bench-pg` in PostgreSQL (table `table`)."""
    embedding_model = MODEL_FILE.read_text().split("\n---\n")[0]
    path = folder / "kb-postgres.yaml"
    path.write_text(
        embedding_model
        + "\n---\napiVersion: llm.nstream.ai/v1\nkind: KnowledgeBase\nmetadata:\n  name: bench-pg\nspec:\n"
        + "  embeddingModel: minilm\n  store:\n    postgres:\n      connectionSecretRef: {name: pg, key: url}\n"
        + f"      table: {table}\n"
    )
    return path


def nstream_run(binary: Path, passages: list[str], queries: list[str], pg_url: str | None = None,
                own_exact: list[list[str]] | None = None) -> dict:
    """Ours: a store made through the API (the embedded store), or with `pg_url` the YAML-declared
    KnowledgeBase `bench-pg` in PostgreSQL + pgvector. `own_exact`: the exact top-10 over the same
    server's vectors when an earlier run of the same binary and flags computed it."""
    import openai

    with tempfile.TemporaryDirectory() as data_dir:
        if pg_url:
            table = f"bench_{len(passages)}_{int(time.time())}"
            model_file = pg_model_file(Path(data_dir), table)
            process, base = start_server(binary, Path(data_dir), model_file, {"NSTREAM_SECRET_PG_URL": pg_url})
        else:
            process, base = start_server(binary, Path(data_dir))
        try:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=3600)
            lines = "".join(json.dumps({"id": str(index), "text": text}) + "\n" for index, text in enumerate(passages))
            uploaded = client.files.create(file=("corpus.jsonl", lines.encode()), purpose="assistants")
            store_id = "bench-pg" if pg_url else client.vector_stores.create(name="bench").id
            started = time.perf_counter()
            attached = client.vector_stores.files.create_and_poll(
                file_id=uploaded.id, vector_store_id=store_id, poll_interval_ms=200
            )
            ingest = time.perf_counter() - started
            assert attached.status == "completed", attached.last_error
            latencies, results = [], []
            for query in queries:
                began = time.perf_counter()
                page = client.vector_stores.search(store_id, query=query, max_num_results=10)
                latencies.append(time.perf_counter() - began)
                results.append([hit.content[0].text for hit in page.data])
            return {"ingest_s": ingest, "latencies": latencies, "results": results,
                    "own_exact": own_exact or own_exact_top10(client, passages, queries)}
        finally:
            process.terminate()
            process.wait(30)


def chroma_run(passages: list[str], queries: list[str], batch: int) -> dict:
    import chromadb
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

    function = SentenceTransformerEmbeddingFunction(model_name="sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        client = chromadb.PersistentClient(path=folder)
        collection = client.create_collection("bench", embedding_function=function, metadata={"hnsw:space": "cosine"})
        started = time.perf_counter()
        for start in range(0, len(passages), batch):
            part = passages[start : start + batch]
            collection.add(ids=[str(start + offset) for offset in range(len(part))], documents=part)
        ingest = time.perf_counter() - started
        latencies, results = [], []
        for query in queries:
            began = time.perf_counter()
            answer = collection.query(query_texts=[query], n_results=10)
            latencies.append(time.perf_counter() - began)
            results.append(answer["documents"][0])
        return {"ingest_s": ingest, "latencies": latencies, "results": results,
                "vectors": stored_vectors(collection, len(passages), batch)}


def stored_vectors(collection, count: int, batch: int):
    """The sentence-transformers vectors Chroma stored, in passage order (ids are positions)."""
    import numpy

    vectors = numpy.zeros((count, 0), dtype=numpy.float32)
    for start in range(0, count, batch):
        page = collection.get(ids=[str(index) for index in range(start, min(count, start + batch))], include=["embeddings"])
        if vectors.shape[1] == 0:
            vectors = numpy.zeros((count, len(page["embeddings"][0])), dtype=numpy.float32)
        for identifier, vector in zip(page["ids"], page["embeddings"]):
            vectors[int(identifier)] = vector
    return vectors


def exact_top10(passages: list[str], queries: list[str], vectors) -> list[list[str]]:
    """Exact top-10 over sentence-transformers' passage vectors (`vectors`, the ones Chroma's
    embedding function computed and stored: the same model, not encoded a second time)."""
    import numpy
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    vectors = vectors / numpy.linalg.norm(vectors, axis=1, keepdims=True)
    query_vectors = model.encode(queries, normalize_embeddings=True)
    scores = query_vectors @ vectors.T
    return [[passages[index] for index in numpy.argsort(-row)[:10]] for row in scores]


def own_exact_top10(client, passages: list[str], queries: list[str]) -> list[list[str]]:
    """Exact top-10 over the server's own vectors (its /v1/embeddings, the same model and precision
    that indexed the store): what the ANN index alone is measured against, apart from how far our
    vectors are from sentence-transformers'."""
    import numpy

    def embed(texts: list[str]):
        rows = []
        for start in range(0, len(texts), 64):
            answer = client.embeddings.create(model="minilm", input=texts[start : start + 64])
            rows.extend(item.embedding for item in answer.data)
        vectors = numpy.asarray(rows, dtype=numpy.float32)
        return vectors / numpy.linalg.norm(vectors, axis=1, keepdims=True)

    scores = embed(queries) @ embed(passages).T
    return [[passages[index] for index in numpy.argsort(-row)[:10]] for row in scores]


def recall(found: list[list[str]], exact: list[list[str]]) -> float:
    return statistics.mean(len(set(a) & set(b)) / 10 for a, b in zip(found, exact))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--chroma-batch", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--pg-url", help="also measure the PostgreSQL + pgvector store at this URL")
    parser.add_argument("--server-flags", default="", help='extra nstream-server flags, e.g. "--dtype bf16"')
    parser.add_argument("--label", help="results/<date>-<label>.json instead of results/<date>.json")
    arguments = parser.parse_args()
    SERVER_FLAGS.extend(arguments.server_flags.split())

    rows = []
    for size in arguments.sizes:
        passages = corpus(size)
        queries = [text.split(" (passage")[0][:120] for text in random.Random(1).sample(passages, arguments.queries)]
        ours = nstream_run(arguments.server_bin, passages, queries)
        theirs = chroma_run(passages, queries, arguments.chroma_batch)
        exact = exact_top10(passages, queries, theirs["vectors"])
        row = {
            "chunks": size,
            "server_flags": arguments.server_flags,
            "nstream_chunks_per_s": size / ours["ingest_s"],
            "chroma_chunks_per_s": size / theirs["ingest_s"],
            "nstream_p50_ms": 1000 * percentile(ours["latencies"], 0.5),
            "nstream_p99_ms": 1000 * percentile(ours["latencies"], 0.99),
            "chroma_p50_ms": 1000 * percentile(theirs["latencies"], 0.5),
            "chroma_p99_ms": 1000 * percentile(theirs["latencies"], 0.99),
            "nstream_recall_at_10": recall(ours["results"], exact),
            "nstream_index_recall_at_10": recall(ours["results"], ours["own_exact"]),
            "chroma_recall_at_10": recall(theirs["results"], exact),
        }
        row["ingest_ratio"] = row["nstream_chunks_per_s"] / row["chroma_chunks_per_s"]
        row["p50_ratio"] = row["nstream_p50_ms"] / row["chroma_p50_ms"]
        if arguments.pg_url:
            try:
                pg = nstream_run(arguments.server_bin, passages, queries, arguments.pg_url, ours["own_exact"])
                row["pgvector_chunks_per_s"] = size / pg["ingest_s"]
                row["pgvector_p50_ms"] = 1000 * percentile(pg["latencies"], 0.5)
                row["pgvector_p99_ms"] = 1000 * percentile(pg["latencies"], 0.99)
                row["pgvector_recall_at_10"] = recall(pg["results"], exact)
                row["pgvector_index_recall_at_10"] = recall(pg["results"], pg["own_exact"])
            except Exception as error:  # noqa: BLE001 - a failed pgvector side must not lose the others
                row["pgvector_error"] = repr(error)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    print("| chunks | ingest chunks/s nstream / Chroma (ratio) | p50 ms nstream / Chroma (ratio) | p99 ms nstream / Chroma "
          "| recall@10 vs exact over sentence-transformers' vectors, nstream / Chroma | nstream index recall@10 (own vectors) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['chunks']} | {row['nstream_chunks_per_s']:.0f} / {row['chroma_chunks_per_s']:.0f} ({row['ingest_ratio']:.2f}x) "
            f"| {row['nstream_p50_ms']:.1f} / {row['chroma_p50_ms']:.1f} ({row['p50_ratio']:.2f}x) "
            f"| {row['nstream_p99_ms']:.1f} / {row['chroma_p99_ms']:.1f} "
            f"| {row['nstream_recall_at_10']:.3f} / {row['chroma_recall_at_10']:.3f} "
            f"| {row['nstream_index_recall_at_10']:.3f} |"
        )
    for row in rows:
        if "pgvector_chunks_per_s" in row:
            print(
                f"\npgvector store, {row['chunks']} chunks: {row['pgvector_chunks_per_s']:.0f} chunks/s "
                f"({row['pgvector_chunks_per_s'] / row['chroma_chunks_per_s']:.2f}x Chroma), p50 "
                f"{row['pgvector_p50_ms']:.1f} ms, p99 {row['pgvector_p99_ms']:.1f} ms, recall@10 "
                f"{row['pgvector_recall_at_10']:.3f} (index alone: {row['pgvector_index_recall_at_10']:.3f})"
            )
        elif "pgvector_error" in row:
            print(f"\npgvector store, {row['chunks']} chunks: failed: {row['pgvector_error']}")
    arguments.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{arguments.label}" if arguments.label else ""
    results = arguments.out / f"{time.strftime('%Y-%m-%d')}{suffix}.json"
    results.write_text(json.dumps(rows, indent=2))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import chart  # benches/chart.py: the results' SVG chart, next to them
    chart.after_run(results, bench="kb")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The official `openai` Python client against nstream's files and vector-stores API.

nstream-server serves examples/knowledge-base.yaml (the EmbeddingModel `minilm` and the
KnowledgeBase `docs`) with an API key and a throwaway data directory. The unmodified client
uploads files, creates a store, attaches files with `create_and_poll` (in_progress -> completed),
searches with and without OpenAI's filters and a score threshold, pages through lists, renames a
store and changes a file's attributes (indexed again), indexes a PDF (and fails a broken one
clearly), deletes a file and sees it gone from results, attaches a file to the declared KnowledgeBase, gets its
exception classes for bad requests, and finds everything again after a restart.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import openai
import pytest

from test_openai_client import ROOT, RunningServer, nstream_server, server_binary

MODEL_FILE = ROOT / "examples" / "knowledge-base.yaml"
DOCS = ROOT / "tests" / "fixtures" / "kb" / "docs"
API_KEY = "sk-vector-stores"
QUESTION = "How do I know my sourdough starter is ready for baking?"
TOPICS = {"sourdough.md": "cooking", "tides.md": "science", "espresso.md": "cooking", "black-holes.md": "science"}


def serve(data_dir: Path):
    return nstream_server("--api-key", API_KEY, "--data-dir", str(data_dir), model_file=MODEL_FILE)


def make_client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nstream-data")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[RunningServer]:
    with serve(data_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return make_client(server)


@pytest.fixture(scope="module")
def store(client: openai.OpenAI) -> dict:
    """A store with four attached files (attributes: topic), indexed."""
    files = {}
    for name in TOPICS:
        with open(DOCS / name, "rb") as handle:
            uploaded = client.files.create(file=handle, purpose="assistants")
        assert uploaded.object == "file" and uploaded.filename == name
        assert uploaded.bytes == (DOCS / name).stat().st_size
        files[name] = uploaded.id
    created = client.vector_stores.create(name="python-e2e")
    assert created.object == "vector_store"
    assert created.metadata["embedding_model"] == "minilm"
    for name, file_id in files.items():
        attached = client.vector_stores.files.create_and_poll(
            file_id=file_id, vector_store_id=created.id, attributes={"topic": TOPICS[name]}, poll_interval_ms=50
        )
        assert attached.status == "completed", attached.last_error
        assert attached.usage_bytes > 0
    return {"id": created.id, "files": files}


def test_store_counts_completed_files(client: openai.OpenAI, store: dict) -> None:
    shown = client.vector_stores.retrieve(store["id"])
    assert shown.status == "completed"
    assert shown.file_counts.completed == 4 and shown.file_counts.total == 4
    assert shown.usage_bytes > 0
    listed = client.vector_stores.files.list(vector_store_id=store["id"])
    assert sorted(file.id for file in listed) == sorted(store["files"].values())
    assert all(file.status == "completed" for file in listed)
    one = client.vector_stores.files.retrieve(store["files"]["tides.md"], vector_store_id=store["id"])
    assert one.attributes == {"topic": "science"}


def test_search_ranks_the_answering_file_first(client: openai.OpenAI, store: dict) -> None:
    results = client.vector_stores.search(store["id"], query=QUESTION, max_num_results=3).data
    assert 1 <= len(results) <= 3
    assert results[0].filename == "sourdough.md"
    assert results[0].file_id == store["files"]["sourdough.md"]
    assert results[0].attributes["topic"] == "cooking"
    assert results[0].content[0].type == "text" and "starter" in results[0].content[0].text
    scores = [result.score for result in results]
    assert scores == sorted(scores, reverse=True)


def test_search_with_filters_and_threshold(client: openai.OpenAI, store: dict) -> None:
    science = client.vector_stores.search(
        store["id"], query=QUESTION, filters={"type": "eq", "key": "topic", "value": "science"}
    ).data
    assert science and {result.filename for result in science} <= {"tides.md", "black-holes.md"}
    compound = client.vector_stores.search(
        store["id"],
        query="espresso coffee",
        filters={
            "type": "and",
            "filters": [
                {"type": "eq", "key": "topic", "value": "cooking"},
                {"type": "ne", "key": "source", "value": "sourdough.md"},
            ],
        },
    ).data
    assert compound and {result.filename for result in compound} == {"espresso.md"}
    strict = client.vector_stores.search(store["id"], query=QUESTION, ranking_options={"score_threshold": 0.99})
    assert strict.data == []


def test_lists_page_with_the_cursor(client: openai.OpenAI, store: dict) -> None:
    first = client.files.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    every = [file.id for file in client.files.list(limit=2)]  # the client follows `after`
    assert len(every) == len(set(every)) >= 4
    assert set(store["files"].values()) <= set(every)
    stores = {vector_store.id for vector_store in client.vector_stores.list(limit=1)}
    assert {store["id"], "docs"} <= stores


def test_declared_knowledge_base_is_a_store(client: openai.OpenAI) -> None:
    declared = client.vector_stores.retrieve("docs")
    assert declared.metadata["knowledge_base"] == "docs"
    with open(DOCS / "honeybees.md", "rb") as handle:
        attached = client.vector_stores.files.upload_and_poll(vector_store_id="docs", file=handle, poll_interval_ms=50)
    assert attached.status == "completed", attached.last_error
    results = client.vector_stores.search("docs", query="How do bees tell each other where flowers are?").data
    assert results[0].filename == "honeybees.md"
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.delete("docs")


def test_bad_requests_name_the_field(client: openai.OpenAI, store: dict) -> None:
    cases = [
        ({"query": QUESTION, "max_num_results": 0}, "max_num_results"),
        ({"query": QUESTION, "max_num_results": 10_000}, "max_num_results"),
        ({"query": ""}, "query"),
        ({"query": QUESTION, "filters": {"type": "like", "key": "topic", "value": "x"}}, "filters.type"),
        ({"query": QUESTION, "ranking_options": {"score_threshold": 3}}, "ranking_options.score_threshold"),
    ]
    for arguments, field in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            client.vector_stores.search(store["id"], **arguments)
        assert raised.value.param == field, (arguments, raised.value)
        assert field in raised.value.message
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve("vs_missing")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id=store["id"], file_id="file-missing")
    with pytest.raises(openai.BadRequestError) as raised:
        client.vector_stores.create(metadata={"embedding_model": "bge"})
    assert raised.value.param == "metadata.embedding_model"
    anonymous = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.vector_stores.list()


def test_updates_rename_and_reindex_attributes(client: openai.OpenAI, store: dict) -> None:
    renamed = client.vector_stores.update(store["id"], name="renamed", metadata={"team": "docs"})
    assert renamed.name == "renamed"
    assert renamed.metadata == {"team": "docs", "embedding_model": "minilm"}
    tides = store["files"]["tides.md"]
    updated = client.vector_stores.files.update(tides, vector_store_id=store["id"], attributes={"topic": "ocean"})
    assert updated.attributes == {"topic": "ocean"}
    done = client.vector_stores.files.poll(tides, vector_store_id=store["id"], poll_interval_ms=50)
    assert done.status == "completed", done.last_error
    ocean = client.vector_stores.search(
        store["id"], query="sea level", filters={"type": "eq", "key": "topic", "value": "ocean"}
    ).data
    assert ocean and {result.filename for result in ocean} == {"tides.md"}
    with pytest.raises(openai.BadRequestError) as raised:
        client.vector_stores.update(store["id"], metadata={"embedding_model": "other"})
    assert raised.value.param == "metadata.embedding_model"


def test_a_pdf_is_indexed_by_its_text_and_a_broken_one_fails_clearly(client: openai.OpenAI) -> None:
    pdf = ROOT / "tests" / "fixtures" / "kb" / "pdf" / "policy.pdf"
    store = client.vector_stores.create(name="pdfs")
    with open(pdf, "rb") as handle:
        attached = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=handle, poll_interval_ms=50)
    assert attached.status == "completed", attached.last_error
    top = client.vector_stores.search(store.id, query="How long is a kettle covered against defects?").data[0]
    assert top.filename == "policy.pdf"
    assert top.attributes.get("format") in (None, "pdf")
    assert "two-year warranty" in " ".join(part.text for part in top.content)
    content = " ".join(part.text for part in client.vector_stores.files.content(attached.id, vector_store_id=store.id))
    assert "Customers may return a teapot within 30 days" in content
    # A PDF cut short: the file fails with a message naming it; the store keeps the good one.
    broken = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("broken.pdf", pdf.read_bytes()[:900]), poll_interval_ms=50
    )
    assert broken.status == "failed"
    assert broken.last_error.code == "unsupported_file"
    assert "broken.pdf" in broken.last_error.message and "PDF" in broken.last_error.message
    assert client.vector_stores.retrieve(store.id).file_counts.completed == 1
    assert client.vector_stores.delete(store.id).deleted


def test_deleted_file_leaves_results_and_restart_keeps_the_rest(
    client: openai.OpenAI, store: dict, server: RunningServer, data_dir: Path
) -> None:
    # Runs last in this module: it stops the module's server.
    removed = client.files.delete(store["files"]["sourdough.md"])
    assert removed.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(store["files"]["sourdough.md"])
    results = client.vector_stores.search(store["id"], query=QUESTION, max_num_results=10).data
    assert results and all(result.filename != "sourdough.md" for result in results)
    detached = client.vector_stores.files.delete(store["files"]["espresso.md"], vector_store_id=store["id"])
    assert detached.deleted
    server.stop()

    with serve(data_dir) as restarted:
        again = make_client(restarted)
        shown = again.vector_stores.retrieve(store["id"])
        assert shown.name == "renamed"
        assert shown.file_counts.completed == 2
        assert {file.id for file in again.files.list()} >= {store["files"]["tides.md"], store["files"]["espresso.md"]}
        top = again.vector_stores.search(store["id"], query="Why does the sea rise twice a day?").data[0]
        assert top.filename == "tides.md"
        assert again.vector_stores.delete(store["id"]).deleted
        with pytest.raises(openai.NotFoundError):
            again.vector_stores.retrieve(store["id"])


def test_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    """Models are still served without KnowledgeBases; with one, the start fails naming the path."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("x")
    model_only = ROOT / "examples" / "all-minilm-l6-v2.yaml"
    with nstream_server("--data-dir", str(blocked), model_file=model_only) as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0)
        assert len(client.embeddings.create(model="all-minilm-l6-v2", input="still served").data) == 1
        with pytest.raises(openai.NotFoundError) as raised:
            client.vector_stores.list()
        assert "serves no vector stores" in raised.value.message

    failed = subprocess.run(
        [str(server_binary()), "--model-file", str(MODEL_FILE), "--port", "0", "--data-dir", str(blocked)],
        env=dict(os.environ, HF_HUB_OFFLINE="1", NO_COLOR="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode != 0
    assert "not-a-folder" in failed.stdout + failed.stderr, failed.stdout + failed.stderr

"""The official `openai` Python client against nstream's vector-store file batches, expiry and
file contents.

nstream-server serves examples/knowledge-base.yaml (the EmbeddingModel `minilm`) with an API key
and a throwaway data directory. The unmodified client attaches files in batches with
`create_and_poll` and `upload_and_poll`, pages through a batch's files, cancels a batch, sets and
removes a store's `expires_after`, uploads a file with `expires_after`, attaches a file twice,
reads a file's parsed content, and gets OpenAI's errors (with `param` naming the field) for bad
batches and policies.
"""

from __future__ import annotations

from typing import Iterator

import openai
import pytest

from test_openai_client import RunningServer
from test_vector_stores import DOCS, make_client, serve

STATIC = {"type": "static", "static": {"max_chunk_size_tokens": 150, "chunk_overlap_tokens": 30}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve(tmp_path_factory.mktemp("nstream-batches")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return make_client(server)


def upload(client: openai.OpenAI, name: str) -> str:
    with open(DOCS / name, "rb") as handle:
        return client.files.create(file=handle, purpose="assistants").id


def test_create_and_poll_applies_attributes_and_chunking(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="batches")
    file_ids = [upload(client, name) for name in ("tides.md", "espresso.md", "sourdough.md")]
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=store.id,
        file_ids=file_ids,
        attributes={"origin": "batch"},
        chunking_strategy=STATIC,
        poll_interval_ms=50,
    )
    assert batch.object == "vector_store.file_batch" and batch.id.startswith("vsfb_")
    assert batch.vector_store_id == store.id
    assert batch.status == "completed"
    counts = batch.file_counts
    assert (counts.completed, counts.failed, counts.cancelled, counts.in_progress, counts.total) == (3, 0, 0, 0, 3)
    assert client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id).status == "completed"

    files = list(client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id, limit=1))
    assert sorted(file.id for file in files) == sorted(file_ids)  # the client followed `after`
    for file in files:
        assert file.status == "completed" and file.attributes == {"origin": "batch"}
        assert file.chunking_strategy.type == "static"
        assert file.chunking_strategy.static.max_chunk_size_tokens == 150
        assert file.chunking_strategy.static.chunk_overlap_tokens == 30
    oldest_first = client.vector_stores.file_batches.list_files(
        batch.id, vector_store_id=store.id, order="asc", limit=2
    )
    assert oldest_first.has_more and len(oldest_first.data) == 2
    before = client.vector_stores.file_batches.list_files(
        batch.id, vector_store_id=store.id, order="asc", before=oldest_first.data[1].id
    )
    assert [file.id for file in before.data] == [oldest_first.data[0].id]
    failed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id, filter="failed")
    assert failed.data == []

    results = client.vector_stores.search(
        store.id, query="espresso extraction", filters={"type": "eq", "key": "origin", "value": "batch"}
    ).data
    assert results[0].file_id == file_ids[1]
    with pytest.raises(openai.BadRequestError) as raised:
        client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id)
    assert "already completed" in raised.value.message


def test_upload_and_poll_and_per_file_attributes(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="uploads")
    handles = [open(DOCS / name, "rb") for name in ("honeybees.md", "volcano.md")]
    try:
        batch = client.vector_stores.file_batches.upload_and_poll(
            vector_store_id=store.id, files=handles, poll_interval_ms=50
        )
    finally:
        for handle in handles:
            handle.close()
    assert batch.status == "completed" and batch.file_counts.completed == 2
    top = client.vector_stores.search(store.id, query="How do bees tell each other where flowers are?").data[0]
    assert top.filename == "honeybees.md"

    tea, sleep = upload(client, "tea.md"), upload(client, "sleep.md")
    each = client.vector_stores.file_batches.create(
        vector_store_id=store.id,
        files=[
            {"file_id": tea, "attributes": {"topic": "drink"}},
            {"file_id": sleep, "attributes": {"topic": "health"}, "chunking_strategy": STATIC},
        ],
    )
    assert each.status == "in_progress" and each.file_counts.total == 2
    done = client.vector_stores.file_batches.poll(each.id, vector_store_id=store.id, poll_interval_ms=50)
    assert done.status == "completed"
    shown = client.vector_stores.files.retrieve(sleep, vector_store_id=store.id)
    assert shown.attributes == {"topic": "health"} and shown.chunking_strategy.static.max_chunk_size_tokens == 150
    drinks = client.vector_stores.search(
        store.id, query="a warm cup", filters={"type": "eq", "key": "topic", "value": "drink"}
    ).data
    assert drinks and {result.file_id for result in drinks} == {tea}
    assert client.vector_stores.retrieve(store.id).file_counts.completed == 4


def test_cancel_leaves_waiting_files_cancelled(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="cancelled")
    # More files than are indexed at once, so some still wait when the cancel arrives.
    file_ids = [upload(client, name) for name in sorted(path.name for path in DOCS.glob("*.md"))[:12]]
    batch = client.vector_stores.file_batches.create(vector_store_id=store.id, file_ids=file_ids)
    cancelled = client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id)
    assert cancelled.status == "cancelled"
    assert cancelled.file_counts.in_progress == 0 and cancelled.file_counts.cancelled >= 8
    listed = client.vector_stores.file_batches.list_files(
        batch.id, vector_store_id=store.id, filter="cancelled", limit=100
    )
    assert len(listed.data) == cancelled.file_counts.cancelled
    assert all(file.status == "cancelled" for file in listed.data)
    shown = client.vector_stores.retrieve(store.id)
    assert shown.file_counts.cancelled == cancelled.file_counts.cancelled


def test_bad_batches_name_the_field(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="bad-batches")
    known = upload(client, "tides.md")
    cases = [
        ({"file_ids": []}, "file_ids"),
        ({"file_ids": [known, known]}, "file_ids[1]"),
        ({"file_ids": [known], "attributes": {"k": {"nested": 1}}}, "attributes.k"),
        (
            {"file_ids": [known], "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 5000, "chunk_overlap_tokens": 0}}},
            "chunking_strategy.static.max_chunk_size_tokens",
        ),
        ({"file_ids": [known], "files": [{"file_id": known}]}, "files"),
    ]
    for arguments, field in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            client.vector_stores.file_batches.create(vector_store_id=store.id, **arguments)
        assert raised.value.param == field, (arguments, raised.value)
        assert field in raised.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.vector_stores.file_batches.create(vector_store_id=store.id, file_ids=[known, "file-missing"])
    assert missing.value.param == "file_ids[1]"
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.file_batches.retrieve("vsfb_missing", vector_store_id=store.id)
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.file_batches.create(vector_store_id="vs_missing", file_ids=[known])


def test_expiry_policy_and_file_content(client: openai.OpenAI) -> None:
    tides = upload(client, "tides.md")
    policy = {"anchor": "last_active_at", "days": 7}
    store = client.vector_stores.create(name="expiring", expires_after=policy, file_ids=[tides])
    assert store.expires_after is not None and store.expires_after.days == 7
    assert store.expires_at == store.last_active_at + 7 * 86_400
    for bad, field in [
        ({"anchor": "created_at", "days": 7}, "expires_after.anchor"),
        ({"anchor": "last_active_at", "days": 400}, "expires_after.days"),
    ]:
        with pytest.raises(openai.BadRequestError) as raised:
            client.vector_stores.update(store.id, expires_after=bad)
        assert raised.value.param == field, raised.value
    longer = client.vector_stores.update(store.id, expires_after={"anchor": "last_active_at", "days": 30})
    assert longer.expires_at == longer.last_active_at + 30 * 86_400
    forever = client.vector_stores.update(store.id, expires_after=None)
    assert forever.expires_after is None and forever.expires_at is None

    attached = client.vector_stores.files.poll(tides, vector_store_id=store.id, poll_interval_ms=50)
    assert attached.status == "completed", attached.last_error
    content = list(client.vector_stores.files.content(tides, vector_store_id=store.id))
    assert [part.type for part in content] == ["text"]
    assert content[0].text == (DOCS / "tides.md").read_text()
    raw = client.files.content(tides)
    assert raw.read() == (DOCS / "tides.md").read_bytes()
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.content("file-missing", vector_store_id=store.id)


def test_file_expiry_is_accepted_and_checked(client: openai.OpenAI) -> None:
    with open(DOCS / "tides.md", "rb") as handle:
        expiring = client.files.create(
            file=handle, purpose="assistants", expires_after={"anchor": "created_at", "seconds": 3600}
        )
    assert expiring.expires_at == expiring.created_at + 3600
    assert client.files.retrieve(expiring.id).expires_at == expiring.expires_at
    assert client.files.retrieve(upload(client, "espresso.md")).expires_at is None
    allowed = "from 3600 (1 hour) to 2592000 (30 days)"
    for policy, field, expected in [
        ({"anchor": "created_at", "seconds": 60}, "expires_after[seconds]", allowed),
        ({"anchor": "created_at", "seconds": 2_592_001}, "expires_after[seconds]", allowed),
        ({"anchor": "last_active_at", "seconds": 3600}, "expires_after[anchor]", "expected created_at"),
    ]:
        with open(DOCS / "tides.md", "rb") as handle, pytest.raises(openai.BadRequestError) as raised:
            client.files.create(file=handle, purpose="assistants", expires_after=policy)  # type: ignore[arg-type]
        assert raised.value.param == field, raised.value
        assert expected in str(raised.value), raised.value

    # Attaching a file again while it is indexed answers the same vector-store file.
    store = client.vector_stores.create(name="twice")
    first = client.vector_stores.files.create(vector_store_id=store.id, file_id=expiring.id)
    second = client.vector_stores.files.create(vector_store_id=store.id, file_id=expiring.id)
    assert second.id == first.id and second.created_at == first.created_at
    done = client.vector_stores.files.poll(expiring.id, vector_store_id=store.id, poll_interval_ms=50)
    assert done.status == "completed", done.last_error
    again = client.vector_stores.files.create(vector_store_id=store.id, file_id=expiring.id)
    assert again.status == "completed" and again.created_at == first.created_at
    assert client.vector_stores.retrieve(store.id).file_counts.total == 1

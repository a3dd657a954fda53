"""OpenAI's Files API with the official client: upload, list, retrieve, download, delete;
files stay within their tenant; bad uploads get clear errors and leave nothing behind."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import API_KEY, Gateway

DATA = (b'{"messages": [{"role": "user", "content": "hi"}, '
        b'{"role": "assistant", "content": "hello"}]}\n')


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> OpenAI:
    return OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0)


def member_client(gateway: Gateway) -> OpenAI:
    admin = httpx.Client(base_url=gateway.url, headers=gateway.headers)
    tenant = admin.post("/admin/tenants", json={"name": f"files-{uuid.uuid4().hex[:8]}"})
    key = admin.post("/admin/keys", json={"tenant_id": tenant.json()["id"]}).json()["key"]
    admin.close()
    return OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


def stored_files(gateway: Gateway) -> list[Path]:
    root = Path(gateway.settings["files"]["root"])
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_upload_list_retrieve_download_delete(client: OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(DATA * 3)
    with path.open("rb") as fh:
        created = client.files.create(file=fh, purpose="fine-tune")
    assert (created.object, created.bytes, created.filename, created.purpose) == (
        "file", len(DATA) * 3, "train.jsonl", "fine-tune")
    assert created.id.startswith("file-") and created.status == "processed"
    assert created.id in [f.id for f in client.files.list(purpose="fine-tune")]
    assert client.files.retrieve(created.id).bytes == len(DATA) * 3
    assert client.files.content(created.id).read() == DATA * 3
    deleted = client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_list_pages_newest_first(client: OpenAI) -> None:
    ids = [client.files.create(file=(f"f{i}.jsonl", DATA), purpose="batch").id
           for i in range(3)]
    page = client.files.list(purpose="batch", limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    rest = client.files.list(purpose="batch", limit=2, after=page.data[-1].id)
    assert ids[0] in [f.id for f in rest.data]
    for file_id in ids:
        client.files.delete(file_id)


def test_files_are_private_to_their_tenant(gateway: Gateway, client: OpenAI) -> None:
    mine = client.files.create(file=("secret.jsonl", DATA), purpose="fine-tune")
    other = member_client(gateway)
    assert mine.id not in [f.id for f in other.files.list()]
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    assert client.files.retrieve(mine.id).id == mine.id
    client.files.delete(mine.id)


def test_bad_uploads_are_refused_and_leave_nothing(gateway: Gateway, client: OpenAI) -> None:
    before = stored_files(gateway)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", DATA), purpose="nonsense")  # type: ignore[arg-type]
    too_big = b"x" * (1024 * 1024 + 1)
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", too_big), purpose="fine-tune")
    assert info.value.status_code == 413
    missing = httpx.post(f"{gateway.base_url}/files", headers=gateway.headers,
                         data={"purpose": "fine-tune"}, files={"other": ("a", b"b")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    not_multipart = httpx.post(f"{gateway.base_url}/files", headers=gateway.headers,
                               json={"purpose": "fine-tune"})
    assert not_multipart.status_code == 400
    assert stored_files(gateway) == before

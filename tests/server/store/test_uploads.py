"""server/store/uploads.py: uploaded files per owner, written atomically, found only by their owner."""

from __future__ import annotations

import pytest

from server.store import FileStore, owner_hash

DATA = b'{"text": "x = 1\\n"}\n'


def test_add_get_read_list_delete(tmp_path):
    store = FileStore(tmp_path)
    first = store.add("key-a", "train.jsonl", "fine-tune", DATA)
    second = store.add("key-a", "more.jsonl", "fine-tune", DATA * 2)
    assert first["id"].startswith("file-") and first["id"] != second["id"]
    assert {k: first[k] for k in ("object", "bytes", "filename", "purpose", "status")} == {
        "object": "file", "bytes": len(DATA), "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed"}
    assert store.get("key-a", first["id"]) == first
    assert store.read("key-a", second["id"]) == DATA * 2
    assert {r["id"] for r in store.list("key-a")} == {first["id"], second["id"]}
    assert store.list("key-a", purpose="batch") == []

    # Only the key's hash names the directory; no temporary files are left behind.
    folder = tmp_path / "files" / owner_hash("key-a")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{r['id']}{ext}" for r in (first, second) for ext in (".json", ".data"))

    assert store.delete("key-a", first["id"]) == {"id": first["id"], "object": "file", "deleted": True}
    assert [r["id"] for r in store.list("key-a")] == [second["id"]]
    for call in (store.get, store.read, store.delete):
        with pytest.raises(KeyError):
            call("key-a", first["id"])


def test_other_keys_and_malformed_ids_find_nothing(tmp_path):
    store = FileStore(tmp_path)
    mine = store.add("key-a", "train.jsonl", "fine-tune", DATA)
    assert store.list("key-b") == [] and store.list(None) == []
    for owner, file_id in [("key-b", mine["id"]), (None, mine["id"]), ("key-a", "../../jobs/x"),
                           ("key-a", mine["id"] + ".json"), ("key-a", 7)]:
        for call in (store.get, store.read, store.delete):
            with pytest.raises(KeyError):
                call(owner, file_id)
    assert store.read("key-a", mine["id"]) == DATA


def test_an_interrupted_upload_is_not_listed(tmp_path):
    store = FileStore(tmp_path)
    kept = store.add("key-a", "a.jsonl", "fine-tune", DATA)
    # Bytes written but no file object (the server stopped in between): nothing to list or read.
    (tmp_path / "files" / owner_hash("key-a") / "file-0123456789abcdef01234567.data").write_bytes(DATA)
    assert [r["id"] for r in store.list("key-a")] == [kept["id"]]
    with pytest.raises(KeyError):
        store.read("key-a", "file-0123456789abcdef01234567")

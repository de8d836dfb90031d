"""server/store/ on its own: versioned PEFT adapters per owner, names, atomic files.

Snapshots are real ``AdapterSnapshot`` objects with random factors (no model is
needed to store one); everything is written under ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch

from adapter_core import AdapterSnapshot, load_peft
from server.store import (
    SESSION_PREFIX,
    AdapterStore,
    StoreError,
    check_name,
    owner_hash,
    write_file_atomic,
    write_json_atomic,
)

BASE = "tiny-base"
MODULES = {"model.layers.0.self_attn.q_proj": (4, 16, 24), "model.layers.0.mlp.down_proj": (2, 32, 16)}
PEFT_FILES = {"adapter_model.safetensors", "adapter_config.json", "dynarank.json"}


def snapshot(version: int, seed: int = 0, **metadata) -> AdapterSnapshot:
    """A snapshot with non-zero factors of different ranks per module."""
    gen = torch.Generator().manual_seed(seed * 1000 + version)
    A = {n: torch.randn(r, fan_in, generator=gen) for n, (r, fan_in, _) in MODULES.items()}
    B = {n: torch.randn(fan_out, r, generator=gen) for n, (r, _, fan_out) in MODULES.items()}
    scale = {n: 0.5 + i for i, n in enumerate(MODULES)}
    return AdapterSnapshot.from_tensors(version, A, B, scale, {"policy": "fixed", **metadata})


def assert_same(a: AdapterSnapshot, b: AdapterSnapshot) -> None:
    assert a.version == b.version
    assert a.ranks == b.ranks
    assert dict(a.scale) == pytest.approx(dict(b.scale))
    for name in a.modules:
        assert torch.equal(a.A[name], b.A[name]), name
        torch.testing.assert_close(a.B[name], b.B[name], rtol=1e-6, atol=1e-7)


def differs(a: AdapterSnapshot, b: AdapterSnapshot) -> bool:
    return any(not torch.equal(a.A[n], b.A[n]) for n in a.modules)


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path, BASE, keep_versions=3)


def visible_entries(directory) -> set[str]:
    return {p.name for p in directory.iterdir()}


# -- save / load ------------------------------------------------------------------

def test_round_trip_keeps_factors_scales_and_metadata(store):
    snap = snapshot(1, note="hello", step=7)
    path = store.save("key-a", "myrepo", snap, info={"kind": "repository", "repository": {"id": "r1"}})
    assert {p.name for p in path.iterdir()} == PEFT_FILES
    loaded = store.load("key-a", "myrepo")
    assert_same(snap, loaded)
    assert loaded.metadata["note"] == "hello" and loaded.metadata["step"] == 7
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE
    assert store.versions("key-a", "myrepo") == [1]
    assert store.exists("key-a", "myrepo")
    info = store.info("key-a", "myrepo")
    assert info["kind"] == "repository" and info["name"] == "myrepo" and info["repository"] == {"id": "r1"}


def test_load_a_given_version_and_missing_ones(store):
    first, second = snapshot(1), snapshot(2)
    store.save(None, "a", first)
    store.save(None, "a", second)
    assert_same(store.load(None, "a", 1), first)
    assert_same(store.load(None, "a"), second)  # default: the latest
    with pytest.raises(KeyError):
        store.load(None, "a", 7)
    with pytest.raises(KeyError):
        store.load(None, "never-saved")
    assert store.versions(None, "never-saved") == [] and not store.exists(None, "never-saved")


def test_keep_versions_prunes_the_oldest(tmp_path):
    store = AdapterStore(tmp_path, BASE, keep_versions=2)
    snaps = {v: snapshot(v) for v in range(1, 6)}
    for v, snap in snaps.items():
        store.save("k", "repo", snap)
        assert store.versions("k", "repo") == list(range(max(1, v - 1), v + 1))
    for v in (1, 2, 3):
        with pytest.raises(KeyError):
            store.load("k", "repo", v)
    assert_same(store.load("k", "repo", 4), snaps[4])
    assert_same(store.load("k", "repo"), snaps[5])
    adapter_dir = tmp_path / "adapters" / owner_hash("k") / "repo"
    assert {p.name for p in adapter_dir.iterdir() if p.name.startswith("v")} == {"v4", "v5"}


def test_keep_versions_is_at_least_one(tmp_path):
    store = AdapterStore(tmp_path, BASE, keep_versions=0)
    store.save(None, "a", snapshot(1))
    store.save(None, "a", snapshot(2))
    assert store.versions(None, "a") == [2]


# -- owners -----------------------------------------------------------------------

def test_owners_are_isolated(store, tmp_path):
    snap = snapshot(1)
    store.save("key-a", "shared-name", snap, info={"kind": "repository"})
    assert store.exists("key-a", "shared-name")
    for other in ("key-b", None, ""):
        assert store.versions(other, "shared-name") == []
        assert not store.exists(other, "shared-name")
        assert store.list(other) == []
        assert store.info(other, "shared-name") == {}
        with pytest.raises(KeyError):
            store.load(other, "shared-name")
        with pytest.raises(KeyError):
            store.export_tar(other, "shared-name")
        assert store.delete(other, "shared-name") is False
    # B's adapter of the same name is its own.
    store.save("key-b", "shared-name", snapshot(1, seed=5))
    assert differs(store.load("key-a", "shared-name"), store.load("key-b", "shared-name"))
    assert_same(store.load("key-a", "shared-name"), snap)
    assert [r["name"] for r in store.list("key-a")] == ["shared-name"]


def test_api_keys_never_reach_the_disk(store, tmp_path):
    key = "sk-very-secret-key-123"
    store.save(key, "a", snapshot(1), info={"kind": "repository"})
    for path in tmp_path.rglob("*"):
        assert key not in str(path.relative_to(tmp_path))
        if path.is_file():
            assert key.encode() not in path.read_bytes()


def test_owner_hash():
    assert owner_hash("a") == owner_hash("a") != owner_hash("b")
    assert owner_hash(None) == owner_hash("")  # no key: the one local owner
    assert len(owner_hash("a")) == 24 and all(c in "0123456789abcdef" for c in owner_hash("a"))


# -- names ------------------------------------------------------------------------

BAD_NAMES = ["", "..", "../x", "a/b", "/abs", "a\\b", ".hidden", "a..b", "-lead", "x" * 81, "sp ace", "nul\0",
             "ü", None, 3]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_invalid_names_are_rejected_everywhere(store, tmp_path, name):
    with pytest.raises(StoreError) as err:
        check_name(name)
    assert isinstance(err.value, ValueError) and "invalid adapter name" in str(err.value)
    for call in (lambda: store.save(None, name, snapshot(1)), lambda: store.load(None, name),
                 lambda: store.versions(None, name), lambda: store.delete(None, name),
                 lambda: store.export_tar(None, name)):
        with pytest.raises(StoreError):
            call()
    assert store.exists(None, name) is False
    assert not (tmp_path / "adapters").exists()  # nothing was written anywhere


@pytest.mark.parametrize("name", ["a", "A9", "my-repo_v1.2", "x" * 80, SESSION_PREFIX + "abc"])
def test_valid_names(store, name):
    assert check_name(name) == name
    store.save(None, name, snapshot(1))
    assert store.versions(None, name) == [1]


# -- crashes ----------------------------------------------------------------------

def test_crash_mid_write_keeps_previous_version(store, monkeypatch):
    import safetensors.torch

    first = snapshot(1)
    store.save("k", "repo", first, info={"kind": "repository"})
    real_save_file = safetensors.torch.save_file

    def save_then_crash(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)  # the weights file is written...
        raise OSError("disk full")  # ...and the rest never is

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        store.save("k", "repo", snapshot(2))
    monkeypatch.undo()

    assert store.versions("k", "repo") == [1]
    assert_same(store.load("k", "repo"), first)
    assert [r["versions"] for r in store.list("k")] == [[1]]
    adapter_dir = store.root / owner_hash("k") / "repo"
    assert visible_entries(adapter_dir) == {"v1", "info.json"}  # no partial v2, no temp dir left
    # The next save of that version goes through.
    second = snapshot(2)
    store.save("k", "repo", second)
    assert store.versions("k", "repo") == [1, 2]
    assert_same(store.load("k", "repo"), second)


def test_leftovers_of_a_killed_writer_are_invisible(store):
    first = snapshot(1)
    adapter_dir = store.save("k", "repo", first).parent
    # A process killed mid-write leaves a hidden temp dir, possibly with a config
    # already in it; a directory without adapter_config.json is no version either.
    partial = adapter_dir / ".v2.tmp-killed"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    (adapter_dir / "v3").mkdir()
    (adapter_dir / "v3" / "adapter_model.safetensors").write_bytes(b"partial")
    (store.root / owner_hash("k") / ".deleted-old-1").mkdir()
    assert store.versions("k", "repo") == [1]
    assert_same(store.load("k", "repo"), first)
    assert [(r["name"], r["versions"]) for r in store.list("k")] == [("repo", [1])]


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "record.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        # json.dump writes "{"a": 2, ..." before it meets the object it cannot encode.
        write_json_atomic(path, {"a": 2, "b": "x" * 10_000, "z": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert visible_entries(path.parent) == {"record.json"}  # the temp file is gone
    write_json_atomic(path, {"a": 3})
    assert json.loads(path.read_text()) == {"a": 3}


def test_write_file_atomic_binary_and_failure(tmp_path):
    path = tmp_path / "state.bin"
    write_file_atomic(path, lambda f: f.write(b"old"), "wb")

    def half_then_fail(f):
        f.write(b"new-partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_file_atomic(path, half_then_fail, "wb")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_info_write_failure_keeps_the_old_info(store):
    store.save(None, "repo", snapshot(1), info={"kind": "repository", "repository": {"id": "r1"}})
    with pytest.raises(TypeError):
        store.save(None, "repo", snapshot(2), info={"kind": "repository", "bad": object()})
    assert store.info(None, "repo")["repository"] == {"id": "r1"}
    assert store.load(None, "repo").version in (1, 2)  # whichever version is visible loads


# -- listing, lookup, delete, export --------------------------------------------------

def test_list_and_find_for_repository(store):
    app = {"kind": "repository", "repository": {"id": "gh/app", "root_name": "app"}}
    store.save("k", "old-app", snapshot(1), info=app)
    store.save("k", "new-app", snapshot(1), info=app)
    tool = {"kind": "repository", "repository": {"id": "other", "root_name": "tool"}}
    store.save("k", "by-root", snapshot(1), info=tool)
    store.save("k", SESSION_PREFIX + "s1", snapshot(3), info={"kind": "session", "repository": {"id": "gh/sess"}})
    rows = {r["name"]: r for r in store.list("k")}
    assert set(rows) == {"old-app", "new-app", "by-root", SESSION_PREFIX + "s1"}
    assert rows[SESSION_PREFIX + "s1"]["kind"] == "session" and rows[SESSION_PREFIX + "s1"]["latest_version"] == 3
    assert rows["by-root"]["repository"] == {"id": "other", "root_name": "tool"}

    assert store.find_for_repository("k", {"id": "gh/app"}) == "new-app"  # most recently updated
    assert store.find_for_repository("k", {"id": "unknown", "root_name": "tool"}) == "by-root"  # id, then root name
    assert store.find_for_repository("k", {"id": "gh/sess"}) is None  # sessions are not repository adapters
    assert store.find_for_repository("k", {"id": "nope", "root_name": "nope"}) is None
    assert store.find_for_repository("k", None) is None
    assert store.find_for_repository("other-key", {"id": "gh/app"}) is None


def test_adapter_without_info_lists_as_repository(store):
    store.save(None, "plain", snapshot(1))
    assert store.list(None) == [{"name": "plain", "kind": "repository", "versions": [1], "latest_version": 1,
                                 "repository": None, "updated": None}]


def test_export_tar_contains_the_peft_files(store, tmp_path):
    first, second = snapshot(1), snapshot(2)
    store.save("k", "repo", first)
    store.save("k", "repo", second)
    for version, expected in ((None, second), (1, first)):
        data = store.export_tar("k", "repo", version)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            names = set(tar.getnames())
            assert {f"repo/{f}" for f in PEFT_FILES} <= names
            assert all(n == "repo" or n.startswith("repo/") for n in names)
            out = tmp_path / f"extract-{version}"
            tar.extractall(out, filter="data")
        assert_same(load_peft(out / "repo"), expected)
    with pytest.raises(KeyError):
        store.export_tar("k", "repo", 9)


def test_delete_removes_it(store):
    store.save("k", "gone", snapshot(1), info={"kind": "repository"})
    store.save("k", "gone", snapshot(2))
    store.save("k", "kept", snapshot(1))
    assert store.delete("k", "gone") is True
    assert not store.exists("k", "gone") and store.versions("k", "gone") == []
    with pytest.raises(KeyError):
        store.load("k", "gone")
    assert [r["name"] for r in store.list("k")] == ["kept"]
    assert visible_entries(store.root / owner_hash("k")) == {"kept"}  # no trash left behind
    assert store.delete("k", "gone") is False
    # The name can be used again from scratch.
    store.save("k", "gone", snapshot(5))
    assert store.versions("k", "gone") == [5]

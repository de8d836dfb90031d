"""ide_client pieces that need no server: URLs, messages, backoff, state file, CLI helpers."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ide_client import messages as m
from ide_client.backoff import Backoff
from ide_client.oneshot import parse_location, split_at
from ide_client.repo import find_root, repository_info, source_files
from ide_client.state import StateFile, default_state_path
from ide_client.urls import http_base, ws_url

ROOT = Path(__file__).resolve().parents[2]


def test_urls():
    assert ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/ws"
    assert ws_url("https://h.example/base/") == "wss://h.example/base/v1/ws"
    assert ws_url("localhost:9") == "ws://localhost:9/v1/ws"
    assert ws_url("ws://h:1/v1/ws") == "ws://h:1/v1/ws"
    assert http_base("ws://h:1/v1/ws") == "http://h:1"
    assert http_base("http://h:1/v1/") == "http://h:1"


def test_parse_known_unknown_and_extra_fields():
    ready = m.parse({"type": "ready", "session_id": "s", "resume_token": "t", "adapter_version": 2,
                     "ranks": {"a": 4}, "mean_rank": 4.0, "new_field": 1})
    assert isinstance(ready, m.Ready) and ready.adapter_version == 2 and ready.ranks == {"a": 4}
    assert isinstance(m.parse({"type": "adapted", "version": 3, "loss": 1.0}), m.Adapted)
    assert isinstance(m.parse({"type": "future.thing"}), m.Unknown)
    assert isinstance(m.parse({"type": "ready"}), m.Unknown)  # required fields missing
    assert isinstance(m.parse([1]), m.Unknown)


def test_outgoing_messages():
    assert m.hello(resume_token="t")["resume_token"] == "t" and "session_id" not in m.hello()
    assert m.complete("c1", path="a.py", cursor=(2, 3)) == {
        "type": "complete", "id": "c1", "path": "a.py", "cursor": {"line": 2, "character": 3}}
    with pytest.raises(ValueError):
        m.edit_document("a.py", 2)
    assert m.edit_document("a.py", 2, changes=[]) == {"type": "edit", "path": "a.py", "version": 2, "changes": []}


def test_backoff_grows_to_its_cap_with_jitter():
    delays = list(Backoff(initial=1, factor=2, maximum=5, jitter=0.1, max_attempts=6).delays())
    assert len(delays) == 6
    assert 0.9 <= delays[0] <= 1.1 and 1.8 <= delays[1] <= 2.2 and all(4.5 <= d <= 5.5 for d in delays[3:])


def test_state_file_is_private_and_ignored_by_git(tmp_path):
    path = default_state_path(tmp_path)
    assert path == tmp_path / ".dynarank" / "client.json"
    state = StateFile(path)
    assert state.load("http://a") == {}
    state.save("http://a", session_id="s1", resume_token="secret")
    state.save("http://b", session_id="s2", resume_token=None)
    assert state.load("http://a") == {"session_id": "s1", "resume_token": "secret"}
    assert state.load("http://b") == {"session_id": "s2"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (path.parent / ".gitignore").read_text() == "*\n"
    state.forget("http://a")
    assert state.load("http://a") == {}
    path.write_text("{not json")
    assert state.load("http://b") == {}


def test_repository_walk_and_root(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "node_modules" / "x").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("a = 1\n")
    (tmp_path / "node_modules" / "x" / "b.js").write_text("b\n")
    (tmp_path / "src" / "blob.py").write_bytes(b"\x00\x01")
    (tmp_path / "image.png").write_bytes(b"png")
    assert find_root(tmp_path / "src" / "a.py") == tmp_path.resolve()
    assert list(source_files(tmp_path)) == [("src/a.py", "a = 1\n")]
    info = repository_info(tmp_path)
    assert info["root_name"] == tmp_path.name and info == repository_info(tmp_path / "src" / "..")


def test_location_and_split():
    assert parse_location("pkg/a.py:3:5") == (Path("pkg/a.py"), 2, 4)
    assert parse_location("C:/x.py:1:1") == (Path("C:/x.py"), 0, 0)
    for bad in ("a.py", "a.py:0:1", "a.py:x:1"):
        with pytest.raises(ValueError):
            parse_location(bad)
    text = "ab\ncd\n"
    assert split_at(text, 1, 1) == ("ab\nc", "d\n")
    assert split_at(text, 0, 2) == ("ab", "\ncd\n")  # the end of a line
    assert split_at(text, 2, 0) == (text, "")  # the empty line after the last line break
    assert split_at("ab\r\ncd", 1, 2) == ("ab\r\ncd", "")
    assert split_at("", 0, 0) == ("", "")
    for line, col, message in [(0, 3, "column 4 is past the end of line 1: columns are 1-3"),
                               (2, 1, "column 2 is past the end of line 3: columns are 1-1"),
                               (3, 0, "line 4 is past the end of the file: lines are 1-3"),
                               (9, 0, "line 10 is past the end of the file: lines are 1-3")]:
        with pytest.raises(ValueError) as err:
            split_at(text, line, col)
        assert str(err.value) == message


def test_no_torch_in_ide_client():
    code = "import sys, ide_client, ide_client.cli, ide_client.watch, ide_client.finetune, ide_client.oneshot; " \
           "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'server')]"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

"""The client never sends what the privacy rules refuse: source_files, watch (every save) and finetune,
the last two against a live server (tiny random model), whose data directory is searched for the secrets."""

from __future__ import annotations

import asyncio
import io
import time

import pytest
import watchfiles

from ide_client import API
from ide_client.finetune import follow, start_job
from ide_client.repo import source_files
from ide_client.watch import Watcher
from tests.helpers import client_cli, run_client, stop_child
from tests.ide_client.test_client_live import LineReader
from tests.privacy_repo import ALLOWED, PRIVATE_KEY, REFUSED, leaked, make_private_repo

CONTENT_REFUSED = [p for p, (_, why) in REFUSED.items() if p.startswith("src/") and why not in
                   ("symlink", "ignored by .dynarankignore")]  # refused only once read: watch reports them


@pytest.fixture
def repo(tmp_path):
    return make_private_repo(tmp_path / "repo")


def test_source_files_are_the_allowed_ones(repo):
    assert dict(source_files(repo)) == ALLOWED


class FakeSession:
    """What Watcher.handle uses of a session; records the calls."""

    def __init__(self):
        self.documents: dict = {}
        self.calls: list[tuple] = []

    async def open(self, path, text, version=1):
        self.documents[path] = type("Doc", (), {"text": text})()
        self.calls.append(("open", path, text))

    async def edit(self, path, text):
        self.documents[path].text = text
        self.calls.append(("edit", path, text))
        return 2

    async def close_document(self, path):
        self.documents.pop(path)
        self.calls.append(("close", path))


def test_watch_checks_every_save(repo):
    out = []
    watcher = Watcher(ctx=None, root=repo, out=type("Out", (), {"write": lambda self, s: out.append(s),
                                                               "flush": lambda self: None})())
    watcher.known = dict(source_files(repo))
    watcher.session = FakeSession()

    async def save(rel, text=None):
        path = repo / rel
        if text is not None:
            path.write_text(text)
        if watcher._wanted(watchfiles.Change.modified, str(path)):
            await watcher.handle(watchfiles.Change.modified, path)

    async def go():
        for rel in [*REFUSED, "build_output/gen.py"]:
            if not rel.endswith("/"):
                await save(rel)
        assert watcher.session.calls == []  # nothing refused was sent
        for rel, text in ALLOWED.items():
            await save(rel, text + "# saved\n")
        assert {c[1] for c in watcher.session.calls if c[0] == "edit"} == set(ALLOWED)
        # A key pasted into an open file: closed on the server, the text never sent.
        calls = len(watcher.session.calls)
        await save("src/app.py", ALLOWED["src/app.py"] + f"K = '''{PRIVATE_KEY}'''\n")
        assert watcher.session.calls[calls:] == [("close", "src/app.py")]
        # A line added to .dynarankignore while watching: the file's next save closes it instead.
        (repo / ".dynarankignore").write_text("src/private_notes.py\nsrc/geometry.py\n")
        await save("src/geometry.py", "x = 2\n")
        assert watcher.session.calls[-1] == ("close", "src/geometry.py")
        assert "x = 2" not in str(watcher.session.calls)

    asyncio.run(go())
    printed = "".join(out)
    for rel in CONTENT_REFUSED:
        assert f"not sent  {rel} ({REFUSED[rel][1]})" in printed, printed
    assert "src/app.py (private key)" in printed and "src/geometry.py (ignored by .dynarankignore)" in printed
    assert not [c for c in watcher.session.calls if any(s in str(c) for s in ("AKIA", "BEGIN RSA"))]


# -- against a live server ---------------------------------------------------------------------------


def test_finetune_uploads_only_allowed_files(server, repo):
    sent = []
    with API(server.url) as api:
        create = api.create_job

        def recording_create(**kwargs):
            sent.extend(kwargs.get("files") or [])
            return create(**kwargs)

        api.create_job = recording_create
        job = start_job(api, repo, "private-upload", {"steps": 2, "rank_policy": "fixed"}, upload=True)
        job = follow(api, job, out=io.StringIO(), poll_s=0.2)
    assert {f["path"]: f["text"] for f in sent} == ALLOWED  # the ordinary files do arrive
    assert job["status"] == "succeeded", job
    assert job["repository"]["files"] == len(ALLOWED) and "skipped" not in job["repository"]
    assert not leaked(server.data_dir)


def test_finetune_on_a_server_path_skips_with_reasons(server, repo):
    done = run_client("finetune", str(repo), "--server", server.url, "--steps", "2", "--rank-policy", "fixed",
                      "--name", "private-path", timeout=180)
    assert done.returncode == 0, done.stdout
    with API(server.url) as api:
        job = next(j for j in api.jobs() if j["adapter_name"] == "private-path")
        events = " ".join(e["message"] or "" for e in api.job_events(job["id"], limit=100))
    assert job["status"] == "succeeded" and job["repository"]["files"] == len(ALLOWED), job
    for rel, (_, why) in REFUSED.items():
        if rel == "src/huge.py":
            assert "src/huge.py (too large" in events
        elif rel == "src/latin1.py":
            assert "src/latin1.py (not utf-8)" in events
        else:
            assert f"{rel} ({why})" in events, (rel, events)
    assert f"{len(ALLOWED)} files" in events
    assert not leaked(server.data_dir)


def test_watch_sends_allowed_files_only(server, repo):
    proc = client_cli("watch", str(repo), "--server", server.url)
    out = LineReader(proc)
    try:
        out.wait_for(f"watching {repo.resolve()} ({len(ALLOWED)} source files)", 60)
        session_id = out.wait_for("session", 10).split()[1]
        time.sleep(1.5)  # let the watcher arm before the saves
        for rel, (content, _) in REFUSED.items():  # every refused file saved with a change
            if isinstance(content, bytes):
                (repo / rel).write_bytes(content + b"\n")
            elif content:
                (repo / rel).write_text(content + "\n")
        (repo / "build_output" / "gen.py").write_text("marker_build_output = 2\n")
        for rel, text in ALLOWED.items():
            (repo / rel).write_text(text + "\n# saved\n")
        lines = [out.wait_for("  edit  ", 30) for _ in ALLOWED]
        assert {line.split()[2] for line in lines} == set(ALLOWED)
        out.wait_for("adapted", 90)  # the ordinary edits train the session
        (repo / "src" / "app.py").write_text(ALLOWED["src/app.py"] + f"K = '''{PRIVATE_KEY}'''\n")
        assert "src/app.py (private key)" in out.wait_for("not sent  src/app.py", 30)
    finally:
        stop_child(proc)
    printed = "\n".join(out.seen) + out.rest()
    assert proc.returncode == 0, printed
    for rel in CONTENT_REFUSED:
        assert f"not sent  {rel} ({REFUSED[rel][1]})" in printed, printed
    with API(server.url) as api:
        documents = api.session(session_id)["documents"]
    assert sorted(documents) == sorted(set(ALLOWED) - {"src/app.py"})  # app.py closed when the key came
    assert not leaked(server.data_dir)


def test_complete_refuses_a_private_file_before_it_connects(repo):
    # The server URL is unreachable: the refusal must come first, from the privacy rules.
    for path, why in (("src/settings.py", "secret assigned to DB_PASSWORD"), (".env", "secret-looking name")):
        done = run_client("complete", "--server", "http://127.0.0.1:9", f"{path}:1:1", cwd=repo)
        assert done.returncode != 0 and why in done.stdout, done.stdout
        assert "cannot reach" not in done.stdout
    done = run_client("complete", "--server", "http://127.0.0.1:9", "src/app.py:1:1", cwd=repo)
    assert "cannot reach" in done.stdout  # an ordinary file gets as far as the connection

"""Crash safety: a real server killed with SIGKILL at named fault points, then restarted on its data dir.

A server started with ``DYNARANK_FAULT_POINT=<point>`` (adapter_core/faults.py) stops at that point once
the gate file exists (the test creates it when the state it wants to crash is reached), creates the
marker file and sleeps; the test waits for the marker and kills the process (SIGKILL: no shutdown code
runs). Then, on the data dir as the kill left it and again after a restart:

- every ``*.json`` parses and every ``*.safetensors`` loads (temp copies aside: they may be cut short);
- after the restart no temp file or directory (``.NAME.tmp-*``, ``.NAME.old-*``) and no trash
  (``.deleted-*``) is left;
- sessions: with ``--persist-every 1`` a version is written before its ``adapted`` push, so the versions
  pushed before the crash are durable; the crash comes while version ``published`` = acknowledged + 1 is
  written. The session resumes with its token at exactly the acknowledged version when the crash came
  before that version's adapter directory was renamed into place, and at ``published`` after it. Never
  older than the acknowledged one;
- jobs: a job killed mid-run resumes from its last checkpoint (its events say from which step) and
  succeeds, or is failed with the reason; it is never left running;
- uploads: a file cut short is not listed, and the store takes the next upload.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from adapter_core.faults import GATE_ENV, MARKER_ENV, POINT_ENV
from server.store.files import remove_stale_temps
from tests.helpers import ROOT, free_port, server_output, start_server, stop_child, stop_server, wait_for_http
from tests.session_server import FILE_V1, FILE_V2, Client, adapt_once, run

WAIT_S = 120.0
LEFTOVER = re.compile(r"^\..+\.(tmp|old)-|^\.deleted-")
# Points on a session's persist path (server/sessions/manager.py persist -> server/store/adapters.py save ->
# adapter_core/atomic.py for the version directory -> server/store/files.py for info.json and the rest), and
# whether the version being written is in place when the crash comes there.
SESSION_POINTS = {
    "session.before_save": False,
    "dir.before_fsync": False,
    "dir.before_rename": False,
    "dir.before_dir_fsync": True,
    "store.before_info": True,
    "file.before_fsync": True,
    "file.before_replace": True,
    "session.before_meta": True,
}
JOB_FILES = [{"path": "geometry.py", "text": FILE_V2}, {"path": "util.py", "text": "def clamp(x, lo, hi):\n"
                                                                                 "    return max(lo, min(x, hi))\n"}]
JOB = {"adapter_name": "crash", "files": JOB_FILES, "hyperparameters": {"steps": 6, "checkpoint_every": 2}}
# Points a job passes (in a server with no session), and what a restart makes of the job: checkpoints
# are written when it is queued (step 0) and at steps 2 and 4; the adapter is saved after step 6.
JOB_POINTS = {
    "dir.before_rename": ("failed", "its files were still being prepared"),  # the step-0 checkpoint
    "job.before_checkpoint": ("resumed", 0),  # the step-2 checkpoint, not yet written
    "dir.after_swap": ("resumed", 2),  # the step-2 checkpoint swapped in, the old one not yet removed
    "job.before_finish": ("resumed", 4),  # the adapter not yet saved
}


class Crash:
    """One data dir, a server armed at ``point`` on it, and the restarted one."""

    def __init__(self, tiny_dir: Path, tmp: Path, point: str, gated: bool):
        self.tiny_dir, self.data, self.point = tiny_dir, tmp / "data", point
        self.gate, self.marker = tmp / "armed", tmp / "arrived"
        self.env = {POINT_ENV: point, MARKER_ENV: str(self.marker), GATE_ENV: str(self.gate) if gated else ""}
        self.proc = None

    def start(self, armed: bool = True) -> Crash:
        self.port = free_port()
        # Only the writes the test drives: no timer writes sessions meanwhile (where that option exists).
        env = {"DYNARANK_PERSIST_INTERVAL_S": "0", **(self.env if armed else {})}
        self.proc = start_server(["--model", str(self.tiny_dir), "--port", str(self.port), "--data-dir",
                                  str(self.data), "--persist-every", "1", "--edit-quiet-s", "0.05",
                                  "--adaptation-workers", "1"], env)
        wait_for_http(self.url("/health"), self.proc)
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def arm(self) -> None:
        self.gate.touch()

    def wait_arrival(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while not self.marker.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited before {self.point}:\n{server_output(self.proc)[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.point} not reached within {WAIT_S}s:\n{server_output(self.proc)[-4000:]}")
            time.sleep(0.05)
        assert self.marker.read_text() == self.point

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait()
        self.proc.log_file.close()

    def stop(self) -> None:
        out = stop_server(self.proc)
        assert "Traceback" not in out, out[-4000:]

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_child(self.proc)


@pytest.fixture
def crash(tiny_dir, tmp_path):
    made = []

    def make(point: str, gated: bool = False) -> Crash:
        made.append(Crash(tiny_dir, tmp_path, point, gated))
        return made[-1]

    yield make
    for c in made:
        c.cleanup()


def is_leftover(path: Path, root: Path) -> bool:
    return any(LEFTOVER.match(part) for part in path.relative_to(root).parts)


def check_files(data: Path, *, restarted: bool) -> None:
    """Every JSON parses and every safetensors file loads; after a restart, no leftovers at all."""
    leftovers = [p for p in data.rglob("*") if LEFTOVER.match(p.name)]
    if restarted:
        assert not leftovers, leftovers
    jsons = [p for p in data.rglob("*.json") if not is_leftover(p, data)]
    tensors = [p for p in data.rglob("*.safetensors") if not is_leftover(p, data)]
    for p in jsons:
        json.loads(p.read_text())
    for p in tensors:
        load_file(p)


# -- sessions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("point", list(SESSION_POINTS))
def test_a_session_killed_while_persisting_resumes_at_its_durable_version(crash, point):
    c = crash(point, gated=True).start()

    async def until_crash():
        client = await Client.connect(c.port)
        ready = await client.hello()
        first = await adapt_once(client)  # version 1 at least, written before this push
        c.arm()
        await client.send({"type": "open", "path": "shapes.py", "text": FILE_V1, "version": 1})
        await client.send({"type": "edit", "path": "shapes.py", "version": 2, "text": FILE_V2})
        await client.send({"type": "close", "path": "shapes.py"})
        await asyncio.to_thread(c.wait_arrival)
        # The worker sleeps at the point; the event loop still answers. The reply comes after every push
        # sent before it, so the `adapted` pushes are all in.
        await client.send({"type": "status", "id": "probe"})
        status = await client.wait_for("status", WAIT_S, lambda m: m.get("id") == "probe")
        acked = max([first["version"]] + [m["version"] for m in client.backlog if m["type"] == "adapted"])
        return ready, acked, status["version"]

    ready, acked, published = run(until_crash())
    # One worker, --persist-every 1: it is writing the version it published, and told the session about it
    # before the write (a version is live before it is durable); the one before is on disk.
    assert published == acked
    c.kill()
    check_files(c.data, restarted=False)

    c.start(armed=False)
    check_files(c.data, restarted=True)

    async def resume():
        client = await Client.connect(c.port)
        again = await client.hello(resume_token=ready["resume_token"])
        await client.close()
        return again

    again = run(resume())
    assert again["session_id"] == ready["session_id"]
    assert again["adapter_version"] == (published if SESSION_POINTS[point] else published - 1)
    c.stop()


# -- fine-tuning jobs ----------------------------------------------------------------------------

def job_state(c: Crash, job_id: str) -> dict:
    return httpx.get(c.url(f"/v1/fine_tuning/jobs/{job_id}"), timeout=30).json()


@pytest.mark.parametrize("point", list(JOB_POINTS))
def test_a_job_killed_mid_run_resumes_or_fails_with_the_reason(crash, point):
    c = crash(point).start()
    r = httpx.post(c.url("/v1/fine_tuning/jobs"), json=JOB, timeout=30)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    c.wait_arrival()
    c.kill()
    check_files(c.data, restarted=False)

    c.start(armed=False)
    job = job_state(c, job_id)
    deadline = time.monotonic() + WAIT_S
    while job["status"] in ("validating_files", "queued", "running"):
        assert time.monotonic() < deadline, f"job still {job['status']} after {WAIT_S}s: {job}"
        time.sleep(0.2)
        job = job_state(c, job_id)
    events = [e["message"] for e in httpx.get(c.url(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100"),
                                              timeout=30).json()["data"]]
    outcome, detail = JOB_POINTS[point]
    if outcome == "resumed":
        assert job["status"] == "succeeded" and job["step"] == 6, job
        assert f"resumed from step {detail} of 6 after a restart" in events
        r = httpx.post(c.url("/v1/completions"), json={"model": job["fine_tuned_model"], "prompt": "def ",
                                                       "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
    else:
        assert job["status"] == "failed" and job["error"]["code"] == "interrupted", job
        assert "no usable checkpoint" in job["error"]["message"] and detail in job["error"]["message"]
        assert events[-1] == job["error"]["message"]
    check_files(c.data, restarted=True)
    assert [p.name for p in (c.data / "jobs").iterdir()] == [f"{job_id}.json"]  # its checkpoint went with it
    c.stop()


# -- a plain store write -------------------------------------------------------------------------

def test_an_upload_killed_mid_write_is_not_listed_and_the_next_one_is_stored(crash):
    c = crash("file.before_replace").start()
    line = json.dumps({"prompt": "def area(w, h):\n", "completion": "    return w * h\n"}) + "\n"

    def upload():
        try:
            httpx.post(c.url("/v1/files"), files={"file": ("train.jsonl", line.encode())},
                       data={"purpose": "fine-tune"}, timeout=WAIT_S)
        except httpx.HTTPError:
            pass  # the server is killed while it answers

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    c.wait_arrival()
    c.kill()
    thread.join(WAIT_S)
    assert [p for p in c.data.rglob("*") if LEFTOVER.match(p.name)], "the killed write left no temp file"

    c.start(armed=False)
    check_files(c.data, restarted=True)
    assert httpx.get(c.url("/v1/files"), timeout=30).json()["data"] == []
    r = httpx.post(c.url("/v1/files"), files={"file": ("train.jsonl", line.encode())}, data={"purpose": "fine-tune"},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert [f["id"] for f in httpx.get(c.url("/v1/files"), timeout=30).json()["data"]] == [r.json()["id"]]
    check_files(c.data, restarted=True)
    c.stop()


# -- the directory swap's fallback (no RENAME_EXCHANGE), without a server ----------------------------

SWAP = """
import sys
from pathlib import Path
import adapter_core.atomic as atomic
atomic._exchange = lambda a, b: False  # as on a filesystem without RENAME_EXCHANGE: two renames
atomic.write_dir_atomically(Path(sys.argv[1]), lambda tmp: (tmp / "v.json").write_text('"new"'))
"""


def test_a_swap_killed_between_its_renames_is_put_back_at_startup(tmp_path):
    target = tmp_path / "data" / "adapter"
    target.mkdir(parents=True)
    (target / "v.json").write_text('"old"')
    marker = tmp_path / "arrived"
    env = {**os.environ, POINT_ENV: "dir.between_renames", MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", SWAP, str(target)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + WAIT_S
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "dir.between_renames not reached"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not target.exists()  # cut between the renames: the old version is aside, the new one in temp

    found = remove_stale_temps(tmp_path / "data")
    assert {p.name.split("-")[0] for p in found} == {".adapter.old", ".adapter.tmp"}
    assert json.loads((target / "v.json").read_text()) == "old"  # put back, not deleted
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["adapter"]

"""server/adaptation/jobs.py under load: the manager's lock, caps on active jobs, bounded memory, restarts.

Like tests/server/adaptation/test_jobs.py: no worker threads (the tests run the step functions ``take()``
gives), preparation in the manager's own thread, waited for through ``on_work``. Real tokenizer, tiny
random Llama, data under ``tmp_path``.
"""

from __future__ import annotations

import json
import threading
import types

import pytest
import torch
from fastapi.testclient import TestClient

import adapter_core
import server.adaptation.jobs as jobs_module
from server.adaptation import job_checkpoint
from server.adaptation.jobs import Job, JobManager
from server.adaptation.workers import AdaptationWorkers
from server.app.main import create_app
from server.app.routers.fine_tuning import job_events
from server.config import Settings
from server.engines.gate import ServingGate
from server.errors import ClientError
from server.store import owner_hash
from tests.helpers import create_ready

WAIT_S = 60.0
FILES = [{"path": "geometry.py", "text": "def area(width, height):\n    return width * height\n"},
         {"path": "util.py", "text": "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n"}]


def body(name="geo", steps=2, **hyperparameters):
    return {"adapter_name": name, "files": FILES, "hyperparameters": {"steps": steps, **hyperparameters}}


def run_steps(s, limit: int = 1000) -> int:
    n = 0
    while (step := s.jobs.take()) is not None:
        step()
        n += 1
        assert n <= limit
    return n


def record_file(s, job) -> object:
    return s.settings.data_dir / "jobs" / f"{job.id}.json"


# -- the manager's lock ------------------------------------------------------------------------

class RacingDict(dict):
    """A jobs dict whose iteration lets another thread change it midway, as create and cancel do (under
    the manager's lock) while the worker takes a step or a request lists jobs. If the reader does not
    hold the lock, the change lands and iteration fails with "dictionary changed size"."""

    def __init__(self, lock, *args):
        super().__init__(*args)
        self.lock = lock
        self.changes = 0

    def values(self):
        for n, job in enumerate(dict.values(self)):
            if n == 0:
                t = threading.Thread(target=self._change)
                t.start()
                t.join(WAIT_S)
                assert not t.is_alive()
            yield job

    def _change(self):
        if self.lock.acquire(blocking=False):  # blocks nobody: a reader holding the lock only skips the change
            try:
                self[f"ftjob-new{self.changes}"] = fake_job(f"ftjob-new{self.changes}")
                self.changes += 1
            finally:
                self.lock.release()


def fake_job(job_id, status="queued", owner=None):
    return Job({"id": job_id, "created_at": 1, "status": status, "_owner": owner_hash(owner)}, owner)


@pytest.mark.parametrize("read", ["take", "list"])
def test_take_and_list_read_the_jobs_under_the_managers_lock(tmp_path, read):
    jobs = JobManager(Settings(model="tiny", data_dir=tmp_path), None, None, None, None)
    jobs.jobs = RacingDict(jobs._lock, {f"ftjob-{i}": fake_job(f"ftjob-{i}") for i in range(3)})
    getattr(jobs, read)(*(() if read == "take" else (None,)))  # RuntimeError if the dict changed under it
    assert jobs.jobs.changes == 0
    jobs.list(None)
    assert len(jobs.jobs) == 3


# -- caps on active jobs ---------------------------------------------------------------------

def test_active_jobs_are_capped_per_key_and_in_all(make_jobs):
    s = make_jobs(max_jobs_per_key=2, max_jobs=3)
    a1, a2 = create_ready(s, "a", body("a1")), create_ready(s, "a", body("a2"))
    with pytest.raises(ClientError) as err:
        s.jobs.create("a", body("a3"))
    assert (err.value.code, err.value.status) == ("too_many_requests", 429)
    assert "at most 2" in err.value.message
    assert len(s.jobs.jobs) == 2 and len(list((s.settings.data_dir / "jobs").glob("*.json"))) == 2

    b1 = create_ready(s, "b", body("b1"))  # another key has its own count...
    with pytest.raises(ClientError) as err:
        s.jobs.create("b", body("b2"))  # ...but all keys together are capped too
    assert err.value.code == "too_many_requests" and "at most 3" in err.value.message

    s.jobs.cancel("a", a1.id)  # finished jobs do not count
    a3 = create_ready(s, "a", body("a3"))
    run_steps(s)
    assert a2.status == b1.status == a3.status == "succeeded"
    create_ready(s, "b", body("b2"))
    create_ready(s, "b", body("b3"))


class NoEngine:
    """Enough of the Engine protocol for the fine-tuning routes (nothing is generated)."""

    model_name = "tiny"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.gate = ServingGate()

    def attach(self, adapters):
        pass

    def close(self):
        pass


def test_over_http_the_cap_is_a_429(tmp_path, tokenizer, tiny_llama):
    settings = Settings(model="tiny", data_dir=tmp_path / "data", api_keys=("k",), max_jobs_per_key=1)
    app = create_app(settings, tiny_llama, tokenizer, engine=NoEngine(tokenizer))
    jobs = app.state.dynarank.services.jobs
    prepared = threading.Event()
    jobs.on_work = prepared.set
    client = TestClient(app, headers={"Authorization": "Bearer k"})  # no lifespan: no worker takes the job
    first = client.post("/v1/fine_tuning/jobs", json=body("one"))
    assert first.status_code == 200, first.text
    assert prepared.wait(WAIT_S)
    prepared.clear()
    second = client.post("/v1/fine_tuning/jobs", json=body("two"))
    assert second.status_code == 429, second.text
    error = second.json()["error"]
    assert (error["code"], error["type"]) == ("too_many_requests", "rate_limit_error")
    assert "at most 1" in error["message"]
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]] == [first.json()["id"]]

    cancelled = client.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    third = client.post("/v1/fine_tuning/jobs", json=body("three"))
    assert third.status_code == 200, third.text
    assert prepared.wait(WAIT_S)  # preparation ends before the data dir goes


# -- bounded memory ------------------------------------------------------------------------

def test_only_the_newest_finished_jobs_of_a_key_are_kept(make_jobs):
    s = make_jobs(max_finished_jobs_per_key=2)
    other = create_ready(s, "other", body("other"))
    s.jobs.cancel("other", other.id)
    first, second, third = (create_ready(s, "k", body(f"j{i}", steps=1)) for i in range(3))
    s.jobs.cancel("k", second.id)  # finishes first
    run_steps(s)  # then first, then third
    assert first.status == third.status == "succeeded"
    active = create_ready(s, "k", body("active"))  # active jobs do not count against the bound
    s.jobs.cancel("k", first.id)  # already finished: changes nothing

    assert {j.id for j in s.jobs.list("k")} == {active.id, third.id, first.id}
    assert not record_file(s, second).exists()  # forgotten, record and all
    assert all(record_file(s, j).exists() for j in (first, third, active, other))
    with pytest.raises(KeyError):
        s.jobs.get("k", second.id)
    assert s.store.versions("k", "j0") and s.store.versions("k", "j2")  # their adapters stay
    assert [j.id for j in s.jobs.list("other")] == [other.id]

    # A restart that cannot resume the active job fails it (now the newest finished) and keeps the bound.
    job_checkpoint.drop(s.settings.data_dir / "jobs", active.id)
    again = make_jobs(max_finished_jobs_per_key=2)
    assert {j.id for j in again.jobs.list("k")} == {active.id, third.id}
    assert again.jobs.get("k", active.id).status == "failed"
    assert not record_file(s, first).exists()
    assert [j.id for j in again.jobs.list("other")] == [other.id]


def test_a_job_keeps_its_last_events(make_jobs, monkeypatch):
    monkeypatch.setattr(jobs_module, "MAX_EVENTS", 6)
    s = make_jobs()
    job = create_ready(s, "k", body(steps=8))
    events = job.events  # what a request handler holds while the job goes on
    run_steps(s)
    assert job.status == "succeeded"
    # created, prepared, 8 steps, saved: 11 events, the last 6 kept, numbered as they came.
    assert [e["id"] for e in job.events] == [f"ftevent-{i}" for i in range(5, 11)]
    assert [e["data"]["step"] for e in job.events[:5]] == [4, 5, 6, 7, 8]
    assert "saved adapter" in job.events[-1]["message"]
    assert [e["id"] for e in events[:2]] == ["ftevent-0", "ftevent-1"]  # a list once handed out is not cut

    services = types.SimpleNamespace(jobs=s.jobs)
    page = job_events(job.id, services, "k", after="ftevent-2", limit=100)  # from the oldest kept
    assert [e["id"] for e in page["data"]] == [f"ftevent-{i}" for i in range(5, 11)]
    page = job_events(job.id, services, "k", after="ftevent-7", limit=2)
    assert [e["id"] for e in page["data"]] == ["ftevent-8", "ftevent-9"] and page["has_more"]

    stored = json.loads(record_file(s, job).read_text())["_events"]
    assert [e["id"] for e in stored] == [f"ftevent-{i}" for i in range(5, 11)]
    again = make_jobs().jobs.get("k", job.id)
    assert again.events == job.events and again.next_event == 11


# -- restarts ------------------------------------------------------------------------------

def test_a_running_job_resumes_from_its_last_checkpoint_and_ends_as_if_never_stopped(make_jobs):
    s = make_jobs()
    straight = create_ready(s, "k", body("straight", steps=8, checkpoint_every=2))
    run_steps(s)
    assert straight.status == "succeeded"
    job = create_ready(s, "k", body(steps=8, checkpoint_every=2))
    for _ in range(5):  # checkpoints at steps 0, 2 and 4; the record is written as `running` at step 5
        s.jobs.take()()
    assert json.loads(record_file(s, job).read_text())["status"] == "running"

    again = make_jobs()  # as after kill -9: the old manager is simply gone
    reloaded = again.jobs.get("k", job.id)
    assert reloaded.status == "running" and reloaded.record["step"] == 4
    assert reloaded.events[-1]["message"] == "resumed from step 4 of 8 after a restart"
    assert run_steps(again) == 4
    assert reloaded.status == "succeeded" and reloaded.record["step"] == 8
    assert [e["data"]["step"] for e in reloaded.events if e["type"] == "metrics"][-4:] == [5, 6, 7, 8]

    # Same examples, same order, factors, optimizer moments and policy state restored: the same adapter
    # as the run that never stopped (up to the rounding of the stored factors).
    resumed, uninterrupted = again.store.load("k", "geo"), again.store.load("k", "straight")
    assert resumed.ranks == uninterrupted.ranks and resumed.metadata["step"] == uninterrupted.metadata["step"] == 8
    for name in resumed.modules:
        torch.testing.assert_close(resumed.delta(name), uninterrupted.delta(name), rtol=1e-4, atol=1e-6)
    assert [p.name for p in record_file(s, job).parent.glob(f"{job.id}*")] == [f"{job.id}.json"]


def test_a_job_without_a_usable_checkpoint_is_failed_with_the_reason(make_jobs):
    s = make_jobs()
    job = create_ready(s, "k", body(steps=8))
    for _ in range(5):  # the record is written as `running` at step 5
        s.jobs.take()()
    assert json.loads(record_file(s, job).read_text())["status"] == "running"
    (s.settings.data_dir / "jobs" / f"{job.id}.examples.safetensors").write_bytes(b"cut short")

    again = make_jobs()  # as after kill -9: the old manager is simply gone
    reloaded = again.jobs.get("k", job.id)
    assert reloaded.status == "failed" and reloaded.record["finished_at"] is not None
    error = reloaded.record["error"]
    assert error["code"] == "interrupted"
    assert "server restarted" in error["message"] and "step 5 of 8" in error["message"]
    assert "no usable checkpoint (examples unreadable" in error["message"]
    assert reloaded.events[-1]["level"] == "error" and reloaded.events[-1]["message"] == error["message"]
    assert again.jobs.take() is None
    assert json.loads(record_file(s, job).read_text())["status"] == "failed"
    assert not s.store.list("k")
    assert [p.name for p in record_file(s, job).parent.iterdir()] == [f"{job.id}.json"]  # checkpoint dropped


# -- a step's own TimeoutError ------------------------------------------------------------------

def test_a_job_step_raising_timeout_error_fails_the_job_once(make_jobs, monkeypatch):
    s = make_jobs()
    job = create_ready(s, "k", body(steps=3))
    calls = []

    def timing_out(*args, **kwargs):
        calls.append(1)
        raise TimeoutError("the step's own timeout")

    monkeypatch.setattr(adapter_core, "train_step", timing_out)
    no_sessions = types.SimpleNamespace(sessions=list, take=lambda: None)
    workers = AdaptationWorkers(s.settings, None, None, no_sessions, ServingGate(grace_s=0))
    workers.run_step(s.jobs.take())
    assert calls == [1]
    assert job.status == "failed" and job.record["error"]["code"] == "job_failed"
    assert "training failed" in job.record["error"]["message"] and "own timeout" in job.record["error"]["message"]
    assert s.jobs.take() is None

"""server/adaptation/jobs.py on its own: fine-tuning jobs validated, stepped, stored, reloaded.

No worker threads: the tests take the jobs' step functions with ``take()`` and
run them directly, as the adaptation workers would. Preparation (tokenizing the
files) runs in the manager's own thread; the tests wait for its ``on_work``
signal. Real tokenizer, tiny random Llama, store under ``tmp_path``.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from server.adaptation.jobs import CHECKPOINT_EVERY, JobError
from tests.helpers import create_ready

WAIT_S = 60.0
GEOMETRY = (
    "import math\n\n\n"
    "def area(width, height):\n    return width * height\n\n\n"
    "def circle(radius):\n    return math.pi * radius ** 2\n"
)
UTIL = "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    return min(x, hi)\n"
FILES = [{"path": "geometry.py", "text": GEOMETRY}, {"path": "util.py", "text": UTIL}]


def wait_until(predicate, timeout: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


def run_steps(s, job, limit: int = 1000) -> int:
    """Take and run step functions until none is offered; returns how many ran."""
    n = 0
    while (step := s.jobs.take()) is not None:
        step()
        n += 1
        assert n <= limit, job.public()
    return n


def body(name="geo", steps=3, **extra):
    return {"adapter_name": name, "files": FILES, "repository": {"id": "gh/me/geo", "root_name": "geo"},
            "hyperparameters": {"steps": steps}, **extra}


# -- validation ------------------------------------------------------------------------

BAD_BODIES = [
    ("not-an-object", lambda tmp: ["geo"], "JSON object"),
    ("unknown-field", lambda tmp: {**body(), "validation_file": "x"}, "unknown field(s): validation_file"),
    ("no-name", lambda tmp: {"files": FILES}, "set adapter_name (or suffix)"),
    ("underived-name", lambda tmp: {"files": FILES, "repository": {"root_name": "..."}}, "set adapter_name"),
    ("dotdot-name", lambda tmp: body(name=".."), "invalid adapter name"),
    ("slash-name", lambda tmp: body(name="a/b"), "invalid adapter name"),
    ("long-name", lambda tmp: body(name="x" * 81), "invalid adapter name"),
    ("session-name", lambda tmp: body(name="session-abc"), "reserved for sessions"),
    ("wrong-model", lambda tmp: body(model="gpt-4o"), "model must be the served base model 'tiny'"),
    ("hp-not-object", lambda tmp: {**body(), "hyperparameters": "fast"}, "hyperparameters must be an object"),
    ("hp-unknown", lambda tmp: {**body(), "hyperparameters": {"lr": 0.1}}, "unknown hyperparameter 'lr'"),
    ("steps-str", lambda tmp: body(steps="3"), "'steps' has the wrong type"),
    ("steps-bool", lambda tmp: body(steps=True), "'steps' has the wrong type"),
    ("steps-float", lambda tmp: body(steps=2.0), "'steps' has the wrong type"),
    ("steps-zero", lambda tmp: body(steps=0), "steps out of range"),
    ("steps-negative", lambda tmp: body(steps=-4), "steps out of range"),
    ("steps-huge", lambda tmp: body(steps=10**9), "steps out of range"),
    ("epochs-zero", lambda tmp: {**body(), "hyperparameters": {"epochs": 0}}, "epochs out of range"),
    ("budget-zero", lambda tmp: {**body(), "hyperparameters": {"budget": 0}}, "budget out of range"),
    ("steps-and-epochs", lambda tmp: {**body(), "hyperparameters": {"steps": 2, "epochs": 1}}, "not both"),
    ("checkpoint-every-zero", lambda tmp: {**body(), "hyperparameters": {"checkpoint_every": 0}},
     "checkpoint_every out of range"),
    ("checkpoint-every-str", lambda tmp: {**body(), "hyperparameters": {"checkpoint_every": "5"}}, "wrong type"),
    ("lr-zero", lambda tmp: {**body(), "hyperparameters": {"learning_rate": 0}}, "learning_rate must be in (0, 1)"),
    ("lr-one", lambda tmp: {**body(), "hyperparameters": {"learning_rate": 1.0}}, "learning_rate must be in (0, 1)"),
    ("lr-bool", lambda tmp: {**body(), "hyperparameters": {"learning_rate": True}}, "wrong type"),
    ("policy-unknown", lambda tmp: {**body(), "hyperparameters": {"rank_policy": "nope"}},
     "unknown rank_policy 'nope'"),
    ("policy-not-str", lambda tmp: {**body(), "hyperparameters": {"rank_policy": 3}}, "wrong type"),
    ("files-empty", lambda tmp: {**body(), "files": []}, "files must be a list"),
    ("files-not-list", lambda tmp: {**body(), "files": "a.py"}, "files must be a list"),
    ("file-no-text", lambda tmp: {**body(), "files": [{"path": "a.py"}]}, "string path and text"),
    ("file-int-path", lambda tmp: {**body(), "files": [{"path": 1, "text": "x"}]}, "string path and text"),
    ("files-with-path", lambda tmp: {**body(), "repository": {"path": str(tmp)}}, "may only name them"),
    ("files-repo-int-id", lambda tmp: {**body(), "repository": {"id": 3}}, "may only name them"),
    ("no-source", lambda tmp: {"adapter_name": "geo"}, "give 'repository'"),
    ("training-file-missing", lambda tmp: {"training_file": "file-" + "0" * 24}, "no such file of this key"),
    ("training-file-bad-id", lambda tmp: {"training_file": "../jobs"}, "no such file of this key"),
    ("training-file-and-files", lambda tmp: {**body(), "training_file": "file-" + "0" * 24}, "give one of"),
    ("repo-not-object", lambda tmp: {"adapter_name": "geo", "repository": str(tmp)}, "repository must be {path"),
    ("repo-extra-key", lambda tmp: {"adapter_name": "geo", "repository": {"path": str(tmp), "branch": "main"}},
     "repository must be {path"),
    ("repo-missing-dir", lambda tmp: {"adapter_name": "geo", "repository": {"path": str(tmp / "nope")}},
     "not a directory"),
]


@pytest.mark.parametrize("make_body, message", [pytest.param(b, m, id=i) for i, b, m in BAD_BODIES])
def test_create_rejects_bad_requests_and_stores_nothing(make_jobs, tmp_path, make_body, message):
    s = make_jobs()
    with pytest.raises(JobError) as err:
        s.jobs.create("key", make_body(tmp_path))
    assert isinstance(err.value, ValueError)
    assert message in str(err.value)
    assert s.jobs.list("key") == [] and s.jobs.jobs == {}
    assert not (s.settings.data_dir / "jobs").exists()
    assert s.store.list("key") == []


def test_server_side_paths_need_allowed_roots(make_jobs, tmp_path):
    allowed, outside = tmp_path / "repos" / "app", tmp_path / "elsewhere"
    for d in (allowed, outside):
        d.mkdir(parents=True)
        (d / "main.py").write_text(GEOMETRY)

    keyed = make_jobs(api_keys=("key",))  # keys and no roots: server paths are off
    with pytest.raises(JobError, match="disabled"):
        keyed.jobs.create("key", {"adapter_name": "app", "repository": {"path": str(allowed)}})

    rooted = make_jobs(api_keys=("key",), repo_roots=(str(tmp_path / "repos"),))
    with pytest.raises(JobError, match="outside"):
        rooted.jobs.create("key", {"adapter_name": "app", "repository": {"path": str(outside)}})
    with pytest.raises(JobError, match="outside"):  # no escaping with ..
        escape = allowed / ".." / ".." / "elsewhere"
        rooted.jobs.create("key", {"adapter_name": "app", "repository": {"path": str(escape)}})
    assert rooted.jobs.jobs == {}

    job = create_ready(rooted, "key", {"adapter_name": "app", "repository": {"path": str(allowed)},
                                       "hyperparameters": {"steps": 1}})
    assert job.record["repository"]["path"] == str(allowed.resolve())
    assert job.record["repository"]["id"] == "app" and job.record["repository"]["files"] == 1


def test_defaults_and_accepted_hyperparameters(make_jobs):
    s = make_jobs(adapter_lr=0.005)
    job = create_ready(s, None, {"suffix": "geo", "files": FILES, "model": "tiny",
                                 "hyperparameters": {"rank_policy": "fixed", "budget": 5000}})
    hp = job.record["hyperparameters"]
    assert hp == {"rank_policy": "fixed", "steps": None, "epochs": None, "budget": 5000, "learning_rate": 0.005,
                  "checkpoint_every": CHECKPOINT_EVERY}
    every = create_ready(s, None, {**body(name="geo2"), "hyperparameters": {"checkpoint_every": 3}})
    assert every.record["hyperparameters"]["checkpoint_every"] == 3
    assert job.record["adapter_name"] == "geo" and job.record["model"] == "tiny"
    assert job.public()["object"] == "fine_tuning.job" and not any(k.startswith("_") for k in job.public())


# -- running -----------------------------------------------------------------------------

def test_job_runs_to_completion_and_stores_a_repository_adapter(make_jobs):
    s = make_jobs()
    job = create_ready(s, "key-a", body(steps=3))
    assert job.record["total_steps"] == 3 and job.record["repository"]["files"] == 2

    first = s.jobs.take()
    assert first is not None
    assert s.jobs.take() is None  # one step of a job at a time
    first()
    assert job.status == "running" and job.record["step"] == 1 and job.record["started_at"] is not None
    assert run_steps(s, job) == 2
    assert s.jobs.take() is None

    record = job.public()
    assert record["status"] == "succeeded" and record["step"] == 3 and record["trained_tokens"] > 0
    assert record["fine_tuned_model"] == "tiny:geo" and record["finished_at"] >= record["started_at"]
    assert record["error"] is None

    snap = s.store.load("key-a", "geo")
    assert record["result"] == {"version": snap.version, "ranks": snap.ranks}
    assert snap.metadata.get("job") == job.id
    assert any(float(snap.delta(n).abs().max()) > 0 for n in snap.modules)  # trained: B moved off zero
    assert s.store.info("key-a", "geo")["kind"] == "repository"
    assert s.store.find_for_repository("key-a", {"id": "gh/me/geo"}) == "geo"
    assert s.store.list("key-b") == []
    # Its examples and checkpoint went with the run: only the record is left.
    assert [p.name for p in (s.settings.data_dir / "jobs").iterdir()] == [f"{job.id}.json"]

    metrics = [e for e in job.events if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == [1, 2, 3]
    assert all(e["data"]["total_steps"] == 3 and "loss" in e["data"] for e in metrics)
    assert job.events[0]["message"] == "job created" and "saved adapter geo" in job.events[-1]["message"]
    assert [e["id"] for e in job.events] == [f"ftevent-{i}" for i in range(len(job.events))]

    # The owner sees it; another key does not.
    assert [j.id for j in s.jobs.list("key-a")] == [job.id]
    assert s.jobs.list("key-b") == []
    with pytest.raises(KeyError):
        s.jobs.get("key-b", job.id)

    # A new session of that repository starts from the job's adapter.
    session, _ = s.sessions.attach("key-a", repository={"id": "gh/me/geo", "root_name": "geo"})
    assert session.origin == "geo"
    live = session.current()
    assert live.ranks == snap.ranks
    for name in snap.modules:
        torch.testing.assert_close(live.delta(name), snap.delta(name), rtol=1e-5, atol=1e-7)


def test_epochs_scale_the_number_of_steps(make_jobs):
    s = make_jobs()
    one = create_ready(s, None, {**body(name="one"), "hyperparameters": {"epochs": 1}})
    two = create_ready(s, None, {**body(name="two"), "hyperparameters": {"epochs": 2}})
    assert one.record["total_steps"] >= 2  # at least one example per file
    assert two.record["total_steps"] == 2 * one.record["total_steps"]
    # OpenAI's name for it, and its "auto" (one epoch here).
    three = create_ready(s, None, {**body(name="three"), "hyperparameters": {"n_epochs": 3}})
    auto = create_ready(s, None, {**body(name="auto"), "hyperparameters": {"n_epochs": "auto"}})
    assert three.record["hyperparameters"]["epochs"] == 3
    assert (three.record["total_steps"], auto.record["total_steps"]) == (3 * one.record["total_steps"],
                                                                         one.record["total_steps"])


def test_oldest_job_steps_first(make_jobs):
    s = make_jobs()
    older = create_ready(s, None, body(name="older", steps=2))
    newer = create_ready(s, None, body(name="newer", steps=2))
    s.jobs.take()()
    assert (older.record["step"], newer.record["step"]) == (1, 0)
    run_steps(s, older)
    assert older.status == newer.status == "succeeded"
    assert s.store.versions(None, "older") and s.store.versions(None, "newer")


def test_job_without_source_text_fails(make_jobs):
    s = make_jobs()
    job = s.jobs.create(None, {**body(), "files": [{"path": "empty.py", "text": "  \n\n"}]})
    wait_until(lambda: job.status == "failed", what="job failure")
    assert job.record["error"]["code"] == "job_failed"
    assert "no training examples" in job.record["error"]["message"]
    assert job.events[-1]["level"] == "error"
    assert s.jobs.take() is None and s.store.list(None) == []


# -- cancelling ------------------------------------------------------------------------

def test_cancel_before_the_first_step(make_jobs):
    s = make_jobs()
    job = create_ready(s, "k", body(steps=3))
    step = s.jobs.take()
    assert s.jobs.cancel("k", job.id) is job
    assert job.status == "cancelled" and job.record["finished_at"] is not None
    step()  # the step taken before the cancel does nothing
    assert job.record["step"] == 0 and job.status == "cancelled"
    assert s.jobs.take() is None
    assert s.store.list("k") == []
    assert job.events[-1]["message"] == "job cancelled"


def test_cancel_mid_run(make_jobs):
    s = make_jobs()
    job = create_ready(s, "k", body(steps=5))
    s.jobs.take()()
    s.jobs.take()()
    s.jobs.cancel("k", job.id)
    assert s.jobs.take() is None
    assert job.status == "cancelled" and job.record["step"] == 2
    assert s.store.list("k") == [] and job.record["fine_tuned_model"] is None


def test_cancel_of_another_keys_job_is_refused(make_jobs):
    s = make_jobs()
    job = create_ready(s, "owner", body(steps=1))
    with pytest.raises(KeyError):
        s.jobs.cancel("intruder", job.id)
    assert job.status == "queued"


def test_cancel_after_success_keeps_the_result(make_jobs):
    s = make_jobs()
    job = create_ready(s, "k", body(steps=1))
    run_steps(s, job)
    s.jobs.cancel("k", job.id)
    assert job.status == "succeeded" and job.record["fine_tuned_model"] == "tiny:geo"
    assert s.store.versions("k", "geo") == [1]


def test_cancel_after_success_does_not_claim_it_cancelled(make_jobs):
    s = make_jobs()
    job = create_ready(s, "k", body(steps=1))
    run_steps(s, job)
    s.jobs.cancel("k", job.id)
    assert all(e["message"] != "job cancelled" for e in job.events)


def test_cancel_while_saving_is_not_overridden(make_jobs):
    s = make_jobs()
    job = create_ready(s, "k", body(steps=1))
    answered = []
    real_save = s.store.save

    def save_with_cancel(*args, **kwargs):
        answered.append(s.jobs.cancel("k", job.id).status)  # the client's cancel lands now
        return real_save(*args, **kwargs)

    s.store.save = save_with_cancel
    run_steps(s, job)
    assert answered == ["cancelled"]
    assert job.status == answered[0]
    assert not s.store.exists("k", job.record["adapter_name"])  # the version written meanwhile is taken back


def test_a_second_job_under_the_same_name_publishes_the_next_version(make_jobs):
    s = make_jobs()
    first = create_ready(s, "k", body(name="same", steps=1))
    run_steps(s, first)
    second = create_ready(s, "k", body(name="same", steps=2))
    run_steps(s, second)
    assert first.record["result"]["version"] == 1 and second.record["result"]["version"] == 2
    assert s.store.versions("k", "same") == [1, 2]
    v1, v2 = s.store.load("k", "same", 1), s.store.load("k", "same", 2)
    assert any(not torch.equal(v1.B[n], v2.B[n]) for n in v1.B)  # the new training, not a copy of v1


# -- training files (/v1/files) ----------------------------------------------------------

PROMPT = "def area(width, height):\n    return"
TRAINING = (json.dumps({"prompt": PROMPT, "completion": " width * height\n"}) + "\n\n"
            + json.dumps({"text": UTIL}) + "\n").encode()


def test_training_file_job_trains_on_the_completion_given_the_prompt(make_jobs, tokenizer):
    s = make_jobs()
    f = s.jobs.files.add("key-a", "train.jsonl", "fine-tune", TRAINING)
    # Neither adapter_name nor suffix (an OpenAI client sends neither): the adapter is named after the file.
    job = create_ready(s, "key-a", {"training_file": f["id"], "model": "tiny"})
    assert job.record["adapter_name"] == f["id"] and job.public()["training_file"] == f["id"]

    pair, *text = job.examples
    targets = [w > 0 for w in pair.loss_weights]
    first = targets.index(True)
    assert all(targets[first:]) and first > 0  # the prompt is context only
    assert PROMPT.startswith(tokenizer.decode(pair.input_ids[:first]))
    assert tokenizer.decode(pair.input_ids[first:]).endswith("width * height\n")
    assert text and all(w > 0 for w in text[0].loss_weights)  # plain text: every token is a target
    assert UTIL.startswith(text[0].target_text)
    assert job.record["total_steps"] == len(job.examples)  # one epoch by default

    run_steps(s, job)
    assert job.public()["fine_tuned_model"] == f"tiny:{f['id']}"
    assert s.store.versions("key-a", f["id"])

    named = create_ready(s, "key-a", {"training_file": f["id"], "suffix": "area-ft"})
    assert named.record["adapter_name"] == "area-ft"
    with pytest.raises(JobError, match="no such file of this key"):
        s.jobs.create("key-b", {"training_file": f["id"]})  # files belong to the key that uploaded them


# -- persistence -------------------------------------------------------------------------

def test_a_new_manager_lists_finished_jobs_resumes_queued_ones_and_fails_the_unresumable(make_jobs):
    s = make_jobs()
    done = create_ready(s, "k", body(name="done", steps=2))
    run_steps(s, done)
    assert done.status == "succeeded"
    waiting = create_ready(s, "k", body(name="waiting", steps=2))  # queued when the server "stops"
    broken = create_ready(s, "k", body(name="broken", steps=2))
    (s.settings.data_dir / "jobs" / f"{broken.id}.ckpt" / "state.json").write_text("{not json")
    (s.settings.data_dir / "jobs" / "ftjob-garbage.json").write_text("{not json")

    again = make_jobs()
    by_id = {j.id: j for j in again.jobs.list("k")}
    assert set(by_id) == {done.id, waiting.id, broken.id}

    reloaded = by_id[done.id]
    assert reloaded.public() == done.public()
    assert [e["message"] for e in reloaded.events] == [e["message"] for e in done.events]

    interrupted = by_id[broken.id]
    assert interrupted.status == "failed" and interrupted.record["error"]["code"] == "interrupted"
    assert "no usable checkpoint (checkpoint unreadable" in interrupted.record["error"]["message"]
    assert interrupted.record["finished_at"] is not None
    assert not (s.settings.data_dir / "jobs" / f"{broken.id}.ckpt").exists()

    resumed = by_id[waiting.id]
    assert resumed.status == "queued" and resumed.events[-1]["message"] == "resumed from step 0 of 2 after a restart"
    assert run_steps(again, resumed) == 2 and resumed.status == "succeeded"
    assert again.store.load("k", "waiting").metadata["job"] == waiting.id
    assert again.jobs.list("other") == []
    with pytest.raises(KeyError):
        again.jobs.get("other", done.id)

    # What the restart decided was written back: a third manager sees the same.
    third = make_jobs()
    assert third.jobs.get("k", broken.id).record["error"]["code"] == "interrupted"
    assert third.jobs.get("k", waiting.id).status == "succeeded"
    assert third.jobs.take() is None
    record = json.loads((s.settings.data_dir / "jobs" / f"{broken.id}.json").read_text())
    assert record["status"] == "failed"

"""Fine-tuning jobs apply the privacy rules: a server-side repository is walked without the files they
refuse (each skip reported with its reason), and inline files they refuse are dropped."""

from __future__ import annotations

import threading
import time

import pytest

from server.adaptation.jobs import JobManager
from server.config import Settings
from server.sessions import SessionManager
from server.store import AdapterStore
from tests.privacy_repo import ALLOWED, NEVER_SENT, PRIVATE_KEY, REFUSED, make_private_repo

WAIT_S = 60.0


@pytest.fixture
def jobs(tmp_path, tokenizer, tiny_llama):
    settings = Settings(model="tiny", data_dir=tmp_path / "data")
    store = AdapterStore(settings.data_dir, settings.served_name, settings.keep_versions)
    manager = JobManager(settings, tiny_llama, tokenizer, store, SessionManager(settings, tiny_llama, tokenizer, store))
    manager.ready = threading.Event()
    manager.on_work = manager.ready.set
    return manager


def prepared(jobs, body):
    """Create a job and wait until its files are prepared (queued) or it failed."""
    job = jobs.create(None, {"hyperparameters": {"steps": 1}, **body})
    deadline = time.monotonic() + WAIT_S
    while not jobs.ready.is_set() and job.status != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    return job


def trained_text(job, tokenizer) -> str:
    return "\n".join(tokenizer.decode(ex.input_ids) for ex in job.examples)


def messages(job) -> str:
    return "\n".join(e["message"] for e in job.events)


def test_server_path_job_skips_refused_files_with_reasons(jobs, tmp_path, tokenizer):
    repo = make_private_repo(tmp_path / "repo")
    job = prepared(jobs, {"adapter_name": "private", "repository": {"path": str(repo)}})
    assert job.status == "queued", job.public()
    assert {ex.path for ex in job.examples} == set(ALLOWED)  # every ordinary file is trained on
    text = trained_text(job, tokenizer)
    assert "circle_area" in text and "next_id" in text
    assert not [s for s in NEVER_SENT if s in text]
    events = messages(job)
    for rel, (_, why) in REFUSED.items():
        why = {"src/huge.py": "too large", "src/latin1.py": "not utf-8"}.get(rel, why)
        assert f"{rel} ({why}" in events, rel
    skipped = job.record["repository"]["skipped"]
    assert skipped["secret-looking name"] == 5 and skipped["ignored by .gitignore"] == 2
    assert job.record["repository"]["files"] == len(ALLOWED)


def test_inline_files_the_rules_refuse_are_dropped(jobs, tokenizer):
    refused = {".env": REFUSED[".env"][0], "deploy.pem": PRIVATE_KEY, "src/secrets.py": REFUSED["src/secrets.py"][0],
               "src/settings.py": REFUSED["src/settings.py"][0], "src/blob.py": "a\x00b"}
    files = [{"path": p, "text": t} for p, t in {**ALLOWED, **refused}.items()]
    job = prepared(jobs, {"adapter_name": "upload", "files": files})
    assert job.status == "queued", job.public()
    assert {ex.path for ex in job.examples} == set(ALLOWED)
    assert not [s for s in NEVER_SENT if s in trained_text(job, tokenizer)]
    events = messages(job)
    assert "skipped 5 file(s): .env (secret-looking name), deploy.pem (secret-looking name), " \
           "src/secrets.py (AWS access key), src/settings.py (secret assigned to DB_PASSWORD), " \
           "src/blob.py (binary)" in events
    assert job.record["repository"]["files"] == len(ALLOWED)


def test_a_job_of_refused_files_only_fails_and_says_why(jobs):
    job = prepared(jobs, {"adapter_name": "secrets", "files": [{"path": ".env", "text": "A=1\n"}]})
    assert job.status == "failed"
    assert "no training examples" in job.record["error"]["message"]
    assert ".env (secret-looking name)" in messages(job)


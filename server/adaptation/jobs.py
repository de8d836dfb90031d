"""Repository fine-tuning jobs, shaped like OpenAI's ``/v1/fine_tuning/jobs``.

A job walks a repository (a directory on the server, or files sent inline),
builds whole-file examples with code_signals, and trains a fresh adapter one
step at a time inside the adaptation worker pool (so completions keep priority).
The result is a named repository adapter in the store: usable as the model
``"<base>:<name>"`` and as the starting point of sessions for that repository.
Records are JSON files written atomically. A job checkpoints (server/adaptation/
job_checkpoint.py: adapter, optimizer, policy, step) when it is queued and every
``checkpoint_every`` steps; on restart a queued or running job resumes from its
checkpoint, and one without a usable checkpoint is failed with the reason, so no
job is left ``running``.

Bounds: at most ``max_jobs_per_key`` jobs of one key, and ``max_jobs`` of all
keys, are active (validating, queued or running) at once, beyond which
``create`` raises ``ClientError("too_many_requests")`` (HTTP 429); a job keeps
its last ``MAX_EVENTS`` events; each key keeps its ``max_finished_jobs_per_key``
most recently finished jobs, and older ones are forgotten, their record file
included (the adapters they made stay in the store).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import secrets
import threading
import time
from pathlib import Path

from adapter_core.faults import fault_point
from server.adaptation import job_checkpoint, training_file
from server.errors import ClientError
from server.store import FileStore, check_name, owner_hash, write_json_atomic

log = logging.getLogger("dynarank.jobs")

ACTIVE = ("validating_files", "queued", "running")
MAX_EVENTS = 1000  # events a job keeps (in memory and on disk); older ones go first
MAX_INLINE_FILES = 2000
MAX_STEPS = 100_000
# Steps between checkpoints unless the job's hyperparameters say otherwise: a restart repeats at most
# this many steps, and a checkpoint (a small adapter and its optimizer state) costs about one step.
CHECKPOINT_EVERY = 10


class JobError(ValueError):
    pass


def finished() -> dict:
    """The record fields of a job that ends now: OpenAI's ``finished_at`` (seconds) and ``_finished``
    (not public; finer, so the oldest finished job is forgotten first even within one second)."""
    now = time.time()
    return {"finished_at": int(now), "_finished": now}


class Job:
    def __init__(self, record: dict, owner: str | None):
        self.record = record
        self.owner = owner
        # Replaced, never shortened in place, when it grows past MAX_EVENTS: a reader that took the list
        # sees a consistent one.
        self.events: list[dict] = record.pop("_events", [])[-MAX_EVENTS:]
        self.next_event = int(self.events[-1]["id"].removeprefix("ftevent-")) + 1 if self.events else 0
        self.forgotten = False  # dropped by the per-key bound: its record is gone and is not written again
        self.examples: list = []
        self.adapter = None
        self.policy = None
        self.busy = False
        self.started_mono = None  # when this process started stepping it, at step ``mono_from`` (for the ETA)
        self.mono_from = 0
        self.lock = threading.Lock()
        self.ckpt_lock = threading.Lock()  # a checkpoint write and the removal of the job's checkpoint

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def status(self) -> str:
        return self.record["status"]

    def public(self) -> dict:
        return {k: v for k, v in self.record.items() if not k.startswith("_")}


class JobManager:
    def __init__(self, settings, model, tokenizer, store, sessions, files: FileStore | None = None):
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.sessions = sessions
        self.files = files or FileStore(settings.data_dir)  # uploads (/v1/files) a job may train on
        self.root = Path(settings.data_dir) / "jobs"
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.on_work = lambda: None  # set to the workers' wake()
        self._load()

    # -- persistence -------------------------------------------------------------

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("ftjob-*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("unreadable job record %s", path)
                continue
            job = Job(record, None)
            self.jobs[job.id] = job
            if record.get("status") in ACTIVE:  # never left as it was: resumed, or failed with the reason
                self._resume(job)
            else:  # ended; a kill right after it ended may have left its checkpoint
                job_checkpoint.drop(self.root, job.id)
        job_checkpoint.drop_orphans(self.root, set(self.jobs))
        for oh in {job.record.get("_owner") for job in self.jobs.values()}:
            self._forget_finished(oh)

    def _resume(self, job: Job) -> None:
        """After a restart: go on from the job's checkpoint, or fail it, saying why."""
        from adapter_core import new_session_adapter

        record = job.record
        try:
            if record["status"] == "validating_files":
                raise job_checkpoint.CheckpointError("its files were still being prepared")
            ckpt = job_checkpoint.load(self.root, job.id)
            examples = job_checkpoint.load_examples(self.root, job.id)
            owner = ckpt.state.get("owner")
            if owner_hash(owner) != record.get("_owner"):
                raise job_checkpoint.CheckpointError("the checkpoint is another key's")
            if ckpt.state.get("position") != ckpt.step % len(examples):
                raise job_checkpoint.CheckpointError("the checkpoint was not trained on these examples")
            adapter, policy = new_session_adapter(self.model, self._adapter_config(record["hyperparameters"]),
                                                  snapshot=ckpt.snapshot, policy_state=ckpt.policy_state)
            job_checkpoint.restore_optimizer(adapter, ckpt.optimizer)
        except Exception as exc:  # noqa: BLE001 - any reason not to resume fails the job, with that reason
            message = (f"the server restarted before the job finished (at step {record.get('step', 0)}"
                       f" of {record.get('total_steps')}) and it has no usable checkpoint ({exc}); create it again")
            record.update(status="failed", error={"code": "interrupted", "message": message}, **finished())
            self._event(job, "error", message)  # written back
            job_checkpoint.drop(self.root, job.id)
            return
        job.owner, job.examples, job.adapter, job.policy = owner, examples, adapter, policy
        record.update(step=ckpt.step, trained_tokens=ckpt.state.get("trained_tokens", 0))
        self._event(job, "info", f"resumed from step {ckpt.step} of {record['total_steps']} after a restart")

    def _adapter_config(self, hp: dict):
        from adapter_core import RankBounds
        from server.sessions.adapter_config import session_adapter_config

        return session_adapter_config(self.settings, hp["rank_policy"], lr=hp["learning_rate"],
                                      bounds=RankBounds(budget=hp["budget"]))

    def _checkpoint(self, job: Job, adapter, policy, step: int, new_examples: list | None = None) -> bool:
        """Replace the job's checkpoint with its state at ``step`` (and write ``new_examples``, the first
        time). False if the job ended meanwhile: then nothing is written (its checkpoint is dropped)."""
        with job.ckpt_lock:
            with job.lock:
                if job.status not in ACTIVE:
                    return False
                examples = job.examples if new_examples is None else new_examples
                state = {"step": step, "position": step % len(examples), "owner": job.owner,
                         "trained_tokens": job.record["trained_tokens"]}
            if new_examples is not None:
                job_checkpoint.save_examples(self.root, job.id, new_examples)
            job_checkpoint.save(self.root, job.id, adapter, policy, state)
        return True

    def _drop_checkpoint(self, job: Job) -> None:
        with job.ckpt_lock:
            job_checkpoint.drop(self.root, job.id)

    def _save(self, job: Job) -> None:
        with job.lock:  # a forgotten job's file stays deleted
            if not job.forgotten:
                write_json_atomic(self.root / f"{job.id}.json", {**job.record, "_events": job.events[-MAX_EVENTS:]})

    def _forget_finished(self, oh: str | None) -> None:
        """Keep the owner's ``max_finished_jobs_per_key`` most recently finished jobs; forget the others,
        oldest finished first, record file included."""
        with self._lock:
            done = [j for j in self.jobs.values() if j.record.get("_owner") == oh and j.status not in ACTIVE]
            done.sort(key=lambda j: j.record.get("_finished") or j.record.get("finished_at") or 0)
            dropped = done[:max(0, len(done) - self.settings.max_finished_jobs_per_key)]
            for job in dropped:
                del self.jobs[job.id]
        for job in dropped:
            with job.lock:
                job.forgotten = True
                job.examples, job.adapter, job.policy = [], None, None
                (self.root / f"{job.id}.json").unlink(missing_ok=True)
            self._drop_checkpoint(job)

    # -- API ---------------------------------------------------------------------

    def create(self, owner: str | None, body: dict) -> Job:
        if not isinstance(body, dict):
            raise JobError("the body must be a JSON object")
        fields = {"repository", "files", "training_file", "adapter_name", "hyperparameters", "model", "suffix"}
        unknown = set(body) - fields
        if unknown:
            raise JobError(f"unknown field(s): {', '.join(sorted(unknown))}")
        model = body.get("model")
        if model not in (None, self.settings.served_name):
            raise JobError(f"model must be the served base model {self.settings.served_name!r}")
        hp = self._hyperparameters(body.get("hyperparameters") or {})
        repo, files, file_id = body.get("repository"), body.get("files"), body.get("training_file")
        if file_id is not None:  # an uploaded JSONL file (/v1/files)
            if repo is not None or files is not None:
                raise JobError("give one of training_file, repository or files")
            repository = self._check_training_file(owner, file_id)
        elif files is not None:  # inline files; `repository` may only name them ({id, root_name})
            repository = self._check_files(files, repo)
        elif repo is not None:
            repository = self._check_repository(repo)
        else:
            raise JobError("give 'repository' ({path}), 'files' ([{path, text}], with repository {id, root_name}?) "
                           "or 'training_file' (the id of an uploaded file)")
        name = self._adapter_name(body, repository)
        now = int(time.time())
        record = {
            "id": "ftjob-" + secrets.token_hex(10), "object": "fine_tuning.job", "model": self.settings.served_name,
            "adapter_name": name, "fine_tuned_model": None, "status": "validating_files", "created_at": now,
            "started_at": None, "finished_at": None, "hyperparameters": hp,
            "repository": {k: v for k, v in repository.items() if k not in ("files", "records")},
            "training_file": file_id, "trained_tokens": 0,
            "step": 0, "total_steps": None, "error": None, "result": None, "_owner": owner_hash(owner),
        }
        job = Job(record, owner)
        with self._lock:  # the check and the insertion together: concurrent creates cannot pass the caps
            active = [j for j in self.jobs.values() if j.status in ACTIVE]
            mine = sum(1 for j in active if j.record.get("_owner") == record["_owner"])
            if mine >= self.settings.max_jobs_per_key:
                raise ClientError("too_many_requests",
                                  f"this key already has {mine} fine-tuning jobs validating, queued or running "
                                  f"(at most {self.settings.max_jobs_per_key}); wait for one to finish or "
                                  "cancel one")
            if len(active) >= self.settings.max_jobs:
                raise ClientError("too_many_requests",
                                  f"the server already has {len(active)} fine-tuning jobs validating, queued or "
                                  f"running (at most {self.settings.max_jobs}); try again later")
            self.jobs[job.id] = job
        self._event(job, "info", "job created")
        threading.Thread(target=self._prepare, args=(job, repository.get("files"), repository.get("records")),
                         daemon=True, name=f"prep-{job.id}").start()
        return job

    def _adapter_name(self, body: dict, repository: dict) -> str:
        """adapter_name, else suffix (OpenAI's field), else one derived from the repository or the training file."""
        name = body.get("adapter_name") or body.get("suffix")
        if name is None:
            derived = repository.get("root_name") or body.get("training_file") or ""
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", derived).strip("-.")[:80]
            if not name:
                raise JobError("no adapter name: set adapter_name (or suffix), or name the repository {root_name}")
        try:
            check_name(name)
        except ValueError as exc:
            raise JobError(str(exc)) from None
        if name.startswith("session-"):
            raise JobError("adapter names starting with 'session-' are reserved for sessions")
        return name

    def _check_training_file(self, owner: str | None, file_id) -> dict:
        try:
            records = training_file.parse(self.files.read(owner, file_id))
        except KeyError:
            raise JobError(f"training_file {file_id!r}: no such file of this key (upload it to /v1/files)") from None
        except training_file.TrainingFileError as exc:
            raise JobError(f"training_file {file_id}: {exc}") from None
        return {"id": None, "root_name": None, "records": records}

    def _hyperparameters(self, hp: dict) -> dict:
        if not isinstance(hp, dict):
            raise JobError("hyperparameters must be an object")
        if "n_epochs" in hp:  # OpenAI's name; its "auto" is our default
            hp = dict(hp)
            n_epochs = hp.pop("n_epochs")
            if n_epochs != "auto":
                hp["epochs"] = n_epochs
        allowed = {"rank_policy": str, "steps": int, "epochs": int, "budget": int, "learning_rate": float,
                   "checkpoint_every": int}
        for key, value in hp.items():
            want = allowed.get(key)
            if want is None:
                raise JobError(f"unknown hyperparameter {key!r}")
            ok = isinstance(value, (int, float)) if want is float else isinstance(value, want)
            if value is not None and (not ok or isinstance(value, bool)):
                raise JobError(f"hyperparameter {key!r} has the wrong type")
        if "steps" in hp and "epochs" in hp:
            raise JobError("give steps or epochs, not both")
        for key in ("steps", "epochs", "budget", "checkpoint_every"):
            if hp.get(key) is not None and not 0 < hp[key] <= MAX_STEPS * (10**6 if key == "budget" else 1):
                raise JobError(f"{key} out of range")
        if hp.get("learning_rate") is not None and not 0 < hp["learning_rate"] < 1:
            raise JobError("learning_rate must be in (0, 1)")
        from adapter_core.policies import POLICIES

        policy = hp.get("rank_policy") or self.settings.rank_policy
        if policy not in POLICIES:
            raise JobError(f"unknown rank_policy {policy!r}; known: {', '.join(sorted(POLICIES))}")
        return {"rank_policy": policy, "steps": hp.get("steps"), "epochs": hp.get("epochs"),
                "budget": hp.get("budget"), "learning_rate": hp.get("learning_rate") or self.settings.adapter_lr,
                "checkpoint_every": hp.get("checkpoint_every") or CHECKPOINT_EVERY}

    def _check_repository(self, repo) -> dict:
        if not isinstance(repo, dict) or not isinstance(repo.get("path"), str) or set(repo) - {"path", "id", "root_name"}:
            raise JobError("repository must be {path, id?, root_name?}")
        path = Path(repo["path"]).expanduser().resolve()
        roots = [Path(r).expanduser().resolve() for r in self.settings.repo_roots]
        if roots:
            if not any(path == r or r in path.parents for r in roots):
                raise JobError("repository path is outside the server's allowed repository roots")
        elif self.settings.api_keys:
            raise JobError("server-side repository paths are disabled on this server (no --repo-root); send files")
        if not path.is_dir():
            raise JobError(f"{repo['path']}: not a directory on the server")
        return {"path": str(path), "id": repo.get("id") or path.name, "root_name": repo.get("root_name") or path.name}

    def _check_files(self, files, repo=None) -> dict:
        if not isinstance(files, list) or not files or len(files) > MAX_INLINE_FILES:
            raise JobError(f"files must be a list of 1..{MAX_INLINE_FILES} {{path, text}} objects")
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("text"), str):
                raise JobError("each file needs string path and text")
        if repo is not None and (not isinstance(repo, dict) or set(repo) - {"id", "root_name"}
                                 or not all(isinstance(v, str) and v for v in repo.values())):
            raise JobError("with files, repository may only name them: {id?, root_name?} (no path)")
        repo = repo or {}
        return {"id": repo.get("id"), "root_name": repo.get("root_name"), "files": files}

    def list(self, owner: str | None) -> list[Job]:
        oh = owner_hash(owner)
        with self._lock:
            mine = [j for j in self.jobs.values() if j.record.get("_owner") == oh]
        return sorted(mine, key=lambda j: j.record["created_at"], reverse=True)

    def get(self, owner: str | None, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None or job.record.get("_owner") != owner_hash(owner):
            raise KeyError(job_id)
        return job

    def cancel(self, owner: str | None, job_id: str) -> Job:
        job = self.get(owner, job_id)
        with job.lock:
            active = job.status in ACTIVE
            if active:
                job.record["status"] = "cancelled"
                job.record.update(finished())
                job.examples, job.adapter = [], None
        if active:
            self._event(job, "info", "job cancelled")
            self._drop_checkpoint(job)
            self._forget_finished(job.record.get("_owner"))
        return job

    # -- running -----------------------------------------------------------------

    def _event(self, job: Job, level: str, message: str, data: dict | None = None) -> None:
        with job.lock:  # ids stay unique and in order when a cancel and a step report at once
            job.events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{job.next_event}",
                               "created_at": int(time.time()), "level": level, "message": message,
                               "data": data, "type": "metrics" if data else "message"})
            job.next_event += 1
            if len(job.events) > MAX_EVENTS:
                job.events = job.events[-MAX_EVENTS:]
            save = not data or job.record["step"] % 5 == 0 or job.status not in ACTIVE
        if save:
            self._save(job)

    def _fail(self, job: Job, message: str) -> None:
        with job.lock:
            job.record.update(status="failed", **finished(),
                              error={"code": "job_failed", "message": message})
            job.adapter = None
        self._event(job, "error", message)
        self._drop_checkpoint(job)
        self._forget_finished(job.record.get("_owner"))

    @staticmethod
    def _allowed_inline(inline_files) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(path, text) of the uploaded files the privacy rules allow, and (path, reason) of the others.
        Refused files are dropped, not answered with a 400: the client checks the same rules, so only an
        older or careless client sends them, and the rest of its upload is still worth training on."""
        from code_signals.privacy import PrivacyFilter

        privacy, files, skipped = PrivacyFilter(), [], []
        for f in inline_files:
            why = privacy.reason(f["path"], f["text"])
            if why is None:
                files.append((f["path"], f["text"]))
            else:
                skipped.append((f["path"], why))
        return files, skipped

    def _report_skipped(self, job: Job, skipped: list[tuple[str, str]], shown: int = 50) -> None:
        """One event naming the files left out and why; the counts per reason go on the record."""
        if not skipped:
            return
        counts = collections.Counter(why.split(":")[0] for _, why in skipped)
        with job.lock:
            job.record["repository"]["skipped"] = dict(sorted(counts.items()))
        listed = ", ".join(f"{path} ({why})" for path, why in skipped[:shown])
        more = f", and {len(skipped) - shown} more" if len(skipped) > shown else ""
        self._event(job, "info", f"skipped {len(skipped)} file(s): {listed}{more}")

    def _prepare(self, job: Job, inline_files, records=None) -> None:
        """Walk and tokenize (off the event loop), then queue the job for the workers.

        ``records``: the prompt/completion or text records of a training file (then there are no source files).
        """
        from adapter_core import new_session_adapter
        from code_signals import ExampleBuilder, detect_language, walk_repository

        try:
            if records is not None:
                files, skipped = [], []
            elif inline_files is not None:
                files, skipped = self._allowed_inline(inline_files)
                files = [(path, detect_language(path, text), text) for path, text in files]
            else:
                scan = walk_repository(job.record["repository"]["path"])  # applies the privacy rules itself
                files, skipped = [(f.path, f.language, f.text) for f in scan.files], scan.skipped
            self._report_skipped(job, skipped)
            builder = ExampleBuilder(self.tokenizer, max_tokens=256, max_examples=4)
            examples = training_file.examples(builder, records) if records is not None else []
            for path, language, text in files:
                if text.strip():
                    examples += builder.from_file(text, path, language, max_examples=64)
            if not examples:
                raise JobError("no training examples: the repository has no source files we read")
            hp = job.record["hyperparameters"]
            total = hp["steps"] or (hp["epochs"] or 1) * len(examples)
            adapter, policy = new_session_adapter(self.model, self._adapter_config(hp), task="new_code")
            checkpointed = self._checkpoint(job, adapter, policy, 0, examples)  # so a restart resumes it
        except Exception as exc:
            log.warning("job %s failed while preparing: %s", job.id, exc)
            self._fail(job, str(exc))
            return
        with job.lock:
            cancelled = job.status != "validating_files"
            if not cancelled:
                job.examples, job.adapter, job.policy = examples, adapter, policy
                job.record.update(status="queued", total_steps=min(total, MAX_STEPS))
                job.record["repository"]["files"] = len(files)
        if cancelled:
            if checkpointed:  # written after the cancel dropped the job's checkpoint
                self._drop_checkpoint(job)
            return
        self._event(job, "info", f"{len(files)} files, {len(examples)} examples, {job.record['total_steps']} steps")
        self.on_work()

    def take(self):
        """For the worker pool: one step of the oldest runnable job, or None."""
        with self._lock:  # jobs are created and forgotten by other threads
            jobs = sorted(self.jobs.values(), key=lambda j: j.record["created_at"])
        for job in jobs:
            with job.lock:
                if job.status in ("queued", "running") and job.adapter is not None and not job.busy:
                    job.busy = True
                    return lambda job=job: self._step(job)
        return None

    def _step(self, job: Job) -> None:
        from adapter_core import train_step
        from server.adaptation.examples import example_batch

        try:
            with job.lock:
                if job.status not in ("queued", "running") or job.adapter is None:
                    return
                if job.status == "queued":
                    job.record.update(status="running", started_at=job.record["started_at"] or int(time.time()))
                step = job.record["step"]
                if job.started_mono is None:
                    job.started_mono, job.mono_from = time.monotonic(), step
                example = job.examples[step % len(job.examples)]
                adapter, policy = job.adapter, job.policy
            stats = train_step(self.model, adapter, example_batch(example, adapter.device), policy)
            with job.lock:
                if job.status != "running":
                    return
                job.record["step"] = step = step + 1
                job.record["trained_tokens"] += stats.tokens
                total = job.record["total_steps"]
                eta = (time.monotonic() - job.started_mono) / (step - job.mono_from) * (total - step)
                ranks = adapter.ranks
                data = {"step": step, "total_steps": total, "loss": stats.loss, "skipped": stats.skipped,
                        "mean_rank": sum(ranks.values()) / len(ranks), "ranks": list(ranks.values()),
                        "eta_s": round(eta, 2)}
            self._event(job, "info", f"step {step}/{total}: loss {stats.loss:.4f}", data)
            if step >= total:
                self._finish(job)
            elif step % job.record["hyperparameters"].get("checkpoint_every", CHECKPOINT_EVERY) == 0:
                fault_point("job.before_checkpoint")
                try:
                    self._checkpoint(job, adapter, policy, step)
                except Exception as exc:  # noqa: BLE001 - the job goes on; a restart resumes from the one before
                    log.warning("job %s: checkpoint at step %d failed: %s", job.id, step, exc)
                    self._event(job, "warning", f"could not write the checkpoint at step {step}: {exc}")
        except Exception as exc:
            log.exception("job %s step failed", job.id)
            self._fail(job, f"training failed: {exc}")
        finally:
            job.busy = False

    def _finish(self, job: Job) -> None:
        with job.lock:
            if job.status != "running":
                return  # cancelled after the last step
            adapter, name = job.adapter, job.record["adapter_name"]
        # A re-run under the same name publishes the next version rather than colliding with a stored one.
        adapter.version = max(self.store.versions(job.owner, name), default=0)
        snap = adapter.snapshot(job=job.id)
        repo = job.record["repository"]
        fault_point("job.before_finish")
        self.store.save(job.owner, name, snap,
                        info={"kind": "repository", "job": job.id,
                              "repository": {"id": repo.get("id"), "root_name": repo.get("root_name")}})
        with job.lock:
            cancelled = job.status != "running"
            if not cancelled:
                job.record.update(status="succeeded", **finished(),
                                  fine_tuned_model=f"{self.settings.served_name}:{name}",
                                  result={"version": snap.version, "ranks": snap.ranks})
                job.examples, job.adapter, job.policy = [], None, None
        if cancelled:  # the cancel answered while the adapter was being written: take it back
            self.store.delete_version(job.owner, name, snap.version)
            return
        self._event(job, "info", f"saved adapter {name} (version {snap.version})")
        self._drop_checkpoint(job)
        self._forget_finished(job.record.get("_owner"))

"""``/v1/fine_tuning/jobs``: per-repository fine-tuning, in OpenAI's job shape."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server.adaptation.jobs import Job, JobError, JobManager
from server.app.deps import AUTH, Owner, ServicesDep
from server.app.errors import APIError
from server.app.params import valid_text

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"], dependencies=AUTH)

MAX_PATH_CHARS = 4096  # Linux's PATH_MAX


def _check_fields(body) -> None:
    """The body's text fields must be strings (or null) a file system and a tokenizer take: no NUL, no lone
    surrogate, paths at most MAX_PATH_CHARS. 400 ``invalid_value`` naming the field; the job manager checks
    the rest (shapes, names, hyperparameters)."""
    if not isinstance(body, dict):
        return  # the job manager says what is wrong with it
    fields = [(name, body.get(name), False) for name in ("training_file", "adapter_name", "suffix", "model")]
    repo, files = body.get("repository"), body.get("files")
    if isinstance(repo, dict):
        fields += [("repository.path", repo.get("path"), True), ("repository.id", repo.get("id"), False),
                   ("repository.root_name", repo.get("root_name"), False)]
    if isinstance(files, list):
        for i, f in enumerate(files):
            if isinstance(f, dict):
                fields += [(f"files.{i}.path", f.get("path"), True), (f"files.{i}.text", f.get("text"), False)]
    for param, value, is_path in fields:
        if value is None:
            continue
        if not isinstance(value, str):
            raise APIError(400, f"{param} must be a string.", code="invalid_value", param=param)
        try:
            valid_text(value)
        except ValueError as exc:
            raise APIError(400, f"{param} {exc}", code="invalid_value", param=param) from None
        if is_path and "\x00" in value:
            raise APIError(400, f"{param} contains a NUL character.", code="invalid_value", param=param)
        if is_path and len(value) > MAX_PATH_CHARS:
            raise APIError(400, f"{param} has {len(value)} characters; at most {MAX_PATH_CHARS} are allowed.",
                           code="invalid_value", param=param)


def _job(jobs: JobManager, owner, job_id: str) -> Job:
    try:
        return jobs.get(owner, job_id)
    except KeyError:
        raise APIError(404, f"no fine-tuning job {job_id}", code="job_not_found", param="job_id") from None


@router.post("/jobs")
async def create_job(request: Request, services: ServicesDep, owner: Owner):
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    _check_fields(body)
    try:
        job = await asyncio.to_thread(services.jobs.create, owner, body)  # checks paths, writes the record
    except JobError as exc:
        raise APIError(400, str(exc), code="invalid_request") from None
    return job.public()


@router.get("/jobs")
def list_jobs(services: ServicesDep, owner: Owner):
    return {"object": "list", "data": [j.public() for j in services.jobs.list(owner)], "has_more": False}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, services: ServicesDep, owner: Owner):
    return _job(services.jobs, owner, job_id).public()


def _event_number(after: str) -> int:
    """``after`` is the last event seen: its id (``ftevent-N``, what OpenAI clients send) or N."""
    number = after.removeprefix("ftevent-")
    if not (number.isascii() and number.isdigit()):  # str.isdigit takes "²", which int() refuses
        raise APIError(400, f"after must be an event id (ftevent-N), got {after!r}", code="invalid_value",
                       param="after")
    return int(number)


@router.get("/jobs/{job_id}/events")
def job_events(job_id: str, services: ServicesDep, owner: Owner, after: str | None = None, limit: int = 100):
    """Events oldest first, ``limit`` of them after the event ``after`` (from the first without it).

    (OpenAI lists newest first; a forward cursor lets a client poll for new events, and its
    client's pagination, which sends the last id as ``after``, still walks them all.)
    """
    events = _job(services.jobs, owner, job_id).events
    first = int(events[0]["id"].removeprefix("ftevent-")) if events else 0  # a reloaded job keeps its last events
    start = max(0, _event_number(after) + 1 - first) if after is not None else 0
    page = events[start:start + max(1, min(limit, 1000))]
    return {"object": "list", "data": page, "has_more": start + len(page) < len(events)}


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, services: ServicesDep, owner: Owner):
    _job(services.jobs, owner, job_id)
    return services.jobs.cancel(owner, job_id).public()

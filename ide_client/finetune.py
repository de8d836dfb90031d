"""``dynarank-client finetune PATH``: a per-repository fine-tuning job with a progress bar.

The server reads the repository itself when it may (same machine, allowed
root); otherwise the client uploads the source files inline. Ctrl-C cancels
the job on the server, not only the local progress bar.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ide_client.context import Context
from ide_client.http_api import TERMINAL_JOB_STATES, APIError
from ide_client.repo import repository_info, source_files

# Server answers meaning "I cannot read that path": fall back to uploading.
_PATH_REFUSED = ("server-side repository paths are disabled", "outside the server", "not a directory on the server")


def default_adapter_name(root: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", root.name).strip("-.")[:60] or "repository"


def start_job(api, root: Path, name: str, hp: dict, upload: bool, err=sys.stderr) -> dict:
    info = repository_info(root)
    if not upload:
        try:
            return api.create_job(adapter_name=name, repository={"path": str(root), **info}, hyperparameters=hp)
        except APIError as exc:
            if exc.status != 400 or not any(s in exc.message for s in _PATH_REFUSED):
                raise
            print(f"server cannot read {root} ({exc.message}); uploading files", file=err)
    files = [{"path": rel, "text": text} for rel, text in source_files(root)]
    if not files:
        raise SystemExit(f"no source files under {root}")
    # Name the repository so the adapter seeds this repository's sessions, as a server-side job would.
    return api.create_job(adapter_name=name, files=files, repository=info, hyperparameters=hp)


def follow(api, job: dict, out=sys.stderr, poll_s: float = 0.5) -> dict:
    """Poll the job and its events until it ends; draw a tqdm bar meanwhile."""
    last_event = None
    bar = tqdm(total=job.get("total_steps"), desc=job["adapter_name"], unit="step", file=out, dynamic_ncols=True)
    try:
        while True:
            events = api.job_events(job["id"], after=last_event, limit=1000)
            for event in events:
                last_event = int(event["id"].rsplit("-", 1)[1])
                data = event.get("data") or {}
                if "loss" in data:
                    bar.set_postfix(loss=f"{data['loss']:.4f}", rank=f"{data['mean_rank']:.2f}", refresh=False)
                elif event.get("message"):
                    bar.write(f"  {event['message']}", file=out)
            job = api.job(job["id"])
            if job.get("total_steps") and bar.total != job["total_steps"]:
                bar.total = job["total_steps"]
            bar.update(job.get("step", 0) - bar.n)
            if job["status"] in TERMINAL_JOB_STATES:
                return job
            time.sleep(poll_s)
    finally:
        bar.close()


def run_finetune(ctx: Context, path: Path, *, name: str | None, steps: int | None, epochs: int | None,
                 policy: str | None, lr: float | None, upload: bool, out=sys.stdout) -> int:
    root = Path(path).resolve()
    hp = {k: v for k, v in {"steps": steps, "epochs": epochs, "rank_policy": policy,
                             "learning_rate": lr}.items() if v is not None}
    with ctx.api() as api:
        job = start_job(api, root, name or default_adapter_name(root), hp, upload)
        print(f"job {job['id']} ({job['status']})", file=out, flush=True)
        try:
            job = follow(api, job)
        except KeyboardInterrupt:
            job = api.cancel_job(job["id"])
            print(f"job {job['id']} cancelled", file=out)
            return 130
    if job["status"] == "succeeded":
        print(f"succeeded: model {job['fine_tuned_model']} (adapter version {job['result']['version']}); "
              f"new sessions on this repository start from it", file=out)
        return 0
    error = (job.get("error") or {}).get("message", "")
    print(f"{job['status']}: {error}", file=out)
    return 1

"""Helpers for tests that start real servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Write ``{relative path: text or bytes}`` under ``root`` (parents made); returns root."""
    for rel, content in files.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return Path(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> httpx.Response:
    """Poll url until it answers 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = server_output(proc)
            raise AssertionError(f"server exited with {proc.returncode}:\n{out[-4000:]}")
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except httpx.HTTPError as exc:
            last_error = exc
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s: {last_error}")


def start_server(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start `dynarank serve ARGS` as a real process; the caller stops it.

    Its output goes to a temporary file, not a pipe: a server that logs every
    request would fill an unread pipe and block on its next log line.
    """
    full_env = {**os.environ, **(env or {})}
    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115 - stop_server closes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", *args],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log_file = log
    return proc


def server_output(proc: subprocess.Popen) -> str:
    """Everything the server printed so far."""
    proc.log_file.flush()
    proc.log_file.seek(0)
    return proc.log_file.read()


def stop_child(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (a child started in the background may ignore SIGINT), then SIGKILL if it is still alive."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    stop_child(proc, timeout)
    out = server_output(proc)
    proc.log_file.close()
    return out


def client_cli(*args, cwd=ROOT, env: dict | None = None, split_stderr: bool = False) -> subprocess.Popen:
    """`python -m ide_client ARGS` from the checkout, stderr on stdout's pipe unless split; the caller stops it
    (stop_child)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "ide_client", *args], cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE if split_stderr else subprocess.STDOUT)


def run_client(*args, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m ide_client ARGS` to its end (client_cli's keywords). Past `timeout` it is stopped and fails."""
    proc = client_cli(*args, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_child(proc, 5)
        out, err = proc.communicate()
        raise AssertionError(f"dynarank-client {' '.join(args)} still ran after {timeout}s:\n{out[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def create_ready(s, owner, body, timeout: float = 60.0):
    """Create a fine-tuning job on ``s`` (the ``make_jobs`` namespace) and wait until its files are
    prepared (queued for the workers)."""
    s.ready.clear()
    job = s.jobs.create(owner, body)
    assert s.ready.wait(timeout), f"job never became ready: {job.public()}"
    assert job.status == "queued", job.public()
    return job

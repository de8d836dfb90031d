"""Shared by the live client tests: a real `dynarank serve` on a tiny random model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import build_tiny_model
from tests.helpers import free_port, start_server, stop_server, wait_for_http


class LiveServer:
    """`dynarank serve` on a fixed port, so it can be restarted where clients expect it."""

    def __init__(self, model_dir: Path, data_dir: Path):
        self.model_dir, self.data_dir, self.port = model_dir, data_dir, free_port()
        self.proc = None
        self.logs: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.proc = start_server(["--model", str(self.model_dir), "--port", str(self.port),
                                  "--data-dir", str(self.data_dir)])
        wait_for_http(self.url + "/health", self.proc)
        return self

    def stop(self) -> None:
        self.logs.append(stop_server(self.proc))


@pytest.fixture(scope="module")
def tiny_dir(tokenizer):
    d = Path(tempfile.mkdtemp(prefix="ide-client-tiny-"))
    build_tiny_model("llama", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tiny_dir):
    data = Path(tempfile.mkdtemp(prefix="ide-client-data-"))
    srv = LiveServer(tiny_dir, data).start()
    yield srv
    srv.stop()
    shutil.rmtree(data, ignore_errors=True)
    assert "Traceback" not in srv.logs[-1], srv.logs[-1][-3000:]

"""The real SmolLM2-135M over the websocket: edit, adapt, complete on the new version."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.session_server import FILE_V1, FILE_V2, Client, Server, run


@pytest.mark.real_model
def test_smollm2_session_adapts_and_serves_new_version(smollm2_path):
    data = Path(tempfile.mkdtemp(prefix="dynarank-real-"))
    srv = Server(smollm2_path, data).start()
    try:
        async def go():
            c = await Client.connect(srv.port)
            ready = await c.hello(repository={"id": "geometry", "root_name": "geometry"})
            assert ready["adapter_version"] == 0
            await c.send({"type": "open", "path": "geometry.py", "language": "python", "text": FILE_V1, "version": 1})
            await c.send({"type": "edit", "path": "geometry.py", "version": 2, "text": FILE_V2})
            adapted = await c.wait_for("adapted", 180)
            assert adapted["version"] >= 1 and adapted["loss"] > 0
            deltas, done = await c.complete("r1", path="geometry.py", cursor={"line": 7, "character": 0},
                                            max_tokens=8)
            assert done["type"] == "completion.done", done
            assert done["adapter_version"] >= adapted["version"]
            assert done["text"] == "".join(deltas)
            await c.close()

        run(go())
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)

"""A client that sends a .env or a file with a key over the websocket anyway: the server mirrors it (the
editor's versions stay in step) but never trains on it, and nothing of it reaches the data directory."""

from __future__ import annotations

import time

from tests.helpers import server_output
from tests.privacy_repo import API_TOKEN, PRIVATE_KEY, leaked
from tests.session_server import FILE_V1, FILE_V2, Client, adapt_once, run


def test_refused_documents_are_mirrored_but_never_trained(server):
    async def go():
        c = await Client.connect(server.port)
        await c.hello()
        await c.send({"type": "open", "path": ".env", "text": "DEBUG=1\n", "version": 1})
        await c.send({"type": "edit", "path": ".env", "version": 2, "text": f"DEBUG=1\nAPI_KEY={API_TOKEN}\n"})
        await c.send({"type": "open", "path": "config.py", "text": FILE_V1, "version": 1})
        await c.send({"type": "edit", "path": "config.py", "version": 2,
                      "text": FILE_V2 + f"KEY = '''{PRIVATE_KEY}'''\n"})
        await c.send({"type": "status", "id": "s1"})
        status = await c.wait_for("status", 30, lambda m: m.get("id") == "s1")
        assert status["documents"] == {".env": 2, "config.py": 2}  # accepted and mirrored
        for path in (".env", "config.py"):
            await c.send({"type": "close", "path": path})
        adapted = await adapt_once(c, "geometry.py")  # an ordinary file still trains the session
        await c.close()
        return adapted

    adapted = run(go())
    assert adapted["version"] >= 1
    deadline = time.monotonic() + 30
    while "not training on an edit of config.py" not in server_output(server.proc) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server_output(server.proc)
    assert "not training on an edit of .env (secret-looking name)" in log
    assert "not training on an edit of config.py (private key)" in log
    assert "not training on an edit of geometry.py" not in log
    assert not leaked(server.data_dir)

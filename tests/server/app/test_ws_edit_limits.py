"""The document limits over a real socket (docs/protocol.md, "Document limits"): a server started with
small --max-edit-changes, --max-document-chars and --max-open-documents answers each refused message with
its error code and changes nothing; messages at the limits go through.

Whether a refused edit changed the mirror is read back through the protocol itself: a range edit that
fits only the previous text is accepted (else it would be invalid_range), and `status` reports versions.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.session_server import Client, Server, run

MAX_CHANGES, MAX_CHARS, MAX_DOCS = 8, 1000, 3


@pytest.fixture(scope="module")
def limited(tiny_dir):
    data = Path(tempfile.mkdtemp(prefix="dynarank-data-"))
    srv = Server(tiny_dir, data, extra=["--max-edit-changes", str(MAX_CHANGES), "--max-document-chars",
                                        str(MAX_CHARS), "--max-open-documents", str(MAX_DOCS)]).start()
    yield srv
    out = srv.stop()
    shutil.rmtree(data, ignore_errors=True)
    assert "Traceback" not in out, out[-3000:]


def at(line, character):
    return {"line": line, "character": character}


def insert(line, character, text):
    return {"range": {"start": at(line, character), "end": at(line, character)}, "text": text}


async def reply(c: Client, msg: dict) -> dict:
    """Send a message with an id; its ack or error."""
    await c.send(msg)
    return await c.wait_for_any(("ack", "error"), msg["id"], timeout=30)


async def documents(c: Client) -> dict:
    await c.send({"type": "status", "id": "st"})
    return (await c.wait_for("status", 30, lambda m: m.get("id") == "st"))["documents"]


def test_too_many_changes_and_oversized_documents_are_refused_and_change_nothing(limited):
    async def go():
        c = await Client.connect(limited.port)
        await c.hello()
        assert (await reply(c, {"type": "open", "path": "a.py", "text": "x = 1\n", "version": 1, "id": 1}))["type"] == "ack"

        err = await reply(c, {"type": "edit", "path": "a.py", "version": 2, "id": 2,
                              "changes": [insert(0, 5, "0")] * (MAX_CHANGES + 1)})
        assert err["type"] == "error" and err["code"] == "too_many_changes" and err["ref"] == 2, err
        # At the limit: applied on top of the unchanged text ("x = 1": a change at character 5 fits).
        ok = await reply(c, {"type": "edit", "path": "a.py", "version": 2, "id": 3,
                             "changes": [insert(0, 5, "0")] * MAX_CHANGES})
        assert ok == {"type": "ack", "ref": "edit", "id": 3, "path": "a.py", "version": 2}
        line_end = 5 + MAX_CHANGES  # "x = 1" + eight "0"s

        err = await reply(c, {"type": "open", "path": "big.py", "text": "x" * (MAX_CHARS + 1), "version": 1, "id": 4})
        assert err["code"] == "document_too_large" and err["ref"] == 4, err
        err = await reply(c, {"type": "edit", "path": "a.py", "version": 3, "id": 5, "text": "y" * (MAX_CHARS + 1)})
        assert err["code"] == "document_too_large", err
        err = await reply(c, {"type": "edit", "path": "a.py", "version": 3, "id": 6,
                              "changes": [insert(0, line_end, "z" * MAX_CHARS)]})
        assert err["code"] == "document_too_large", err
        assert await documents(c) == {"a.py": 2}
        # The text is still the one of version 2: a change at its line end fits, one past it would not.
        ok = await reply(c, {"type": "edit", "path": "a.py", "version": 3, "id": 7, "changes": [insert(0, line_end, "!")]})
        assert ok["type"] == "ack" and ok["version"] == 3, ok
        # Exactly at the size limit is fine.
        ok = await reply(c, {"type": "open", "path": "big.py", "text": "x" * MAX_CHARS, "version": 1, "id": 8})
        assert ok["type"] == "ack", ok
        await c.close()

    run(go())


def test_open_documents_are_capped_across_the_tabs_of_a_session(limited):
    async def go():
        tab1 = await Client.connect(limited.port)
        ready = await tab1.hello()
        tab2 = await Client.connect(limited.port)
        await tab2.hello(session_id=ready["session_id"])
        for i in range(MAX_DOCS - 1):
            assert (await reply(tab1, {"type": "open", "path": f"{i}.py", "text": "x", "version": 1, "id": i}))["type"] == "ack"
        assert (await reply(tab2, {"type": "open", "path": "tab2.py", "text": "x", "version": 1, "id": "t"}))["type"] == "ack"
        err = await reply(tab1, {"type": "open", "path": "one_more.py", "text": "x", "version": 1, "id": "m1"})
        assert err["code"] == "too_many_documents" and err["ref"] == "m1", err
        err = await reply(tab2, {"type": "open", "path": "one_more.py", "text": "x", "version": 1, "id": "m2"})
        assert err["code"] == "too_many_documents", err
        # Re-opening an open document replaces it: no new document, so it is not refused.
        assert (await reply(tab2, {"type": "open", "path": "0.py", "text": "y", "version": 5, "id": "r"}))["type"] == "ack"
        expected = {**{f"{i}.py": 1 for i in range(MAX_DOCS - 1)}, "tab2.py": 1, "0.py": 5}
        assert await documents(tab1) == expected
        await tab1.send({"type": "close", "path": "tab2.py", "id": "c"})
        assert (await tab1.wait_for_any(("ack", "error"), "c"))["type"] == "ack"
        assert (await reply(tab2, {"type": "open", "path": "one_more.py", "text": "x", "version": 1, "id": "m3"}))["type"] == "ack"
        await tab1.close()
        await tab2.close()

    run(go())

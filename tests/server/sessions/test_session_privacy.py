"""Documents a client sends over the websocket are mirrored as sent, but an edit or an accepted completion
in one the privacy rules refuse (by path or content) never becomes a training example."""

from __future__ import annotations

import time
import types

from server.feedback import FeedbackBook, find_kept
from server.sessions import Document, Session
from tests.privacy_repo import API_TOKEN, PRIVATE_KEY

APP_V1 = "def area(w, h):\n    return w * h\n"
APP_V2 = APP_V1 + "\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"


def session() -> Session:
    return Session("s1", None, None, None, types.SimpleNamespace(version=0), token_hashes=[], max_queue=10)


def edited(s: Session, path: str, before: str, after: str) -> None:
    s.open_doc(path, before, 1, None, quiet_s=0.0)
    s.edit_doc(path, 2, after)


def test_settle_drops_edits_of_refused_documents():
    s = session()
    edited(s, ".env", "A=1\n", f"A=1\nAPI_KEY={API_TOKEN}\n")  # secret-looking name
    edited(s, "app.py", APP_V1, APP_V2)  # ordinary
    edited(s, "config.py", "X = 1\n", f"X = 1\nKEY = '''{PRIVATE_KEY}'''\n")  # a key pasted in
    edited(s, "cleanup.py", f"KEY = '''{PRIVATE_KEY}'''\n", "KEY = None\n")  # a key taken out: before has it
    edited(s, ".git/config", "[core]\n", "[core]\n\tbare = false\n")  # private directory
    settled = s.settle(time.monotonic() + 60)
    assert [(path, after) for _, after, path, _ in settled] == [("app.py", APP_V2)]
    assert set(s.docs) == {".env", "app.py", "config.py", "cleanup.py", ".git/config"}  # still mirrored
    assert s.settle(time.monotonic() + 60) == []


def test_accepted_text_in_a_refused_document_is_not_kept():
    book = FeedbackBook(max_records=8)
    book.record("c0", version=1, model="m", text="return w * h", prompt="x = ")
    book.apply("c0", "accepted", check_after_s=0)
    record = book.records["c0"]
    secret_doc = Document(f"TOKEN = '{API_TOKEN}'\ndef f(w, h):\n    return w * h\n", 2, "python")
    assert find_kept(record, {"settings.py": secret_doc}) is None
    assert find_kept(record, {".env": Document(APP_V1, 2, None)}) is None
    found = find_kept(record, {"settings.py": secret_doc, "app.py": Document(APP_V1, 2, "python")})
    assert found is not None and found[2] == "app.py"

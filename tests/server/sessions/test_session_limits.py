"""The document mirror's limits (docs/protocol.md, "Document limits"): a refused open or edit raises
ClientError and leaves every document, version and pending burst as it was."""

from __future__ import annotations

import time
import types

import pytest

from server.errors import ClientError
from server.sessions import Session


def session() -> Session:
    return Session("s1", None, None, None, types.SimpleNamespace(version=0), token_hashes=[], max_queue=10)


def mirror(s: Session) -> dict:
    return {path: (doc.text, doc.version) for path, doc in s.docs.items()}


def refused(code: str, fn, *args, **kwargs) -> ClientError:
    with pytest.raises(ClientError) as err:
        fn(*args, **kwargs)
    assert err.value.code == code and err.value.message
    return err.value


def test_open_over_the_size_limit_opens_nothing():
    s = session()
    s.open_doc("a.py", "x" * 10, 1, None, 0.0, max_chars=10)  # at the limit: fine
    err = refused("document_too_large", s.open_doc, "b.py", "x" * 11, 1, None, 0.0, max_chars=10)
    assert "b.py" in err.message and "11" in err.message and "10" in err.message
    refused("document_too_large", s.open_doc, "a.py", "y" * 11, 5, None, 0.0, max_chars=10)  # a re-open too
    assert mirror(s) == {"a.py": ("x" * 10, 1)}
    assert set(s.coalescers) == {"a.py"}


def test_edit_over_the_size_limit_keeps_the_previous_text_and_version():
    s = session()
    s.open_doc("a.py", "a = 1\n", 1, None, 0.0, max_chars=10)
    refused("document_too_large", s.edit_doc, "a.py", 2, "a = 1\n" * 2, max_chars=10)
    assert mirror(s) == {"a.py": ("a = 1\n", 1)}
    assert s.settle(time.monotonic() + 60) == []  # the refused text never reached the burst coalescer
    s.edit_doc("a.py", 2, "a = 22\n", max_chars=10)
    assert mirror(s) == {"a.py": ("a = 22\n", 2)}


def test_open_documents_are_capped_per_session_and_a_reopen_does_not_count():
    s = session()
    for path in ("a.py", "b.py"):
        s.open_doc(path, "x", 1, None, 0.0, max_documents=2)
    err = refused("too_many_documents", s.open_doc, "c.py", "x", 1, None, 0.0, max_documents=2)
    assert "c.py" in err.message
    s.open_doc("a.py", "reopened", 4, None, 0.0, max_documents=2)  # already open: replaced, not a new one
    assert mirror(s) == {"a.py": ("reopened", 4), "b.py": ("x", 1)}
    s.close_doc("b.py")
    s.open_doc("c.py", "x", 1, None, 0.0, max_documents=2)
    assert sorted(s.docs) == ["a.py", "c.py"]


def test_without_limits_nothing_is_refused():
    s = session()
    for i in range(100):
        s.open_doc(f"{i}.py", "x" * 5000, 1, None, 0.0)
    s.edit_doc("0.py", 2, "y" * 100_000)
    assert len(s.docs) == 100 and s.docs["0.py"].version == 2

"""`dynarank-client` failures, by running the real command: one line on stderr that says the fix, exit status 2.

No server at all, a server that refuses the key, a session it does not know,
a position outside the file. A keyed server on a tiny random model serves the
middle cases.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import free_port, run_client
from tests.session_server import Server, save_tiny_model

KEY = "cli-key"
SOURCE = "import math\n\n\ndef circle_area(r):\n    return math.pi * r * r\n"


@pytest.fixture(scope="module")
def server(tokenizer):
    root = Path(tempfile.mkdtemp(prefix="dynarank-cli-errors-"))
    srv = Server(save_tiny_model(root / "tiny", tokenizer), root / "data", ["--api-key", KEY]).start()
    yield srv
    srv.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / ".git").mkdir()  # a repository root: the session state goes under it, not in $HOME
    (tmp_path / "circle.py").write_text(SOURCE)
    return tmp_path


def commands(repo: Path) -> dict[str, list[str]]:
    return {"status": ["status", str(repo)], "complete": ["complete", f"{repo / 'circle.py'}:5:5"],
            "finetune": ["finetune", str(repo), "--steps", "1"], "watch": ["watch", str(repo)]}


def one_line_error(done, *needles: str) -> str:
    """The command failed with exit status 2 and exactly one line on stderr holding every needle."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stdout, done.stderr)
    assert lines[0].startswith("dynarank-client: ") and "Traceback" not in done.stderr + done.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["status", "complete", "finetune", "watch"])
def test_unreachable_server(repo, command):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = run_client(*commands(repo)[command], "--server", url, split_stderr=True)
    one_line_error(done, f"cannot reach the dynarank server at {url}", "start it with `dynarank serve`",
                   "pass --server")


@pytest.mark.parametrize("command", ["status", "complete", "finetune", "watch"])
def test_wrong_or_missing_api_key(server, repo, command):
    url = server.url("")
    wrong = run_client(*commands(repo)[command], "--server", url, "--api-key", "not-the-key", split_stderr=True)
    one_line_error(wrong, f"the server at {url} refused the API key", "set DYNARANK_API_KEY or pass --api-key")
    missing = run_client(*commands(repo)[command], "--server", url, env={"DYNARANK_API_KEY": ""}, split_stderr=True)
    one_line_error(missing, "needs an API key", "set DYNARANK_API_KEY or pass --api-key")


@pytest.mark.parametrize("command", ["status", "complete", "watch"])
def test_unknown_session(server, repo, command):
    args = [*commands(repo)[command], "--server", server.url(""), "--api-key", KEY]
    by_id = run_client(*args, "--session", "no-such-session", split_stderr=True)
    one_line_error(by_id, "does not know that session", "no session no-such-session", "--new-session")
    by_token = run_client(*args, "--resume", "not-a-token", split_stderr=True)
    one_line_error(by_token, "does not know that session", "--new-session")
    assert not (repo / ".dynarank" / "client.json").exists()  # no session was started under either name


def test_a_saved_session_the_server_lost_is_replaced_with_a_note(server, repo):
    state = repo / ".dynarank" / "client.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"servers": {server.url(""): {"session_id": "gone", "resume_token": "stale"}}}))
    done = run_client("status", str(repo), "--server", server.url(""), "--api-key", KEY, split_stderr=True)
    assert done.returncode == 0 and "no longer valid" in done.stderr, (done.stdout, done.stderr)
    assert "gone" not in state.read_text()


@pytest.mark.parametrize("location, message", [
    ("circle.py:5:40", "circle.py:5:40: column 40 is past the end of line 5: columns are 1-27"),
    ("circle.py:9:1", "circle.py:9:1: line 9 is past the end of the file: lines are 1-6"),
    ("circle.py:0:1", "LINE and COL start at 1"),
    ("circle.py:5", "expected FILE:LINE:COL (1-based)"),
    ("missing.py:1:1", "cannot read missing.py"),
])
def test_positions_outside_the_file(repo, location, message):
    # Checked before connecting: no server is needed to be told.
    done = run_client("complete", location, "--server", f"http://127.0.0.1:{free_port()}", cwd=repo,
                      split_stderr=True)
    one_line_error(done, message)


def test_help_states_the_cursor_convention():
    done = run_client("complete", "--help", split_stderr=True)
    assert done.returncode == 0
    assert "1-based" in done.stdout and "0-based" in done.stdout

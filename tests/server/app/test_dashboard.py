"""The dashboard and the session/job metrics, on a real server with an API key (tiny model).

The page is rendered in headless Chromium: ``--dump-dom`` for what it shows
without a key, with a wrong key and with the right one (``/dashboard#key=KEY``),
and the DevTools protocol over ``--remote-debugging-pipe`` to type a key into
the login box, take a screenshot and forget the key.

The screenshot goes into the test's tmp dir; with ``DYNARANK_DOCS_SCREENSHOT=1``
it also replaces docs/dashboard.png (so ordinary runs leave the tree clean).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.observability.metrics import JOB_STATES, Metrics
from tests.helpers import ROOT
from tests.session_server import Client, Server, adapt_once, run

KEY = "dash-key-4417"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=820,1800"]


@pytest.fixture(scope="module")
def server(tiny_dir):
    data = Path(tempfile.mkdtemp(prefix="dynarank-dash-"))
    srv = Server(tiny_dir, data, ["--api-key", KEY]).start()
    yield srv
    out = srv.stop()
    shutil.rmtree(data, ignore_errors=True)
    assert "Traceback" not in out, out[-3000:]


def scrape(server) -> dict:
    """``{(name, labels...): value}`` of the session and job gauges."""
    r = httpx.get(server.url("/metrics"), headers=AUTH)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith(("dynarank_sessions_", "dynarank_fine_tuning_jobs")):
                out[(s.name, *s.labels.values())] = s.value
    return out


def wait_until(fn, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_job(server, name, steps) -> str:
    files = [{"path": f"m{i}.py", "text": f"def f{i}(x):\n    return x + {i}\n" * 20} for i in range(3)]
    r = httpx.post(server.url("/v1/fine_tuning/jobs"), headers=AUTH, timeout=30,
                   json={"files": files, "adapter_name": name, "hyperparameters": {"steps": steps}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def job_status(server, job_id) -> str:
    return httpx.get(server.url(f"/v1/fine_tuning/jobs/{job_id}"), headers=AUTH).json()["status"]


def make_history(server) -> None:
    """A session with trained versions and one accepted completion (a 100% point), and a finished job."""

    async def go():
        c = await Client.connect(server.port)
        await c.hello(api_key=KEY)
        for i in range(3):  # a few versions: points on the loss chart, frames for the heatmap's slider
            await adapt_once(c, f"dash{i}.py")
        _, done = await c.complete("c1", prefix="def area(width, height):\n    return ", max_tokens=4)
        await c.send({"type": "feedback", "id": "f1", "completion_id": done["completion_id"], "event": "accepted"})
        assert (await c.wait_for_any(("ack", "error"), "f1"))["type"] == "ack"
        await c.close()

    run(go())
    job = start_job(server, "dash-repo", 4)
    wait_until(lambda: job_status(server, job) == "succeeded", what="the job to succeed")


def dump_dom(url, profile) -> str:
    """The rendered DOM without its script (which holds every message the page may show)."""
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=8000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    return re.sub(r"<script>.*</script>", "", out.stdout, flags=re.DOTALL)


# -- metrics -------------------------------------------------------------------


def test_collectors_count_sessions_and_jobs_by_state():
    m = Metrics()
    sessions = [SimpleNamespace(connections=2), SimpleNamespace(connections=0)]
    jobs = {i: SimpleNamespace(status=s) for i, s in enumerate(["running", "succeeded", "succeeded", "cancelled"])}
    m.watch_services(SimpleNamespace(sessions=lambda: sessions), SimpleNamespace(jobs=jobs))
    text = m.render()[0].decode()
    assert "dynarank_sessions_resident 2.0" in text and "dynarank_sessions_connected 1.0" in text
    assert 'dynarank_fine_tuning_jobs{state="succeeded"} 2.0' in text
    assert 'dynarank_fine_tuning_jobs{state="failed"} 0.0' in text  # every state, zeros included
    assert {f'state="{s}"' in text for s in JOB_STATES} == {True}
    jobs[9] = SimpleNamespace(status="failed")  # read at scrape time: no update call needed
    assert 'dynarank_fine_tuning_jobs{state="failed"} 1.0' in m.render()[0].decode()


# -- the page ------------------------------------------------------------------


def test_dashboard_page_is_self_contained_and_its_data_needs_the_key(server):
    page = httpx.get(server.url("/dashboard"))
    assert page.status_code == 200  # public: the page holds no data
    assert "<svg" in page.text and "http" not in page.text.replace("http://www.w3.org/2000/svg", "")  # no assets
    assert "localStorage" not in page.text and "sessionStorage" in page.text
    assert httpx.get(server.url("/v1/dashboard/data")).status_code == 401


@needs_chromium
def test_dashboard_login_and_data_in_headless_chromium(server, tmp_path):
    # No key: the login box, not an HTTP error.
    out = dump_dom(server.url("/dashboard"), tmp_path / "p1")
    assert 'data-state="login"' in out, out[-2000:]
    assert "This server needs an API key" in out and '<div id="login">' in out and '<div id="main" hidden="">' in out
    # A wrong key: a clear message.
    out = dump_dom(server.url("/dashboard#key=not-the-key"), tmp_path / "p2")
    assert 'data-state="badkey"' in out and "Wrong API key" in out and "Incorrect API key" in out, out[-2000:]
    # The right key: data, or empty states saying how to start when there is none yet.
    fresh = not httpx.get(server.url("/v1/dashboard/data"), headers=AUTH).json()["sessions"]
    out = dump_dom(server.url(f"/dashboard#key={KEY}"), tmp_path / "p3")
    assert 'data-state="ok"' in out and '<div id="login" hidden="">' in out, out[-2000:]
    if fresh:  # nothing yet (the usual order: this test runs before any other makes sessions)
        assert "No sessions yet" in out and "dynarank-client watch" in out
        assert "No fine-tuning jobs yet" in out and "No loss yet" in out

    make_history(server)
    out = dump_dom(server.url(f"/dashboard#key={KEY}"), tmp_path / "p4")
    assert 'data-state="ok"' in out and KEY not in out, out[-2000:]
    assert re.search(r"Sessions: \d+ resident, \d+ connected\. Fine-tuning jobs: .*[1-9]\d* succeeded", out)
    assert "No sessions yet" not in out and "No loss yet" not in out and "No fine-tuning jobs yet" not in out
    # Loss: wall-clock ticks on x, titles on both axes.
    assert "time (HH:MM:SS" in out and ">loss</text>" in out
    assert any(len(t) == 8 and t[2] == t[5] == ":" for t in _texts(out, "loss"))
    # Heatmap: 2 layers x 7 projections of the tiny llama, each cell with its module and rank.
    assert out.count('class="cell"') == 14
    assert "<title>model.layers.1.mlp.down_proj: rank " in out
    heat = _texts(out, "heat")
    assert {"layer", "projection", "q_proj", "down_proj", "0", "1"} <= set(heat)
    # Acceptance: axis titles, and the 100% point label inside the chart (not clipped at the top).
    assert {"adapter version", "acceptance rate", "100%"} <= set(_texts(out, "accept"))
    assert _label_y(out, "accept", "100%") >= 11


# -- metrics of the real server (after the page test, which sees the server empty first) -------


def test_metrics_need_the_key_and_count_a_real_session_and_jobs(server):
    assert httpx.get(server.url("/metrics")).status_code == 401
    assert httpx.get(server.url("/metrics"), headers={"Authorization": "Bearer wrong"}).status_code == 401
    before = scrape(server)
    assert set(before) >= {("dynarank_sessions_resident",), ("dynarank_sessions_connected",)}
    assert {("dynarank_fine_tuning_jobs", s) for s in JOB_STATES} <= set(before)

    async def go():
        c = await Client.connect(server.port)
        await c.hello(api_key=KEY, session_id="metrics-probe")
        during = scrape(server)
        await c.close()
        return during

    during = run(go())
    connected = ("dynarank_sessions_connected",)
    assert during[connected] == before[connected] + 1
    resident = ("dynarank_sessions_resident",)
    assert during[resident] == before[resident] + 1  # a new session id: one more in memory
    wait_until(lambda: scrape(server)[connected] == before[connected], 10, "the session to disconnect")

    done, cancelled = ("dynarank_fine_tuning_jobs", "succeeded"), ("dynarank_fine_tuning_jobs", "cancelled")
    short = start_job(server, "metrics-short", 2)
    wait_until(lambda: job_status(server, short) == "succeeded", what="the short job")
    long = start_job(server, "metrics-long", 5000)
    wait_until(lambda: job_status(server, long) in ("queued", "running"), what="the long job to start")
    assert httpx.post(server.url(f"/v1/fine_tuning/jobs/{long}/cancel"), headers=AUTH).json()["status"] == "cancelled"
    after = scrape(server)
    assert after[done] == before[done] + 1 and after[cancelled] == before[cancelled] + 1
    # The dashboard shows the same counts (for the caller's key).
    summary = httpx.get(server.url("/v1/dashboard/data"), headers=AUTH).json()["summary"]
    assert summary["jobs"]["cancelled"] == after[cancelled] and summary["sessions"]["resident"] >= 1


def _svg(out: str, svg_id: str) -> str:
    start = out.index(f'<svg id="{svg_id}"')
    return out[start:out.index("</svg>", start)]


def _texts(out: str, svg_id: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", _svg(out, svg_id))


def _label_y(out: str, svg_id: str, label: str) -> float:
    ys = [float(y) for y, t in re.findall(r'<text[^>]*\by="([\d.]+)"[^>]*>([^<]*)</text>', _svg(out, svg_id))
          if t == label]
    return min(ys)


# -- typing a key: the DevTools protocol over a pipe -------------------------------


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 and 4."""

    def __init__(self, profile: Path):
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def wire():  # in the child: its fd 3 reads our commands, fd 4 writes the answers
            a, b = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=wire, close_fds=False,  # noqa: PLW1509
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id = b"", 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method, session=None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            while b"\0" not in self._buf:
                ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(self._in, 1 << 20) if ready else b""
                if not chunk:
                    raise AssertionError(f"chromium gave no answer to {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:  # events (no id) are skipped
                assert "error" not in answer, answer
                return answer["result"]

    def page(self, method, **params):
        return self.call(method, self.session, **params)

    def js(self, expression):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression, timeout=30.0):
        return wait_until(lambda: self.js(expression), timeout, expression)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self._in)
        os.close(self._out)


@needs_chromium
def test_dashboard_login_box_screenshot_and_forget_key(server, tmp_path):
    if not httpx.get(server.url("/v1/dashboard/data"), headers=AUTH).json()["sessions"]:
        make_history(server)  # run alone: the screenshot should show data
    b = Browser(tmp_path / "profile")
    try:
        b.page("Page.navigate", url=server.url("/dashboard"))
        b.wait("document.body.dataset.state === 'login'")
        # A wrong key typed in: a clear message, nothing kept.
        b.js("document.getElementById('keyinput').value = 'wrong'; document.getElementById('loginform').requestSubmit()")
        b.wait("document.body.dataset.state === 'badkey'")
        assert "Wrong API key" in b.js("document.getElementById('loginmsg').textContent")
        assert b.js("sessionStorage.length") == 0
        # The right key: data; kept in sessionStorage only.
        b.js(f"document.getElementById('keyinput').value = '{KEY}'; document.getElementById('loginform').requestSubmit()")
        b.wait("document.body.dataset.state === 'ok' && document.querySelectorAll('#heat .cell').length > 0")
        assert b.js("sessionStorage.getItem('dynarank.apiKey')") == KEY and b.js("localStorage.length") == 0
        assert not b.js("document.getElementById('keybar').hidden")
        height = b.js("Math.ceil(document.body.getBoundingClientRect().bottom) + 16")
        b.page("Emulation.setDeviceMetricsOverride", width=820, height=height, deviceScaleFactor=1, mobile=False)
        png = base64.b64decode(b.page("Page.captureScreenshot", format="png")["data"])
        assert png.startswith(b"\x89PNG") and len(png) > 20_000
        (tmp_path / "dashboard.png").write_bytes(png)
        if os.environ.get("DYNARANK_DOCS_SCREENSHOT") == "1":
            (ROOT / "docs" / "dashboard.png").write_bytes(png)
        # Forget key: back to the login box, the key gone from the tab.
        b.js("document.getElementById('forget').click()")
        b.wait("document.body.dataset.state === 'login'")
        assert b.js("sessionStorage.length") == 0
        assert "Key forgotten" in b.js("document.getElementById('loginmsg').textContent")
        assert b.js("document.getElementById('main').hidden")
    finally:
        b.close()

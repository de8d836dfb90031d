"""The replica router (``server/engines/vllm/replicas.py``) on fake vLLM servers: no vLLM needed.

A fake server answers like vLLM's OpenAI API does for ``VLLMServerClient`` and can die
(connection refused), die mid-stream (reset after N tokens), fail its health check, or
forget its adapters (a restart). Its tokens depend only on the model name and the
position, so a request continued on another replica must give the tokens an
uninterrupted one gives. The real two-server test is ``test_vllm_replicas.py``.
"""

from __future__ import annotations

import asyncio
import zlib

import httpx
import pytest

from server.engines.vllm.remote import LoRARequest, VLLMServerClient, _Completion, _Output
from server.engines.vllm.replicas import (
    AdapterMissing,
    NoReplicaAvailable,
    ReplicaSet,
    ReplicaUnavailable,
)
from server.engines.vllm.versions import lora_name

BASE = "base"


class FakeServer:
    def __init__(self, url: str, model: str = BASE, max_model_len: int = 1024):
        self.url, self.model, self.max_model_len = url, model, max_model_len
        self.alive = True
        self.healthy = True
        self.reset_after: int | None = None  # stream this many tokens, then drop the connection (and die)
        self.loaded: set[str] = set()
        self.loads: list[str] = []
        self.served: list[str] = []  # model name of every completion started

    def _reachable(self):
        if not self.alive:
            raise ReplicaUnavailable(f"{self.url}: connection refused")

    async def base_models(self):
        self._reachable()
        return {self.model: self.max_model_len}

    async def adapters(self):
        self._reachable()
        return set(self.loaded)

    async def health(self):
        self._reachable()
        return self.healthy

    async def load(self, name, path):
        self._reachable()
        await asyncio.sleep(0.01)  # a load takes a while: concurrent requests must share it
        self.loaded.add(name)
        self.loads.append(name)

    async def unload(self, name):
        self._reachable()
        self.loaded.discard(name)
        return True

    async def generate(self, prompt_ids, params, model):
        self._reachable()
        if model != self.model and model not in self.loaded:
            raise AdapterMissing(f"{self.url}: 404 the model `{model}` does not exist")
        self.served.append(model)
        for i in range(params["max_tokens"]):
            if self.reset_after is not None and i >= self.reset_after:
                self.alive = False
                raise ReplicaUnavailable(f"{self.url}: connection reset")
            await asyncio.sleep(0)
            yield _Output([_Completion([token(model, len(prompt_ids) + i)], None, None)])
        yield _Output([_Completion([], None, "length")])

    async def aclose(self):
        pass


def token(model: str, position: int) -> int:
    return 1000 + (zlib.crc32(model.encode()) + 7 * position) % 4000  # plain tokens of SmolLM2's vocabulary


def lora(lineage: str, version: int, int_id: int) -> LoRARequest:
    return LoRARequest(lora_name(lineage, version, int_id), int_id, f"/shared/{lineage}/v{version}")


def servers(n: int = 2) -> list[FakeServer]:
    return [FakeServer(f"http://replica-{i}:800{i}") for i in range(n)]


async def started(fakes, **kwargs) -> ReplicaSet:
    rs = ReplicaSet(fakes, health_interval_s=kwargs.pop("health_interval_s", 3600), **kwargs)
    await rs.connect()
    return rs


def run_on_replicas(body, n: int = 2, **kwargs) -> None:
    """Run ``await body(fakes, rs)``: ``rs`` a ReplicaSet started over ``n`` fresh fake servers, closed after."""
    async def main():
        fakes = servers(n)
        rs = await started(fakes, **kwargs)
        try:
            await body(fakes, rs)
        finally:
            await rs.aclose()

    asyncio.run(main())


async def complete(rs, version=None, max_tokens=6, prompt=(1, 2, 3), rid="r") -> list[int]:
    out = []
    async for o in rs.generate({"prompt_token_ids": list(prompt)}, {"max_tokens": max_tokens}, rid, version):
        out += o.outputs[0].token_ids
    return out


def expected(version, max_tokens=6, prompt=(1, 2, 3)) -> list[int]:
    model = version.lora_name if version is not None else BASE
    return [token(model, len(prompt) + i) for i in range(max_tokens)]


def test_affinity_a_session_stays_on_the_replica_that_holds_its_version():
    async def body(fakes, rs):
        a1, b1 = lora("a", 1, 1), lora("b", 1, 2)
        await rs.add_lora(a1)  # new lineages go to the least loaded replica
        await rs.add_lora(b1)
        home_a, home_b = rs.holders(a1.lora_name), rs.holders(b1.lora_name)
        assert len(home_a) == 1 and len(home_b) == 1 and home_a != home_b
        for _ in range(10):
            assert await complete(rs, a1) == expected(a1)
            assert await complete(rs, b1) == expected(b1)
        a2 = lora("a", 2, 3)
        await rs.add_lora(a2)  # the next version loads where the previous one is
        assert rs.holders(a2.lora_name) == home_a
        for _ in range(10):
            assert await complete(rs, a2) == expected(a2)
        assert rs.routed["hit"] == 30 and rs.routed["cold"] == 0
        by_url = {f.url: f for f in fakes}
        assert by_url[home_a[0]].served.count(a2.lora_name) == 10
        assert by_url[home_b[0]].loads == [b1.lora_name]  # nothing of lineage a ever went there

    run_on_replicas(body)


def test_concurrent_requests_share_one_load_and_base_requests_balance():
    async def body(fakes, rs):
        a1 = lora("a", 1, 1)
        rs._live[a1.lora_int_id] = a1  # published but loaded nowhere (as after its home went down)
        outs = await asyncio.gather(*(complete(rs, a1, rid=f"r{i}") for i in range(5)))
        assert all(o == expected(a1) for o in outs)
        assert sum(f.loads.count(a1.lora_name) for f in fakes) == 1
        assert rs.routed["cold"] == 5  # all five were routed before the load finished
        assert await complete(rs, a1) == expected(a1) and rs.routed["hit"] == 1
        await asyncio.gather(*(complete(rs, None, rid=f"b{i}") for i in range(4)))
        assert rs.routed["base"] == 4 and all(BASE in f.served for f in fakes)  # least in flight first

    run_on_replicas(body)


def test_a_dead_replica_is_marked_down_and_the_request_retried_before_any_token():
    async def body(fakes, rs):
        a1 = lora("a", 1, 1)
        await rs.add_lora(a1)
        home = next(f for f in fakes if a1.lora_name in f.loaded)
        other = next(f for f in fakes if f is not home)
        home.alive = False  # connection refused from now on
        assert await complete(rs, a1) == expected(a1)
        assert rs.routed["retried"] == 1
        rows = {row["url"]: row for row in rs.rows()}
        assert rows[home.url]["up"] is False and rows[home.url]["failures"] == 1
        assert rows[home.url]["loaded"] == 0 and rows[other.url]["loaded"] == 1
        assert a1.lora_name in other.loaded  # loaded from the shared directory on the new replica
        # The session now lives there: its next version goes there too.
        a2 = lora("a", 2, 2)
        await rs.add_lora(a2)
        assert rs.holders(a2.lora_name) == [other.url]

    run_on_replicas(body)


def test_reset_mid_stream_goes_on_from_the_streamed_tokens():
    async def body(fakes, rs):
        a1 = lora("a", 1, 1)
        await rs.add_lora(a1)
        home = next(f for f in fakes if a1.lora_name in f.loaded)
        home.reset_after = 3
        assert await complete(rs, a1, max_tokens=8) == expected(a1, max_tokens=8)
        assert rs.routed["resumed"] == 1 and rs.rows()[fakes.index(home)]["up"] is False

    run_on_replicas(body)


def test_losing_a_replica_moves_its_sessions_newest_versions_at_once():
    async def body(fakes, rs):
        versions = [lora(name, 1, i + 1) for i, name in enumerate("abcd")]
        for v in versions:
            await rs.add_lora(v)
        dead = fakes[0]
        lost = [v for v in versions if v.lora_name in dead.loaded]
        assert lost and len(lost) < len(versions)
        dead.alive = False
        await rs.check_health()
        await rs.wait_moves()
        assert all(v.lora_name in fakes[1].loaded for v in versions)
        for v in lost:  # so their next requests are hits, not loads
            assert await complete(rs, v) == expected(v)
        assert rs.routed["hit"] == len(lost) and rs.routed["cold"] == 0

    run_on_replicas(body)


def test_health_checks_bring_a_replica_back_empty():
    async def body(fakes, rs):
        a1 = lora("a", 1, 1)
        await rs.add_lora(a1)
        home = next(f for f in fakes if a1.lora_name in f.loaded)
        home.healthy = False  # answers, but its engine is dead (vLLM's /health says 503)
        await wait_for(lambda: not rs.rows()[fakes.index(home)]["up"])
        await rs.wait_moves()
        assert a1.lora_name in next(f for f in fakes if f is not home).loaded
        home.healthy = True  # it kept a1 listed (no restart): we unload our stale names on the way back
        await wait_for(lambda: rs.rows()[fakes.index(home)]["up"])
        assert home.loaded == set() and rs.rows()[fakes.index(home)]["loaded"] == 0

    run_on_replicas(body, health_interval_s=0.02)


def test_a_restarted_replica_that_forgot_an_adapter_reloads_it():
    async def body(fakes, rs):
        a1 = lora("a", 1, 1)
        await rs.add_lora(a1)
        fakes[0].loaded.clear()  # restarted between two health checks
        assert await complete(rs, a1) == expected(a1)
        assert fakes[0].loads == [a1.lora_name, a1.lora_name]

    run_on_replicas(body, 1)


def test_request_errors_are_not_replica_failures():
    class Rejecting(FakeServer):
        async def generate(self, prompt_ids, params, model):
            raise RuntimeError("vLLM server: 400 prompt too long")
            yield  # pragma: no cover

    async def main():
        fakes = [Rejecting("http://replica-0:8000"), Rejecting("http://replica-1:8001")]
        rs = await started(fakes)
        with pytest.raises(RuntimeError, match="400"):
            await complete(rs)
        assert all(row["up"] for row in rs.rows()) and rs.routed["retried"] == 0
        await rs.aclose()

    asyncio.run(main())


def test_all_replicas_down_is_a_clear_error():
    async def body(fakes, rs):
        for f in fakes:
            f.alive = False
        with pytest.raises(NoReplicaAvailable, match="replica-0.*replica-1"):
            await complete(rs)
        with pytest.raises(NoReplicaAvailable):
            await rs.add_lora(lora("a", 1, 1))
        assert rs._live == {}  # a version that could not be loaded is not published

    run_on_replicas(body)


def test_connect_needs_one_replica_serving_the_model():
    async def main():
        other = FakeServer("http://replica-1:8001", model="another-model")
        dead = FakeServer("http://replica-2:8002")
        dead.alive = False
        rs = await started([FakeServer("http://replica-0:8000"), other, dead])
        assert [row["up"] for row in rs.rows()] == [True, False, False]
        assert "another-model" in rs.rows()[1]["last_error"]
        await rs.aclose()
        with pytest.raises(NoReplicaAvailable, match="connection refused"):
            await started([dead])
        with pytest.raises(ValueError):
            ReplicaSet([])

    asyncio.run(main())


def test_remove_unloads_everywhere_and_list_reports_loaded_ids():
    async def body(fakes, rs):
        a1, a2 = lora("a", 1, 1), lora("a", 2, 2)
        await rs.add_lora(a1)
        await rs.add_lora(a2)
        assert await rs.list_loras() == {1, 2}
        assert await rs.remove_lora(1) and not await rs.remove_lora(1)
        assert await rs.list_loras() == {2} and all(a1.lora_name not in f.loaded for f in fakes)

    run_on_replicas(body)


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- the whole engine on fake replicas: publication, routing, metrics ---------------------


def test_engine_publishes_once_routes_to_the_home_and_reports_replicas(smollm2_path, tokenizer, tmp_path):
    from server.engines.base import GenerationRequest
    from server.engines.vllm.remote import RemoteVLLMEngine
    from server.observability.metrics import Metrics
    from tests.server.engines.vllm_serve import random_snapshot

    fakes = {f.url: f for f in servers()}
    engine = RemoteVLLMEngine(list(fakes), tokenizer, "smollm2-135m", model_path=smollm2_path, data_dir=tmp_path,
                              r_max=16, health_interval_s=3600, client_factory=lambda url, api_key: fakes[url])
    try:
        request = GenerationRequest(prompt="def area(w, h):", max_tokens=4)
        snaps = [random_snapshot(1, seed, lineage=f"owner/session-{seed}") for seed in range(2)]
        for snap in snaps:
            engine.prefetch(snap)  # as the session manager's on_publish does right after a step
            assert engine.wait_loaded(snap, timeout=60)
        records = [engine.versions.version_of(snap) for snap in snaps]
        assert all((r.path / "adapter_config.json").exists() for r in records)  # written once, shared
        homes = [engine.llm.holders(r.lora.lora_name) for r in records]
        assert sorted(h[0] for h in homes) == sorted(fakes)  # two sessions, one on each replica
        for snap, record, home in zip(snaps, records, homes):
            chunks = list(engine.generate(request, snap))
            assert chunks[-1].finish_reason == "length"
            assert fakes[home[0]].served == [record.lora.lora_name]
        metrics = Metrics()
        metrics.watch_replicas(engine)
        metrics.watch_replicas(engine)  # once per engine
        text = metrics.render()[0].decode()
        for url in fakes:
            assert text.count(f'dynarank_vllm_replica_up{{replica="{url}"}} 1.0') == 1
            assert f'dynarank_vllm_replica_requests_total{{replica="{url}"}} 1.0' in text
            assert f'dynarank_vllm_replica_loaded_versions{{replica="{url}"}} 1.0' in text
        assert 'dynarank_vllm_routed_total{outcome="hit"} 2.0' in text
        # Its first replica dies: the session goes on on the other one, with the same version.
        fakes[homes[0][0]].alive = False
        assert list(engine.generate(request, snaps[0]))[-1].finish_reason == "length"
        assert fakes[homes[1][0]].served[-1] == records[0].lora.lora_name
        text = metrics.render()[0].decode()
        assert f'dynarank_vllm_replica_up{{replica="{homes[0][0]}"}} 0.0' in text
        assert f'dynarank_vllm_replica_failures_total{{replica="{homes[0][0]}"}} 1.0' in text
    finally:
        engine.close()


def test_engine_start_without_a_usable_replica_is_a_clear_error(smollm2_path, tokenizer, tmp_path):
    from server.engines.vllm.remote import RemoteVLLMEngine
    from server.models import ModelError

    dead = FakeServer("http://replica-0:8000")
    dead.alive = False
    with pytest.raises(ModelError, match="no vLLM replica is usable: http://replica-0:8000: .*refused"):
        RemoteVLLMEngine([dead.url], tokenizer, "smollm2-135m", model_path=smollm2_path, data_dir=tmp_path,
                         client_factory=lambda url, api_key: dead)


# -- the HTTP client: what counts as a replica failure -----------------------------------


def client_with(handler) -> VLLMServerClient:
    client = VLLMServerClient("http://replica-0:8000")
    client.client = httpx.AsyncClient(base_url=client.url, transport=httpx.MockTransport(handler))
    return client


def test_client_maps_transport_errors_and_answers():
    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    def answers(request):
        if request.url.path == "/v1/completions":
            return httpx.Response(404, json={"message": "The model `x` does not exist."})
        if request.url.path == "/v1/load_lora_adapter":
            return httpx.Response(400, text="The lora adapter 'x' has already been loaded.")
        if request.url.path == "/health":
            return httpx.Response(503)
        return httpx.Response(200, json={"data": [{"id": BASE, "max_model_len": 512},
                                                  {"id": "x", "parent": BASE}]})

    async def main():
        down = client_with(refused)
        with pytest.raises(ReplicaUnavailable, match="replica-0"):
            await down.health()
        with pytest.raises(ReplicaUnavailable):
            async for _ in down.generate([1], {"max_tokens": 1, "temperature": 0, "top_p": 1,
                                               "stop_token_ids": []}, BASE):
                pass
        up = client_with(answers)
        assert await up.base_models() == {BASE: 512} and await up.adapters() == {"x"}
        assert await up.health() is False
        await up.load("x", "/p")  # "already loaded" is not an error
        with pytest.raises(AdapterMissing):
            async for _ in up.generate([1], {"max_tokens": 1, "temperature": 0, "top_p": 1,
                                             "stop_token_ids": []}, "x"):
                pass

    asyncio.run(main())

"""One API key cannot hold more than ``max_ws_connections_per_key`` websocket sessions open."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.session_server import Client, run, served

KEY_A, KEY_B = "cap-key-alpha-1", "cap-key-bravo-2"
LIMIT = 2


@pytest.fixture(scope="module")
def capped(tiny_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    yield from served(tiny_dir, ["--api-key-file", str(keys), "--max-ws-connections-per-key", str(LIMIT)])


async def hello_reply(client: Client, key: str) -> dict:
    await client.send({"type": "hello", "api_key": key, "client": {"name": "pytest", "version": "1"}})
    return await client.recv()


def test_a_key_past_its_limit_is_refused_and_others_are_not(capped):
    async def go():
        held = [await Client.connect(capped.port) for _ in range(LIMIT)]
        for c in held:
            await c.hello(api_key=KEY_A)
        extra = await Client.connect(capped.port)
        refused = await hello_reply(extra, KEY_A)
        assert refused["type"] == "error" and refused["code"] == "too_many_connections", refused
        # Another key is not affected, and the refused socket stays usable.
        other = await Client.connect(capped.port)
        await other.hello(api_key=KEY_B)
        assert (await hello_reply(extra, KEY_A))["code"] == "too_many_connections"
        # Closing one of the key's sessions frees its place (the server notices the close asynchronously).
        await held[0].close()
        await hello_until_ready(extra, KEY_A)
        for c in (*held[1:], extra, other):
            await c.close()

    run(go())


def test_refused_hellos_and_closes_give_their_places_back(capped):
    async def go():
        for _ in range(3):  # a count leaked per refusal or close would leave fewer places each round
            clients = [await Client.connect(capped.port) for _ in range(LIMIT + 1)]
            for c in clients[:LIMIT]:
                await hello_until_ready(c, KEY_B)  # the previous round's closes are handled asynchronously
            assert (await hello_reply(clients[LIMIT], KEY_B))["code"] == "too_many_connections"
            for c in clients:
                await c.close()

    run(go())


async def hello_until_ready(client: Client, key: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        reply = await hello_reply(client, key)
        if reply["type"] == "ready":
            return
        assert reply["code"] == "too_many_connections" and time.monotonic() < deadline, reply
        await asyncio.sleep(0.05)

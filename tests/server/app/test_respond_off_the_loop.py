"""The OpenAI routes' end-of-request bookkeeping (``on_finished``: recording the completion in a feedback
book, which reads the key's books from disk the first time) runs off the event loop (issue 17).

``on_finished`` here waits until a coroutine on the loop tells it to go on: that can only happen if the
wait is not on the loop itself.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.app import openai

WAIT_S = 30.0


class FakeRequest:
    async def is_disconnected(self) -> bool:
        return False


class FakeGeneration:
    def __init__(self):
        self.cancel = threading.Event()

    async def run(self) -> None:
        return None

    def close(self) -> None:
        self.cancel.set()


@pytest.mark.parametrize("stream", [False, True])
def test_on_finished_leaves_the_loop_free(stream):
    release, released_in_time = threading.Event(), []

    def on_finished():
        released_in_time.append(release.wait(WAIT_S))  # False: the loop was stuck in here

    async def events():
        yield {"choices": [{"text": "x"}]}

    async def releaser():
        await asyncio.sleep(0.05)
        release.set()  # only reached if on_finished does not block the loop

    async def go():
        task = asyncio.create_task(releaser())
        response = await openai.respond(FakeRequest(), FakeGeneration(), stream=stream, body=lambda: {"ok": True},
                                        events=events, usage=None, on_finished=on_finished)
        if stream:
            _ = [chunk async for chunk in response.body_iterator]
        await task

    asyncio.run(go())
    assert released_in_time == [True]

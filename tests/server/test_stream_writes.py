"""A stream whose events pile up while the event loop is busy goes out in few writes: the
pieces already queued are sent together (one SSE event each), so a loop that falls behind the
scheduler pays a stream's send once a wake-up, not once a token. Driven through ASGI directly
to see the writes."""

from __future__ import annotations

import asyncio
import json
import time

from kiln.server import create_app
from tests.server.test_server import PROMPTS, _greedy, _llm, paused

TOKENS = 16


async def _post_stream(app, body: bytes) -> list[bytes]:
    """POST /v1/completions through the app's ASGI callable -> the non-empty body writes."""
    writes: list[bytes] = []
    request = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if request:
            return request.pop()
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            writes.append(message["body"])

    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    return writes


def test_events_queued_while_the_loop_is_busy_go_out_in_one_write(stories_model):
    llm = _llm(stories_model)
    want = _greedy(_llm(stories_model), PROMPTS[0], TOKENS).text
    app = create_app(llm, model_name="stories")
    scheduler = app.state.scheduler
    body = json.dumps(
        {"prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "stream": True}
    ).encode()

    async def main():
        with paused(scheduler):  # the request queues; nothing runs yet
            task = asyncio.create_task(_post_stream(app, body))
            deadline = time.time() + 20
            while scheduler.n_waiting == 0:
                assert time.time() < deadline, "the request never reached the scheduler"
                await asyncio.sleep(0.01)
        time.sleep(1.0)  # the loop busy: every token of the request is generated meanwhile
        return await asyncio.wait_for(task, 30)

    try:
        writes = asyncio.run(main())
    finally:
        scheduler.close()
    events = b"".join(writes).decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) >= TOKENS  # one SSE event a token, as before
    assert len(writes) <= 2, f"{len(writes)} writes for {len(chunks) + 1} events"

"""The OpenAI-compatible app: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /health, GET /metrics. Every request goes through one Scheduler (kiln/runtime/scheduler.py);
an error is OpenAI's JSON {"error": {"message", "type", "param", "code"}} with its status and
touches no other request."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import threading
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from kiln.errors import KilnError, UsageError
from kiln.runtime.sampler import SamplingParams
from kiln.runtime.scheduler import Event, QueueFull, Scheduler, SchedulerClosed
from kiln.server.metrics import Metrics
from kiln.server.schemas import ChatCompletionRequest, CompletionRequest

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "repeat_last_n", "seed", "stop", "ignore_eos",
)  # fmt: skip


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


class EventBridge:
    """Events from the scheduler thread into the event loop's request queues, with one wake-up
    of the loop per burst: a decode step emits one event per running request, and a
    call_soon_threadsafe for each would write to the loop's self-pipe (a system call and a GIL
    hand-off) once per request and token instead of once per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def put(self, queue: asyncio.Queue, event: Event) -> None:
        """Any thread: queue.put_nowait(event) on the loop, soon."""
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a drain is scheduled and has not run yet: it takes this one too
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody reads these queues any more
            with self._lock:
                self._pending.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    """The OpenAI-shaped JSON response of an APIError."""
    body = error_body(e.message, e.type, e.param, e.code)
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def key_error() -> APIError:
    """The 401 of a request without the server's API key."""
    return APIError(
        401,
        "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
        "authentication_error",
        code="invalid_api_key",
    )


def key_ok(authorization: str, api_key: str | None) -> bool:
    """Whether an Authorization header value carries the API key ('Bearer KEY'; compared in
    constant time); True when the server has no key."""
    if api_key is None:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    )


def create_app(
    llm,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_queue: int = 64,
    max_body: int = 4 << 20,
    chat_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    overlap: bool = True,
    mix: bool = False,
) -> FastAPI:
    """An app serving `llm` (a kiln.LLM, loaded): its engine is run by a Scheduler thread
    started here and stopped when the app shuts down (or by app.state.scheduler.close())."""
    if max_body < 1:
        raise UsageError(f"the body size limit must be >= 1 byte, got {max_body}")
    name = model_name or llm.path.stem
    scheduler = Scheduler(llm.engine, llm.tokenizer, max_queue=max_queue, overlap=overlap, mix=mix)
    metrics = Metrics(scheduler)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="kiln", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.llm = scheduler, metrics, llm

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        body = error_body(f"no route {request.method} {request.url.path}", "not_found_error")
        return JSONResponse(body, status_code=404)

    @app.exception_handler(405)
    async def _not_allowed(request: Request, e):
        message = f"{request.method} is not allowed on {request.url.path}"
        body = error_body(message, "invalid_request_error")
        return JSONResponse(body, status_code=405)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        metrics.requests.labels(request.url.path, "500").inc()
        body = error_body(f"internal error: {type(e).__name__}: {e}", "server_error")
        return JSONResponse(body, status_code=500)

    def auth(request: Request) -> None:
        if not key_ok(request.headers.get("authorization", ""), api_key):
            raise key_error()

    async def read_body(request: Request, schema: type[BaseModel]):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            raise APIError(413, f"the body has {length} bytes; the limit is {max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise APIError(413, f"the body is over the limit of {max_body} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the body must be a JSON object, not {type(data).__name__}")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}", param=param) from None
        if req.model is not None and req.model != name:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist: this server serves {name!r}",
                param="model",
                code="model_not_found",
            )
        return req

    def params_of(req, max_tokens: int | None, n_prompt: int) -> SamplingParams:
        values = {k: getattr(req, k) for k in _SAMPLING if getattr(req, k) is not None}
        if isinstance(values.get("stop"), list):
            values["stop"] = tuple(values["stop"])
        values["max_tokens"] = llm.n_ctx - n_prompt if max_tokens is None else max_tokens
        try:
            return SamplingParams(**values)
        except UsageError as e:
            raise APIError(400, str(e)) from None

    async def prompt_of(param: str, fn, *args, **kwargs) -> list[int]:
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except KilnError as e:
            raise APIError(400, str(e), param=param) from None

    bridges: dict[asyncio.AbstractEventLoop, EventBridge] = {}

    def start(ids, params, logprobs):
        loop = asyncio.get_running_loop()
        bridge = bridges.get(loop) or bridges.setdefault(loop, EventBridge(loop))
        queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = scheduler.submit(ids, params, functools.partial(bridge.put, queue), logprobs)
        except QueueFull as e:
            raise APIError(
                429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        except SchedulerClosed as e:
            raise APIError(503, str(e), "server_error", headers={"Retry-After": "5"}) from None
        except UsageError as e:
            raise APIError(400, str(e), param="prompt") from None
        return handle, queue

    class Timing:
        def __init__(self):
            self.arrived, self.last = time.perf_counter(), None

        def token(self) -> None:
            now = time.perf_counter()
            if self.last is None:
                metrics.ttft.observe(now - self.arrived)
            else:
                metrics.token_latency.observe(now - self.last)
            self.last = now

    def count(path: str, event: Event) -> None:
        stats = event.result.stats
        metrics.prompt_tokens.inc(stats.prompt_tokens)
        metrics.cached_tokens.inc(stats.cached_tokens)
        metrics.generated_tokens.inc(stats.generated_tokens)
        metrics.requests.labels(path, "500" if event.error else "200").inc()

    def usage(result) -> dict:
        s = result.stats
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.generated_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
        }

    def token_text(tid: int) -> tuple[str, list[int]]:
        b = llm.tokenizer.token_to_bytes(tid)
        return b.decode("utf-8", "replace"), list(b)

    def chat_logprobs(choices) -> dict:
        content = []
        for c in choices:
            text, b = token_text(c.token)
            top = []
            for tid, lp in c.top:
                t, tb = token_text(tid)
                top.append({"token": t, "logprob": lp, "bytes": tb})
            content.append({"token": text, "logprob": c.logprob, "bytes": b, "top_logprobs": top})
        return {"content": content}

    def completion_logprobs(choices, offset: int = 0) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in choices:
            text, _ = token_text(c.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(c.logprob)
            out["top_logprobs"].append({token_text(t)[0]: lp for t, lp in c.top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    async def next_event(request: Request, queue, checked: list[float]) -> Event | None:
        """The request's next event, or None once its client has gone (polled every 0.1 s:
        a request still queued or held back sends nothing that would notice)."""
        while True:
            try:
                event = queue.get_nowait()  # under load the event is usually there already
            except asyncio.QueueEmpty:
                try:
                    async with asyncio.timeout(0.1):  # a timer, not wait_for's task a token
                        event = await queue.get()
                except TimeoutError:
                    event = None
            if time.monotonic() - checked[0] > 0.1:
                checked[0] = time.monotonic()
                if await request.is_disconnected():
                    return None
            if event is not None:
                return event

    async def wait_all(request: Request, handle, queue) -> Event:
        """Every event until the end -> the last; a client gone meanwhile cancels it."""
        timing, checked = Timing(), [time.monotonic()]
        while True:
            event = await next_event(request, queue, checked)
            if event is None:
                handle.cancel()
                raise APIError(499, "the client closed the connection")
            if event.choice is not None:
                timing.token()
            if event.done:
                return event

    def failed(event: Event) -> APIError:
        return APIError(500, f"generation failed: {event.error}", "server_error")

    async def stream(request, handle, queue, chunk, finish_chunk, include_usage, path, base):
        """SSE: chunk(text, choices) per piece, then finish_chunk(reason), the usage chunk when
        asked, then [DONE]; a client gone mid-stream cancels the request. The events of the
        pieces already queued go out in one write (one SSE event each): when the loop falls
        behind the scheduler, a stream's send costs it once a wake-up, not once a token."""
        timing, done, pending, checked = Timing(), False, [], [time.monotonic()]
        out: list[str] = []
        try:
            while not done:
                event = await next_event(request, queue, checked)
                if event is None:
                    return  # the client is gone: cancelled below
                if event.error is not None:
                    done = True
                    count(path, event)
                    err = error_body(f"generation failed: {event.error}", "server_error")
                    out.append(f"data: {json.dumps(err)}\n\n")
                    break
                if event.choice is not None:
                    timing.token()
                    if event.choice.logprob is not None:
                        pending.append(event.choice)
                if event.text or (pending and not event.done):
                    out.append(f"data: {json.dumps(chunk(event.text, pending))}\n\n")
                    pending = []
                if event.done:
                    done = True
                    count(path, event)
                    reason = FINISH[event.result.finish_reason]
                    out.append(f"data: {json.dumps(finish_chunk(reason, pending))}\n\n")
                    if include_usage:
                        last = {**base, "choices": [], "usage": usage(event.result)}
                        out.append(f"data: {json.dumps(last)}\n\n")
                elif out and queue.empty():
                    yield "".join(out)
                    out = []
            out.append("data: [DONE]\n\n")
            yield "".join(out)
        finally:
            if not done:  # the client went away (or the server is stopping)
                handle.cancel()
                metrics.requests.labels(path, "499").inc()

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    # -- endpoints -----------------------------------------------------------------------------
    def sse(request, req, handle, queue, chunk, finish_chunk, path, base) -> StreamingResponse:
        """The request's stream as Server-Sent Events (chunk / finish_chunk shape each event)."""
        include = bool(req.stream_options and req.stream_options.include_usage)
        body = stream(request, handle, queue, chunk, finish_chunk, include, path, base)
        return StreamingResponse(body, media_type="text/event-stream", headers=sse_headers)

    async def finished(request: Request, handle, queue, path: str):
        """The whole result of a request answered at once (its error raised as an APIError)."""
        event = await wait_all(request, handle, queue)
        count(path, event)
        if event.error is not None:
            raise failed(event)
        return event.result

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        model = {"id": name, "object": "model", "created": created, "owned_by": "kiln"}
        return {"object": "list", "data": [model]}

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        path = "/v1/chat/completions"
        req: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        ids = await prompt_of(
            "messages",
            llm.encode_chat,
            messages,
            chat_template=chat_template,
            template_kwargs=template_kwargs,
        )
        max_tokens = req.max_completion_tokens
        params = params_of(req, req.max_tokens if max_tokens is None else max_tokens, len(ids))
        n_top = (req.top_logprobs or 0) if req.logprobs else None
        handle, queue = start(ids, params, n_top)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": name}
        if req.stream:
            base = {**head, "object": "chat.completion.chunk"}

            first = [True]

            def chunk(text, choices):
                delta = {"content": text}
                if first[0]:
                    delta["role"], first[0] = "assistant", False
                lp = chat_logprobs(choices) if n_top is not None else None
                c = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}
                return {**base, "choices": [c]}

            def finish_chunk(reason, choices):
                lp = chat_logprobs(choices) if choices else None
                c = {"index": 0, "delta": {}, "logprobs": lp, "finish_reason": reason}
                return {**base, "choices": [c]}

            return sse(request, req, handle, queue, chunk, finish_chunk, path, base)
        result = await finished(request, handle, queue, path)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": chat_logprobs(result.logprobs) if n_top is not None else None,
            "finish_reason": FINISH[result.finish_reason],
        }
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(result)}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        path = "/v1/completions"
        req: CompletionRequest = await read_body(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = await prompt_of("prompt", llm.prompt_ids, prompt, {})
        params = params_of(req, 16 if req.max_tokens is None else req.max_tokens, len(ids))
        handle, queue = start(ids, params, req.logprobs)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": name}
        if req.stream:
            base = {**head, "object": "text_completion"}

            def chunk(text, choices):
                lp = completion_logprobs(choices) if req.logprobs is not None else None
                c = {"index": 0, "text": text, "logprobs": lp, "finish_reason": None}
                return {**base, "choices": [c]}

            def finish_chunk(reason, choices):
                lp = completion_logprobs(choices) if choices else None
                c = {"index": 0, "text": "", "logprobs": lp, "finish_reason": reason}
                return {**base, "choices": [c]}

            return sse(request, req, handle, queue, chunk, finish_chunk, path, base)
        result = await finished(request, handle, queue, path)
        choice = {
            "index": 0,
            "text": result.text,
            "logprobs": completion_logprobs(result.logprobs) if req.logprobs is not None else None,
            "finish_reason": FINISH[result.finish_reason],
        }
        return {**head, "object": "text_completion", "choices": [choice], "usage": usage(result)}

    return app

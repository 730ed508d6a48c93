"""The app `kiln serve` listens with while its model loads: the port answers from the start.

    app = LoadingApp(load, api_key=KEY, on_failure=stop)   # load() -> the real app (create_app)
    app.start()                                            # load() runs in a thread

Until load() returns, GET /health is 503 {"status": "loading"} and every other path an
OpenAI-shaped 503 (type "unavailable_error", code "model_loading", Retry-After) after the same
API key check as the real app's (401 without it). Then every request, lifespan events aside, goes
to the app load() returned. A load that raises leaves /health at 500 {"status": "error",
"message": ...}, the other paths at 503 naming the error, and calls on_failure (kiln serve
stops and reports it). At shutdown the loaded app's scheduler is closed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from starlette.responses import JSONResponse

from kiln.server.app import APIError, error_response, key_error, key_ok


class LoadingApp:
    def __init__(
        self,
        load: Callable[[], object],
        api_key: str | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ):
        self.app = None  # the loaded app, once load() has returned
        self.error: BaseException | None = None  # what load() raised
        self.ready = threading.Event()  # set when load() has returned or raised
        self._load, self._api_key, self._on_failure = load, api_key, on_failure
        self._thread = threading.Thread(target=self._run, name="kiln-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self.app = self._load()
        except BaseException as e:  # reported on /health and to on_failure
            self.error = e
        self.ready.set()
        if self.error is not None and self._on_failure is not None:
            self._on_failure(self.error)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._not_ready(scope)(scope, receive, send)

    def _not_ready(self, scope) -> JSONResponse:
        error = self.error
        if scope["path"] == "/health":
            if error is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            return JSONResponse({"status": "error", "message": _text(error)}, status_code=500)
        headers = dict(scope["headers"])
        if not key_ok(headers.get(b"authorization", b"").decode("latin-1"), self._api_key):
            return error_response(key_error())
        if error is None:
            message, code = "the model is loading: retry in a moment", "model_loading"
        else:
            message, code = f"the model failed to load: {_text(error)}", "model_load_failed"
        retry = {"Retry-After": "1"}
        return error_response(APIError(503, message, "unavailable_error", code=code, headers=retry))

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.app is not None:
                    self.app.state.scheduler.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _text(error: BaseException) -> str:
    return str(error) or type(error).__name__

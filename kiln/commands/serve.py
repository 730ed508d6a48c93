"""`kiln serve -m MODEL`: an OpenAI-compatible HTTP server (see docs/serving.md). The port
answers at once: while the model loads and warms up (Engine.warm_up: the KV pool allocated, every
batch shape's kernels compiled and CUDA graphs captured) /health says "loading" (503) and the API
503 with Retry-After (kiln/server/loading.py), so no client waits for a compile; then the app of
kiln/server/app.py serves. A model that fails to load stops the server with its error."""

from __future__ import annotations

import argparse
import sys
import time

from kiln.cli import command
from kiln.commands.common import (
    add_chat_template_args,
    add_model_args,
    chat_template_kwargs,
    load_llm,
)
from kiln.errors import UsageError


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--api-key", metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every endpoint but /health",
    )  # fmt: skip
    p.add_argument(
        "-np", "--parallel", type=int, default=8, metavar="SLOTS",
        help="requests decoded at once (KV cache room for SLOTS full contexts; default 8)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue", type=int, default=64, metavar="N",
        help="requests waiting for a slot before new ones get 429 (default 64)",
    )  # fmt: skip
    p.add_argument(
        "--alias", metavar="NAME",
        help="the model name clients give (default: -m's file name without .gguf, or the "
        "known name given)",
    )  # fmt: skip
    p.add_argument(
        "--overlap", choices=("on", "off"), default="on",
        help="launch each decode step with the last step's ids still on the device, and read "
        "them while it runs (default on; off: every step waits for the last one's ids)",
    )  # fmt: skip
    p.add_argument(
        "--mix", choices=("on", "off"), default="off",
        help="run an iteration's prompt chunks in the decode step's forward (on), or in a "
        "forward of their own before it (off, the default)",
    )  # fmt: skip
    add_chat_template_args(p)


@command("serve", "Serve a model over an OpenAI-compatible HTTP API.", _add_arguments)
def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kiln.server import create_app
    from kiln.server.loading import LoadingApp

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.parallel < 1:
        raise UsageError(f"-np/--parallel must be >= 1, got {args.parallel}")
    if args.max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {args.max_queue}")
    kwargs = chat_template_kwargs(args)

    def load():
        llm = load_llm(args, n_seq=args.parallel)
        t0 = time.perf_counter()
        print("kiln: warming up (kernels for every batch shape, CUDA graphs) ..", file=sys.stderr)
        runs = llm.engine.warm_up()
        print(
            f"kiln: warm-up: {runs} forwards in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
        app = create_app(
            llm,
            api_key=args.api_key,
            model_name=args.alias or _name(args.model),
            max_queue=args.max_queue,
            chat_template=args.chat_template,
            template_kwargs=kwargs,
            overlap=args.overlap == "on",
            mix=args.mix == "on",
        )
        print(f"kiln: serving {llm.path.name} on {url}/v1", file=sys.stderr)
        return app

    url = f"http://{args.host}:{args.port}"
    app = LoadingApp(load, api_key=args.api_key, on_failure=lambda error: stop())
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="on")
    )

    def stop() -> None:
        server.should_exit = True

    print(
        f"kiln: listening on {url} (/health says 'loading' until the model is ready)",
        file=sys.stderr,
    )
    app.start()
    server.run()
    if app.error is not None:
        raise app.error
    return 0


def _name(model: str) -> str:
    """The name a client gives for -m MODEL: a known name as typed, a file's name less .gguf."""
    name = model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name

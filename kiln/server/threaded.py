"""An app served by uvicorn in a thread of this process on a free loopback port: for the tests,
scripts/load_serve.py and benchmarks/serve_host.py (`kiln serve` runs uvicorn in the foreground)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn


@dataclass
class ThreadedServer:
    url: str  # http://127.0.0.1:PORT
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        """Ask uvicorn to exit (the app's shutdown runs) and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_thread(app, timeout: float = 60.0, daemon: bool = False) -> ThreadedServer:
    """uvicorn serving `app` in a new thread on a free loopback port, once it has started; a
    RuntimeError when it has not within `timeout` seconds (or its thread died)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=daemon)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    return ThreadedServer(url, server, thread)

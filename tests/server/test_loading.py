"""`kiln serve` while its model loads (kiln/server/loading.py): a real uvicorn server on a free
loopback port answers from the start; /health is 503 "loading", the API an OpenAI-shaped 503 with
Retry-After (401 first without the key), then the loaded app serves; a load that fails is said
on /health and stops `kiln serve` with the load's error."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import httpx
import openai

import kiln
from kiln.server import create_app
from kiln.server.loading import LoadingApp
from kiln.server.threaded import serve_in_thread


def test_the_port_answers_while_the_model_loads(stories_model):
    release, built = threading.Event(), []

    def load():
        assert release.wait(30)
        llm = kiln.LLM(stories_model, backend="torch", n_ctx=128, n_seq=2, verbose=False)
        app = create_app(llm, api_key="k")
        built.append(app)
        return app

    app = LoadingApp(load, api_key="k")
    app.start()
    srv = serve_in_thread(app, timeout=20)
    try:
        health = httpx.get(f"{srv.url}/health", timeout=5)
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        body = {"prompt": "Once", "max_tokens": 3}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=5)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        keyed = {"Authorization": "Bearer k"}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, headers=keyed, timeout=5)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        err = r.json()["error"]
        assert err["type"] == "unavailable_error" and err["code"] == "model_loading"
        assert "loading" in err["message"]
        release.set()
        assert app.ready.wait(30) and app.error is None
        assert httpx.get(f"{srv.url}/health", timeout=5).json() == {"status": "ok"}
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0, timeout=30)
        out = client.completions.create(model="stories260K", prompt="Once", max_tokens=3)
        assert out.usage.completion_tokens == 3
    finally:
        release.set()
        srv.stop(20)
    assert built and built[0].state.scheduler._closed  # closed at shutdown


def test_a_failed_load_is_said_and_stops(stories_model):
    stopped = threading.Event()

    def load():
        raise kiln.errors.UsageError("no such model: x.gguf")

    app = LoadingApp(load, on_failure=lambda error: stopped.set())
    srv = serve_in_thread(app, timeout=20)
    try:
        app.start()
        assert stopped.wait(10) and isinstance(app.error, kiln.errors.UsageError)
        health = httpx.get(f"{srv.url}/health", timeout=5)
        assert health.status_code == 500
        assert health.json() == {"status": "error", "message": "no such model: x.gguf"}
        r = httpx.get(f"{srv.url}/v1/models", timeout=5)
        assert (
            r.status_code == 503 and "failed to load: no such model" in r.json()["error"]["message"]
        )
    finally:
        srv.stop(20)


def test_kiln_serve_with_a_missing_model_exits_with_its_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    missing = tmp_path / "missing.gguf"
    cmd = [sys.executable, "-m", "kiln", "serve", "-m", str(missing), "--port", str(port)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "missing.gguf" in r.stderr and "Traceback" not in r.stderr, r.stderr

"""`kiln serve`'s app: a real uvicorn server on a free loopback port, driven by the `openai`
client (and httpx for raw bodies), against stories260K on the torch reference backend. Greedy
output is compared with kiln.LLM's on a second instance (the served engine belongs to the
scheduler's thread)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import kiln
from kiln.cli import main
from kiln.server import create_app
from kiln.server.threaded import serve_in_thread

CTX = 1024
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
CHAT = [{"role": "user", "content": "Tell me a story about a cat."}]
PROMPTS = ["Once upon a time", "The dog ran", "Lily and Ben went to the park. They", "One day"]


def _llm(path, n_seq=4, n_ctx=CTX):
    return kiln.LLM(path, backend="torch", n_ctx=n_ctx, ubatch=16, n_seq=n_seq, verbose=False)


class Server:
    def __init__(self, app):
        self.app = app
        self.served = serve_in_thread(app, timeout=20)
        self.url = self.served.url
        self.scheduler = app.state.scheduler
        self.pool = self.scheduler.engine.pool

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)

    def stop(self) -> None:
        self.served.stop(20)

    def idle_free_blocks(self) -> int:
        """The pool's free blocks once nothing runs and the prefix cache is dropped."""
        deadline = time.time() + 10
        while self.scheduler.n_running or self.scheduler.n_waiting:
            assert time.time() < deadline, "requests are still running"
            time.sleep(0.02)
        self.scheduler.clear_cache()
        return self.scheduler.call(lambda: self.pool.free_blocks)


@contextlib.contextmanager
def paused(scheduler):
    """The scheduler's thread held between two iterations (requests queue, none runs)."""
    inside, release = threading.Event(), threading.Event()

    def hold():
        inside.set()
        release.wait(60)

    t = threading.Thread(target=scheduler.call, args=(hold, 90))
    t.start()
    assert inside.wait(20)
    try:
        yield
    finally:
        release.set()
        t.join(30)


@pytest.fixture(scope="module")
def ref(stories_model):
    return _llm(stories_model)


@pytest.fixture(scope="module")
def srv(stories_model):
    app = create_app(
        _llm(stories_model), model_name="stories", chat_template=TEMPLATE, max_body=1 << 16
    )
    s = Server(app)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(stories_model):
    """One slot, a queue of one, an API key."""
    llm = _llm(stories_model, n_seq=1, n_ctx=2048)
    app = create_app(llm, api_key="sekret", max_queue=1)
    s = Server(app)
    yield s
    s.stop()


def _greedy(ref, prompt, n=24):
    return ref.generate(prompt, temperature=0, max_tokens=n)


# -- answers -------------------------------------------------------------------------------------
def test_completion_greedy_equals_llm_generate_with_usage(srv, ref):
    want = _greedy(ref, PROMPTS[0])
    r = srv.client().completions.create(
        model="stories", prompt=PROMPTS[0], max_tokens=24, temperature=0
    )
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.encode_prompt(PROMPTS[0]))
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    # token ids as the prompt give the same continuation
    ids = ref.encode_prompt(PROMPTS[0])
    r = srv.client().completions.create(model="stories", prompt=ids, max_tokens=24, temperature=0)
    assert r.choices[0].text == want.text


def test_completion_stream_equals_non_stream_and_ends_with_usage(srv, ref):
    want = _greedy(ref, PROMPTS[1])
    chunks = list(
        srv.client().completions.create(
            model="stories",
            prompt=PROMPTS[1],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


def test_chat_greedy_equals_llm_chat_stream_and_not(srv, ref):
    want = ref.chat(CHAT, chat_template=TEMPLATE, temperature=0, max_tokens=20)
    ref.reset()
    client = srv.client()
    r = client.chat.completions.create(
        model="stories", messages=CHAT, max_completion_tokens=20, temperature=0
    )
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(
        model="stories", messages=CHAT, max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_next_turn_reuses_the_cached_prefix(srv):
    client = srv.client()
    first = client.chat.completions.create(
        model="stories", messages=CHAT, max_tokens=12, temperature=0
    )
    turn = [*CHAT, {"role": "assistant", "content": first.choices[0].message.content}]
    turn.append({"role": "user", "content": "And then?"})
    second = client.chat.completions.create(
        model="stories", messages=turn, max_tokens=12, temperature=0
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1
    assert cached < second.usage.prompt_tokens


def test_logprobs_chat_and_completion(srv, ref):
    want = ref.generate(PROMPTS[2], temperature=0, max_tokens=8, logprobs=3)
    r = srv.client().completions.create(
        model="stories", prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 8
    for got, choice in zip(lp.token_logprobs, want.logprobs):
        assert got == pytest.approx(choice.logprob, abs=1e-4)
    assert all(len(top) <= 3 and top for top in lp.top_logprobs)
    c = srv.client().chat.completions.create(
        model="stories", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the best
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    chunks = srv.client().chat.completions.create(
        model="stories",
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_concurrent_streams_get_the_tokens_they_get_alone(srv, ref):
    want = [_greedy(ref, p, 32).text for p in PROMPTS]
    got: dict[int, str] = {}

    def one(i):
        stream = srv.client().completions.create(
            model="stories", prompt=PROMPTS[i], max_tokens=32, temperature=0, stream=True
        )
        got[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [got.get(i) for i in range(len(PROMPTS))] == want


def test_client_gone_mid_stream_frees_its_blocks_and_others_finish(srv, ref):
    baseline = srv.idle_free_blocks()
    want = _greedy(ref, PROMPTS[3], 64).text
    other: list[str] = []

    def survivor():
        stream = srv.client().completions.create(
            model="stories", prompt=PROMPTS[3], max_tokens=64, temperature=0, stream=True
        )
        other.append("".join(c.choices[0].text for c in stream))

    t = threading.Thread(target=survivor)
    t.start()
    cancelled = srv.scheduler.cancelled
    body = {"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            data = (line for line in r.iter_lines() if line)
            for _ in range(3):
                assert next(data).startswith("data: ")
    t.join(30)
    assert other == [want]
    assert srv.idle_free_blocks() == baseline
    assert srv.scheduler.cancelled == cancelled + 1  # it was cut short, not finished


def test_stop_strings_seeds_and_zero_tokens(srv, ref):
    client = srv.client()
    full = _greedy(ref, PROMPTS[0], 24).text
    word = full.split()[3]
    r = client.completions.create(
        model="stories", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[word, "zzz"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(word)]
    # a seeded draw is the same alone, again, and beside other requests; LLM's too
    seeded = {"model": "stories", "prompt": PROMPTS[1], "max_tokens": 20, "seed": 7}
    seeded["temperature"] = 1.0
    texts: list[str] = []

    def one():
        texts.append(client.completions.create(**seeded).choices[0].text)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    want = ref.generate(PROMPTS[1], max_tokens=20, seed=7, temperature=1.0).text
    assert texts == [want] * 3
    r = client.completions.create(model="stories", prompt=PROMPTS[1], max_tokens=0)
    assert r.choices[0].text == "" and r.usage.completion_tokens == 0
    assert r.choices[0].finish_reason == "length"


def test_client_gone_while_waiting_for_a_whole_answer_cancels_it(srv):
    cancelled = srv.scheduler.cancelled
    body = {"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json=body, timeout=0.2)
    deadline = time.time() + 10
    while srv.scheduler.cancelled == cancelled:
        assert time.time() < deadline, "the request was not cancelled"
        time.sleep(0.02)


def test_client_gone_while_queued_is_cancelled_before_it_runs(srv):
    cancelled, admitted = srv.scheduler.cancelled, srv.scheduler.admitted
    body = {"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with paused(srv.scheduler):
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=0.3) as r:
                for _ in r.iter_lines():
                    pass
        time.sleep(0.5)  # the server notices while the request still waits for the scheduler
    deadline = time.time() + 10
    while srv.scheduler.cancelled == cancelled:
        assert time.time() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    assert srv.scheduler.admitted == admitted  # it never ran


def test_models_health_metrics(srv):
    models = srv.client().models.list()
    assert [m.id for m in models.data] == ["stories"]
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{srv.url}/metrics").text
    for name in (
        "kiln_requests_total",
        "kiln_prompt_tokens_total",
        "kiln_generated_tokens_total",
        "kiln_queue_length",
        "kiln_running_requests",
        "kiln_time_to_first_token_seconds_bucket",
        "kiln_inter_token_latency_seconds_bucket",
        "kiln_kv_blocks_used",
    ):
        assert name in text, name


# -- errors --------------------------------------------------------------------------------------
def _post(srv, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{srv.url}{path}", content=data, headers=headers, timeout=30, **kw)


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"\xff\xfe", None),
        (b"[1, 2]", None),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [1, 2]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_bad_bodies_are_400_and_the_server_goes_on(srv, path, body, param):
    if isinstance(body, dict):
        base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
        body = {**base, **body}
    err = _error(_post(srv, path, body), 400)
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": "hello"},
        {},
    ],
)
def test_bad_messages_are_400(srv, body):
    _error(_post(srv, "/v1/chat/completions", body), 400)


def test_bad_prompts_are_400(srv, ref):
    _error(_post(srv, "/v1/completions", {"prompt": [10**9]}), 400)
    _error(_post(srv, "/v1/completions", {"prompt": []}), 400)
    _error(_post(srv, "/v1/completions", {"prompt": ["a", "b"]}), 400)
    long = "Once upon a time " * 400
    err = _error(_post(srv, "/v1/completions", {"prompt": long}), 400)
    assert str(CTX) in err["message"] and "tokens" in err["message"]
    n = len(ref.tokenizer.encode(long))
    assert str(n) in err["message"]
    chat = {"messages": [{"role": "user", "content": long}]}
    err = _error(_post(srv, "/v1/chat/completions", chat), 400)
    assert str(CTX) in err["message"]


def test_unknown_model_404_body_too_large_413(srv):
    err = _error(_post(srv, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404)
    assert err["param"] == "model" and "stories" in err["message"]
    _error(_post(srv, "/v1/completions", {"prompt": "x" * (1 << 17)}), 413)
    r = srv.client().completions.create(model="stories", prompt="hi", max_tokens=2)
    assert r.usage.completion_tokens <= 2  # still serving


def test_api_key_and_queue_full(keyed):
    bad = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}]
    for path in ("/v1/models", "/metrics"):
        for headers in bad:
            assert _error(httpx.get(f"{keyed.url}{path}", headers=headers), 401)
        good = httpx.get(f"{keyed.url}{path}", headers={"Authorization": "Bearer sekret"})
        assert good.status_code == 200
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").completions.create(model="x", prompt="hi")
    # a queue of one: while the scheduler is between iterations a request waits, the next is
    # refused with Retry-After
    long = {"prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    auth = {"Authorization": "Bearer sekret"}
    done = threading.Event()

    def hold():  # a stream kept open until the test is done
        with httpx.Client(timeout=30, headers=auth) as c:
            with c.stream("POST", f"{keyed.url}/v1/completions", json=long) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    if done.is_set():
                        return

    holder = threading.Thread(target=hold)
    try:
        with paused(keyed.scheduler):
            holder.start()
            deadline = time.time() + 20
            while keyed.scheduler.n_waiting < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            r3 = _post(keyed, "/v1/completions", long, headers=auth)
            err = _error(r3, 429)
            assert r3.headers["Retry-After"] and err["type"] == "rate_limit_error"
    finally:
        done.set()
        holder.join(30)
    assert keyed.idle_free_blocks() == keyed.pool.max_blocks - 1


def test_serve_command_checks_flags(stories_model, capsys):
    assert main(["serve", "-m", str(stories_model), "--port", "70000"]) == 1
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "-m", str(stories_model), "-np", "0"]) == 1
    assert "-np" in capsys.readouterr().err


def test_kiln_serve_process_answers_on_loopback(stories_model):
    """The command as a user runs it: the model loaded, then uvicorn on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "kiln", "serve", "-m", str(stories_model), "--backend", "torch"]
    cmd += ["-c", "128", "-np", "2", "--port", str(port), "--api-key", "k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "kiln serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=30)
        r = client.completions.create(
            model="stories260K", prompt="Once", max_tokens=5, temperature=0
        )
        assert r.usage.completion_tokens == 5 and r.choices[0].text
    finally:
        proc.terminate()
        proc.wait(20)
    assert b"serving stories260K.gguf on http://127.0.0.1:" in proc.stderr.read()

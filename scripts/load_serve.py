"""Load and faults for `kiln serve` (issue 18, item 6): many concurrent streaming requests of
mixed prompt lengths and max_tokens, a fraction closed by the client mid-stream, a fraction
malformed; then checks that the server kept every promise.

    python scripts/load_serve.py -m ../shared/models/stories260K.gguf      # in-process server
    python scripts/load_serve.py --url http://127.0.0.1:8080                # a running server

Loopback only (a non-loopback --url needs --allow-remote), bounded in count (--requests) and
time (--timeout). Well-formed requests are streamed chat or text completions with
`ignore_eos` and no stop strings, so each must end with finish_reason "length" and exactly
max_tokens completion tokens (from the usage chunk). Checks (exit 0 only if all hold):

- every well-formed request that was not cancelled completed with finish_reason "length" and
  usage.completion_tokens == max_tokens ("stop" is counted apart and fails: with ignore_eos and
  no stop strings it must not happen);
- every malformed request got a 4xx OpenAI-shaped error ({"error": {"message", ...}});
- /health still answers 200 afterwards;
- the KV blocks in use (/metrics' kiln_kv_blocks_used, once no request runs) return to their
  baseline: exactly, with the prefix cache cleared before both reads (in-process), or after the
  same --settle sequential requests before and after the load (a running server);
- in-process (or a running server's --pid): the server process's RSS (VmRSS of
  /proc/PID/status) after the load is at most the baseline (read after the --settle warm-up)
  + max(--rss-mib MiB, 10%): allocator caches and Python's free lists keep some memory, a
  leak per request grows with --requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

WORDS = (
    "the cat dog sun tree ran big little happy park ball girl boy mom day play went saw "
    "red blue bird fish house friend jump walk toy car hat cake bed book"
).split()
PLAIN_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass
class Outcome:
    """One request's fate, as the client saw it."""

    kind: str  # "ok" (well-formed), "cancel" (meant to be cut), "malformed"
    max_tokens: int = 0
    status: int | None = None  # HTTP status (None: no answer / transport error)
    finish: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None  # from the usage chunk, when the server sent one
    cancelled: bool = False  # the client closed the stream before its end
    error_shaped: bool = False  # the body was {"error": {"message": ...}}
    error: str | None = None  # transport or protocol error
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)


@dataclass
class Server:
    url: str
    scheduler: object | None = None  # in-process: the app's Scheduler
    stop: object | None = None
    n_ctx: int | None = None


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def start_server(args, max_queue: int | None = None) -> Server:
    """`kiln serve` in this process: uvicorn in a thread on a free loopback port (args: model,
    device, backend, ctx, ubatch, parallel, and optional chat_template; the queue holds
    max_queue requests, by default args.requests)."""
    import kiln
    from kiln.errors import KilnError
    from kiln.server import create_app
    from kiln.server.threaded import serve_in_thread

    llm = kiln.LLM(
        args.model, device=args.device, backend=args.backend, n_ctx=args.ctx,
        ubatch=args.ubatch, n_seq=args.parallel, verbose=False,
    )  # fmt: skip
    template = getattr(args, "chat_template", None)
    if template is None:
        try:
            llm.encode_chat([{"role": "user", "content": "hi"}])
        except KilnError:  # a model without a chat template (stories260K): a plain one
            template = PLAIN_TEMPLATE
    max_queue = max(args.requests if max_queue is None else max_queue, 1)
    app = create_app(llm, max_queue=max_queue, chat_template=template)
    served = serve_in_thread(app, daemon=True)
    return Server(served.url, app.state.scheduler, served.stop, llm.n_ctx)


def plan(args, n_ctx: int | None) -> list[dict]:
    """The requests, seeded: each a dict with kind, endpoint, body (bytes), max_tokens, cut."""
    rng = random.Random(args.seed)
    too_long = (n_ctx or 1 << 17) + 1
    out = []
    for i in range(args.requests):
        r = rng.random()
        words = rng.randint(1, args.prompt_words)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        n = rng.randint(1, args.max_tokens)
        chat = args.chat and rng.random() < 0.5
        body = {"max_tokens": n, "stream": True, "ignore_eos": True, "seed": i,
                "stream_options": {"include_usage": True}}  # fmt: skip
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        item = {"kind": "ok", "endpoint": endpoint, "max_tokens": n, "cut": None}
        if r < args.malformed:
            fault = rng.choice(["json", "type", "range", "long"])
            item["kind"] = "malformed"
            if fault == "json":
                raw = json.dumps(body).encode()[:-3] + b",,}"
            elif fault == "type":
                raw = json.dumps({**body, "max_tokens": str(n)}).encode()
            elif fault == "range":
                raw = json.dumps({**body, "temperature": 7.5}).encode()
            else:
                body.pop("messages", None)
                body["prompt"] = [1] * too_long
                item["endpoint"] = "/v1/completions"
                raw = json.dumps(body).encode()
            item["fault"] = fault
        else:
            raw = json.dumps(body).encode()
            if r < args.malformed + args.cancel:
                item["kind"], item["cut"] = "cancel", rng.randrange(n)
        item["body"] = raw
        out.append(item)
    return out


async def one(client: httpx.AsyncClient, item: dict) -> Outcome:
    o = Outcome(item["kind"], item["max_tokens"])
    headers = {"Content-Type": "application/json"}
    start = time.perf_counter()
    try:
        async with client.stream(
            "POST", item["endpoint"], content=item["body"], headers=headers
        ) as resp:
            o.status = resp.status_code
            if resp.status_code != 200:
                body = await resp.aread()
                with contextlib.suppress(ValueError):
                    err = json.loads(body).get("error")
                    o.error_shaped = isinstance(err, dict) and isinstance(err.get("message"), str)
                    o.error = err.get("message") if o.error_shaped else body[:200].decode("replace")
                return o
            if item["cut"] == 0:
                o.cancelled = True
                return o  # closed right after the headers
            pieces, last = 0, None
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    o.error = f"error event: {chunk['error'].get('message')}"
                    continue
                if chunk.get("usage"):
                    o.completion_tokens = chunk["usage"].get("completion_tokens")
                    o.prompt_tokens = chunk["usage"].get("prompt_tokens")
                for c in chunk.get("choices", []):
                    text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            o.ttft = now - start
                        else:
                            o.itl.append(now - last)
                        last = now
                        pieces += 1
                    if c.get("finish_reason"):
                        o.finish = c["finish_reason"]
                if item["cut"] is not None and pieces >= item["cut"] and o.finish is None:
                    o.cancelled = True
                    return o  # leaving the block closes the connection mid-stream
    except (httpx.HTTPError, ValueError) as e:
        o.error = f"{type(e).__name__}: {e}"
    return o


async def run_load(url: str, items: list[dict], concurrency: int, timeout: float):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def bounded(item):
            async with sem:
                return await one(client, item)

        start = time.perf_counter()
        outcomes = await asyncio.wait_for(asyncio.gather(*(bounded(it) for it in items)), timeout)
        return list(outcomes), time.perf_counter() - start


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def idle_kv(srv: Server, deadline: float) -> float | None:
    """kiln_kv_blocks_used once no request runs or waits (in-process: the prefix cache
    cleared first); None if the server has no such metric."""
    while True:
        text = httpx.get(f"{srv.url}/metrics", timeout=10).text
        running, waiting = metric(text, "kiln_running_requests"), metric(text, "kiln_queue_length")
        if running is None:
            return None
        if running == 0 and waiting == 0:
            break
        if time.time() > deadline:
            raise TimeoutError("requests still running at the deadline")
        time.sleep(0.05)
    if srv.scheduler is not None:
        srv.scheduler.clear_cache()
        # the gauge is published after the next iteration: read the pool directly
        pool = srv.scheduler.engine.pool
        return float(srv.scheduler.call(lambda: pool.max_blocks - 1 - pool.free_blocks))
    return metric(httpx.get(f"{srv.url}/metrics", timeout=10).text, "kiln_kv_blocks_used")


def settle(url: str, n: int) -> None:
    """n identical sequential greedy requests (warm-up, and a known prefix-cache state)."""
    body = {"prompt": "the cat sat", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    for _ in range(n):
        httpx.post(f"{url}/v1/completions", json=body, timeout=60).raise_for_status()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def evaluate(outcomes: list[Outcome]) -> tuple[dict[str, int], list[str]]:
    """-> (counts by outcome, failed checks) for the requests alone."""
    counts: dict[str, int] = {}
    failures: list[str] = []

    def add(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    for i, o in enumerate(outcomes):
        if o.kind == "malformed":
            if o.status is not None and 400 <= o.status < 500 and o.error_shaped:
                add(f"malformed -> {o.status}")
            else:
                add("malformed answered wrongly")
                failures.append(f"request {i} (malformed): status {o.status}, OpenAI error body "
                                f"{o.error_shaped}, {o.error or ''}")  # fmt: skip
            continue
        if o.cancelled:
            add("cancelled")
            continue
        if o.status != 200 or o.error is not None:
            add(f"failed ({o.status})")
            failures.append(f"request {i}: status {o.status}, {o.error or 'no error text'}")
        elif o.finish == "stop":
            add("finished 'stop'")
            failures.append(f"request {i}: finish_reason 'stop' despite ignore_eos")
        elif o.finish != "length" or o.completion_tokens != o.max_tokens:
            add("wrong length")
            failures.append(
                f"request {i}: finish_reason {o.finish!r}, {o.completion_tokens} completion "
                f"tokens for max_tokens {o.max_tokens}"
            )
        else:
            add("completed")
    return counts, failures


def add_server_args(p: argparse.ArgumentParser, ctx, parallel, ctx_help, np_help) -> None:
    """The flags naming the server to load: a running one (--url, --allow-remote) or kiln's,
    started in this process (-m and its options; -c and -np default to ctx and parallel)."""
    p.add_argument("--url", default="http://127.0.0.1:8080", help="a running server")
    p.add_argument("-m", "--model", help="start a server in this process with this model")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("-c", "--ctx", type=int, default=ctx, help=ctx_help)
    p.add_argument("-np", "--parallel", type=int, default=parallel, help=np_help)
    p.add_argument("-ub", "--ubatch", type=int, default=512)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")


def check_url(p: argparse.ArgumentParser, args) -> None:
    """Loopback only, unless --allow-remote (or -m: the server is this process's)."""
    host = urlparse(args.url).hostname or ""
    if not args.model and host not in LOOPBACK and not args.allow_remote:
        p.error(f"--url {args.url} is not loopback: pass --allow-remote to load another host")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(p, 512, 16, "in-process context (512)", "in-process slots (16)")
    p.add_argument(
        "--chat-template", help="in-process template (default: the model's, else a plain one)"
    )
    p.add_argument(
        "--no-chat", dest="chat", action="store_false",
        help="text completions only (a server whose model has no chat template)",
    )  # fmt: skip
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--cancel", type=float, default=0.10, help="fraction cut mid-stream")
    p.add_argument("--malformed", type=float, default=0.05, help="fraction of bad requests")
    p.add_argument("--prompt-words", type=int, default=48, help="prompt lengths 1..N words")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens 1..N")
    p.add_argument("--timeout", type=float, default=300, help="seconds for the whole run")
    p.add_argument("--settle", type=int, default=24, help="sequential requests before/after")
    p.add_argument("--rss-mib", type=float, default=64, help="RSS tolerance floor (MiB)")
    p.add_argument("--pid", type=int, help="a running server's process id, to check its RSS")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (0 <= args.cancel <= 1 and 0 <= args.malformed <= 1 and args.cancel + args.malformed
            <= 1):  # fmt: skip
        p.error("--cancel and --malformed must be fractions in 0..1 with a sum <= 1")
    for name in ("requests", "concurrency", "prompt_words", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    check_url(p, args)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    deadline = time.time() + args.timeout
    srv = start_server(args) if args.model else Server(args.url.rstrip("/"))
    try:
        settle(srv.url, args.settle)
        kv_before = idle_kv(srv, deadline)
        rss_pid = "self" if srv.scheduler is not None else args.pid
        rss_before = rss_mib(rss_pid) if rss_pid is not None else None
        items = plan(args, srv.n_ctx)
        left = max(deadline - time.time(), 1)
        outcomes, wall = asyncio.run(run_load(srv.url, items, args.concurrency, left))
        health = httpx.get(f"{srv.url}/health", timeout=10).status_code
        kv_after_load = idle_kv(srv, deadline + 30)
        settle(srv.url, args.settle)
        kv_after = idle_kv(srv, deadline + 30)
        rss_after = rss_mib(rss_pid) if rss_pid is not None else None
    finally:
        if srv.stop is not None:
            srv.stop()
    counts, failures = evaluate(outcomes)
    if health != 200:
        failures.append(f"/health answered {health} after the load")
    if kv_before is not None and kv_after != kv_before:
        failures.append(f"KV blocks in use {kv_after:g} after the load, {kv_before:g} before")
    rss_limit = None
    if rss_before is not None:
        rss_limit = rss_before + max(args.rss_mib, 0.10 * rss_before)
        if rss_after > rss_limit:
            failures.append(f"RSS {rss_after:.0f} MiB after, limit {rss_limit:.0f} MiB")
    done = [o for o in outcomes if o.kind != "malformed" and not o.cancelled and o.status == 200]
    tokens = sum(o.completion_tokens or 0 for o in done)
    ttft = [o.ttft for o in outcomes if o.ttft is not None and not o.cancelled]
    itl = [x for o in outcomes for x in o.itl]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status != 200:
            errors[str(o.status)] = errors.get(str(o.status), 0) + 1
    print(f"load: {len(outcomes)} requests, concurrency {args.concurrency}, {wall:.2f} s, "
          f"server {srv.url}{' (in-process)' if srv.scheduler else ''}")  # fmt: skip
    print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("  errors by status: " + (", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
                                    or "none"))  # fmt: skip
    print(f"  output: {tokens} tokens, {tokens / wall:.1f} tokens/s aggregate")
    print(f"  time to first token p50 {pct(ttft, 50) * 1e3:.1f} ms, p99 {pct(ttft, 99) * 1e3:.1f}"
          f" ms; inter-token latency p50 {pct(itl, 50) * 1e3:.2f} ms, "
          f"p99 {pct(itl, 99) * 1e3:.2f} ms")  # fmt: skip
    print(f"  /health after: {health}")
    kv_text = "n/a (no kiln_kv_blocks_used)" if kv_before is None else (
        f"{kv_before:g} before, {kv_after_load:g} right after the load, {kv_after:g} after "
        f"settling (must equal the baseline)")  # fmt: skip
    print(f"  KV blocks in use: {kv_text}")
    if rss_before is not None:
        print(f"  RSS: {rss_before:.0f} MiB before, {rss_after:.0f} MiB after (limit "
              f"{rss_limit:.0f} MiB = before + max({args.rss_mib:g} MiB, 10%))")  # fmt: skip
    for f in failures[:20]:
        print(f"  FAIL: {f}")
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more failures")
    print("load: " + ("PASS" if not failures else f"FAIL ({len(failures)} checks)"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

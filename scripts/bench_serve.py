"""Serving throughput of an OpenAI-compatible server (issue 18, item 7): C concurrent streaming
clients at each level of --clients, fixed prompt and output lengths; aggregate output tokens/s,
time to first token and inter-token latency percentiles, and the single-client decode rate.

    python scripts/bench_serve.py --url http://127.0.0.1:8080 --clients 1,8,32,64 \\
        --prompt-tokens 128 --max-tokens 256 --label kiln --json kiln.json   # a running server
    python scripts/bench_serve.py -m model.gguf --clients 1,4,8 ...      # kiln serve in-process

The same load for `kiln serve` and llama.cpp's `llama-server`: every request is a streamed
POST /v1/completions whose prompt is a list of exactly --prompt-tokens token ids (both servers
take a token array as the OpenAI API allows, and neither adds BOS to one), with `ignore_eos`,
temperature 0, max_tokens --max-tokens and stream_options.include_usage. The ids come from
--token-range (ordinary vocabulary ids, 1000..1999 by default; in-process, a vocabulary smaller
than the range gets its upper half instead); each request's first two ids name it, so no two
prompts of a run share a prefix and no prefix cache serves one request from another (--seed,
the first request's number, is random by default: a second run against the same server does
not meet the first one's prompts in its cache either). Every request must end with
finish_reason "length", usage.completion_tokens == --max-tokens and usage.prompt_tokens ==
--prompt-tokens: otherwise the run FAILS (exit 1) instead of measuring short outputs.

Each level: one warm-up request (not counted), then C clients each sending K requests back to
back (--requests-per-client; default 3 below 8 clients, 2 from 8 on). Reported per level:
- agg t/s: completion tokens of the level / its wall time (first request sent to last answer);
  per-client t/s = agg / C; x single = agg / the 1-client level's agg;
- TTFT: request sent to its first content chunk, p50/p99 over the level's requests;
- ITL: time between consecutive content chunks, p50/p99 over all gaps of the level. A server that
  puts several tokens into one SSE chunk (kiln holds back a token that ends inside a UTF-8
  character) would show fewer, longer gaps: "tok/chunk" (completion tokens / content chunks) says
  how far that goes, and "stream t/s" (per request: (completion tokens - 1) / first to last
  chunk, median) is the per-token rate that does not depend on chunking;
- single-client decode: the 1-client level's stream t/s (compare with `kiln bench` tg).

The table goes to stdout (markdown), progress to stderr, raw numbers (every request's TTFT and
gaps) to --json. Loopback only unless --allow-remote; --timeout bounds the whole run. For GPU
numbers run the server in its own process (`kiln serve`) and point --url at it: in-process, the
client's parsing shares the interpreter with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from scripts import load_serve as L  # noqa: E402

PRIME = 7919  # spreads the ids of consecutive requests over the range
RAW = ("ttft", "itl", "completion_tokens", "prompt_tokens")  # per request in --json (seconds)


class BenchError(Exception):
    """A run that cannot measure: the server is unreachable, refuses the load or runs late."""


def prompt_ids(r: int, n: int, lo: int, hi: int) -> list[int]:
    """Request r's prompt: n ids in lo..hi-1, the first two naming r (unique for (hi-lo)^2
    requests), the rest a rotation of the range."""
    span = hi - lo
    head = [lo + r % span, lo + (r // span) % span]
    rest = [lo + (r * PRIME + i) % span for i in range(n)]
    return (head + rest)[:n]


def item(args, r: int) -> dict:
    """Request r as load_serve.one() takes it."""
    body = {
        "prompt": prompt_ids(r, args.prompt_tokens, *args.token_range),
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return {"kind": "ok", "endpoint": "/v1/completions", "body": json.dumps(body).encode(),
            "max_tokens": args.max_tokens, "cut": None}  # fmt: skip


def check(outcomes: list[L.Outcome], prompt_tokens: int) -> list[str]:
    """Failed checks: load_serve's (status, finish "length", exact completion tokens), the
    prompt's token count, and a first content chunk."""
    _, failures = L.evaluate(outcomes)
    for i, o in enumerate(outcomes):
        if o.status == 200 and o.error is None and o.prompt_tokens != prompt_tokens:
            failures.append(f"request {i}: usage.prompt_tokens {o.prompt_tokens}, sent "
                            f"{prompt_tokens}")  # fmt: skip
        if o.status == 200 and o.error is None and o.ttft is None:
            failures.append(f"request {i}: no content chunk in the stream")
    return failures


def stream_rate(o: L.Outcome) -> float | None:
    """(completion tokens - 1) / (first to last content chunk): one stream's decode rate."""
    span = sum(o.itl)
    return (o.completion_tokens - 1) / span if o.completion_tokens and span > 0 else None


def summarize(clients: int, outcomes: list[L.Outcome], wall: float) -> dict:
    ttft = [o.ttft for o in outcomes if o.ttft is not None]
    itl = [x for o in outcomes for x in o.itl]
    rates = [r for r in map(stream_rate, outcomes) if r is not None]
    tokens = sum(o.completion_tokens or 0 for o in outcomes)
    chunks = sum(len(o.itl) + 1 for o in outcomes if o.ttft is not None)
    agg = tokens / wall
    return {
        "clients": clients,
        "requests": len(outcomes),
        "completion_tokens": tokens,
        "wall_s": wall,
        "agg_tps": agg,
        "per_client_tps": agg / clients,
        "ttft_ms": {"p50": L.pct(ttft, 50) * 1e3, "p99": L.pct(ttft, 99) * 1e3},
        "itl_ms": {"p50": L.pct(itl, 50) * 1e3, "p99": L.pct(itl, 99) * 1e3},
        "stream_tps_p50": L.pct(rates, 50),
        "tokens_per_chunk": tokens / chunks if chunks else float("nan"),
        "raw": [{k: getattr(o, k) for k in RAW} for o in outcomes],
    }


async def run_level(url: str, args, clients: int, first: int, deadline: float):
    """One warm-up request, then `clients` clients of K requests each -> (outcomes, wall s)."""
    k = args.requests_per_client or (3 if clients < 8 else 2)
    items = [[item(args, first + 1 + c * k + j) for j in range(k)] for c in range(clients)]
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=left) as client:
        warm = await asyncio.wait_for(L.one(client, item(args, first)), left)
        if failures := check([warm], args.prompt_tokens):
            raise BenchError(f"the warm-up request failed: {failures[0]}" + (
                "; a model with a small vocabulary needs --token-range (e.g. 100:400)"
                if warm.status == 400 else ""))  # fmt: skip

        async def client_run(reqs):
            return [await L.one(client, it) for it in reqs]

        start = time.perf_counter()
        left = deadline - time.monotonic()
        done = await asyncio.wait_for(asyncio.gather(*map(client_run, items)), max(left, 0.001))
        wall = time.perf_counter() - start
    return [o for per_client in done for o in per_client], wall, 1 + clients * k


def table(levels: list[dict], label: str) -> str:
    single = next((lv["agg_tps"] for lv in levels if lv["clients"] == 1), None)
    rows = [f"{label}" if label else "", "| clients | requests | agg t/s | per-client t/s | "
            "x single | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | stream t/s | "
            "tok/chunk |", "|" + "---:|" * 11]  # fmt: skip
    for lv in levels:
        x = f"{lv['agg_tps'] / single:.2f}" if single else "-"
        rows.append(
            f"| {lv['clients']} | {lv['requests']} | {lv['agg_tps']:.1f} | "
            f"{lv['per_client_tps']:.1f} | {x} | {lv['ttft_ms']['p50']:.1f} | "
            f"{lv['ttft_ms']['p99']:.1f} | {lv['itl_ms']['p50']:.2f} | {lv['itl_ms']['p99']:.2f}"
            f" | {lv['stream_tps_p50']:.1f} | {lv['tokens_per_chunk']:.2f} |"
        )
    one = next((lv for lv in levels if lv["clients"] == 1), None)
    if one is not None:
        rows.append(f"\nsingle-client decode: {one['stream_tps_p50']:.1f} t/s (median stream "
                    f"t/s of the 1-client level)")  # fmt: skip
    return "\n".join(r for r in rows if r)


def parse_clients(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be >= 1: {text!r}")
    return values


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI, got {text!r}") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"need 0 <= LO < HI, got {text!r}")
    return lo, hi


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    L.add_server_args(p, None, None, "in-process context (prompt + max tokens + 65)",
                      "in-process slots (the most clients)")  # fmt: skip
    p.add_argument("--clients", type=parse_clients, default=[1, 8, 32, 64], help="1,8,32,64")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument(
        "--requests-per-client", type=int, metavar="K",
        help="requests each client sends back to back (default 3 below 8 clients, else 2)",
    )  # fmt: skip
    p.add_argument("--token-range", type=parse_range, default=(1000, 2000), metavar="LO:HI",
                   help="prompt ids come from LO..HI-1 (default 1000:2000)")  # fmt: skip
    p.add_argument("--seed", type=int, help="the first request's number (default: random)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the raw numbers here")
    p.add_argument("--label", default="", help="a name for this run (table title, JSON)")
    args = p.parse_args(argv)
    for name in ("prompt_tokens", "max_tokens", "requests_per_client"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    L.check_url(p, args)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if args.model:
        # one KV block (64 tokens) to spare: the scheduler admits a request only when the pool
        # has a block more than its prompt needs
        args.ctx = args.ctx or args.prompt_tokens + args.max_tokens + 65
        args.parallel = args.parallel or max(args.clients)
    return args


def log(text: str) -> None:
    print(f"bench_serve: {text}", file=sys.stderr, flush=True)


def start(args) -> L.Server:
    """The server to load: kiln's in-process (its vocabulary fitted to --token-range) or --url,
    which must answer /health."""
    if args.model:
        log(f"starting kiln serve in-process: {args.model}")
        srv = L.start_server(args, max_queue=max(args.clients))
        n_vocab = srv.scheduler.tokenizer.n_vocab
        if args.token_range[1] > n_vocab:
            args.token_range = (n_vocab // 2, n_vocab)
            log(f"the vocabulary has {n_vocab} ids: prompt ids from {n_vocab // 2}..{n_vocab - 1}")
        return srv
    url = args.url.rstrip("/")
    try:
        health = httpx.get(f"{url}/health", timeout=10)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if health.status_code != 200:
        raise BenchError(f"{url}/health answered {health.status_code}: {health.text[:200]}")
    return L.Server(url)


def run(args) -> tuple[list[dict], list[str]]:
    deadline = time.monotonic() + args.timeout
    srv = start(args)
    levels: list[dict] = []
    failures: list[str] = []
    first = args.seed
    try:
        for clients in args.clients:
            log(f"{clients} clients: running")
            try:
                outcomes, wall, used = asyncio.run(run_level(srv.url, args, clients, first,
                                                             deadline))  # fmt: skip
            except (TimeoutError, asyncio.TimeoutError):
                failures.append(f"{clients} clients: not done within --timeout {args.timeout:g} s")
                break
            first += used
            level = summarize(clients, outcomes, wall)
            levels.append(level)
            log(f"{clients} clients: {level['requests']} requests, {wall:.2f} s, "
                f"{level['agg_tps']:.1f} t/s aggregate")  # fmt: skip
            failures += [f"{clients} clients, {f}" for f in check(outcomes, args.prompt_tokens)]
            if failures:
                break
    finally:
        if srv.stop is not None:
            srv.stop()
    return levels, failures


def main(argv=None) -> int:
    args = parse(argv)
    try:
        levels, failures = run(args)
    except BenchError as e:
        log(f"error: {e}")
        return 1
    print(table(levels, args.label))
    if args.json:
        from kiln.fileio import write_text

        report = {"label": args.label, "url": None if args.model else args.url,
                  "model": args.model, "prompt_tokens": args.prompt_tokens,
                  "max_tokens": args.max_tokens, "token_range": list(args.token_range),
                  "seed": args.seed,
                  "levels": levels, "failures": failures}  # fmt: skip
        write_text(args.json, json.dumps(report, indent=1) + "\n")
    for f in failures[:20]:
        print(f"FAIL: {f}")
    if len(failures) > 20:
        print(f"... and {len(failures) - 20} more failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

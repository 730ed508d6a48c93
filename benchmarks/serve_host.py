"""What the host costs a token of `kiln serve`, with the model's forward taken out: the forward
returns fixed logits at once, so what is timed is the scheduler, the sampler, the hand-off of
events to the event loop, and the HTTP/SSE stream. Its single-stream rate is the ceiling a GPU
cannot lift (issue 18: single-client decode within 10% of `kiln bench` tg): on the 0.6b a token
has about 0.8 ms of GPU time on an H100, and the host work of a token must fit under it.

    python benchmarks/serve_host.py [-m MODEL] [--tokens 512] [--clients 1,8]

Two measures per level: "scheduler" (requests submitted straight to the Scheduler, events read
by a Python thread: no HTTP) and "http" (the app on uvicorn in this process, streamed
completions read by httpx in a second process, as scripts/bench_serve.py reads them). Each
prints the tokens/s of the level (all streams together), the wall microseconds a token, and
for http the server process's CPU microseconds a token (every thread; the client's excluded):
the work a token costs the host whatever the cores.
--step-ms and --token-us emulate the device: a forward then keeps a device busy for that long,
and a step's ids are read when it is done (a sleep without the GIL, as a CUDA event wait), so
the levels show how much of the device's time the host work leaves on the table (e.g. --step-ms
0.8 --token-us 30: qwen3-0.6b Q8_0's decode step on an H100 is about 0.81 ms at one row), and
--host-us the Python a real launch holds the GIL for. The scheduler thread's and the HTTP side's
host work add up under the GIL: with the device emulated at 0.8 ms, one stream over HTTP keeps
97% of the device's rate at 0 us, 92% at 300 us and 71% at 600 us of host work a launch (this
2-core CPU), the scheduler alone 99% at each.
Runs on the CPU; a small vocabulary (the default: ../shared's stories260K, else the demo model)
keeps the sampler's arithmetic out of the measure. The client runs in its own process: on a
machine with few cores (2 here) it competes with the server for them, so levels of many clients
are a lower bound there. Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

import torch  # noqa: E402

from kiln.runtime.sampler import PendingChoices, SamplingParams  # noqa: E402
from kiln.runtime.scheduler import Scheduler  # noqa: E402

STORIES = ROOT.parent / "shared" / "models" / "stories260K.gguf"
CPU_US: list[float] = []  # the server's CPU us a token of each http run
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


class Device:
    """An emulated GPU: a forward of T tokens keeps it busy step_ms + T * token_us after it
    is free, and a step's sampled ids can be read once it is done (PendingChoices.collect sleeps
    until then, without the GIL, as a CUDA event wait does). step_ms 0: no device time."""

    def __init__(self, step_ms: float, token_us: float, host_us: float = 0.0):
        self.step, self.token, self.host = step_ms / 1e3, token_us / 1e6, host_us / 1e6
        self.free_at = 0.0

    def run(self, tokens: int) -> None:
        """A forward's launch: host_us of Python holding the GIL (what launching a real step
        costs the host: input copies, the graph replay, the sampler's kernels), then the device
        busy for its time."""
        end = time.perf_counter() + self.host
        while time.perf_counter() < end:
            pass
        if self.step or self.token:
            self.free_at = max(self.free_at, time.perf_counter()) + self.step + tokens * self.token


def null_forward(llm, device: Device) -> None:
    """Replace the model's forward by fixed logits (one row per row that asks for them), its
    time by the emulated device's."""
    n_vocab = llm.engine.model.config.n_vocab
    table = torch.randn(64, n_vocab, generator=torch.Generator().manual_seed(0))

    def forward(batch, pool):
        device.run(batch.n_tokens)
        rows = batch.logit_rows.numel() if batch.logit_rows is not None else batch.n_tokens
        return table[torch.arange(rows) % 64]

    llm.engine.model.forward = forward
    init, collect = PendingChoices.__init__, PendingChoices.collect

    def launched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.emulated_ready = device.free_at

    def collected(self):
        wait = self.emulated_ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return collect(self)

    PendingChoices.__init__, PendingChoices.collect = launched, collected


def scheduler_level(llm, clients: int, tokens: int) -> float:
    """tokens/s of `clients` greedy streams submitted straight to a Scheduler."""
    sched = Scheduler(llm.engine, llm.tokenizer)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    try:
        for _ in range(2):  # the first round warms up
            done = queue.Queue()
            t0 = time.perf_counter()
            for c in range(clients):
                sched.submit(PROMPT + [9 + c], params, lambda e, q=done: e.done and q.put(e))
            for _ in range(clients):
                assert done.get(timeout=600).result.stats.generated_tokens == tokens
            wall = time.perf_counter() - t0
        return clients * tokens / wall
    finally:
        sched.close()


CLIENT = """
import asyncio, json, sys, time, httpx
url, clients, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def one(c, client, model):
    body = {"model": model, "prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9 + c], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    n = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                n = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", n)
    assert n == tokens, f"{n} tokens, not {tokens}"
    return n
async def main():
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        await one(0, client, model)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, client, model) for c in range(clients)))
        print(clients * tokens / (time.perf_counter() - t0))
asyncio.run(main())
"""


def cpu_seconds() -> float:
    """This process's CPU time (every thread: the server's), user + system."""
    t = os.times()
    return t.user + t.system


def http_level(llm, clients: int, tokens: int) -> float:
    """tokens/s of `clients` streamed completions through the app on uvicorn (and the server's
    CPU microseconds a token, in CPU_US)."""
    from kiln.server.app import create_app
    from kiln.server.threaded import serve_in_thread

    app = create_app(llm)
    served = serve_in_thread(app)
    url = served.url
    try:
        cpu = cpu_seconds()
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, url, str(clients), str(tokens)],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if out.returncode:
            raise SystemExit(f"serve_host: the client failed:\n{out.stdout}{out.stderr[-2000:]}")
        CPU_US.append((cpu_seconds() - cpu) * 1e6 / ((clients + 1) * tokens))  # + the warm-up
        return float(out.stdout.split()[-1])
    finally:
        served.stop()
        app.state.scheduler.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=str(STORIES) if STORIES.exists() else "smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512, help="tokens a stream (default 512)")
    ap.add_argument("--clients", default="1,8", help="levels of concurrent streams")
    ap.add_argument("--repeat", type=int, default=3, help="runs a level (the median is shown)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument(
        "--step-ms", type=float, default=0.0,
        help="emulated device time of a forward, ms (0: none; qwen3-0.6b Q8_0 on an H100: 0.8)",
    )  # fmt: skip
    ap.add_argument(
        "--token-us", type=float, default=0.0, help="emulated device time a token, us (e.g. 30)"
    )
    ap.add_argument(
        "--host-us", type=float, default=0.0,
        help="emulated host work a forward launch holds the GIL for, us (default 0)",
    )  # fmt: skip
    ap.add_argument("--switch-ms", type=float, help="sys.setswitchinterval (default: Python's)")
    args = ap.parse_args(argv)
    from kiln.llm import LLM

    if args.switch_ms:
        sys.setswitchinterval(args.switch_ms / 1e3)
    llm = LLM(args.model, device="cpu", n_ctx=args.tokens + 64, n_seq=64, verbose=False)
    null_forward(llm, Device(args.step_ms, args.token_us, args.host_us))
    rows = []
    emulated = f"{args.step_ms} ms + {args.token_us} us a token" if args.step_ms else "none"
    emulated += f", {args.host_us} us of host work a launch" if args.host_us else ""
    print(f"device time: {emulated}; switch interval {sys.getswitchinterval() * 1e3:.2f} ms")
    print("| clients | path | t/s | us a token | server CPU us a token |")
    print("|---:|---|---:|---:|---:|")
    for clients in (int(c) for c in args.clients.split(",")):
        for path, fn in (("scheduler", scheduler_level), ("http", http_level)):
            CPU_US.clear()
            rate = statistics.median(fn(llm, clients, args.tokens) for _ in range(args.repeat))
            cpu = statistics.median(CPU_US) if CPU_US else None
            rows.append({"clients": clients, "path": path, "tps": rate, "server_cpu_us": cpu})
            cell = f"{cpu:.1f}" if cpu is not None else "-"
            print(f"| {clients} | {path} | {rate:.1f} | {1e6 / rate:.1f} | {cell} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Running llama.cpp's CPU tools from ../shared/peer in tests."""

from __future__ import annotations

import subprocess


def llama_perplexity(peer_cpu, *args, last_line: str = "Final estimate") -> str:
    """Run llama-perplexity until its output holds last_line: its logger is a thread that can
    lose the last lines at exit (llama.cpp issue 22142), so a run may end without them."""
    for _ in range(4):
        r = subprocess.run(
            [str(peer_cpu), "llama-perplexity", "-t", "1", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        if last_line in r.stdout + r.stderr:
            return r.stdout + r.stderr
    raise AssertionError(f"llama-perplexity printed no {last_line!r}:\n{r.stderr[-2000:]}")

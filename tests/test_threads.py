"""-t/--threads on every command that runs a model, threads= on kiln.LLM: torch's intra-op
threads, by default the physical cores this process may run on."""

from __future__ import annotations

import os

import pytest
import torch

from kiln import LLM
from kiln.cli import main
from kiln.errors import UsageError
from kiln.ops.cpu import physical_cores, set_threads


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_physical_cores_counts_cores_this_process_may_use():
    n = physical_cores()
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= n <= allowed


def test_set_threads():
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    assert set_threads(None) == physical_cores() == torch.get_num_threads()
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(UsageError, match="thread count must be an integer >= 1"):
            set_threads(bad)


def test_llm_threads(stories_model):
    llm = LLM(stories_model, device="cpu", n_ctx=64, verbose=False, threads=1)
    assert llm.threads == 1 and torch.get_num_threads() == 1
    assert llm.generate("Once", max_tokens=2, temperature=0).token_ids
    with pytest.raises(UsageError, match="thread count"):
        LLM("no/such/model.gguf", threads=0)  # checked before the model is looked for


def test_run_with_threads(stories_model, capsys):
    args = ["run", "-m", str(stories_model), "-p", "Once", "-n", "2", "--device", "cpu"]
    assert main([*args, "-t", "1"]) == 0
    assert torch.get_num_threads() == 1
    assert main([*args, "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "-p", "hi", "-n", "1"],
        ["ppl", "-f", "{text}", "-c", "64", "--chunks", "1"],
        ["bench", "-p", "0", "-n", "1", "-r", "1"],
        ["ab", "-p", "0", "-n", "1", "-r", "1", "-ub 32", "-ub 64"],
        ["sweep", "-c", "64", "-ub", "32"],
    ],
    ids=lambda a: a[0],
)
def test_bad_thread_count_is_one_line(stories_model, tmp_path, capsys, argv):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    argv = [a.replace("{text}", str(text)) for a in argv]
    assert main([*argv, "-m", str(stories_model), "--device", "cpu", "-t", "0"]) == 1
    err = capsys.readouterr().err
    assert "thread count must be an integer >= 1, got 0" in err and "Traceback" not in err

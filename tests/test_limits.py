"""Limits on the sizes a user gives, checked before the work starts with a message that names the
limit and the fix (kiln.limits, kiln.fileio, the bench/ppl/make-model commands, chat template
rendering), and hostile inputs that used to end in a traceback, a hang or a silently wrong
number: corrupt history files, --record/--history combinations, KL-divergence bases holding
NaN or infinite log-probabilities."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import time

import numpy as np
import pytest
import torch

from kiln import limits
from kiln.bench import history as H
from kiln.bench import perplexity as P
from kiln.cli import main
from kiln.errors import UsageError
from kiln.tokenizer.chat_template import ChatTemplateError, render_chat

TINY = "synthetic:tiny-llama:q8_0"  # trained context 2048
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
    "One day, she saw a big red ball in the park. She ran to the ball and kicked it very high. "
    "Her friend Tom came to play with her. They played with the ball all day long.\n"
) * 4


def _fails(capsys, argv: list[str], *words: str, seconds: float = 30.0) -> str:
    """The command ends at once (well before any real work) with one line naming `words`."""
    start = time.perf_counter()
    assert main(argv) == 1
    assert time.perf_counter() - start < seconds
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # progress lines may come before: the error is one line
    assert " error: " in last and err.count(" error: ") == 1, err
    for w in words:
        assert w in last, err
    return out


@pytest.fixture
def no_memory(monkeypatch):
    """Every device reports 1 MiB free."""
    monkeypatch.setattr(limits, "free_memory", lambda device: 1 << 20)


# -- kiln bench / ab / sweep: the context and the memory ------------------------------------------
@pytest.mark.parametrize(
    ("sizes", "n_ctx"),
    [
        (["-d", "100000000", "-p", "4", "-n", "0"], 100000004),  # was killed for memory at 49 s
        (["-p", "0", "-n", "100000000"], 100000000),  # ran for ever
        (["-p", "2049", "-n", "0"], 2049),  # one past the trained context
        (["-p", "0", "-n", "0", "-pg", "2000,49"], 2049),
        (["-p", "16", "-n", "0", "-d", "0,1024,2040"], 2056),  # the largest of a list
    ],
)
def test_bench_sizes_beyond_the_models_context_fail_before_anything_runs(capsys, sizes, n_ctx):
    out = _fails(
        capsys,
        ["bench", "-m", TINY, "-r", "1", *sizes],
        f"needs a context of {n_ctx} tokens, more than the 2048",
        "lower -d, -p, -n or -pg",
    )
    assert "|" not in out  # no table row: nothing ran


def test_bench_refuses_what_does_not_fit_in_memory(capsys, no_memory):
    _fails(
        capsys,
        ["bench", "-m", TINY, "-p", "16", "-n", "0", "-r", "1"],
        "needs",
        "of memory is free on cpu",
        "KV cache of 16 tokens",
    )


def test_ab_sizes_and_check_tokens_are_bounded_too(capsys):
    ab = ["ab", "-m", TINY, "-r", "2", "-p", "0", "-n", "4", "-ub 32", "-ub 64"]
    _fails(capsys, [*ab, "-d", "100000000"], "needs a context of 100000004 tokens")
    _fails(capsys, [*ab, "--check-tokens", "100000000"], "--check-tokens 100000000", "2048")


def test_synthetic_layers_and_in_memory_models_are_bounded(capsys, no_memory):
    from kiln.gguf.synthetic import build_model

    _fails(capsys, ["bench", "-m", "synthetic:qwen3-8b:q4_k_m:100000"], "more than 512")
    with pytest.raises(UsageError, match=r"qwen3-8b synthetic q4_k_m.*36 layers.*memory is free"):
        build_model("qwen3-8b", "q4_k_m")  # 5 GB: refused before a single tensor is made


def test_sweep_refuses_a_cache_that_does_not_fit(capsys, stories_model, no_memory):
    _fails(
        capsys,
        ["sweep", "-m", str(stories_model), "-c", "512", "-ub", "64", "--device", "cpu"],
        "a sweep of",
        "memory is free",
        "lower -c",
    )


def test_every_kv_cache_is_checked_against_free_memory(capsys, stories_model, monkeypatch):
    """The net under every command: a KV cache (kiln run, chat, ppl, the LLM API) larger than
    the free memory is a UsageError naming its size, not an allocation the kernel kills."""
    from kiln.llm import LLM
    from kiln.runtime.kv_pool import KVPool

    llm = LLM(stories_model, device="cpu", n_ctx=512)
    need = limits.kv_cache_bytes(llm.config, 512)
    monkeypatch.setattr(limits, "free_memory", lambda device: need - 1)
    with pytest.raises(UsageError, match=r"a KV cache of \d+ tokens"):
        KVPool(llm.config, 512, 1, torch.device("cpu"), initial_tokens=512)
    monkeypatch.setattr(limits, "free_memory", lambda device: 1 << 10)
    _fails(capsys, ["run", "-m", str(stories_model), "-p", "Once", "-n", "4"], "KV cache")


# -- make-model and quantize: layers and disk space -----------------------------------------------
@pytest.mark.parametrize("layers", ["0", "-3", "513", "100000"])
def test_make_model_bounds_the_layers(capsys, tmp_path, layers):
    out = tmp_path / "m.gguf"
    argv = ["make-model", "--preset", "tiny-llama", "--type", "q8_0", "-o", str(out)]
    _fails(capsys, [*argv, "--layers", layers], "--layers must be")
    assert not out.exists()


@pytest.fixture
def small_disk(monkeypatch):
    """The output's disk has 10 MB free."""
    from kiln import fileio

    class Usage:
        total, used, free = 1 << 40, (1 << 40) - 10_000_000, 10_000_000

    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: Usage)


def test_make_model_checks_the_disk_before_writing(capsys, tmp_path, small_disk):
    """Was: a 118 GB file started on a 73 GB disk. The real qwen3-8b shapes (5 GB) on a disk
    with 10 MB free: refused at once, nothing left behind."""
    out = tmp_path / "big.gguf"
    argv = ["make-model", "--preset", "qwen3-8b", "--type", "q4_k_m", "-o", str(out), "--quiet"]
    _fails(capsys, argv, "the model needs about 5.", "GB but", "10.0 MB free")
    assert list(tmp_path.iterdir()) == []


def test_quantize_and_the_kld_base_check_the_disk(capsys, tmp_path, small_disk, stories_model):
    out = tmp_path / "q.gguf"
    # stories260K as F32 is 1 MB: it fits 10 MB less the 64 MiB margin only on a bigger disk
    _fails(capsys, ["quantize", str(stories_model), str(out), "f32", "--quiet"], "needs about")
    text = tmp_path / "story.txt"
    text.write_text(STORY)
    base = tmp_path / "b.kld"
    argv = ["ppl", "-m", str(stories_model), "-f", str(text), "-c", "64"]
    _fails(capsys, [*argv, "--kl-divergence-base", str(base)], "KL-divergence base file needs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["story.txt"]


# -- ppl -f: bounded reads ------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_ppl_refuses_a_device_as_text(capsys, stories_model, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    _fails(capsys, ["ppl", "-m", str(stories_model), "-f", device], "is a device", seconds=10)


def test_text_reads_are_bounded_for_files_and_pipes(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("x" * 5000)
    with pytest.raises(UsageError, match="holds more than 4096 bytes of text"):
        P.read_text(big, max_bytes=4096)
    assert len(P.read_text(big, max_bytes=5000)) == 5000

    fifo = tmp_path / "endless"
    os.mkfifo(fifo)
    stop = threading.Event()

    def feed():  # an endless writer, like `yes | kiln ppl -f /dev/stdin`
        try:
            with open(fifo, "wb") as f:
                while not stop.is_set():
                    f.write(b"y\n" * 4096)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with pytest.raises(UsageError, match="holds more than 1 MiB of text"):
            P.read_text(fifo, max_bytes=1 << 20)
    finally:
        stop.set()
        writer.join(timeout=10)


# -- chat templates: bounded renders --------------------------------------------------------------
MSGS = [{"role": "user", "content": "hi"}]
HOSTILE = {
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "steps",
    ),
    "filtered nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}{% endfor %}",
        "steps",
    ),
    "loops over a built list": (
        "{% set xs = ('x' * 99999)|list %}{% for a in xs %}{% for b in xs %}{% endfor %}"
        "{% endfor %}",
        "steps",
    ),
    "repetition": ("{{ 'x' * 1000000000 }}", "repetition would make 1000000000 characters"),
    "list repetition": ("{{ ([1] * 1000000000)|length }}", "repetition"),
    "power": ("{{ 7 ** 100000000 }}", "bits"),
    "percent width": ("{{ '%0999999999d' % 1 }}", "width or precision"),
    "percent star": ("{{ '%*d' % (999999999, 1) }}", "'*' width"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", "width or precision"),
    "ljust": ("{{ 'a'.ljust(999999999) }}", "str.ljust"),
    "center filter": ("{{ 'x'|center(999999999) }}", "center"),
    "indent filter": ("{{ 'x'|indent(999999999, true) }}", "indent"),
    "format filter": ("{{ '%*d'|format(999999999, 1) }}", "'*' width"),
    "replace": ("{{ ('a' * 100000)|replace('a', 'b' * 1000) }}", "replace"),
    "long output": ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "output passed"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_templates_stop_with_the_limit_named(case):
    source, words = HOSTILE[case]
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="was stopped") as e:
        render_chat(source, MSGS)
    assert words in str(e.value) and "render_limits" in str(e.value)
    assert time.perf_counter() - start < 30


def test_real_templates_render_as_before():
    """The limits change nothing for a real template: Qwen2's (from its vocabulary file) and
    a tool-using ChatML loop render exactly as plain Jinja renders them."""
    from kiln.gguf.header import parse_header
    from kiln.tokenizer.chat_template import compile_template
    from tests.conftest import shared_path

    source = parse_header(shared_path("vocab", "ggml-vocab-qwen2.gguf")).metadata[
        "tokenizer.chat_template"
    ]
    msgs = [
        {"role": "system", "content": "be brief"},
        *[{"role": r, "content": f"turn {i}"} for i in range(200) for r in ("user", "assistant")],
    ]
    plain = compile_template(source).render(
        messages=msgs, add_generation_prompt=True, tools=None, documents=None
    )
    assert render_chat(source, msgs) == plain
    padded = "{{ 'x'.ljust(40) }}{{ '%5d' % 3 }}{{ 'ab' * 3 }}{{ 2 ** 10 }}|{{ 'a'|center(9) }}"
    assert render_chat(padded, MSGS) == "x" + " " * 39 + "    3ababab1024|    a    "


# -- history files: corrupt and hostile -----------------------------------------------------------
GOOD = {"commit": "a" * 40, "avg_ts": 10.0, "test": "tg128", "samples_ts": [9.0, 11.0]}


def _line(**kw) -> str:
    return json.dumps({**GOOD, **kw}) + "\n"


BAD_HISTORIES = {
    "truncated": (_line() + '{"commit": "abc', ":2: not a JSON line", "cut short"),
    "not json": (_line() + "hello\n", ":2: not a JSON line", ""),
    "not an object": ("[1, 2]\n", ":1: not a history record", ""),
    "no avg_ts": ('{"commit": "x"}\n', ":1: not a history record: needs commit and avg_ts", ""),
    "avg_ts a string": (_line(avg_ts="fast"), ":1:", "avg_ts must be a finite number"),
    "avg_ts infinite": (_line().replace("10.0", "1e999"), ":1:", "avg_ts must be a finite"),
    "avg_ts NaN": (_line().replace("10.0", "NaN"), ":1:", "avg_ts must be a finite"),
    "commit a number": (_line(commit=5), ":1:", "commit must be a non-empty string"),
    "samples not numbers": (_line(samples_ts=["x"]), ":1:", "samples_ts must be a list"),
    "samples a dict": (_line(samples_ts={"a": 1}), ":1:", "samples_ts must be a list"),
    "n_batch a list": (_line(n_batch=[1]), ":1:", "n_batch must be an integer"),
    "n_prompt negative": (_line(n_prompt=-1), ":1:", "n_prompt must be an integer >= 0"),
    "dirty a string": (_line(dirty="yes"), ":1:", "dirty must be true or false"),
    "device a number": (_line(device_name=3), ":1:", "device_name must be a string"),
    "deep nesting": ("[" * 100000 + "]" * 100000 + "\n", ":1:", "nested too deeply"),
    "binary": (b"\xff\xfe\x00garbage\n", ":1: not UTF-8", ""),
}


@pytest.mark.parametrize("case", list(BAD_HISTORIES))
@pytest.mark.parametrize("action", [["list"], ["compare", "a", "b"], ["plot", "-o", "p.png"]])
def test_corrupt_history_files_name_the_file_and_line(capsys, tmp_path, monkeypatch, case, action):
    monkeypatch.chdir(tmp_path)
    text, where, words = BAD_HISTORIES[case]
    path = tmp_path / "h.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = ["history", action[0], "--history", str(path), *action[1:]]
    _fails(capsys, argv, f"{path}{where}", words)
    assert not (tmp_path / "p.png").exists()


def test_history_size_limits_and_non_files(capsys, tmp_path, monkeypatch):
    path = tmp_path / "h.jsonl"
    monkeypatch.setattr(H, "MAX_LINE_BYTES", 1000)
    path.write_text(_line() + _line(pad="x" * 2000))
    _fails(capsys, ["history", "list", "--history", str(path)], f"{path}:2:", "longer than 1000")
    monkeypatch.setattr(H, "MAX_FILE_BYTES", 500)
    path.write_text(_line() * 10)
    _fails(capsys, ["history", "list", "--history", str(path)], "more than the 500 bytes")
    _fails(capsys, ["history", "list", "--history", str(tmp_path)], "is a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _fails(capsys, ["history", "list", "--history", str(fifo)], "not a regular file", seconds=10)


def test_record_and_history_flag_combinations(capsys, tmp_path):
    bench = ["bench", "-m", TINY, "-p", "4", "-n", "0", "-r", "1", "--no-warmup"]
    _fails(capsys, [*bench, "--record", "--history", str(tmp_path)], "is a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _fails(capsys, [*bench, "--record", "--history", str(fifo)], "FIFO")
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "elsewhere.jsonl")
    _fails(capsys, [*bench, "--record", "--history", str(link)], "symbolic link")
    _fails(capsys, [*bench, "--history", str(tmp_path / "h.jsonl")], "add --record")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.jsonl"]


# -- KL divergence: NaN, infinities, damaged bases ------------------------------------------------
@pytest.fixture(scope="module")
def stories_llm(stories_model):
    from kiln.llm import LLM

    return LLM(stories_model, device="cpu", n_ctx=64)


@pytest.fixture
def base_file(stories_llm, tmp_path):
    path = tmp_path / "base.kld"
    P.save_kld_base(stories_llm, STORY, path, n_ctx=64, n_chunks=2)
    return path


def _row_head_offset(path, chunk: int, token: int) -> int:
    base = P.read_kld_base(path)
    start = len(P.KLD_MAGIC) + 12 + 4 * base.tokens.size
    return start + 2 * (chunk * P.n_scored(64) + token) * P.row_width(base.n_vocab)


@pytest.mark.parametrize(
    ("scale", "low"), [(math.nan, -3.0), (math.inf, -3.0), (1e-4, -math.inf), (-1.0, -3.0)]
)
def test_kld_against_a_base_of_nan_or_inf_log_probs_is_an_error(
    capsys, stories_model, base_file, scale, low
):
    """llama.cpp writes NaN logits into its base as they come; the old reader turned them into
    log-probs the KLD sum leaves out, and printed Mean KLD 0."""
    data = bytearray(base_file.read_bytes())
    at = _row_head_offset(base_file, 1, 5)
    data[at : at + 8] = struct.pack("<ff", scale, low)
    base_file.write_bytes(bytes(data))
    argv = ["ppl", "-m", str(stories_model), "-c", "64"]
    out = _fails(
        capsys,
        [*argv, "--kl-divergence-base", str(base_file), "--kl-divergence"],
        "chunk 2, scored token 5",
        "NaN or infinite",
    )
    assert "Mean    KLD" not in out


@pytest.mark.parametrize("change", [-1, 1, -4096])
def test_a_truncated_or_extended_base_is_an_error(capsys, stories_model, base_file, change):
    data = base_file.read_bytes()
    base_file.write_bytes(data[:change] if change < 0 else data + b"\0" * change)
    argv = ["ppl", "-m", str(stories_model), "--kl-divergence-base", str(base_file)]
    _fails(capsys, [*argv, "--kl-divergence"], "truncated or damaged")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_logits_stop_ppl_kld_and_the_base_writer(
    stories_llm, base_file, tmp_path, monkeypatch, bad
):
    real = P.scored_logits

    def broken(*args, **kwargs):
        for i, (logits, targets) in enumerate(real(*args, **kwargs)):
            if i == 1:
                logits = logits.clone()
                logits[3, 7] = bad
            yield logits, targets

    monkeypatch.setattr(P, "scored_logits", broken)
    with pytest.raises(UsageError, match=r"logits of chunk 2 hold 1 NaN or infinite"):
        P.perplexity(stories_llm, STORY, n_ctx=64, n_chunks=2)
    with pytest.raises(UsageError, match="logits of chunk 2"):
        P.kl_divergence(stories_llm, base_file)
    out = tmp_path / "new.kld"
    with pytest.raises(UsageError, match="logits of chunk 2"):
        P.save_kld_base(stories_llm, STORY, out, n_ctx=64, n_chunks=2)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base.kld"]


def test_a_sound_base_still_gives_a_kld_of_zero_against_itself(stories_llm, base_file):
    stats = P.kl_divergence(stories_llm, base_file)
    assert stats.n_tokens == 2 * P.n_scored(64)
    assert 0 <= stats.kld < 1e-3 and np.isfinite(stats.kld)


@pytest.mark.parametrize("kind", ["/dev/zero", "directory", "too long", "missing"])
def test_sweep_files_are_read_with_the_same_bounds(kind, tmp_path):
    """kiln sweep --overlay / read_sweeps reads through kiln.fileio.read_input_text like -f and
    templates: a device ends at once instead of reading without end."""
    from kiln.bench import sweep

    path = {
        "/dev/zero": "/dev/zero",
        "directory": str(tmp_path),
        "too long": str(tmp_path / "big.jsonl"),
        "missing": str(tmp_path / "nope.jsonl"),
    }[kind]
    words = {
        "/dev/zero": "is a device",
        "directory": "is a directory",
        "too long": "holds more than",
        "missing": "no such file",
    }[kind]
    if kind == "/dev/zero" and not os.path.exists(path):
        pytest.skip("no /dev/zero here")
    if kind == "too long":
        with open(path, "wb") as f:
            f.truncate(sweep.MAX_SWEEP_BYTES + 1)
    with pytest.raises(UsageError, match=words):
        sweep.read_sweeps(path)

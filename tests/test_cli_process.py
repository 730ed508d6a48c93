"""The `kiln` command as a real process whose standard streams misbehave: a reader that goes away
(`kiln run ... | head -c 10`), descriptors closed at start (`>&-`, `<&-`), a full disk (`>
/dev/full`). Each ends with one line (or, for a gone reader, silence) and no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.gguf.synthetic import build_model
from kiln.gguf.writer import write_gguf

KILN = [sys.executable, "-m", "kiln"]
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _sh(redirect: str, *argv: str) -> subprocess.CompletedProcess:
    """argv run by sh with a redirection such as '>&-' (a descriptor closed at start)."""
    script = f'exec "$@" {redirect}'
    return subprocess.run(
        ["sh", "-c", script, "sh", *argv], capture_output=True, text=True, env=ENV, timeout=120
    )


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """tiny-qwen2: a chat template, so that `kiln chat` reaches its input."""
    path = tmp_path_factory.mktemp("m") / "tiny-qwen2.gguf"
    write_gguf(build_model("tiny-qwen2", "q8_0"), path, progress=False)
    return path


def test_a_reader_that_goes_away_ends_the_run_quietly(stories_model):
    argv = ["run", "-m", str(stories_model), "--device", "cpu", "-p", "Once upon a time"]
    argv += ["-n", "400", "--ignore-eos", "--temp", "0", "-c", "512"]
    proc = subprocess.Popen([*KILN, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout.read(10) == b"Once upon "  # as `| head -c 10`
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE
    _no_traceback(err.decode())
    assert "error" not in err.decode()


def test_output_buffered_until_exit_into_a_closed_pipe(stories_model):
    # `kiln info` prints at once and exits: the write fails only in the final flush
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        run = subprocess.run(
            [*KILN, "info", str(stories_model)], stdout=write, stderr=subprocess.PIPE,
            env=ENV, timeout=120, text=True,
        )  # fmt: skip
    finally:
        os.close(write)
    assert run.returncode == 128 + signal.SIGPIPE
    _no_traceback(run.stderr)


def test_closed_stdout(stories_model):
    run = _sh(">&-", *KILN, "info", str(stories_model))
    assert run.returncode == 1
    _no_traceback(run.stderr)
    assert run.stderr == (
        "kiln info: error: standard output is closed (the command was started with >&-)\n"
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["info", "run"])
def test_a_full_disk_on_stdout(command, stories_model):
    argv = ["info", str(stories_model)]
    if command == "run":
        argv = ["run", "-m", str(stories_model), "--device", "cpu", "-p", "Once", "-n", "2"]
    with open("/dev/full", "w") as full:
        run = subprocess.run(
            [*KILN, *argv], stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, timeout=120
        )
    assert run.returncode == 1
    _no_traceback(run.stderr)
    last = run.stderr.splitlines()[-1]
    assert last == f"kiln {command}: error: cannot write the output: No space left on device"


def test_closed_stdin(chat_model):
    chat = _sh("<&-", *KILN, "chat", "-m", str(chat_model), "--device", "cpu")
    assert chat.returncode == 1
    _no_traceback(chat.stderr)
    assert chat.stderr.endswith(
        "kiln chat: error: standard input is closed (the command was started with <&-)\n"
    ), chat.stderr
    run = _sh("<&-", *KILN, "run", "-m", str(chat_model), "--device", "cpu")  # no -p: stdin
    assert run.returncode == 1
    _no_traceback(run.stderr)
    assert "kiln run: error: no prompt" in run.stderr

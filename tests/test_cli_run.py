"""`kiln run` and `kiln chat` as a user runs them (in-process, and once as a real process)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from kiln.cli import main


def test_run_streams_text_and_prints_speed(stories_model, capsys):
    args = ["run", "-m", str(stories_model), "-p", "Once upon a time", "-n", "12", "--temp", "0"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Once upon a time")
    assert len(captured.out) > len("Once upon a time") + 10
    assert "prompt:" in captured.err and "t/s" in captured.err
    assert "generation: 12 tokens" in captured.err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--temp", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["-p", ""], "prompt is empty"),
        (["-c", "99999"], "exceeds the 2048 tokens"),
        (["--device", "cuda:7"], "cuda"),
    ],
)
def test_run_bad_input_is_one_line_without_traceback(stories_model, capsys, flags, words):
    args = ["run", "-m", str(stories_model), "-p", "hello", "-n", "4", *flags]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_run_prompt_longer_than_context(stories_model, capsys):
    args = ["run", "-m", str(stories_model), "-p", "the dog ran " * 50, "-c", "32", "-n", "2"]
    assert main(args) == 1
    assert "--truncate" in capsys.readouterr().err
    assert main([*args, "--truncate"]) == 0


def test_chat_keeps_the_conversation(demo_model, capsys, monkeypatch):
    from kiln.llm import LLM

    seen: list[list[dict]] = []
    encode_chat = LLM.encode_chat

    def spy(self, messages, options=None):
        seen.append([dict(m) for m in messages])
        return encode_chat(self, messages, options)

    monkeypatch.setattr(LLM, "encode_chat", spy)
    lines = "My name is Ada.\n/reset\nHi.\nWhat is my name?\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(["chat", "-n", "16", "--temp", "0", "-c", "512", "--system", "Be brief."]) == 0
    turns = seen[1:]  # seen[0] is the start-up check of the template
    assert [m["role"] for m in turns[0]] == ["system", "user"]
    assert [m["role"] for m in turns[1]] == ["system", "user"]  # /reset forgot the first turn
    assert [m["role"] for m in turns[2]] == ["system", "user", "assistant", "user"]
    assert turns[2][1]["content"] == "Hi." and turns[2][2]["content"].strip()
    out = capsys.readouterr().out
    assert turns[2][2]["content"] in out  # what the model said is what the user saw


def test_chat_without_template_is_a_clear_error(stories_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "-m", str(stories_model)]) == 1
    err = capsys.readouterr().err
    assert "chat template" in err and "Traceback" not in err


def test_kiln_process_exit_code_and_message(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "info", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "broken.gguf" in proc.stderr and "Traceback" not in proc.stderr

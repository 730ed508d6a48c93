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
        (["--temp", "nan"], "temperature must be a finite number"),
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


# stories260K has no chat template of its own; this one writes an assistant turn the way its
# generation prompt begins it, so that each reply is a prefix of the next turn's prompt
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chat_keeps_the_conversation(stories_model, tmp_path, capsys, monkeypatch):
    """The messages of each turn (/reset forgets them), what the user saw, and the KV cache:
    a turn after the first prefills only its new tokens."""
    from kiln.llm import LLM
    from kiln.runtime.engine import Engine

    seen: list[list[dict]] = []
    prompts: list[list[int]] = []
    encode_chat = LLM.encode_chat

    def spy(self, messages, options=None, **template):
        seen.append([dict(m) for m in messages])
        prompts.append(encode_chat(self, messages, options, **template))
        return prompts[-1]

    prefilled: list[int] = []
    prefill = Engine.prefill

    def count(self, ids, cache, all_logits=False):
        prefilled.append(len(ids))
        return prefill(self, ids, cache, all_logits)

    monkeypatch.setattr(LLM, "encode_chat", spy)
    monkeypatch.setattr(Engine, "prefill", count)
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    lines = "My name is Ada.\n/reset\nHi.\nWhat is my name?\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    args = ["chat", "-m", str(stories_model), "--chat-template", str(template), "-n", "6"]
    assert main([*args, "--temp", "0", "-c", "256", "--system", "Be brief."]) == 0
    turns, ids = seen[1:], prompts[1:]  # [0] is the start-up check of the template
    assert [m["role"] for m in turns[0]] == ["system", "user"]
    assert [m["role"] for m in turns[1]] == ["system", "user"]  # /reset forgot the first turn
    assert [m["role"] for m in turns[2]] == ["system", "user", "assistant", "user"]
    assert turns[2][1]["content"] == "Hi." and turns[2][2]["content"].strip()
    captured = capsys.readouterr()
    assert turns[2][2]["content"] in captured.out  # what the model said is what the user saw
    # the first two turns (around /reset) start from nothing; the third extends the second
    assert prefilled[0] == len(ids[0]) and prefilled[1] == len(ids[1])
    assert prefilled[2] < len(ids[2]) - len(ids[1])
    assert "cached)" in captured.err.splitlines()[-1]


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

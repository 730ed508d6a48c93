"""Safe file writes (kiln.fileio) and every command that writes a file: the output appears whole
or not at all, never through a link, a device, a FIFO or a directory; two writers of one path
leave exactly one of their files; a planted temporary name redirects nothing.

Device nodes are made with mknod inside tmp_path (a copy of /dev/null's numbers), never the
real /dev/null, so a failing check cannot replace a system file."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from kiln import fileio
from kiln.cli import main
from kiln.errors import UsageError
from kiln.gguf.reader import read_gguf
from kiln.gguf.synthetic import build_model
from kiln.gguf.writer import write_gguf


# -- targets of every kind ------------------------------------------------------------------------
def _fifo(tmp_path: Path) -> Path:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return p


def _device(tmp_path: Path) -> Path:
    p = tmp_path / "null-copy"
    try:
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here ({e}); the FIFO case covers the class")
    return p


def _dir(tmp_path: Path) -> Path:
    p = tmp_path / "folder"
    p.mkdir()
    return p


def _link_to_file(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(victim)
    return link


def _link_to_dir(tmp_path: Path) -> Path:
    link = tmp_path / "link-dir"
    link.symlink_to(_dir(tmp_path))
    return link


def _link_to_fifo(tmp_path: Path) -> Path:
    link = tmp_path / "link-fifo"
    link.symlink_to(_fifo(tmp_path))
    return link


def _dangling_link(tmp_path: Path) -> Path:
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "not-there")
    return link


BAD_TARGETS = {
    "fifo": (_fifo, "FIFO"),
    "device": (_device, "a device"),
    "directory": (_dir, "is a directory"),
    "link to a file": (_link_to_file, "symbolic link"),
    "link to a directory": (_link_to_dir, "symbolic link"),
    "link to a fifo": (_link_to_fifo, "symbolic link"),
    "dangling link": (_dangling_link, "symbolic link"),
}


def _snapshot(tmp_path: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under tmp_path: (mode, inode, content of regular files)."""
    out = {}
    for p in sorted(tmp_path.rglob("*")):
        st = os.lstat(p)
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(p.relative_to(tmp_path))] = (st.st_mode, st.st_ino, data)
    return out


# -- atomic_output --------------------------------------------------------------------------------
def test_a_new_file_appears_whole_with_the_umask_mode_and_no_temporary_left(tmp_path):
    out = tmp_path / "new.bin"
    with fileio.atomic_output(out) as f:
        f.write(b"abc")
        assert not out.exists()  # nothing under the name until the block ends
    assert out.read_bytes() == b"abc"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.bin"]


def test_an_existing_file_is_replaced_keeping_its_mode(tmp_path):
    out = tmp_path / "old.txt"
    out.write_text("old")
    out.chmod(0o640)
    fileio.write_text(out, "new")
    assert out.read_text() == "new"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


@pytest.mark.parametrize("kind", list(BAD_TARGETS))
def test_every_target_but_a_regular_file_or_new_name_is_refused_before_writing(tmp_path, kind):
    make, words = BAD_TARGETS[kind]
    target = make(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(UsageError, match=words):
        with fileio.atomic_output(target) as f:
            f.write(b"x" * 10)
    with pytest.raises(UsageError, match=words):
        fileio.append_to(target, "line\n")
    assert _snapshot(tmp_path) == before  # nothing replaced, nothing written, no temporary left


def test_a_missing_folder_and_an_empty_name_are_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        fileio.write_bytes(tmp_path / "no" / "such" / "x.bin", b"x")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is not a directory"):
        fileio.write_bytes(tmp_path / "file" / "x.bin", b"x")
    with pytest.raises(UsageError, match="not a file name"):
        fileio.write_bytes("", b"x")


def test_an_error_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "keep.txt"
    out.write_text("old")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with fileio.atomic_output(out, "w") as f:
                f.write("half")
                raise exc
        assert out.read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_failed_write_is_one_usage_error_and_leaves_nothing(tmp_path, code):
    out = tmp_path / "full.bin"
    with pytest.raises(UsageError, match=f"cannot write the thing {out}"):
        with fileio.atomic_output(out, what="the thing"):
            raise OSError(code, os.strerror(code))
    assert list(tmp_path.iterdir()) == []


def test_the_disk_space_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    free = 100 << 20

    class Usage:
        total, used = 1 << 40, (1 << 40) - free

    Usage.free = free
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(UsageError, match=r"needs about 200\.0 MB but .* has 104\.9 MB free"):
        with fileio.atomic_output(tmp_path / "big.bin", size=200_000_000):
            pytest.fail("the block must not run")
    assert list(tmp_path.iterdir()) == []
    fileio.write_bytes(tmp_path / "small.bin", b"x" * 1000)  # well within: written


def test_a_planted_temporary_name_redirects_nothing(tmp_path):
    """The old writer used a fixed OUT.partial: a link planted there sent the model into the
    link's target. Every such name must be left alone."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.gguf"
    for name in ("out.gguf.partial", "out.gguf.tmp", ".out.gguf.tmp"):
        (tmp_path / name).symlink_to(victim)
    model = build_model("tiny-llama", "f16")
    write_gguf(model, out, progress=False)
    assert victim.read_text() == "precious"
    assert read_gguf(out).tensors.keys() == model.tensors.keys()
    assert all((tmp_path / n).is_symlink() for n in ("out.gguf.partial", ".out.gguf.tmp"))


def test_two_writers_of_one_path_leave_exactly_one_whole_model(tmp_path):
    """Two models of different sizes written to one path at the same moment, repeatedly: the
    file is always byte for byte one of them (the old .partial writer spliced them)."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    models = {"f16": build_model("tiny-llama", "f16"), "f32": build_model("tiny-llama", "f32")}
    write_gguf(models["f16"], a, progress=False)
    write_gguf(models["f32"], b, progress=False)
    expected = {a.read_bytes(), b.read_bytes()}
    out = tmp_path / "out.gguf"

    def write(model, barrier, errors):
        barrier.wait()
        try:
            write_gguf(model, out, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    for _ in range(4):
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=write, args=(m, barrier, errors)) for m in models.values()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert out.read_bytes() in expected
        read_gguf(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "out.gguf"]


# -- append_to ------------------------------------------------------------------------------------
def test_append_keeps_every_line_of_concurrent_writers_and_mends_a_cut_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"cut": ')  # a previous write cut short
    lines_per_thread, n_threads = 50, 4

    def work(k):
        for i in range(lines_per_thread):
            fileio.append_to(path, json.dumps({"t": k, "i": i, "pad": "x" * 500}) + "\n")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert lines[:2] == ['{"a": 1}', '{"cut": ']  # the cut line stays alone on its line
    records = [json.loads(line) for line in lines[2:]]
    assert sorted((r["t"], r["i"]) for r in records) == sorted(
        (k, i) for k in range(n_threads) for i in range(lines_per_thread)
    )


# -- the commands that write files ----------------------------------------------------------------
def _refused(capsys, argv: list[str], words: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


COMMANDS = {
    "quantize": lambda src, out: ["quantize", str(src), str(out), "--type", "q8_0", "--quiet"],
    "make-model": lambda src, out: [
        "make-model",
        "--preset",
        "tiny-llama",
        "--type",
        "q8_0",
        "-o",
        str(out),
        "--quiet",
    ],  # fmt: skip
    "ppl base": lambda src, out: [
        "ppl",
        "-m",
        str(src),
        "-f",
        str(src),
        "--kl-divergence-base",
        str(out),
    ],  # fmt: skip
    "sweep --save": lambda src, out: [
        "sweep",
        "-m",
        "synthetic:tiny-llama:q8_0",
        "-c",
        "64",
        "-ub",
        "32",
        "--save",
        str(out),
    ],  # fmt: skip
    "sweep --plot": lambda src, out: [
        "sweep",
        "-m",
        "synthetic:tiny-llama:q8_0",
        "-c",
        "64",
        "-ub",
        "32",
        "--plot",
        str(out),
    ],  # fmt: skip
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "link to a file"])
def test_commands_refuse_a_bad_output_before_any_work(tmp_path, capsys, command, kind):
    make, words = BAD_TARGETS[kind]
    target = make(tmp_path)
    if command == "sweep --plot":  # a plot's name must end in .png: the kind is what is refused
        target = target.rename(target.with_name(target.name + ".png"))
    src = tmp_path / "in.gguf"
    write_gguf(build_model("tiny-llama", "f16"), src, progress=False)
    before = _snapshot(tmp_path)
    _refused(capsys, COMMANDS[command](src, target), words)
    assert _snapshot(tmp_path) == before


def test_quantize_writes_through_the_safe_path(tmp_path, capsys, stories_model):
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(stories_model), str(out), "--type", "f16", "--quiet"]) == 0
    assert read_gguf(out).metadata["general.file_type"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


def test_history_plot_refuses_a_bad_output(tmp_path, capsys):
    hist = tmp_path / "h.jsonl"
    hist.write_text(json.dumps({"commit": "a" * 40, "avg_ts": 1.0, "test": "tg1"}) + "\n")
    fifo = _fifo(tmp_path)
    link = tmp_path / "plot.png"
    link.symlink_to(tmp_path / "elsewhere.png")
    folder = tmp_path / "d.png"
    folder.mkdir()
    fifo = fifo.rename(tmp_path / "fifo.png")
    for out, words in ((fifo, "FIFO"), (link, "symbolic link"), (folder, "is a directory")):
        _refused(capsys, ["history", "plot", "--history", str(hist), "-o", str(out)], words)
    assert not (tmp_path / "elsewhere.png").exists()
    _refused(capsys, ["history", "plot", "--history", str(hist), "-o", "x.nope"], ".png")
    assert main(["history", "plot", "--history", str(hist), "-o", str(tmp_path / "p.svg")]) == 0
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")

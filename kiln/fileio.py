"""Every file Kiln writes goes through here: models (quantize, make-model, the GGUF writer), the
KL-divergence base, sweep results, plots, and the performance history.

Whole files (`atomic_output`): the bytes go to a temporary file created exclusively in the
target's folder (tempfile.mkstemp: O_CREAT | O_EXCL | O_NOFOLLOW, a random name, so no other run
and no planted link can share it), which is flushed and fsync'ed, then renamed over the target
with os.replace (atomic within a filesystem) and the folder fsync'ed. Readers see the old file
or the new one, never a mixture; two runs writing the same path each write their own temporary
file and the last rename wins whole. On any error (or Ctrl-C) the temporary file is removed. A
run killed outright (SIGKILL, power loss) can leave a hidden `.NAME.XXXXXXXX.tmp` beside the
target; it is never reused, and may be deleted.

Appended files (`append_to`: the history, one JSON line per result): a rewrite-and-rename would
lose the lines of a second run appending at the same time, so records are appended instead, in
one write under an exclusive lock (flock), opened with O_APPEND | O_NOFOLLOW.

The output path must be a new name or a regular file (which is replaced). Refused, before any
byte is written: a directory, a device (/dev/null, /dev/sda), a FIFO or socket, and any
symbolic link, even one to a regular file. llama.cpp's tools open the output with fopen, which
writes through a link into its target (and, as root, into a device); Kiln replaces the file
whole by renaming, which would turn the link into a plain file and leave its target as it was,
so instead it says so and asks for the target's own path. A regular file with other hard links
is replaced under this name only (the other names keep the old bytes), as any rename does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from kiln.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

# Room left free beyond an estimated output size: filesystems need some for their own metadata,
# and a disk filled to the last byte breaks other programs.
DISK_MARGIN = 64 << 20
# errno values that mean the write itself failed (as opposed to a bug in the producer).
_WRITE_ERRORS = {
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
}  # fmt: skip


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def check_output_path(path: str | os.PathLike[str], what: str = "output") -> Path:
    """The output path, checked before any work: a new name in an existing folder, or a regular
    file (replaced). Raises UsageError naming `what` (e.g. "the quantized model") otherwise."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise UsageError(f"{what}: {str(path)!r} is not a file name; give a path such as out.gguf")
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise UsageError(f"cannot write {what} {p}: {e.strerror or e}") from None
    if st is None:
        folder = p.parent
        if not folder.is_dir():
            why = "is not a directory" if folder.exists() else "does not exist"
            raise UsageError(f"cannot write {what} {p}: the folder {folder} {why}")
        return p
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        raise UsageError(
            f"{what} {p} is a symbolic link (to {target}); Kiln replaces output files whole and "
            f"does not write through links (llama.cpp's tools would write into the link's "
            f"target): give the target's own path, or remove the link"
        )
    kind = _kind(st.st_mode)
    if kind == "a directory":
        raise UsageError(f"{what} {p} is a directory; give a file name inside it")
    if kind is not None:
        raise UsageError(
            f"{what} {p} is {kind}, not a regular file; Kiln writes only regular files (a new "
            f"name, or an existing file it replaces)"
        )
    return p


def check_disk_space(folder: str | os.PathLike[str], nbytes: int, what: str = "output") -> None:
    """UsageError unless `folder`'s filesystem has nbytes (+ DISK_MARGIN) free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the write itself will tell
    if nbytes + DISK_MARGIN > free:
        raise UsageError(
            f"{what} needs about {_size(nbytes)} but {folder} has {_size(free)} free "
            f"(keeping {_size(DISK_MARGIN)} spare): free some space, or write to another disk"
        )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _default_mode() -> int:
    """0o666 less the umask: what open() would give a new file."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return 0o666 & ~mask


def _write_error(e: OSError, p: Path, what: str) -> UsageError:
    reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or e
    return UsageError(
        f"cannot write {what} {p}: {reason}; check that its folder is writable and has room"
    )


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    what: str = "output",
    size: int | None = None,
    encoding: str | None = "utf-8",
) -> Iterator[IO[Any]]:
    """A file object whose bytes become `path` only when the block ends without an error.

    mode: "wb" or "w" (text, `encoding`). size: the expected size in bytes, checked against the
    free disk space before anything is written. See the module docstring for the rules."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_output writes with mode 'wb' or 'w', not {mode!r}")
    p = check_output_path(path, what)
    if size is not None:
        check_disk_space(p.parent, size, what)
    try:
        existing = os.stat(p, follow_symlinks=False)
        perms = stat.S_IMODE(existing.st_mode)
    except OSError:
        perms = _default_mode()
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name[:100]}.", suffix=".tmp")
    except OSError as e:
        raise UsageError(f"cannot write {what} {p}: {e.strerror or e}") from None
    f: IO[Any] | None = None
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, perms)
        if mode == "wb":
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding, newline="")
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        check_output_path(p, what)  # again: the path may have changed while we wrote
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except BaseException as e:
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        else:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno in _WRITE_ERRORS:
            raise _write_error(e, p, what) from None
        if isinstance(e, OSError) and e.filename in (tmp, str(p)):
            raise _write_error(e, p, what) from None
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (some filesystems refuse fsync on a directory: that is fine)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes, what: str = "output") -> Path:
    with atomic_output(path, "wb", what=what, size=len(data)) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, what: str = "output") -> Path:
    with atomic_output(path, "w", what=what) as f:
        f.write(text)
    return Path(path)


def append_to(path: str | os.PathLike[str], data: str | bytes, what: str = "output") -> Path:
    """Append `data` to `path` (created if new) in one write under an exclusive lock. When the
    file does not end with a newline (a write cut short), the data starts on a new line."""
    p = check_output_path(path, what)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    # O_NONBLOCK: a FIFO planted after the check must not block the open (it is refused below)
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(p, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            check_output_path(p, what)  # a link planted after the check: say so
        if e.errno in (errno.ENXIO, errno.EISDIR):
            check_output_path(p, what)
        raise _write_error(e, p, what) from None
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind is not None:
            raise UsageError(f"{what} {p} is {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) != b"\n":
            raw = b"\n" + raw
        view = memoryview(raw)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except OSError as e:
        raise _write_error(e, p, what) from None
    finally:
        os.close(fd)  # releases the lock
    return p


def read_input_text(
    path: str | os.PathLike[str],
    what: str,
    max_bytes: int,
    *,
    hint: str = "",
    errors: str = "strict",
) -> str:
    """The UTF-8 text of a file a user names (a prompt, a perplexity text, a chat template, a
    sweep file): a regular file or a FIFO (`<(...)`), at most max_bytes read, so /dev/zero or an
    endless pipe ends in an error instead of a hang. A missing file, a directory, a device or
    socket, a longer text or bytes that are not UTF-8 (with errors="strict") are a UsageError
    naming `what` and the file; `hint` is added to the too-long message (how to shorten)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UsageError(f"{what} {p}: no such file") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {p} is a directory, not a regular file: give a text file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise UsageError(f"{what} {p} is a device or socket, not a text file: give a text file")
    if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
        raise UsageError(_too_long(f"{what} {p}", max_bytes, hint))
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {p}: {e.strerror or e}") from None
    return decode_input_text(data, f"{what} {p}", max_bytes, hint=hint, errors=errors)


def decode_input_text(
    data: bytes, source: str, max_bytes: int, *, hint: str = "", errors: str = "strict"
) -> str:
    """The text of `data`, read from `source` (e.g. "the prompt on stdin") with at most
    max_bytes + 1 bytes asked for: more than max_bytes, or bytes that are not UTF-8 (with
    errors="strict"), are a UsageError naming the source (read_input_text's rules, for a
    stream the caller read)."""
    if len(data) > max_bytes:
        raise UsageError(_too_long(source, max_bytes, hint))
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UsageError(f"{source} is not UTF-8 text (bad byte at offset {e.start})") from None


def _too_long(source: str, max_bytes: int, hint: str) -> str:
    message = f"{source} holds more than {_binary_size(max_bytes)} of text, the most Kiln reads"
    return message + (f": {hint}" if hint else "")


def _binary_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"

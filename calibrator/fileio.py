"""Files in and out, one place for each.

In: :func:`input_file` is the one check every reader makes before it opens an input: the
path exists, is a regular file (a character device such as /dev/zero, a FIFO or a socket
would be read forever, or block), and is not absurdly large for what it is. :func:`read_bytes`
reads such a file whole.

Out: files are written whole or not at all: to a temporary file beside the target, then
renamed over it, so an interrupted run never leaves a half-written output. The temporary file
is created with the permissions the umask gives (as ``open`` would create the output) and is
named ``.<name>.calibrator-<pid>-<token>.tmp``, so that a later run can recognise one left by a
killed process and remove it (:func:`remove_stale_temporaries`)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from calibrator.errors import CalibratorError, shorten

KB, MB, GB = 1 << 10, 1 << 20, 1 << 30

#: the largest input of each kind read whole (real ones are far smaller); a caffemodel is
#: bounded by protobuf's own 2 GB message limit
SIZE_LIMITS = {
    "prototxt": 256 * MB, "label map": 64 * MB, "caffemodel": 2 * GB - 1,
    "list file": 1 * GB, "mean file": 1 * GB, "image": 1 * GB, "annotation": 64 * MB,
    "gate config": 64 * MB, "name/size file": 256 * MB, "search state": 1 * GB,
    "baseline": 256 * MB, "history": 1 * GB, "LMDB": 1 << 50,
}
DEFAULT_SIZE_LIMIT = 1 * GB

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def human_size(nbytes: float) -> str:
    """``3.2 GB`` (powers of 1024, as the limits are)."""
    value = float(nbytes)
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if value < 1024 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _stat(path: Path, what: str, follow: bool = True) -> os.stat_result | None:
    """``os.stat``, None if the path does not exist, a CalibratorError if it cannot be
    looked at (a name too long, a NUL character, a loop of links)."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:  # embedded NUL
        raise CalibratorError(f"{shorten(path)}: {what} path contains a NUL character") \
            from None
    except OSError as exc:
        raise CalibratorError(f"{shorten(path)}: cannot open {what}: "
                              f"{exc.strerror or exc}") from None


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists; a path the system cannot even look at (too long, NUL) is a
    CalibratorError naming it rather than an OSError."""
    return _stat(Path(path), "file") is not None


def input_file(path: str | os.PathLike, what: str, limit: int | None = None) -> Path:
    """``path`` checked as an input before it is opened: it exists, is a regular file and
    holds at most ``limit`` bytes (default by ``what``, see SIZE_LIMITS)."""
    path = Path(path)
    info = _stat(path, what)
    if info is None:
        raise CalibratorError(f"{shorten(path)}: {what} not found")
    if stat.S_ISDIR(info.st_mode):
        raise CalibratorError(f"{shorten(path)}: {what} is a folder, expected a file")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "special")
        raise CalibratorError(f"{shorten(path)}: {what} is not a regular file ({kind})")
    limit = SIZE_LIMITS.get(what, DEFAULT_SIZE_LIMIT) if limit is None else limit
    if info.st_size > limit:
        raise CalibratorError(f"{shorten(path)}: {what} is {human_size(info.st_size)}, more "
                              f"than a {what} can be ({human_size(limit)})")
    return path


def read_bytes(path: str | os.PathLike, what: str, limit: int | None = None) -> bytes:
    """The bytes of an input file checked by :func:`input_file`, or a one-line
    CalibratorError naming it. Never reads more than the limit, whatever the file does
    meanwhile."""
    path = input_file(path, what, limit)
    limit = SIZE_LIMITS.get(what, DEFAULT_SIZE_LIMIT) if limit is None else limit
    try:
        # O_NONBLOCK: a FIFO swapped in since the check must not block the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CalibratorError(f"{shorten(path)}: cannot read {what}: "
                              f"{exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CalibratorError(f"{shorten(path)}: {what} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CalibratorError(f"{shorten(path)}: cannot read {what}: "
                              f"{exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CalibratorError(f"{shorten(path)}: {what} grew past {human_size(limit)} while "
                              "being read")
    return data


# --- outputs -------------------------------------------------------------------------------

_OURS = re.compile(r"\.calibrator-(\d+)-[A-Za-z0-9_]+\.tmp$")
_MKSTEMP = re.compile(r"\.[a-z0-9_]{8}\.tmp$")  # what earlier versions left (tempfile)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.calibrator-{os.getpid()}-"
                          f"{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid < (1 << 31)  # someone else's live process (or an absurd number)
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed run left beside the output ``path``: ours
    (``.<name>.calibrator-<pid>-*.tmp`` of a process no longer alive) and those of earlier
    versions (``.<name>.XXXXXXXX.tmp``). Returns what was removed."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or entry.is_symlink():
            continue
        tail = "." + entry.name[len(prefix):]
        ours = _OURS.fullmatch(tail)
        if ours and not _alive(int(ours.group(1))) or (not ours and _MKSTEMP.fullmatch(tail)):
            try:
                if entry.is_dir():  # a staged folder (staged_folder)
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temp file + ``os.replace``), with
    the permissions the umask gives a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike):
    """A folder to write into whose files appear in ``folder`` only when the block
    completes (a failure half-way leaves ``folder`` as it was): a temporary folder beside
    it, renamed into place (or, when ``folder`` exists, its files moved in)."""
    folder = Path(folder)
    stage = temporary_name(folder)
    os.mkdir(stage)
    try:
        yield stage
        if not os.path.isdir(folder):
            os.replace(stage, folder)
            return
        for entry in os.scandir(stage):
            os.replace(entry.path, folder / entry.name)
        os.rmdir(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def writable_folder(folder: Path, what: str) -> None:
    """A CalibratorError unless a file can be created in ``folder`` (tried for real: a
    read-only file system or a folder root cannot write in says so only then)."""
    probe = folder / f".calibrator-probe-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT:
            reason = "no such folder"
        raise CalibratorError(f"{shorten(folder)}: cannot write {what} there: {reason}") \
            from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass

"""Output directories that stay consistent: one writer at a time, files replaced together.

- :class:`DirLock` -- an exclusive, advisory lock on an output directory (``fcntl.flock`` on
  ``DIR/.k2quant.lock``, released when the process ends, even by ``kill -9``). A second writer
  gets a one-line error naming the holder (pid, host, command, start time).
- :func:`check_writable` -- fail before any compute when a directory cannot be written.
- :func:`staged_dir` -- build a set of files in a temporary sibling directory and move them into
  place together when the block succeeds; readers never see new files next to old ones from an
  earlier run.
- :func:`file_digest` -- sha256 of a file, for manifests that readers verify.
"""
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

LOCK_NAME = ".k2quant.lock"

__all__ = ["DirLock", "DirLockedError", "check_writable", "staged_dir", "file_digest",
           "LOCK_NAME"]


class DirLockedError(RuntimeError):
    """Another process holds the output directory."""


class DirLock:
    """``with DirLock(out_dir, option="--out-dir"):`` -- exclusive use of ``out_dir``.

    The directory is created if missing. The lock file keeps a JSON line describing the holder;
    it is left in place on exit (an empty lock file is harmless: the lock is the ``flock``, not
    the file's existence).
    """

    def __init__(self, directory: PathLike, option: str = "--out-dir") -> None:
        self.directory = Path(directory)
        self.option = option
        self._fd: Optional[int] = None

    def __enter__(self) -> "DirLock":
        import fcntl

        check_writable(self.directory, self.option)
        path = self.directory / LOCK_NAME
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DirLockedError(
                f"{self.option} {self.directory} is in use by another k2quant process "
                f"({holder}); wait for it to finish or choose another {self.option}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join(os.path.basename(a) if i == 0 else a
                                    for i, a in enumerate(sys.argv))[:300],
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        d = json.loads(text)
        return f"pid {d.get('pid')} on {d.get('host')}: {d.get('command')}, since {d.get('since')}"
    except (OSError, ValueError, AttributeError):
        return "holder unknown"


def check_writable(directory: PathLike, option: str = "--out-dir") -> Path:
    """Create ``directory`` if needed and check that files can be created in it.

    Raises ``PermissionError`` (one line, naming the option) before any compute is spent.
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{option} {d} exists and is not a directory") from None
    except OSError as e:
        raise PermissionError(f"{option} {d} cannot be created ({e.strerror})") from None
    if not d.is_dir():
        raise NotADirectoryError(f"{option} {d} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-probe-", dir=str(d))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{option} {d} is not writable ({e.strerror})") from None
    return d


@contextlib.contextmanager
def staged_dir(final: PathLike, option: str = "--out-dir") -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final``; on success, move every entry of it into
    ``final`` (replacing entries of the same name), then remove it.

    Each entry moves with ``os.replace`` (a directory entry that exists in ``final`` is first
    renamed aside and deleted after the move), so at every moment each name is either the old
    or the new version; a failure inside the block leaves ``final`` untouched. Writers that must
    be seen as one unit (a model and its plan) should also be listed in a manifest with
    :func:`file_digest` that readers verify.
    """
    final = check_writable(final, option)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=str(final.parent)))
    try:
        yield tmp
        for entry in sorted(tmp.iterdir()):
            dest = final / entry.name
            if entry.is_dir() and dest.is_dir():
                aside = Path(tempfile.mkdtemp(prefix=f".old-{entry.name}-", dir=str(final)))
                os.replace(dest, aside / entry.name)
                os.replace(entry, dest)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_digest(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()

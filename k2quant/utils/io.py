"""Atomic file output: nothing is ever written in place.

Every writer goes to a temporary file in the destination directory, flushes and fsyncs it,
then ``os.replace``s it over the destination, so readers see either the old or the new file,
never a truncated one (an interrupted run leaves at most a ``.tmp-*`` file behind).
"""
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    Args:
      path: destination file. Its parent directory is created if missing.
      mode: ``"wb"`` or ``"w"`` (text, UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=str(path.parent))
    try:
        # mkstemp makes the file 0600; give it the permissions open() would (0666 & ~umask).
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_trusted(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a file k2quant wrote itself (checkpoints, lattices, graphs).

    torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the numpy RNG state
    of training checkpoints and k2's ragged tensors. Only use this for files you trust:
    unpickling runs code.
    """
    import torch

    return torch.load(str(path), map_location=map_location, weights_only=False)

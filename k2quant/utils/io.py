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
    """``torch.load`` with full unpickling. Only for a file the user vouched for with
    ``--allow-pickle`` (see :func:`load_torch`): unpickling runs code."""
    import torch

    return torch.load(str(path), map_location=map_location, weights_only=False)


class UnsafeFileError(ValueError):
    """A torch file that holds more than tensors, numbers, strings, lists and dicts."""


# Globals a plain tensor/number/str/list/dict file may name (what ``torch.save`` of such data
# writes): tensor and parameter rebuilders, storage types, dtypes, Size, OrderedDict, bytes.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
}
_STORAGE_NAMES = {"FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage",
                  "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage",
                  "BoolStorage", "UntypedStorage"}


def _restricted_pickle_module():
    """A ``pickle``-like module whose Unpickler resolves only :data:`_SAFE_GLOBALS` (Python's
    "restricting globals" recipe). torch 1.13's own ``weights_only`` unpickler refuses Python
    floats, so on torch < 2 :func:`load_torch` passes this module to ``torch.load`` instead."""
    import pickle
    import types

    import torch

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _SAFE_GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and (name in _STORAGE_NAMES or
                                      isinstance(getattr(torch, name, None), torch.dtype)):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    mod = types.ModuleType("k2quant_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    mod.__name__ = "k2quant_restricted_pickle"
    return mod


def load_torch(path: PathLike, what: str = "file", *, allow_pickle: bool = False,
               map_location: Any = "cpu") -> Any:
    """Load a torch file a user gave us without running code from it.

    The file may hold tensors, numbers, strings, ``None``, lists, tuples and dicts (what
    k2quant's own formats are made of): it is read with ``torch.load(weights_only=True)`` on
    torch >= 2, and with an equivalent restricted unpickler on torch 1.13 (whose
    ``weights_only`` mode rejects Python floats). Anything else -- a pickled object, a k2
    ``RaggedTensor``, a whole ``nn.Module`` -- is refused with a one-line ``UnsafeFileError``
    naming the file, unless ``allow_pickle`` (the ``--allow-pickle`` flag) is set.

    Args:
      path: the file.
      what: what the file is, for messages (e.g. ``"--model checkpoint"``).
      allow_pickle: full unpickling (runs code from the file: only for files you trust).
    Raises:
      FileNotFoundError: no such file. UnsafeFileError: needs pickle. ValueError: not a torch
      file or truncated.
    """
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist" if p.exists() is False
                                else f"{what} {p} is not a file")
    if allow_pickle:
        try:
            return load_trusted(p, map_location=map_location)
        except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as e:
            raise ValueError(f"{what} {p} is not a readable torch file ({_first_line(e)})") from e
    major = int(torch.__version__.split(".")[0])
    try:
        if major >= 2:
            return torch.load(str(p), map_location=map_location, weights_only=True)
        return _load_restricted_torch1(p, map_location)
    except pickle.UnpicklingError as e:
        msg = _first_line(e)
        if "not allowed" in msg or "Weights only load failed" in msg or "Unsupported" in msg:
            raise UnsafeFileError(
                f"{what} {p} holds pickled Python objects, not only tensors/numbers/strings/"
                f"lists/dicts; k2quant does not unpickle files it is given (that can run code). "
                f"If you trust this file, pass --allow-pickle") from e
        raise ValueError(f"{what} {p} is not a readable torch file ({msg})") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{what} {p} is not a readable torch file (truncated or another "
                         f"format: {_first_line(e)})") from e


def _load_restricted_torch1(path: Path, map_location: Any) -> Any:
    """torch 1.13: ``torch.load`` ignores ``pickle_module`` unless it unpickles everything, so
    read the zip archive with torch 1.13's own reader and our restricted unpickler."""
    import torch.serialization as ser

    with open(path, "rb") as f:
        if not ser._is_zipfile(f):
            raise ValueError("not a zip-format torch file")
        with ser._open_zipfile_reader(f) as zf:
            return ser._load(zf, map_location, _restricted_pickle_module(), encoding="utf-8")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]

"""Manifest file names, atomic manifest writing and ``.done`` markers shared by the data steps.

Naming (lhotse/icefall style), all in one manifest directory:

- ``{prefix}_recordings_{split}.jsonl.gz``  (lhotse ``RecordingSet``)
- ``{prefix}_supervisions_{split}.jsonl.gz`` (lhotse ``SupervisionSet``)
- ``{prefix}_lexicon.txt`` (Kaldi lexicon, see :mod:`k2quant.data.lexicon`)

and in the feature directory ``cuts_{split}.jsonl.gz`` (lhotse ``CutSet`` with features).
"""

import gzip
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from k2quant.utils.io import PathLike, atomic_open, atomic_write_json

log = logging.getLogger(__name__)


def recordings_path(manifest_dir: PathLike, prefix: str, split: str) -> Path:
    return Path(manifest_dir) / f"{prefix}_recordings_{split}.jsonl.gz"


def supervisions_path(manifest_dir: PathLike, prefix: str, split: str) -> Path:
    return Path(manifest_dir) / f"{prefix}_supervisions_{split}.jsonl.gz"


def lexicon_path(manifest_dir: PathLike, prefix: str) -> Path:
    return Path(manifest_dir) / f"{prefix}_lexicon.txt"


def cuts_path(feature_dir: PathLike, split: str) -> Path:
    return Path(feature_dir) / f"cuts_{split}.jsonl.gz"


def save_manifest(manifest: Any, path: PathLike) -> None:
    """Write a lhotse manifest (anything with ``to_dicts()``) as gzipped JSON lines, atomically.

    The output is what ``manifest.to_file(path)`` writes for a ``.jsonl.gz`` path (one
    ``to_dict()`` per line), but it goes through :func:`k2quant.utils.io.atomic_open` and the gzip
    header carries no timestamp, so identical manifests give identical bytes.
    """
    with atomic_open(path, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            for item in manifest.to_dicts():
                gz.write((json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8"))


def read_done(path: PathLike) -> Optional[Dict[str, Any]]:
    """The JSON payload of a ``.done`` marker, or None if there is none (or it is unreadable)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("ignoring unreadable marker %s", path)
        return None


def write_done(path: PathLike, payload: Dict[str, Any]) -> None:
    atomic_write_json(path, payload)

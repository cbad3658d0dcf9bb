"""Lazy imports of optional dependencies with install hints.

k2 exists in the package registry only as ``k2==1.23.4`` for Python 3.9 + torch 1.13.1, so
k2-dependent code never imports it at module level; it calls :func:`import_k2` at entry.
"""
import importlib
import importlib.util
from types import ModuleType

_HINTS = {
    "k2": (
        "k2 is required for this feature (FSAs: LF-MMI, lattices, decoding, rescoring) but is "
        "not installed. Run 'tools/install.sh' (Python 3.9 + torch 1.13.1 + k2 1.23.4), or "
        "install the k2 wheel that matches your torch (see k2's installation page) and then "
        "'pip install -e .[k2]'."
    ),
    "lhotse": "lhotse is required for manifests/features: pip install 'k2quant[k2]' (or: pip install lhotse urllib3)",
    "kaldilm": "kaldilm is required to convert ARPA LMs to FSTs: pip install kaldilm",
    "kaldifst": "kaldifst is required here: pip install kaldifst",
    "sentencepiece": "sentencepiece is required for BPE units: pip install sentencepiece",
    "soundfile": "soundfile is required to read/write audio: pip install soundfile",
    "espeakng_loader": (
        "espeakng-loader is required to synthesise the mini corpus: pip install espeakng-loader"
    ),
}


def optional_import(name: str) -> ModuleType:
    """Import module ``name`` or raise ImportError with an install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as e:  # pragma: no cover - depends on the environment
        hint = _HINTS.get(name.split(".")[0], f"pip install {name}")
        raise ImportError(f"{hint}\n(original error: {e})") from e


def import_k2() -> ModuleType:
    """Return the k2 module, or raise ImportError saying how to install it."""
    return optional_import("k2")


def have(name: str) -> bool:
    """True if module ``name`` can be imported (without importing it)."""
    return importlib.util.find_spec(name) is not None

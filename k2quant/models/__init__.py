"""Acoustic and language models.

Every k2quant model can describe itself as a JSON-able *spec* and be rebuilt from it, so that a
packed export (``k2quant.export``) or a checkpoint can reconstruct the architecture without
pickled code::

    spec = model.model_spec()          # {"arch": "tdnnf", "config": {...}}
    model2 = build_model(spec)         # same architecture, fresh parameters

Architectures register a builder with :func:`register_arch`.
"""
from typing import Callable, Dict

import torch.nn as nn

_ARCHS: Dict[str, str] = {
    # arch name -> "module:callable" taking the spec's "config" dict
    "tdnnf": "k2quant.models.tdnnf:build_tdnnf",
    "transformer_lm": "k2quant.models.transformer_lm:build_transformer_lm",
}
_BUILDERS: Dict[str, Callable[[dict], nn.Module]] = {}


def register_arch(name: str, builder: Callable[[dict], nn.Module]) -> None:
    """Register ``builder(config_dict) -> nn.Module`` under ``name``."""
    _BUILDERS[name] = builder


def build_model(spec: dict) -> nn.Module:
    """Rebuild a model from ``spec = {"arch": str, "config": dict}`` (see module docstring)."""
    if not isinstance(spec, dict) or "arch" not in spec or "config" not in spec:
        raise ValueError(
            f"build_model: expected a spec dict with keys 'arch' and 'config', got {spec!r}"
        )
    arch = spec["arch"]
    if arch not in _BUILDERS:
        if arch not in _ARCHS:
            known = sorted(set(_ARCHS) | set(_BUILDERS))
            raise ValueError(f"build_model: unknown arch {arch!r}; known: {known}")
        import importlib

        mod_name, fn_name = _ARCHS[arch].split(":")
        _BUILDERS[arch] = getattr(importlib.import_module(mod_name), fn_name)
    return _BUILDERS[arch](spec["config"])

"""Acoustic and language models.

Every k2quant model can describe itself as a JSON-able *spec* and be rebuilt from it, so that a
packed export (``k2quant.export``) or a checkpoint can reconstruct the architecture without
pickled code::

    spec = model.model_spec()          # {"arch": "tdnnf", "config": {...}}
    model2 = build_model(spec)         # same architecture, fresh parameters

Architectures register a builder with :func:`register_arch`, and optionally a parameter
counter that reads the spec alone: :func:`spec_num_parameters` lets a loader check a spec
against the data it came with before building (allocating) anything.
"""
from typing import Callable, Dict, Optional

import torch.nn as nn

_ARCHS: Dict[str, str] = {
    # arch name -> "module:callable" taking the spec's "config" dict
    "tdnnf": "k2quant.models.tdnnf:build_tdnnf",
    "transformer_lm": "k2quant.models.transformer_lm:build_transformer_lm",
}
_COUNTERS: Dict[str, str] = {
    # arch name -> "module:callable" taking the spec's "config" dict, returning the number of
    # parameters the built model has (no tensor is allocated)
    "tdnnf": "k2quant.models.tdnnf:spec_num_parameters",
    "transformer_lm": "k2quant.models.transformer_lm:spec_num_parameters",
}
_BUILDERS: Dict[str, Callable[[dict], nn.Module]] = {}
_COUNTER_FNS: Dict[str, Callable[[dict], int]] = {}


def register_arch(name: str, builder: Callable[[dict], nn.Module],
                  num_parameters: Optional[Callable[[dict], int]] = None) -> None:
    """Register ``builder(config_dict) -> nn.Module`` under ``name``, and optionally
    ``num_parameters(config_dict) -> int`` (the built model's parameter count, computed
    without building it)."""
    _BUILDERS[name] = builder
    if num_parameters is not None:
        _COUNTER_FNS[name] = num_parameters
    else:
        _COUNTER_FNS.pop(name, None)


def _check_spec(spec) -> None:
    if not isinstance(spec, dict) or "arch" not in spec or "config" not in spec:
        raise ValueError(
            f"build_model: expected a spec dict with keys 'arch' and 'config', got {spec!r:.200}"
        )
    if not isinstance(spec["config"], dict):
        raise ValueError(f"model spec: 'config' must be a dict, got "
                         f"{type(spec['config']).__name__}")


def spec_num_parameters(spec: dict) -> Optional[int]:
    """Parameters of ``build_model(spec)`` computed from the spec alone (nothing is built), or
    ``None`` for an architecture registered without a counter.

    Raises:
      ValueError: malformed spec, unknown arch, or a config its architecture rejects.
    """
    _check_spec(spec)
    arch = spec["arch"]
    if arch in _BUILDERS and arch not in _ARCHS:
        fn = _COUNTER_FNS.get(arch)
        return None if fn is None else int(fn(spec["config"]))
    if arch not in _COUNTERS:
        known = sorted(set(_ARCHS) | set(_BUILDERS))
        raise ValueError(f"build_model: unknown arch {arch!r}; known: {known}")
    if arch not in _COUNTER_FNS:
        import importlib

        mod_name, fn_name = _COUNTERS[arch].split(":")
        _COUNTER_FNS[arch] = getattr(importlib.import_module(mod_name), fn_name)
    return int(_COUNTER_FNS[arch](spec["config"]))


def build_model(spec: dict) -> nn.Module:
    """Rebuild a model from ``spec = {"arch": str, "config": dict}`` (see module docstring)."""
    _check_spec(spec)
    arch = spec["arch"]
    if arch not in _BUILDERS:
        if arch not in _ARCHS:
            known = sorted(set(_ARCHS) | set(_BUILDERS))
            raise ValueError(f"build_model: unknown arch {arch!r}; known: {known}")
        import importlib

        mod_name, fn_name = _ARCHS[arch].split(":")
        _BUILDERS[arch] = getattr(importlib.import_module(mod_name), fn_name)
    return _BUILDERS[arch](spec["config"])

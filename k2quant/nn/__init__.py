"""Quantization-aware layers (pure torch).

``QuantLinear``, ``QuantConv1d``, ``QuantEmbedding`` and ``QuantLSTM`` derive from
:class:`QuantModule`; build them with ``Cls.from_float(float_module, layer_config, name)`` or,
for a whole model, with :func:`k2quant.plan.quantize_`. See ``docs/DESIGN.md``.

The float -> quant mapping used by ``quantize_`` matches module types *exactly* (a subclass
of ``nn.Linear`` may have a different forward); :func:`register_quant_module` adds entries.
"""
from typing import Dict, Type

from torch import nn

from .base import QuantModule, build_quantizer, check_finite_weights
from .linear import QuantConv1d, QuantEmbedding, QuantLinear
from .lstm import QuantLSTM

#: exact float module type -> quant module class
QUANT_MODULE_MAP: Dict[Type[nn.Module], Type[QuantModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Embedding: QuantEmbedding,
    nn.LSTM: QuantLSTM,
}


def register_quant_module(float_cls: Type[nn.Module], quant_cls: Type[QuantModule]) -> None:
    """Make :func:`k2quant.plan.quantize_` swap modules of exact type ``float_cls`` for
    ``quant_cls.from_float(module, config, name)``."""
    if not (isinstance(quant_cls, type) and issubclass(quant_cls, QuantModule)):
        raise ValueError(
            "register_quant_module: quant_cls must be a QuantModule subclass; "
            f"received {quant_cls!r}"
        )
    QUANT_MODULE_MAP[float_cls] = quant_cls


def is_quantizable(module: nn.Module) -> bool:
    """True for float modules that :func:`k2quant.plan.quantize_` can swap (exact type match)."""
    return type(module) in QUANT_MODULE_MAP


def quant_class_for(module: nn.Module) -> Type[QuantModule]:
    """The quant class replacing ``module`` (``ValueError`` if its type is not supported)."""
    try:
        return QUANT_MODULE_MAP[type(module)]
    except KeyError:
        supported = ", ".join(f"{c.__module__}.{c.__name__}" for c in QUANT_MODULE_MAP)
        raise ValueError(
            f"no quantization-aware module for {type(module).__name__}; supported (exact "
            f"types): {supported}. Register one with k2quant.nn.register_quant_module."
        ) from None


__all__ = [
    "QuantModule",
    "QuantLinear",
    "QuantConv1d",
    "QuantEmbedding",
    "QuantLSTM",
    "QUANT_MODULE_MAP",
    "register_quant_module",
    "is_quantizable",
    "quant_class_for",
    "build_quantizer",
    "check_finite_weights",
]

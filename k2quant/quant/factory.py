"""Quantizer registry and the :func:`make_quantizer` factory."""
import inspect
from typing import Any, Dict, Type

from .base import Quantizer
from .binary import BinaryQuantizer, TernaryQuantizer
from .general import GeneralQuantizer
from .lsq import LSQQuantizer
from .pact import PACTQuantizer
from .sawb import SAWBQuantizer
from .uniform import UniformQuantizer

#: kind name -> quantizer class, in documentation order.
QUANTIZER_KINDS: Dict[str, Type[Quantizer]] = {
    "uniform": UniformQuantizer,
    "lsq": LSQQuantizer,
    "pact": PACTQuantizer,
    "sawb": SAWBQuantizer,
    "general": GeneralQuantizer,
    "binary": BinaryQuantizer,
    "ternary": TernaryQuantizer,
}


def make_quantizer(
    kind: str,
    bits: int,
    granularity: str = "tensor",
    ch_axis: int = 0,
    signed: bool = True,
    **options: Any,
) -> Quantizer:
    """Create a quantizer by kind name.

    Args:
        kind: one of ``QUANTIZER_KINDS`` (``uniform``, ``lsq``, ``pact``, ``sawb``, ``general``,
            ``binary``, ``ternary``).
        bits: bit width, int in 1..8 (``binary``: 1, ``ternary``: 2).
        granularity: ``"tensor"`` or ``"channel"``.
        ch_axis: channel axis for per-channel parameters (0 = output channel of a weight).
        signed: ``True`` for signed data (weights), ``False`` for non-negative activations.
        **options: kind-specific constructor options (see each class), plus ``name``.

    Returns:
        A new :class:`~k2quant.quant.base.Quantizer`. ``make_quantizer(**q.options())``
        re-creates ``q`` (without its learned state).

    Raises:
        ValueError: unknown kind or option, or invalid bits/granularity/options.
    """
    if not isinstance(kind, str) or kind.lower() not in QUANTIZER_KINDS:
        raise ValueError(
            f"unknown quantizer kind {kind!r}; known kinds: {', '.join(QUANTIZER_KINDS)}"
        )
    cls = QUANTIZER_KINDS[kind.lower()]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in params)
    if unknown:
        allowed = sorted(
            k for k in params if k not in ("self", "bits", "granularity", "ch_axis", "signed")
        )
        raise ValueError(
            f"unknown option(s) {unknown} for quantizer kind {kind!r}; "
            f"its options are: {', '.join(allowed)}"
        )
    return cls(bits=bits, granularity=granularity, ch_axis=ch_axis, signed=signed, **options)

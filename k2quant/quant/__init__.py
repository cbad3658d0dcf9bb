"""Quantizers (pure torch): uniform, LSQ, PACT, SAWB, General Quantizer, binary, ternary.

See ``docs/DESIGN.md`` (section "Quantizers") for the contract::

    q = make_quantizer(kind, bits, granularity="tensor"|"channel", ch_axis=0, signed=True, **kw)
    y = q(x)                          # fake quant (STE)
    codes, params = q.quantize(x)     # uint8 codes + QParams
    x_hat = q.dequantize(codes, params)   # == q(x) bit for bit in eval mode
"""
from .base import (
    QParams,
    check_finite,
    Quantizer,
    dequantize,
    grad_scale,
    round_ste,
    straight_through,
    validate_bits,
)
from .factory import QUANTIZER_KINDS, make_quantizer
from .metrics import sqnr_db
from .binary import BinaryQuantizer, TernaryQuantizer
from .general import GeneralQuantizer, temperature_schedule
from .lsq import LSQQuantizer
from .pact import PACTQuantizer
from .sawb import SAWB_COEFFICIENTS, SAWBQuantizer
from .uniform import UniformQuantizer

__all__ = [
    "QParams",
    "Quantizer",
    "QUANTIZER_KINDS",
    "make_quantizer",
    "dequantize",
    "round_ste",
    "grad_scale",
    "straight_through",
    "validate_bits",
    "sqnr_db",
    "check_finite",
    "temperature_schedule",
    "SAWB_COEFFICIENTS",
    "UniformQuantizer",
    "LSQQuantizer",
    "PACTQuantizer",
    "SAWBQuantizer",
    "GeneralQuantizer",
    "BinaryQuantizer",
    "TernaryQuantizer",
]

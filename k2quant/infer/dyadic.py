"""Dyadic numbers ``m / 2**e`` for integer-only requantisation.

Integer-only inference (HAWQ-V3, Q-ASR; GUIDE section 4) never multiplies by a float scale:
the real rescale factor ``M = S_in * S_w / S_out`` of a layer is replaced by a *dyadic*
number ``m / 2**e`` with an integer ``m`` of ``bits`` (31) significant bits, and ``x * M`` by
an integer multiply followed by a rounding right shift.

* :func:`dyadic_multiplier` picks ``(m, e)`` with ``2**(bits-1) <= |m| < 2**bits``, so the
  relative error ``|m / 2**e - M| / |M|`` is at most ``2**-bits`` (rounding ``M * 2**e`` to
  the nearest integer moves it by at most 1/2, and ``|M * 2**e| >= 2**(bits-1)``).
* :func:`rounding_shift` is the rounding used everywhere in :mod:`k2quant.infer`:
  ``floor((x + 2**(e-1)) / 2**e)``, i.e. round half up (towards +inf), computed exactly on
  int64 tensors with an arithmetic right shift.
"""
import math
from typing import Tuple, Union

import torch

#: Significant bits of the requantisation multipliers (gemmlowp / HAWQ-V3 use 31: int32 m).
MULTIPLIER_BITS = 31


def dyadic_multiplier(scale: float, bits: int = MULTIPLIER_BITS) -> Tuple[int, int]:
    """Approximate ``scale`` by ``m / 2**e``.

    Args:
      scale: a finite float (any sign); 0 gives ``(0, 0)``.
      bits: significant bits of ``m`` (1..62).

    Returns:
      ``(m, e)`` Python ints with ``2**(bits-1) <= |m| < 2**bits`` (unless scale == 0) and
      ``|m / 2**e - scale| <= 2**-bits * |scale|``. ``e`` may be negative for
      ``|scale| >= 2**bits``.
    """
    if not isinstance(bits, int) or not 1 <= bits <= 62:
        raise ValueError(f"dyadic_multiplier: bits must be an int in 1..62, got {bits!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"dyadic_multiplier: scale must be finite, got {scale!r}")
    if scale == 0.0:
        return 0, 0
    frac, exp = math.frexp(abs(scale))  # |scale| = frac * 2**exp, frac in [0.5, 1)
    e = bits - exp
    m = int(round(math.ldexp(frac, bits)))  # in [2**(bits-1), 2**bits]
    if m == 1 << bits:  # frac rounded up to 1.0
        m >>= 1
        e -= 1
    return (m if scale > 0 else -m), e


def dyadic_multipliers_common_shift(
    scales: torch.Tensor, bits: int = MULTIPLIER_BITS
) -> Tuple[torch.Tensor, int]:
    """One shift ``e`` for a vector of scales: ``m_j = round(scale_j * 2**e)``, ``|m_j| < 2**bits``.

    ``e`` is chosen from the largest ``|scale_j|`` (which gets ``bits`` significant bits);
    smaller scales get fewer. Used where a per-tensor quantity (the bypass multiplier) must
    share the shift of the per-channel ones.

    Returns:
      ``(m, e)``: int64 tensor shaped like ``scales`` and a Python int.
    """
    s = scales.detach().to(torch.float64)
    mx = float(s.abs().max()) if s.numel() else 0.0
    if mx == 0.0:
        return torch.zeros_like(s, dtype=torch.int64), 0
    _, e = dyadic_multiplier(mx, bits)
    m = torch.round(s * (2.0 ** e)).to(torch.int64)
    lim = (1 << bits) - 1
    return m.clamp(-lim, lim), e


def rounding_shift(x: torch.Tensor, e: Union[int, torch.Tensor]) -> torch.Tensor:
    """``floor((x + 2**(e-1)) / 2**e)`` for an int64 tensor ``x`` and shift ``e >= 1``
    (round half up). ``e`` may be a tensor broadcastable to ``x``."""
    if x.dtype != torch.int64:
        raise ValueError(f"rounding_shift: expected an int64 tensor, got {x.dtype}")
    if isinstance(e, torch.Tensor):
        half = torch.ones_like(e, dtype=torch.int64) << (e - 1)
        return (x + half) >> e
    if e < 1:
        raise ValueError(f"rounding_shift: shift must be >= 1, got {e}")
    return (x + (1 << (e - 1))) >> e

"""LSQ: Learned Step size Quantization (Esser et al., ICLR 2020).

Forward (``v`` the input, ``s`` the learned step size)::

    q = round(clip(v / s, -Qn, Qp)) * s
    signed  (weights),  b >= 2:  Qn = 2**(b-1),  Qp = 2**(b-1) - 1
    unsigned (activations):      Qn = 0,         Qp = 2**b - 1

As codes: ``code = round(clamp(v / s + zp, 0, 2**b - 1))`` with ``zp = Qn`` and
``q = (code - zp) * s``.

1-bit signed LSQ: the integer grid ``{-1, 0}`` would be degenerate, so we use the half-integer
grid ``{-0.5, +0.5} * s`` (``Qn = Qp = 0.5``, ``zp = 0.5``): ``q = (round(clip(v/s, -.5, .5) + .5)
- .5) * s``. The LSQ formulas below hold with these Qn/Qp, and the initial step is
``s = 2 * mean|v|`` so that the initial levels ``+-mean|v|`` are the MSE-optimal binary levels.

Gradients:

* ``dq/dv = 1`` for ``-Qn <= v/s <= Qp``, else 0;
* ``dq/ds = g * (round(v/s) - v/s)`` inside, ``g * (-Qn)`` below, ``g * Qp`` above,
  with ``g = 1 / sqrt(N * Qp)`` and ``N`` the number of elements sharing the step size
  (``x.numel()`` per tensor, ``x.numel() / C`` per channel).

Initialisation (:meth:`LSQQuantizer.init_from`, lazily on first use):
``s = 2 * mean|v| / sqrt(Qp)``.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .base import (
    EPS_SCALE,
    QParams,
    Quantizer,
    affine_codes,
    affine_dequantize,
    grad_scale,
    make_qparams,
)


class LSQQuantizer(Quantizer):
    """LSQ fake quantizer (``kind="lsq"``) with a learned step size.

    Args: see :class:`~k2quant.quant.base.Quantizer`. ``signed=False`` selects the unsigned
    activation grid.

    Parameters:
        step: learned step size ``s``, shape ``()`` per tensor (created at construction) or
            ``(C,)`` per channel (created by :meth:`init_from`, i.e. lazily on first use).
    """

    kind = "lsq"
    _lazy_params = ("step",)

    def __init__(
        self,
        bits: int,
        granularity: str = "tensor",
        ch_axis: int = 0,
        signed: bool = True,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(bits, granularity, ch_axis, signed, name)
        if self.per_channel:
            self.register_parameter("step", None)
        else:
            self.step = nn.Parameter(torch.ones(()))

    @property
    def qn(self) -> float:
        """``Qn``: number of negative levels (0.5 on the 1-bit signed half-integer grid)."""
        if not self.signed:
            return 0.0
        return 0.5 if self.bits == 1 else float(2 ** (self.bits - 1))

    @property
    def qp(self) -> float:
        """``Qp``: number of positive levels (0.5 on the 1-bit signed half-integer grid)."""
        if not self.signed:
            return float(2 ** self.bits - 1)
        return 0.5 if self.bits == 1 else float(2 ** (self.bits - 1) - 1)

    def grad_scale_factor(self, x: Tensor) -> float:
        """LSQ gradient scale ``g = 1 / sqrt(N * Qp)`` for input ``x``."""
        return 1.0 / math.sqrt(self._elements_per_param(x) * self.qp)

    def _init_from(self, x: Tensor) -> None:
        mean_abs = self._reduce(self._rows(x.to(torch.float32)).abs().mean(dim=1))
        if self.signed and self.bits == 1:
            s = 2.0 * mean_abs
        else:
            s = 2.0 * mean_abs / math.sqrt(self.qp)
        self._set_param("step", s.clamp(min=EPS_SCALE))

    def _step(self, x: Tensor, scaled: bool) -> Tensor:
        step = self.step
        if scaled:
            step = grad_scale(step, self.grad_scale_factor(x))
        return self._bcast(torch.clamp(step, min=EPS_SCALE), x)

    def _zp(self, x: Tensor) -> Tensor:
        return torch.tensor(self.qn, dtype=x.dtype, device=x.device)

    def _forward(self, x: Tensor) -> Tensor:
        s = self._step(x, scaled=True).to(x.dtype)
        zp = self._zp(x)
        codes = affine_codes(x, s, zp, 0, self.qmax)
        return affine_dequantize(codes, s, zp)

    def _quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        x = x.to(torch.float32)
        s = self._step(x, scaled=False)
        zp = self._zp(x)
        codes = affine_codes(x, s, zp, 0, self.qmax)
        return codes, make_qparams(self, x, s, zp)

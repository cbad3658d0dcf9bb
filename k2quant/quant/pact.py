"""PACT: Parameterized Clipping Activation (Choi et al., 2018).

Unsigned (activations, ``signed=False``, the PACT paper)::

    y   = clip(x, 0, alpha)
    y_q = round(y / scale) * scale,    scale = alpha / (2**b - 1)      (codes 0..2**b-1, zp = 0)
    dy_q/dx     = 1 for 0 <= x < alpha, else 0          (STE through the rounding)
    dy_q/dalpha = 1 for x >= alpha,     else 0

Signed variant (``signed=True``; a symmetric extension for signed data, not in the paper)::

    y = clip(x, -alpha, alpha), 2**b levels uniformly on [-alpha, alpha]:
    scale = 2 * alpha / (2**b - 1), zp = (2**b - 1) / 2 (half-integer grid, 1 bit = {+-alpha})
    dy_q/dx = 1 for |x| < alpha;  dy_q/dalpha = sign(x) for |x| >= alpha

``alpha`` is learned: initial value the ``alpha`` option (default 6.0, as ReLU6) or, with
``alpha=None``, the data maximum (``max x`` unsigned, ``max |x|`` signed) per tensor/channel.
:meth:`PACTQuantizer.regularization` returns the L2 penalty ``alpha_l2 * sum(alpha**2)`` that the
training loop adds to its loss.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import EPS_SCALE, QParams, Quantizer, affine_codes, affine_dequantize, make_qparams


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` down to the broadcastable ``shape`` (same ndim, or 0-d)."""
    if len(shape) == 0:
        return t.sum()
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


class _PACTFunction(torch.autograd.Function):
    """Values: the affine fake quant of ``x`` with (scale, zp); gradients: PACT's STE."""

    @staticmethod
    def forward(ctx, x, alpha, scale, zp, qmax, signed):  # type: ignore[override]
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        codes = affine_codes(x, scale, zp, 0, qmax)
        return affine_dequantize(codes, scale, zp)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        if ctx.signed:
            inside = x.abs() < alpha
            galpha = torch.where(inside, torch.zeros_like(grad), grad * torch.sign(x))
        else:
            inside = (x >= 0) & (x < alpha)
            galpha = torch.where(x >= alpha, grad, torch.zeros_like(grad))
        gx = grad * inside.to(grad.dtype)
        return gx, _sum_to(galpha, alpha.shape), None, None, None, None


class PACTQuantizer(Quantizer):
    """PACT fake quantizer (``kind="pact"``) with a learned clipping level ``alpha``.

    Args:
        bits, granularity, ch_axis, signed, name: see :class:`~k2quant.quant.base.Quantizer`
            (use ``signed=False`` for post-ReLU activations, PACT's setting).
        alpha: initial clipping level (> 0), or ``None`` to initialise from the data maximum.
        alpha_l2: coefficient of the L2 regularisation term on ``alpha``.

    Parameters:
        alpha: shape ``()`` per tensor (created at construction) or ``(C,)`` per channel
            (created by :meth:`init_from`, i.e. lazily on first use).
    """

    kind = "pact"
    _lazy_params = ("alpha",)

    def __init__(
        self,
        bits: int,
        granularity: str = "tensor",
        ch_axis: int = 0,
        signed: bool = True,
        alpha: Optional[float] = 6.0,
        alpha_l2: float = 1e-4,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(bits, granularity, ch_axis, signed, name)
        if alpha is not None and not float(alpha) > 0.0:
            raise ValueError(f"{self._who()}: alpha must be > 0 (or None = from data), got {alpha}")
        if not float(alpha_l2) >= 0.0:
            raise ValueError(f"{self._who()}: alpha_l2 must be >= 0, got {alpha_l2}")
        self.alpha_init = None if alpha is None else float(alpha)
        self.alpha_l2 = float(alpha_l2)
        if self.per_channel:
            self.register_parameter("alpha", None)
        else:
            self.alpha = nn.Parameter(torch.tensor(self.alpha_init or 1.0))

    def _extra_options(self) -> Dict[str, Any]:
        return {"alpha": self.alpha_init, "alpha_l2": self.alpha_l2}

    def _init_from(self, x: Tensor) -> None:
        rows = self._rows(x.to(torch.float32))
        if self.alpha_init is None:
            stat = rows.abs().max(dim=1).values if self.signed else rows.max(dim=1).values
            a = self._reduce(stat).clamp(min=EPS_SCALE)
        else:
            a = self._reduce(torch.full((rows.shape[0],), self.alpha_init))
        self._set_param("alpha", a.to(x.device))

    def regularization(self) -> Tensor:
        """L2 penalty ``alpha_l2 * sum(alpha**2)`` (0-d tensor, differentiable wrt alpha)."""
        if self.alpha is None:
            return torch.zeros(())
        return self.alpha_l2 * self.alpha.pow(2).sum()

    def _grid(self, alpha: Tensor) -> Tuple[Tensor, Tensor]:
        """``(scale, zp)`` for the (detached, clamped) broadcast alpha."""
        a = alpha.detach().clamp(min=EPS_SCALE)
        if self.signed:
            scale = 2.0 * a / float(self.qmax)
            zp = torch.full_like(a, self.qmax / 2.0)
        else:
            scale = a / float(self.qmax)
            zp = torch.zeros_like(a)
        return scale, zp

    def _forward(self, x: Tensor) -> Tensor:
        alpha = self._bcast(self.alpha, x).to(x.dtype)
        scale, zp = self._grid(alpha)
        return _PACTFunction.apply(x, alpha, scale, zp, self.qmax, self.signed)

    def _quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        x = x.to(torch.float32)
        scale, zp = self._grid(self._bcast(self.alpha, x))
        codes = affine_codes(x, scale, zp, 0, self.qmax)
        return codes, make_qparams(self, x, scale, zp)

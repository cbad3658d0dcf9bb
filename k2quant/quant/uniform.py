"""Uniform (affine) quantizer with min/max, percentile or MSE-optimal range, and an observer.

Grids (``b = bits``, codes ``q`` in ``[0, 2**b - 1]``, value ``(q - zero_point) * scale``):

* symmetric, signed, ``b >= 2``: clip ``c = max|x|`` (or percentile/MSE),
  ``scale = c / (2**(b-1) - 1)``,
  ``zero_point = 2**(b-1)``: the usual signed-integer grid ``[-2**(b-1), 2**(b-1) - 1] * scale``
  (zero is exact; the most negative level is only reached by values below ``-c``).
* symmetric, signed, ``b == 1``: half-integer grid ``zero_point = 0.5``, ``scale = 2c``, i.e. the
  two levels ``+-c`` (a 1-bit grid containing zero would waste a level).
* symmetric, unsigned (``signed=False``, activations): ``[0, c]`` with ``c = max(x)``,
  ``scale = c / (2**b - 1)``, ``zero_point = 0``.
* asymmetric: ``[lo, hi]`` (extended to contain 0), ``scale = (hi - lo) / (2**b - 1)``,
  ``zero_point = clamp(round(-lo / scale), 0, 2**b - 1)`` (so zero is exactly representable).

Range methods (per tensor, or per channel along ``ch_axis``):

* ``minmax``: the extreme values.
* ``percentile``: the ``percentile``-th percentile (nearest rank) of ``|x|`` (symmetric signed),
  of ``x`` for the top and of ``x`` at ``100 - percentile`` for the bottom otherwise.
* ``mse``: grid search over ``mse_grid`` clip ratios ``r in {1/n, 2/n, .., 1}`` applied to the
  min/max range, keeping the ratio with the smallest squared quantization error.

Observer mode (``observer=True``, for activations): running min/max
``r <- (1 - momentum) * r + momentum * batch`` updated by the forward in training mode and
frozen in eval mode (and by :meth:`quantize`). Without the observer the range is recomputed from
every input (weights).

Gradients: straight-through through the rounding, zero outside the clip range; the range
itself is a statistic (no gradient).
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .base import QParams, Quantizer, affine_codes, affine_dequantize, make_qparams, EPS_SCALE

RANGE_METHODS = ("minmax", "percentile", "mse")


def _kth_stat(rows: Tensor, frac: float) -> Tensor:
    """Nearest-rank quantile ``frac`` in [0, 1] of each row of a ``(C, M)`` tensor -> ``(C,)``."""
    m = rows.shape[1]
    k = min(max(int(round(frac * m + 0.5)), 1), m)  # 1-based rank, ceil-like
    return torch.kthvalue(rows, k, dim=1).values


def uniform_grid(
    lo: Tensor, hi: Tensor, bits: int, symmetric: bool, signed: bool
) -> Tuple[Tensor, Tensor]:
    """Scale and zero point of the uniform grid covering ``[lo, hi]`` (see module docstring).

    Args:
        lo, hi: float32 tensors of the same shape (``()`` or ``(C,)``), ``lo <= hi``.
    Returns:
        ``(scale, zero_point)`` float32 tensors of that shape; ``scale >= EPS_SCALE``.
    """
    qmax = 2 ** bits - 1
    if symmetric and signed:
        c = torch.maximum(lo.abs(), hi.abs())
        if bits == 1:
            scale = 2.0 * c
            zp = torch.full_like(c, 0.5)
        else:
            scale = c / float(2 ** (bits - 1) - 1)
            zp = torch.full_like(c, float(2 ** (bits - 1)))
    elif symmetric:
        scale = hi.clamp(min=0.0) / float(qmax)
        zp = torch.zeros_like(hi)
    else:
        lo0 = lo.clamp(max=0.0)
        hi0 = hi.clamp(min=0.0)
        scale = (hi0 - lo0) / float(qmax)
        zp = torch.clamp(torch.round(-lo0 / scale.clamp(min=EPS_SCALE)), 0, qmax)
    return scale.clamp(min=EPS_SCALE), zp


class UniformQuantizer(Quantizer):
    """Uniform affine fake quantizer (``kind="uniform"``).

    Args:
        bits, granularity, ch_axis, signed, name: see :class:`~k2quant.quant.base.Quantizer`.
        symmetric: symmetric grid around zero (default) or asymmetric ``[min, max]`` grid.
        range_method: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        percentile: percentile in (0, 100] for ``range_method="percentile"``.
        mse_grid: number of clip ratios tried by ``range_method="mse"``.
        observer: keep running min/max (EMA) updated in training, frozen in eval.
        momentum: EMA momentum of the observer, in (0, 1].

    Buffers (observer mode): ``running_min``/``running_max`` of shape ``()`` per tensor or
    ``(C,)`` per channel (created lazily by :meth:`init_from`, allocated on state-dict load).
    """

    kind = "uniform"
    _lazy_buffers = ("running_min", "running_max")

    def __init__(
        self,
        bits: int,
        granularity: str = "tensor",
        ch_axis: int = 0,
        signed: bool = True,
        symmetric: bool = True,
        range_method: str = "minmax",
        percentile: float = 99.99,
        mse_grid: int = 64,
        observer: bool = False,
        momentum: float = 0.1,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(bits, granularity, ch_axis, signed, name)
        if range_method not in RANGE_METHODS:
            raise ValueError(
                f"{self._who()}: range_method must be one of {list(RANGE_METHODS)}, "
                f"got {range_method!r}"
            )
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"{self._who()}: percentile must be in (0, 100], got {percentile}")
        if int(mse_grid) < 1:
            raise ValueError(f"{self._who()}: mse_grid must be >= 1, got {mse_grid}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"{self._who()}: momentum must be in (0, 1], got {momentum}")
        self.symmetric = bool(symmetric)
        self.range_method = range_method
        self.percentile = float(percentile)
        self.mse_grid = int(mse_grid)
        self.observer = bool(observer)
        self.momentum = float(momentum)
        if self.observer and not self.per_channel:
            self.register_buffer("running_min", torch.zeros(()))
            self.register_buffer("running_max", torch.zeros(()))
        else:
            self.register_buffer("running_min", None)
            self.register_buffer("running_max", None)

    def _extra_options(self) -> Dict[str, Any]:
        return {
            "symmetric": self.symmetric,
            "range_method": self.range_method,
            "percentile": self.percentile,
            "mse_grid": self.mse_grid,
            "observer": self.observer,
            "momentum": self.momentum,
        }

    # ---- range estimation ------------------------------------------------------------------
    @torch.no_grad()
    def batch_range(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(lo, hi)`` of ``x`` by ``range_method``: float32 ``()`` or ``(C,)`` tensors."""
        rows = self._rows(x.detach().to(torch.float32))
        lo = rows.min(dim=1).values
        hi = rows.max(dim=1).values
        if self.range_method == "percentile":
            p = self.percentile / 100.0
            if self.symmetric and self.signed:
                hi = _kth_stat(rows.abs(), p)
                lo = -hi
            else:
                hi = _kth_stat(rows, p)
                lo = _kth_stat(rows, 1.0 - p)
        elif self.range_method == "mse":
            lo, hi = self._mse_range(rows, lo, hi)
        return self._reduce(lo), self._reduce(hi)

    def _mse_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-row clip ratio minimising the squared error of the quantized rows."""
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(1, self.mse_grid + 1):
            r = i / self.mse_grid
            clo, chi = lo * r, hi * r
            scale, zp = uniform_grid(clo, chi, self.bits, self.symmetric, self.signed)
            s, z = scale[:, None], zp[:, None]
            codes = torch.clamp(torch.round(rows / s + z), 0, self.qmax)
            err = ((codes - z) * s - rows).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, clo, best_lo)
            best_hi = torch.where(better, chi, best_hi)
        return best_lo, best_hi

    def _init_from(self, x: Tensor) -> None:
        if self.observer:
            lo, hi = self.batch_range(x)
            self._set_buffer("running_min", lo)
            self._set_buffer("running_max", hi)

    @torch.no_grad()
    def _current_range(self, x: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        if not self.observer:
            return self.batch_range(x)
        if update:
            lo, hi = self.batch_range(x)
            m = self.momentum
            self.running_min.mul_(1.0 - m).add_(lo * m)
            self.running_max.mul_(1.0 - m).add_(hi * m)
        return self.running_min, self.running_max

    def _params(self, x: Tensor, update: bool) -> Tuple[Tensor, Tensor]:
        lo, hi = self._current_range(x, update)
        scale, zp = uniform_grid(lo, hi, self.bits, self.symmetric, self.signed)
        return self._bcast(scale, x), self._bcast(zp, x)

    # ---- forward / quantize ----------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        scale, zp = self._params(x, update=self.training)
        scale, zp = scale.to(x.dtype), zp.to(x.dtype)
        codes = affine_codes(x, scale, zp, 0, self.qmax)
        return affine_dequantize(codes, scale, zp)

    def _quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        scale, zp = self._params(x, update=False)
        codes = affine_codes(x.to(torch.float32), scale, zp, 0, self.qmax)
        return codes, make_qparams(self, x, scale, zp)

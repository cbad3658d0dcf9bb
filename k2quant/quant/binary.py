"""Binary (1-bit) and ternary (2-bit, TWN) weight quantizers.

Binary (``kind="binary"``, bits must be 1)::

    y = sign(x) * alpha           (sign(0) = +1)
    code = 1 if x >= 0 else 0,    zero_point = 0.5,  scale = 2 * alpha,  y = (code - 0.5) * scale
    alpha = mean|x| (per tensor/channel; XNOR-Net's optimal scale), or a learned parameter
            (``learned=True``; initialised to mean|x|; gradient sum(grad * sign(x))).
    dy/dx = 1 for |x| <= ste_clip, else 0 (clipped straight-through; ``ste_clip=None``: identity)

Ternary (``kind="ternary"``, bits must be 2), Ternary Weight Networks (Li et al., 2016)::

    delta = delta_ratio * mean|w|            (delta_ratio = 0.7)
    alpha = mean of |w| over {|w| > delta}   (0 if that set is empty)
    y = alpha * sign(w) * [|w| > delta]
    code = 1 + sign(w) * [|w| > delta] in {0, 1, 2},  zero_point = 1,  scale = alpha
    dy/dw = 1 (straight-through; optionally clipped to |w| <= ste_clip)

Both are symmetric (``signed=True`` only).
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import (
    EPS_SCALE,
    QParams,
    Quantizer,
    affine_dequantize,
    make_qparams,
    straight_through,
)


def _check_signed(q: Quantizer, signed: bool) -> None:
    if not signed:
        raise ValueError(
            f"{q._who()}: this quantizer is symmetric around zero (signed=True only), got "
            "signed=False; use kind='uniform'/'lsq'/'pact' with signed=False for activations"
        )


def _check_clip(q: Quantizer, ste_clip: Optional[float]) -> Optional[float]:
    if ste_clip is None:
        return None
    if not float(ste_clip) > 0.0:
        raise ValueError(f"{q._who()}: ste_clip must be > 0 or None, got {ste_clip}")
    return float(ste_clip)


class BinaryQuantizer(Quantizer):
    """1-bit sign quantizer ``sign(x) * alpha`` (see module docstring).

    Args:
        bits: must be 1.
        learned: learn ``alpha`` (parameter, ``()`` per tensor or lazily created ``(C,)``).
        ste_clip: straight-through region ``|x| <= ste_clip`` (``None`` = everywhere).
    """

    kind = "binary"
    allowed_bits = (1,)
    _lazy_params = ("alpha",)

    def __init__(
        self,
        bits: int = 1,
        granularity: str = "tensor",
        ch_axis: int = 0,
        signed: bool = True,
        learned: bool = False,
        ste_clip: Optional[float] = 1.0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(bits, granularity, ch_axis, signed, name)
        _check_signed(self, signed)
        self.learned = bool(learned)
        self.ste_clip = _check_clip(self, ste_clip)
        if self.learned and not self.per_channel:
            self.alpha = nn.Parameter(torch.ones(()))
        else:
            self.register_parameter("alpha", None)

    def _extra_options(self) -> Dict[str, Any]:
        return {"learned": self.learned, "ste_clip": self.ste_clip}

    def mean_abs(self, x: Tensor) -> Tensor:
        """``mean|x|`` per tensor ``()`` or per channel ``(C,)``, float32, detached."""
        return self._reduce(self._rows(x.detach().to(torch.float32)).abs().mean(dim=1))

    def _init_from(self, x: Tensor) -> None:
        if self.learned:
            self._set_param("alpha", self.mean_abs(x).clamp(min=EPS_SCALE))

    def _scale(self, x: Tensor) -> Tensor:
        alpha = self.alpha if self.learned else self.mean_abs(x)
        return self._bcast(2.0 * alpha, x)

    def _forward(self, x: Tensor) -> Tensor:
        scale = self._scale(x).to(x.dtype)
        zp = torch.tensor(0.5, dtype=x.dtype, device=x.device)
        codes = (x.detach() >= 0).to(x.dtype)
        value = affine_dequantize(codes, scale, zp)
        mask = None if self.ste_clip is None else x.abs() <= self.ste_clip
        return straight_through(value, x, mask)

    def _quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        x = x.to(torch.float32)
        codes = (x >= 0).to(torch.float32)
        return codes, make_qparams(self, x, self._scale(x), torch.tensor(0.5, device=x.device))


class TernaryQuantizer(Quantizer):
    """TWN ternary quantizer (see module docstring).

    Args:
        bits: must be 2 (codes {0, 1, 2}; code 3 is unused).
        delta_ratio: threshold ``delta = delta_ratio * mean|w|`` (TWN: 0.7).
        ste_clip: straight-through region ``|w| <= ste_clip`` (``None`` = everywhere, TWN).
    """

    kind = "ternary"
    allowed_bits = (2,)

    def __init__(
        self,
        bits: int = 2,
        granularity: str = "tensor",
        ch_axis: int = 0,
        signed: bool = True,
        delta_ratio: float = 0.7,
        ste_clip: Optional[float] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(bits, granularity, ch_axis, signed, name)
        _check_signed(self, signed)
        if not float(delta_ratio) >= 0.0:
            raise ValueError(f"{self._who()}: delta_ratio must be >= 0, got {delta_ratio}")
        self.delta_ratio = float(delta_ratio)
        self.ste_clip = _check_clip(self, ste_clip)

    def _extra_options(self) -> Dict[str, Any]:
        return {"delta_ratio": self.delta_ratio, "ste_clip": self.ste_clip}

    @torch.no_grad()
    def threshold_and_alpha(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(delta, alpha)`` per tensor ``()`` or per channel ``(C,)`` (float32)."""
        a = self._rows(x.detach().to(torch.float32)).abs()
        delta = self.delta_ratio * a.mean(dim=1, keepdim=True)
        big = a > delta
        count = big.sum(dim=1).clamp(min=1)
        alpha = (a * big).sum(dim=1) / count
        return self._reduce(delta), self._reduce(alpha)

    def _codes_scale(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        delta, alpha = self.threshold_and_alpha(x)
        delta, alpha = self._bcast(delta, x), self._bcast(alpha, x)
        xd = x.detach().to(torch.float32)
        codes = 1.0 + torch.sign(xd) * (xd.abs() > delta).to(torch.float32)
        return codes, alpha

    def _forward(self, x: Tensor) -> Tensor:
        codes, scale = self._codes_scale(x)
        zp = torch.tensor(1.0, dtype=x.dtype, device=x.device)
        value = affine_dequantize(codes.to(x.dtype), scale.to(x.dtype), zp)
        mask = None if self.ste_clip is None else x.abs() <= self.ste_clip
        return straight_through(value, x, mask)

    def _quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        codes, scale = self._codes_scale(x)
        return codes, make_qparams(self, x, scale, torch.tensor(1.0, device=x.device))

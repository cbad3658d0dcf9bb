"""SAWB: Statistics-Aware Weight Binning (Choi et al., "Bridging the accuracy gap for 2-bit
quantized neural networks", 2018).

The clipping level is predicted from two moments of the weights::

    alpha = c1 * sqrt(E[w^2]) + c2 * E[|w|]          (per tensor, or per output channel)

and the weights are quantized on the symmetric uniform grid of ``2**b`` levels on
``[-alpha, alpha]`` (the SAWB grid has no zero level: 2 bits = ``{-alpha, -alpha/3, alpha/3,
alpha}``)::

    scale = 2 * alpha / (2**b - 1),  zp = (2**b - 1) / 2,
    code = round(clamp(w / scale + zp, 0, 2**b - 1)),  w_q = (code - zp) * scale

Gradient: straight-through (identity) inside ``[-alpha, alpha]``, zero outside; alpha is a
statistic of the weights and gets no gradient.

Coefficients ``(c1, c2)``:

* 2, 3, 4, 5, 8 bits: the published table (:data:`SAWB_PUBLISHED`).
* 1 bit: ``(0, 1)``, exact: for the two levels ``+-alpha`` the MSE-optimal alpha is ``E|w|``
  for every distribution.
* 6 and 7 bits: not published. We computed them with the published procedure, implemented
  in :func:`fit_sawb_coefficients`: for each of six zero-mean distributions (Gaussian, uniform,
  Laplace, logistic, triangular, von Mises) find the MSE-optimal alpha of the b-bit SAWB grid by a
  grid search, then least-squares fit ``alpha* ~ c1 * sqrt(E w^2) + c2 * E|w|``.
  ``fit_sawb_coefficients(b)`` with its defaults (200k samples, 400 clip candidates, seed 0)
  gives the values in :data:`SAWB_FITTED`. The same procedure gives, e.g., 4 bits
  (12.26, -12.30) versus the published (12.68, -12.80) and 8 bits (34.16, -38.16)
  versus (31.76, -35.04): the fit reproduces the table's clip
  levels to a few percent although the individual coefficients are ill-conditioned.

Caution:
    The two-moment formula is fitted over bell-shaped and bounded distributions at once and is
    least accurate for uniform weights at high bit widths: for a uniform distribution on
    ``[-a, a]`` the published 8-bit pair gives ``alpha = 0.81 a`` (the fitted 6/7-bit pairs
    ``0.76 a`` / ``0.71 a``), so ~20% of a freshly kaiming-uniform-initialised layer is clipped
    and the SQNR stops rising above 5 bits. Trained weights are bell-shaped, where SAWB is accurate; for
    uniform-like weights at >= 6 bits prefer ``uniform`` (``range_method="mse"``) or ``lsq``.
"""
import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .base import (
    EPS_SCALE,
    QParams,
    Quantizer,
    affine_codes,
    affine_dequantize,
    make_qparams,
    straight_through,
)

#: Published (c1, c2) per bit width (Choi et al. 2018).
SAWB_PUBLISHED: Dict[int, Tuple[float, float]] = {
    2: (3.12, -2.064),
    3: (7.509, -6.892),
    4: (12.68, -12.80),
    5: (17.74, -18.64),
    8: (31.76, -35.04),
}

#: Coefficients for the bit widths missing from the table (see module docstring).
SAWB_FITTED: Dict[int, Tuple[float, float]] = {
    1: (0.0, 1.0),
    6: (23.692, -25.84),
    7: (28.863, -31.898),
}

SAWB_COEFFICIENTS: Dict[int, Tuple[float, float]] = {**SAWB_PUBLISHED, **SAWB_FITTED}


def sawb_fit_distributions(num_samples: int, seed: int = 0) -> Dict[str, Tensor]:
    """Samples (float64, shape ``(num_samples,)``) of the six distributions used to fit SAWB."""
    g = torch.Generator().manual_seed(seed)
    n = num_samples

    def uniform01() -> Tensor:
        return torch.rand(n, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)

    u = uniform01()
    laplace = -torch.sign(u - 0.5) * torch.log1p(-2.0 * (u - 0.5).abs())
    v = uniform01()
    logistic = torch.log(v / (1.0 - v))
    # von Mises (kappa = 1) by rejection from the uniform on [-pi, pi].
    vm = []
    count = 0
    while count < n:
        cand = (uniform01() * 2.0 - 1.0) * math.pi
        keep = uniform01() < torch.exp(torch.cos(cand) - 1.0)
        vm.append(cand[keep])
        count += int(keep.sum())
    return {
        "gaussian": torch.randn(n, generator=g, dtype=torch.float64),
        "uniform": uniform01() * 2.0 - 1.0,
        "laplace": laplace,
        "logistic": logistic,
        "triangular": uniform01() - uniform01(),
        "von_mises": torch.cat(vm)[:n],
    }


def sawb_mse_optimal_alpha(w: Tensor, bits: int, candidates: int = 400) -> float:
    """MSE-optimal clip ``alpha`` of the b-bit SAWB grid for the 1-D sample ``w``."""
    levels = 2 ** bits - 1
    amax = float(w.abs().max())
    best_err, best_alpha = math.inf, amax
    for i in range(1, candidates + 1):
        alpha = amax * i / candidates
        scale = 2.0 * alpha / levels
        q = (torch.clamp(torch.round(w / scale + levels / 2.0), 0, levels) - levels / 2.0) * scale
        err = float((q - w).pow(2).mean())
        if err < best_err:
            best_err, best_alpha = err, alpha
    return best_alpha


def fit_sawb_coefficients(
    bits: int, num_samples: int = 200_000, candidates: int = 400, seed: int = 0
) -> Tuple[float, float]:
    """Least-squares ``(c1, c2)`` with ``alpha* ~ c1 * sqrt(E w^2) + c2 * E|w|`` over the six
    distributions of :func:`sawb_fit_distributions` (the SAWB paper's procedure).

    Takes a few seconds with the defaults; use fewer samples/candidates for a quick estimate.
    """
    rows, target = [], []
    for w in sawb_fit_distributions(num_samples, seed).values():
        rows.append([float(w.pow(2).mean().sqrt()), float(w.abs().mean())])
        target.append(sawb_mse_optimal_alpha(w, bits, candidates))
    a = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(target, dtype=torch.float64)[:, None]
    c = torch.linalg.lstsq(a, y).solution.reshape(-1)
    return float(c[0]), float(c[1])


class SAWBQuantizer(Quantizer):
    """SAWB weight fake quantizer (``kind="sawb"``); signed data only.

    Args: see :class:`~k2quant.quant.base.Quantizer`. ``coefficients``: optional ``(c1, c2)``
    overriding the table for this bit width.
    """

    kind = "sawb"

    def __init__(
        self,
        bits: int,
        granularity: str = "tensor",
        ch_axis: int = 0,
        signed: bool = True,
        coefficients: Optional[Tuple[float, float]] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(bits, granularity, ch_axis, signed, name)
        if not signed:
            raise ValueError(
                f"{self._who()}: SAWB quantizes signed weights on [-alpha, alpha]; got "
                "signed=False. Use kind='pact' or 'lsq' with signed=False for activations"
            )
        if coefficients is not None:
            if len(coefficients) != 2:
                raise ValueError(
                    f"{self._who()}: coefficients must be a pair (c1, c2), got {coefficients!r}"
                )
            coefficients = (float(coefficients[0]), float(coefficients[1]))
        self.coefficients = coefficients

    @property
    def c1c2(self) -> Tuple[float, float]:
        return self.coefficients or SAWB_COEFFICIENTS[self.bits]

    def _extra_options(self):
        return {"coefficients": None if self.coefficients is None else list(self.coefficients)}

    @torch.no_grad()
    def clip_value(self, x: Tensor) -> Tensor:
        """``alpha = c1 * sqrt(E x^2) + c2 * E|x|``: float32 ``()`` or ``(C,)``, >= tiny.

        Falls back to ``max|x|`` where the formula gives a non-positive value (degenerate rows).
        """
        rows = self._rows(x.detach().to(torch.float32))
        c1, c2 = self.c1c2
        alpha = c1 * rows.pow(2).mean(dim=1).sqrt() + c2 * rows.abs().mean(dim=1)
        alpha = torch.where(alpha > 0, alpha, rows.abs().max(dim=1).values)
        return self._reduce(alpha.clamp(min=EPS_SCALE))

    def _params(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        alpha = self._bcast(self.clip_value(x), x)
        scale = 2.0 * alpha / float(self.qmax)
        zp = torch.full_like(scale, self.qmax / 2.0)
        return alpha, scale, zp

    def _forward(self, x: Tensor) -> Tensor:
        alpha, scale, zp = self._params(x)
        alpha, scale, zp = alpha.to(x.dtype), scale.to(x.dtype), zp.to(x.dtype)
        with torch.no_grad():
            value = affine_dequantize(affine_codes(x, scale, zp, 0, self.qmax), scale, zp)
        return straight_through(value, x, x.abs() <= alpha)

    def _quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        x = x.to(torch.float32)
        _, scale, zp = self._params(x)
        codes = affine_codes(x, scale, zp, 0, self.qmax)
        return codes, make_qparams(self, x, scale, zp)

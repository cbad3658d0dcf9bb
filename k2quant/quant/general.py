"""General Quantizer (arXiv 2210.09188): learnable centroids in a mu-law space, soft-to-hard.

Centroids (``K = 2**bits`` per tensor, or per channel)::

    c_k = alpha * sign(u_k) * ((1 + mu)**|u_k| - 1) / mu,     u_k in [-1, 1]   ([0, 1] if unsigned)

``u`` and ``alpha`` are learned. Every forward in training mode first projects ``u`` back onto
``[-1, 1]`` and ``alpha`` onto ``alpha > 0`` (projected gradient descent) and the map also
clamps both, so ``|c_k| <= alpha``
always holds: the centroids never leave the mu-law constrained space. Initialisation
(:meth:`GeneralQuantizer.init_from`, lazily on first use): ``alpha = max|x|`` (``max x`` if
unsigned), ``u`` a uniform grid of ``K`` points on ``[-1, 1]`` (``init="uniform"``, the paper)
or ``init="kmeans"``: Lloyd iterations on the data starting from that grid, mapped back to ``u``
through the inverse mu-law ``u = sign(c) * log(1 + mu |c| / alpha) / log(1 + mu)``.

Forward:

* soft (training mode and temperature ``T > 0``)::

      p_k = softmax_k(-((x - c_k) / alpha)**2 / T),    y = sum_k p_k c_k

  (distances are normalised by ``alpha**2`` so that ``T`` does not depend on the weight scale);
  fully differentiable wrt ``x``, ``u`` and ``alpha``.
* hard (``T == 0`` or eval mode): nearest centroid; straight-through gradient to ``x`` and the
  gradient of the output goes to the selected centroid (hence to ``u`` and ``alpha``).

Annealing ``T -> 0`` (:meth:`GeneralQuantizer.set_temperature`, :func:`temperature_schedule`,
:meth:`GeneralQuantizer.anneal`) moves the soft output to the hard one.

:meth:`~k2quant.quant.base.Quantizer.quantize` returns the index of the nearest centroid in the
sorted codebook and ``QParams.codebook`` = the sorted centroids, ``(2**bits,)`` per tensor or
``(C, 2**bits)`` per channel; ``QParams.scale`` holds ``alpha`` and ``zero_point`` zeros.
"""
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import EPS_SCALE, QParams, Quantizer, make_qparams, straight_through

INIT_METHODS = ("uniform", "kmeans")
SCHEDULES = ("exponential", "linear")


def mu_law_centroids(u: Tensor, alpha: Tensor, mu: float) -> Tensor:
    """``alpha * sign(u) * ((1 + mu)**|u| - 1) / mu`` (``alpha`` broadcast against ``u``)."""
    return alpha * torch.sign(u) * torch.expm1(u.abs() * math.log1p(mu)) / mu


def mu_law_inverse(c: Tensor, alpha: Tensor, mu: float) -> Tensor:
    """Inverse of :func:`mu_law_centroids`: ``sign(c) * log(1 + mu |c| / alpha) / log(1 + mu)``."""
    return torch.sign(c) * torch.log1p(mu * c.abs() / alpha) / math.log1p(mu)


def soft_quantize(x: Tensor, centroids: Tensor, alpha: Tensor, temperature: float) -> Tensor:
    """Soft assignment output ``sum_k softmax_k(-((x - c_k)/alpha)^2 / T) c_k``.

    Args:
        x: ``(R, M)`` rows of values.
        centroids: ``(R, K)`` centroids of each row.
        alpha: ``(R,)`` distance normaliser of each row (> 0).
        temperature: ``T > 0``.

    Returns:
        ``(R, M)``, differentiable wrt all tensor arguments. Memory ``O(R * M * K)``.
    """
    d = ((x.unsqueeze(-1) - centroids.unsqueeze(1)) / alpha.reshape(-1, 1, 1)).pow(2)
    p = torch.softmax(-d / temperature, dim=-1)
    return (p * centroids.unsqueeze(1)).sum(dim=-1)


def nearest_codes(x: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Index of the nearest centroid in the sorted codebook.

    Args:
        x: ``(R, M)`` rows.
        centroids: ``(R, K)``, any order.

    Returns:
        ``(codes, sorted_centroids)``: int64 ``(R, M)`` indices (ties to the lower centroid) and
        ``(R, K)`` centroids sorted ascending (differentiable wrt ``centroids``).
    """
    cs, _ = torch.sort(centroids, dim=1)
    mids = ((cs[:, 1:] + cs[:, :-1]) * 0.5).detach().contiguous()
    codes = torch.searchsorted(mids, x.detach().contiguous())
    return codes, cs


def temperature_schedule(
    step: int,
    total_steps: int,
    t_start: float = 1.0,
    t_end: float = 1e-3,
    mode: str = "exponential",
) -> float:
    """Annealed temperature: ``t_start -> t_end`` over ``total_steps``, then 0 (hard).

    ``mode="exponential"``: ``t_start * (t_end / t_start) ** (step / total_steps)``;
    ``mode="linear"``: linear interpolation. Returns ``0.0`` for ``step >= total_steps``.
    """
    if mode not in SCHEDULES:
        raise ValueError(
            f"temperature_schedule: mode must be one of {list(SCHEDULES)}, got {mode!r}"
        )
    if total_steps <= 0 or not 0.0 < t_end <= t_start:
        raise ValueError(
            "temperature_schedule: need total_steps > 0 and 0 < t_end <= t_start, got "
            f"total_steps={total_steps}, t_start={t_start}, t_end={t_end}"
        )
    if step >= total_steps:
        return 0.0
    f = max(step, 0) / total_steps
    if mode == "exponential":
        return t_start * (t_end / t_start) ** f
    return t_start + (t_end - t_start) * f


class GeneralQuantizer(Quantizer):
    """General Quantizer (``kind="general"``), see module docstring.

    Args:
        bits, granularity, ch_axis, signed, name: see :class:`~k2quant.quant.base.Quantizer`.
        mu: mu-law compression parameter (> 0; larger = centroids denser near zero). Default 10,
            tuned here: with the uniform ``u`` initialisation it gives the highest SQNR at 2..8 bits
            among {1, 10, 20, 50, 255} on both Gaussian and Laplace weights (255, the telephony
            value, wastes levels near zero: about 3-6 dB lower at 2-8 bits).
        temperature: initial soft-assignment temperature ``T >= 0`` (0 = hard).
        learn_alpha: learn ``alpha`` (otherwise it stays at its data initialisation).
        init: ``"uniform"`` (uniform grid in ``u``) or ``"kmeans"`` (see module docstring).
        kmeans_iters: Lloyd iterations for ``init="kmeans"``.

    Parameters:
        u: ``(2**bits,)`` per tensor or ``(C, 2**bits)`` per channel (per channel: created by
            :meth:`init_from`, lazily on first use).
        alpha: ``()`` or ``(C,)``.
    Buffers:
        temperature: 0-d float32.
    """

    kind = "general"
    _lazy_params = ("u", "alpha")

    def __init__(
        self,
        bits: int,
        granularity: str = "tensor",
        ch_axis: int = 0,
        signed: bool = True,
        mu: float = 10.0,
        temperature: float = 0.0,
        learn_alpha: bool = True,
        init: str = "uniform",
        kmeans_iters: int = 10,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(bits, granularity, ch_axis, signed, name)
        if not float(mu) > 0.0:
            raise ValueError(f"{self._who()}: mu must be > 0, got {mu}")
        if init not in INIT_METHODS:
            raise ValueError(
                f"{self._who()}: init must be one of {list(INIT_METHODS)}, got {init!r}"
            )
        if int(kmeans_iters) < 0:
            raise ValueError(f"{self._who()}: kmeans_iters must be >= 0, got {kmeans_iters}")
        self.mu = float(mu)
        self.learn_alpha = bool(learn_alpha)
        self.init = init
        self.kmeans_iters = int(kmeans_iters)
        self.num_centroids = 2 ** self.bits
        self.register_buffer("temperature", torch.tensor(0.0))
        self.set_temperature(temperature)
        if self.per_channel:
            self.register_parameter("u", None)
            self.register_parameter("alpha", None)
        else:
            self.u = nn.Parameter(self._u_grid(1).reshape(-1))
            self.alpha = nn.Parameter(torch.ones(()), requires_grad=self.learn_alpha)

    def _extra_options(self) -> Dict[str, Any]:
        return {
            "mu": self.mu,
            "temperature": float(self.temperature),
            "learn_alpha": self.learn_alpha,
            "init": self.init,
            "kmeans_iters": self.kmeans_iters,
        }

    # ---- temperature -----------------------------------------------------------------------
    def set_temperature(self, temperature: float) -> None:
        """Set the soft-assignment temperature ``T >= 0`` (0 = hard assignment)."""
        t = float(temperature)
        if not (t >= 0.0 and math.isfinite(t)):
            raise ValueError(
                f"{self._who()}: temperature must be finite and >= 0, got {temperature}"
            )
        self.temperature.fill_(t)

    def anneal(
        self,
        step: int,
        total_steps: int,
        t_start: float = 1.0,
        t_end: float = 1e-3,
        mode: str = "exponential",
    ) -> float:
        """Set the temperature from :func:`temperature_schedule` and return it."""
        t = temperature_schedule(step, total_steps, t_start, t_end, mode)
        self.set_temperature(t)
        return t

    # ---- centroids ---------------------------------------------------------------------------
    @property
    def _u_low(self) -> float:
        return -1.0 if self.signed else 0.0

    def _u_grid(self, rows: int) -> Tensor:
        return torch.linspace(self._u_low, 1.0, self.num_centroids).repeat(rows, 1)

    def centroids(self) -> Tensor:
        """Current centroids in ``u`` order: ``(K,)`` per tensor or ``(C, K)`` per channel."""
        if self.u is None:
            raise ValueError(f"{self._who()}: not initialised; call init_from(x) or run a forward")
        u = torch.clamp(self.u, self._u_low, 1.0)
        alpha = torch.clamp(self.alpha, min=EPS_SCALE)
        return mu_law_centroids(u, alpha.unsqueeze(-1) if alpha.dim() else alpha, self.mu)

    def _centroid_rows(self) -> Tuple[Tensor, Tensor]:
        c = self.centroids()
        return c.reshape(-1, self.num_centroids), torch.clamp(self.alpha, min=EPS_SCALE).reshape(-1)

    @torch.no_grad()
    def project_(self) -> None:
        """Project the parameters onto the constrained space, in place: ``u`` onto ``[-1, 1]``
        (``[0, 1]`` if unsigned) and ``alpha`` onto ``[EPS_SCALE, inf)``."""
        if self.u is not None:
            self.u.clamp_(self._u_low, 1.0)
        if self.alpha is not None:
            self.alpha.clamp_(min=EPS_SCALE)

    def _init_from(self, x: Tensor) -> None:
        rows = self._rows(x.to(torch.float32))
        stat = rows.abs().max(dim=1).values if self.signed else rows.max(dim=1).values
        alpha = stat.clamp(min=EPS_SCALE)
        u = self._u_grid(rows.shape[0]).to(rows.device)
        if self.init == "kmeans" and self.kmeans_iters > 0:
            c = mu_law_centroids(u, alpha[:, None], self.mu)
            ones = torch.ones_like(rows)
            for _ in range(self.kmeans_iters):
                codes, cs = nearest_codes(rows, c)
                sums = torch.zeros_like(cs).scatter_add_(1, codes, rows)
                counts = torch.zeros_like(cs).scatter_add_(1, codes, ones)
                c = torch.where(counts > 0, sums / counts.clamp(min=1.0), cs)
            c, _ = torch.sort(c, dim=1)
            c = torch.maximum(torch.minimum(c, alpha[:, None]), -alpha[:, None])
            u = mu_law_inverse(c, alpha[:, None], self.mu).clamp(self._u_low, 1.0)
        if self.per_channel:
            self._set_param("u", u)
            self._set_param("alpha", alpha)
        else:
            self._set_param("u", u.reshape(-1))
            self._set_param("alpha", alpha.reshape(()))
        self.alpha.requires_grad_(self.learn_alpha)

    # ---- forward / quantize ------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.project_()
        rows = self._rows(x)
        c, alpha = self._centroid_rows()
        c, alpha = c.to(x.dtype), alpha.to(x.dtype)
        if rows.shape[0] != c.shape[0]:
            self._bcast(self.alpha, x)  # raises the channel-count error
        t = float(self.temperature)
        if self.training and t > 0.0:
            return self._unrows(soft_quantize(rows, c, alpha, t), x)
        codes, cs = nearest_codes(rows, c)
        value = self._unrows(torch.gather(cs, 1, codes), x)
        return straight_through(value, x)

    def _quantize(self, x: Tensor) -> Tuple[Tensor, QParams]:
        x = x.to(torch.float32)
        rows = self._rows(x)
        c, alpha = self._centroid_rows()
        if rows.shape[0] != c.shape[0]:
            self._bcast(self.alpha, x)
        codes, cs = nearest_codes(rows, c)
        codes = self._unrows(codes, x)
        params = make_qparams(self, x, alpha, torch.zeros((), device=x.device))
        params.codebook = (cs if self.per_channel else cs.reshape(-1)).detach().clone()
        return codes, params

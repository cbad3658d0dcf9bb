"""Semi-orthogonal weight constraint (Kaldi's ``ConstrainOrthonormal``) for TDNN-F layers.

A matrix ``M`` of shape (rows, cols) with ``rows <= cols`` is *semi-orthogonal with scale a*
when ``M M^T = a^2 I``. Kaldi's TDNN-F (Povey et al., "Semi-orthogonal low-rank matrix
factorization for deep neural networks", Interspeech 2018) keeps the first factor of every
factored layer close to that set by nudging it every few minibatches (Kaldi:
``src/nnet3/nnet-utils.cc``, ``ConstrainOrthonormalInternal``; snowfall's ``OrthonormalLinear``
is a PyTorch port). This module is our own implementation of the same update:

* ``P = M M^T``, ``Q = P - a^2 I``; one gradient step on ``-||Q||_F^2`` gives
  ``M <- M - 4 * nu / a^2 * Q M`` with ``nu = 0.125`` (quadratic convergence near the
  solution).
* *Floating scale* (Kaldi's ``orthonormal-constraint=-1``, what tdnnf-layer and prefinal-layer
  use): ``a^2 = tr(P P) / tr(P)``, the value for which the update is orthogonal to ``M``
  (``tr(M X^T) = 0``), so the constraint never fights the overall scale the training chooses.
  When the eigenvalues of ``P`` are far apart (``ratio = rows * tr(P P) / tr(P)^2 > 1.02``)
  ``nu`` is halved, as in Kaldi, to avoid divergence.
* Matrices with ``rows > cols`` are constrained through their transpose.

Conv1d weights of shape (out, in, k) are treated as the (out, in * k) matrix that maps the
spliced input ``[x_{t+o_1}; ...; x_{t+o_k}]`` to the output, exactly like Kaldi's
``TdnnComponent`` parameter matrix (the column order does not matter for ``M M^T``).
"""
import math
from typing import Optional

import torch

#: Kaldi's update speed (``nu`` in the paper): quadratic convergence near a semi-orthogonal M.
UPDATE_SPEED = 0.125
#: Kaldi halves the update speed when ``rows * tr(P^2) / tr(P)^2`` exceeds this.
SLOWDOWN_RATIO = 1.02


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise ValueError(
            f"semi-orthogonal constraint: expected a weight with >= 2 dims (out, in[, k]); "
            f"got shape {tuple(weight.shape)}"
        )
    return weight.reshape(weight.shape[0], -1)


def constrain_orthonormal_(weight: torch.Tensor, scale: Optional[float] = None) -> float:
    """Move ``weight`` one step towards semi-orthogonality, in place (Kaldi's update).

    Args:
      weight: float tensor of shape (out, in) (Linear) or (out, in, k) (Conv1d), modified in
        place (pass ``module.weight``; gradients are not tracked). Viewed as the matrix
        ``M`` of shape (out, in * k); if out > in * k its transpose is constrained.
      scale: ``None`` for Kaldi's floating scale (``orthonormal-constraint=-1``), or a fixed
        positive ``a`` (``orthonormal-constraint=a``).

    Returns:
      The relative orthogonality error *before* the update,
      ``||P - a^2 I||_F / (a^2 sqrt(rows))`` (0 for an exactly semi-orthogonal matrix);
      ``0.0`` and no change for an all-zero matrix.

    Caution:
      Like Kaldi's update this is a local method: starting from a matrix whose singular values
      differ by more than a factor of ~3 it converges slowly and may diverge. Layers are
      initialised semi-orthogonal (:func:`semi_orthogonal_init_`) and constrained every few
      steps, which keeps them close.
    """
    if not weight.is_floating_point():
        raise ValueError(
            f"semi-orthogonal constraint: expected a floating-point weight, got {weight.dtype}"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be None (floating) or a positive number, got {scale!r}")
    with torch.no_grad():
        work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        M = _as_matrix(weight).to(work_dtype)
        transposed = M.shape[0] > M.shape[1]
        if transposed:
            M = M.t()
        rows = M.shape[0]
        P = M @ M.t()
        trace_p = float(torch.trace(P))
        if not math.isfinite(trace_p):
            raise ValueError(
                "semi-orthogonal constraint: the weight contains NaN/Inf; training diverged "
                "(lower the learning rate) before the constraint was applied"
            )
        if trace_p <= 0.0:
            return 0.0
        speed = UPDATE_SPEED
        if scale is None:
            trace_pp = float((P * P).sum())  # tr(P P^T) = tr(P P): P is symmetric
            a2 = trace_pp / trace_p
            ratio = trace_pp * rows / (trace_p * trace_p)
            if ratio > SLOWDOWN_RATIO:
                speed *= 0.5
        else:
            a2 = float(scale) ** 2
        Q = P - a2 * torch.eye(rows, dtype=P.dtype, device=P.device)
        error = float(torch.linalg.norm(Q)) / (a2 * math.sqrt(rows))
        M = M - (4.0 * speed / a2) * (Q @ M)
        if transposed:
            M = M.t()
        weight.copy_(M.reshape(weight.shape).to(weight.dtype))
    return error


def semi_orthogonality_error(weight: torch.Tensor) -> float:
    """How far ``weight`` is from semi-orthogonal with its own (mean) scale.

    Args:
      weight: tensor of shape (out, in) or (out, in, k), viewed as (out, in * k); the smaller
        side is used (``M M^T`` or ``M^T M``).

    Returns:
      ``||P / a^2 - I||_F / sqrt(r)`` with ``P = M M^T`` (r x r, r = min side) and
      ``a^2 = tr(P) / r``: the RMS deviation of the normalised Gram matrix from identity.
      0 for an exactly semi-orthogonal matrix, ``inf`` for an all-zero one.
    """
    with torch.no_grad():
        M = _as_matrix(weight).double()
        if M.shape[0] > M.shape[1]:
            M = M.t()
        P = M @ M.t()
        r = P.shape[0]
        a2 = float(torch.trace(P)) / r
        if a2 <= 0.0:
            return math.inf
        eye = torch.eye(r, dtype=P.dtype, device=P.device)
        return float(torch.linalg.norm(P / a2 - eye)) / math.sqrt(r)


def semi_orthogonal_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fill ``weight`` (out, in[, k]) with a random semi-orthogonal matrix times ``scale``.

    Viewed as (out, in * k): ``M M^T = scale^2 I`` if out <= in * k (rows of norm ``scale``,
    like Kaldi's default init whose row norms are ~1), else ``M^T M = scale^2 I``.
    """
    with torch.no_grad():
        M = torch.empty(weight.shape[0], int(weight[0].numel()), dtype=torch.float32)
        torch.nn.init.orthogonal_(M)
        weight.copy_((M * scale).reshape(weight.shape).to(weight.dtype))
    return weight

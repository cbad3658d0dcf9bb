"""Quantization quality metrics."""
import math

import torch
from torch import Tensor


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 * log10(sum x^2 / sum (x - x_hat)^2)``.

    Args:
        x: reference tensor (any float dtype/shape).
        x_hat: approximation of ``x``, same shape.

    Returns:
        A Python float; ``inf`` if ``x_hat == x`` exactly, ``-inf`` if ``x`` is all zeros (and
        ``x_hat`` is not).

    Raises:
        ValueError: if the shapes differ.
    """
    if x.shape != x_hat.shape:
        raise ValueError(
            f"sqnr_db: x and x_hat must have the same shape, got {tuple(x.shape)} and "
            f"{tuple(x_hat.shape)}"
        )
    xd = x.detach().to(torch.float64)
    signal = float(xd.pow(2).sum())
    noise = float((xd - x_hat.detach().to(torch.float64)).pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)

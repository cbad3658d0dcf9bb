"""Edge padding and chunked (streaming) evaluation of TDNN-F style networks.

A TDNN-F output frame ``k`` depends exactly on input frames ``3k - left_context ..
3k + right_context`` (``k2quant.models.tdnnf``). A long utterance can therefore be evaluated
chunk by chunk: pad the whole utterance once like ``TdnnF.forward(pad=True)`` (repeat the
first frame ``left_context`` times, the last as needed), then for output frames
``[k0, k1)`` run the network with ``pad=False`` on padded frames
``[3 k0, 3 (k1 - 1) + left_context + right_context + 1)``. Every chunk sees exactly the
inputs the whole-utterance pass sees for those frames, so an integer engine gives identical
outputs and a float network the same up to GEMM summation order.

Chunks start at multiples of the subsampling factor, so the ``x[::3]`` subsampling inside
the network keeps its phase.
"""
from typing import Callable

import torch
import torch.nn.functional as F


def num_output_frames(T: int, subsampling_factor: int) -> int:
    """``ceil(T / subsampling_factor)``: output frames of ``forward(pad=True)``."""
    return (T + subsampling_factor - 1) // subsampling_factor


def pad_features(
    x: torch.Tensor, left_context: int, right_context: int, subsampling_factor: int
) -> torch.Tensor:
    """Edge-replicate (N, T, C) features exactly like ``TdnnF._pad`` (time axis 1).

    Returns (N, left_context + sf * (T' - 1) + right_context + 1, C), T' = ceil(T / sf).
    """
    T = x.shape[1]
    sf = subsampling_factor
    t_out = num_output_frames(T, sf)
    right = sf * (t_out - 1) + right_context - (T - 1)
    if right < 0:
        x = x[:, : T + right]
        right = 0
    if left_context == 0 and right == 0:
        return x
    y = F.pad(x.transpose(1, 2), (left_context, right), mode="replicate")
    return y.transpose(1, 2)


def chunked_forward(
    forward: Callable[..., torch.Tensor],
    x: torch.Tensor,
    left_context: int,
    right_context: int,
    subsampling_factor: int,
    chunk_frames: int,
) -> torch.Tensor:
    """Evaluate ``forward(x_chunk, pad=False)`` chunk by chunk and concatenate.

    Args:
      forward: a callable with ``TdnnF.forward``'s ``pad=False`` contract (a ``TdnnF``, an
        ``IntTdnnF`` or a ``FoldedTdnnF`` bound method).
      x: float32 features (N, T, C) of the whole utterance(s).
      left_context, right_context, subsampling_factor: the network's geometry.
      chunk_frames: output frames per chunk (>= 1); each chunk consumes
        ``3 * chunk_frames + left_context + right_context - 2`` padded input frames.

    Returns:
      (N, ceil(T / 3), num_classes): what ``forward(x, pad=True)`` returns.
    """
    if not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise ValueError(f"chunked_forward: chunk_frames must be an int >= 1, got {chunk_frames!r}")
    sf = subsampling_factor
    t_out = num_output_frames(x.shape[1], sf)
    xp = pad_features(x, left_context, right_context, sf)
    outs = []
    for k0 in range(0, t_out, chunk_frames):
        k1 = min(k0 + chunk_frames, t_out)
        start = sf * k0
        stop = sf * (k1 - 1) + left_context + right_context + 1
        outs.append(forward(xp[:, start:stop], pad=False))
    return torch.cat(outs, dim=1)

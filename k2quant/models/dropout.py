"""Kaldi-style continuous dropout and its piecewise-linear schedule.

``ContinuousDropout`` is Kaldi's ``GeneralDropoutComponent`` with ``continuous=true`` as used
by ``tdnnf-layer`` and ``relu-batchnorm-dropout-layer ... dropout-per-dim-continuous=true``:
instead of zeroing units, every (sequence, channel) pair is multiplied by one scale drawn from
``Uniform[1 - 2p, 1 + 2p]`` (mean 1, so no rescaling is needed); the scale is constant over
all frames of the sequence. In eval mode it is the identity.

``DropoutSchedule`` parses Kaldi's ``--trainer.dropout-schedule`` strings, e.g. the 7q value
``'0,0@0.20,0.5@0.50,0'``: comma-separated ``value[@fraction]`` points, linearly interpolated
in the fraction of training done. The first point defaults to fraction 0 and the last to
fraction 1; the points in between must give ``@fraction``; fractions must not decrease.
(Kaldi's per-component form ``'pattern=schedule'`` is not supported.)
"""
import bisect
from typing import List, Tuple

import torch
import torch.nn as nn


def _check_proportion(p: float, where: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"{where}: dropout proportion must be a number in [0, 1), got {p!r}")
    return float(p)


class ContinuousDropout(nn.Module):
    """Continuous, time-shared dropout (Kaldi ``GeneralDropoutComponent continuous=true``).

    Input: (N, C, T) float tensor. In training mode with ``p > 0`` the output is
    ``x * m`` with ``m`` of shape (N, C, 1), ``m ~ Uniform[1 - 2p, 1 + 2p]``; otherwise ``x``.
    ``p`` is a plain attribute (not in the state dict), set by the model's schedule.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = _check_proportion(p, "ContinuousDropout")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.dim() != 3:
            raise ValueError(f"ContinuousDropout: expected (N, C, T), got {tuple(x.shape)}")
        mask = torch.empty(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
        mask.uniform_(1.0 - 2.0 * self.p, 1.0 + 2.0 * self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropoutSchedule:
    """Piecewise-linear dropout proportion as a function of training progress in [0, 1].

    Args:
      spec: Kaldi schedule string (``'0,0@0.20,0.5@0.50,0'``), a single number (constant),
        or ``None`` / ``''`` (always 0).

    ``schedule(fraction)`` returns the proportion; ``schedule.points`` is the list of
    ``(fraction, value)`` knots.
    """

    def __init__(self, spec=None) -> None:
        self.spec = spec
        self.points: List[Tuple[float, float]] = self._parse(spec)

    @staticmethod
    def _parse(spec) -> List[Tuple[float, float]]:
        if spec is None or (isinstance(spec, str) and spec.strip() == ""):
            return [(0.0, 0.0), (1.0, 0.0)]
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            v = _check_proportion(spec, "dropout_schedule")
            return [(0.0, v), (1.0, v)]
        if not isinstance(spec, str):
            raise ValueError(
                f"dropout_schedule must be a Kaldi schedule string like '0,0@0.20,0.5@0.50,0', "
                f"a number or None; got {spec!r}"
            )
        if "=" in spec:
            raise ValueError(
                f"dropout_schedule {spec!r}: per-component schedules ('pattern=schedule') are "
                f"not supported; give one schedule for all dropout layers"
            )
        items = [s.strip() for s in spec.split(",")]
        points: List[Tuple[float, float]] = []
        for i, item in enumerate(items):
            try:
                if "@" in item:
                    v_str, f_str = item.split("@", 1)
                    value, frac = float(v_str), float(f_str)
                elif i == 0:
                    value, frac = float(item), 0.0
                elif i == len(items) - 1:
                    value, frac = float(item), 1.0
                else:
                    raise ValueError("missing @fraction")
            except ValueError as e:
                raise ValueError(
                    f"dropout_schedule {spec!r}: cannot parse item {item!r} ({e}); expected "
                    f"'value[@fraction]' items, e.g. '0,0@0.20,0.5@0.50,0' (only the first and "
                    f"last item may omit @fraction)"
                ) from None
            _check_proportion(value, f"dropout_schedule {spec!r}")
            if not (0.0 <= frac <= 1.0):
                raise ValueError(
                    f"dropout_schedule {spec!r}: fraction {frac} of item {item!r} is outside [0, 1]"
                )
            if points and frac < points[-1][0]:
                raise ValueError(
                    f"dropout_schedule {spec!r}: fractions must not decrease "
                    f"({points[-1][0]} then {frac})"
                )
            points.append((frac, value))
        if len(points) == 1:
            points.append((1.0, points[0][1]))
        return points

    def __call__(self, fraction: float) -> float:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            0.0 <= fraction <= 1.0
        ):
            raise ValueError(
                f"training progress must be a fraction in [0, 1] (data processed / total), "
                f"got {fraction!r}"
            )
        pts = self.points
        if fraction <= pts[0][0]:
            return pts[0][1]
        if fraction >= pts[-1][0]:
            return pts[-1][1]
        # last knot with frac <= fraction; interpolate towards the next one
        i = bisect.bisect_right([f for f, _ in pts], fraction) - 1
        (f0, v0), (f1, v1) = pts[i], pts[i + 1]
        if f1 == f0:
            return v1
        return v0 + (v1 - v0) * (fraction - f0) / (f1 - f0)

    def __repr__(self) -> str:
        return f"DropoutSchedule({self.spec!r})"

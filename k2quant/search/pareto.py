"""Pareto fronts of model size vs sensitivity (and vs measured WER).

:func:`pareto_sweep` runs :func:`k2quant.search.allocate.allocate` over a list of budgets;
every allocation is a :class:`ParetoPoint` (size, average bits, ratio, predicted total
sensitivity, the bits/dims). :meth:`ParetoFront.front` keeps the non-dominated points (no other
point is at most as large *and* at most as sensitive, one of them strictly). Once systems are
decoded, :meth:`ParetoFront.set_wer` attaches measured WERs and ``front("wer")`` gives the
size-vs-WER front. :func:`write_pareto` writes the JSON (atomic) and a PNG plot (matplotlib,
Agg canvas, no global backend change).
"""
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from k2quant.search.allocate import Allocation, _range, _build, allocate, DEFAULT_CANDIDATE_BITS
from k2quant.search.sensitivity import SensitivityTable
from k2quant.utils.io import atomic_open, atomic_write_json

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["ParetoPoint", "ParetoFront", "pareto_sweep", "default_budgets", "non_dominated",
           "write_pareto", "plot_pareto"]

PARETO_FORMAT = "k2quant-pareto"


@dataclass
class ParetoPoint:
    """One allocation of a sweep. ``label`` names it (default ``"<kind>=<budget>"``)."""

    label: str
    budget: float
    size_bytes: float
    avg_bits: float
    ratio: float
    sensitivity: float
    bits: Dict[str, int] = field(default_factory=dict)
    dims: Dict[str, int] = field(default_factory=dict)
    wer: Optional[float] = None

    @classmethod
    def from_allocation(cls, a: Allocation, label: Optional[str] = None) -> "ParetoPoint":
        kind, value = a.budget.get("kind", "budget"), a.budget.get("value", math.nan)
        return cls(
            label=label or f"{kind}={value:g}", budget=float(value), size_bytes=a.size_bytes,
            avg_bits=a.avg_bits, ratio=a.ratio, sensitivity=a.sensitivity, bits=dict(a.bits),
            dims=dict(a.dims),
        )


def non_dominated(points: Sequence[ParetoPoint], objective: str = "sensitivity") -> List[ParetoPoint]:
    """Points not dominated in (``size_bytes``, ``objective``), sorted by size ascending.

    Points without a value of ``objective`` (e.g. no WER yet) are ignored. Along the result
    the objective strictly decreases as the size grows.
    """
    pts = [p for p in points if getattr(p, objective) is not None
           and math.isfinite(getattr(p, objective))]
    pts.sort(key=lambda p: (p.size_bytes, getattr(p, objective)))
    out: List[ParetoPoint] = []
    best = math.inf
    for p in pts:
        v = getattr(p, objective)
        if v < best:
            out.append(p)
            best = v
    return out


@dataclass
class ParetoFront:
    """All points of a sweep plus how they were made (``budget_kind``, ``metric``,
    ``fp32_bytes``, ``skipped`` budgets with the reason)."""

    budget_kind: str
    metric: str
    fp32_bytes: float
    points: List[ParetoPoint]
    skipped: List[Dict[str, Any]] = field(default_factory=list)

    def front(self, objective: str = "sensitivity") -> List[ParetoPoint]:
        """Non-dominated points for ``objective`` (``sensitivity`` or ``wer``)."""
        if objective not in ("sensitivity", "wer"):
            raise ValueError(f"objective must be 'sensitivity' or 'wer'; got {objective!r}")
        return non_dominated(self.points, objective)

    def set_wer(self, wers: Mapping[Union[str, int], float]) -> None:
        """Attach measured WERs (%), keyed by point label or index into :attr:`points`."""
        by_label = {p.label: p for p in self.points}
        for k, v in wers.items():
            if isinstance(k, int) and not isinstance(k, bool):
                if not 0 <= k < len(self.points):
                    raise ValueError(f"set_wer: index {k} out of range 0..{len(self.points) - 1}")
                self.points[k].wer = float(v)
            elif k in by_label:
                by_label[k].wer = float(v)
            else:
                raise ValueError(
                    f"set_wer: unknown point {k!r}; labels are {list(by_label)}"
                )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": PARETO_FORMAT,
            "budget_kind": self.budget_kind,
            "metric": self.metric,
            "fp32_bytes": self.fp32_bytes,
            "points": [dataclasses.asdict(p) for p in self.points],
            "front": [p.label for p in self.front("sensitivity")],
            "front_wer": [p.label for p in self.front("wer")],
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParetoFront":
        if not isinstance(d, Mapping) or d.get("format") != PARETO_FORMAT:
            raise ValueError(f"not a k2quant Pareto file (format={PARETO_FORMAT!r})")
        return cls(d["budget_kind"], d["metric"], float(d["fp32_bytes"]),
                   [ParetoPoint(**p) for p in d["points"]], list(d.get("skipped", [])))

    @classmethod
    def load(cls, path: PathLike) -> "ParetoFront":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def default_budgets(table: SensitivityTable, kind: str = "avg_bits", num: int = 8,
                    **allocate_kwargs: Any) -> List[float]:
    """``num`` budgets evenly spaced from the floor (every layer at its minimum width) to the
    widest candidate configuration (not fp32, where nothing changes)."""
    keys = ("bits", "dims", "ties", "tie_pairs", "min_bits", "max_bits")
    kw = {k: allocate_kwargs[k] for k in keys if k in allocate_kwargs}
    prob = _build(table, kw.get("bits", DEFAULT_CANDIDATE_BITS), kw.get("dims"),
                  allocate_kwargs.get("metric", "hawq"), kw.get("ties"),
                  kw.get("tie_pairs", False), kw.get("min_bits"), kw.get("max_bits"))
    lo, _ = _range(prob, kind)
    widest = {n: max(prob.allowed[n]) for n in table.layers}
    dims = {p: max(ds) for p, ds in prob.pair_dims.items()}
    from k2quant.search.allocate import _measure_state

    size, nbits, nparams, _ = _measure_state(prob, widest, dims)
    if kind == "avg_bits":
        hi = nbits / max(nparams, 1)
    elif kind == "size_bytes":
        hi = size
    else:  # ratio: from the widest config (smallest ratio) to the largest ratio
        lo, hi = prob.fp32_bytes / size, _range(prob, kind)[1]
    if num < 2:
        return [hi]
    return [lo + (hi - lo) * i / (num - 1) for i in range(num)]


def pareto_sweep(
    table: SensitivityTable,
    budgets: Optional[Sequence[float]] = None,
    budget_kind: str = "avg_bits",
    num: int = 8,
    **allocate_kwargs: Any,
) -> ParetoFront:
    """Allocate at every budget and collect the points.

    Args:
      table: the sensitivity table.
      budgets: budget values of kind ``budget_kind`` (``avg_bits``, ``size_bytes``, ``ratio``);
        default :func:`default_budgets` (``num`` values). Infeasible budgets are skipped (listed
        in ``front.skipped`` with the error).
      **allocate_kwargs: passed to :func:`~k2quant.search.allocate.allocate` (``metric``,
        ``bits``, ``dims``, ``ties``, ``min_bits``, ``method``, ...).
    """
    if budget_kind not in ("avg_bits", "size_bytes", "ratio"):
        raise ValueError(f"budget_kind must be avg_bits, size_bytes or ratio; got {budget_kind!r}")
    if budgets is None:
        budgets = default_budgets(table, budget_kind, num, **allocate_kwargs)
    points, skipped = [], []
    for b in budgets:
        try:
            a = allocate(table, **{budget_kind: float(b)}, **allocate_kwargs)
        except ValueError as e:
            logger.warning("pareto: skipping budget %s=%g: %s", budget_kind, b, e)
            skipped.append({"budget": float(b), "error": str(e)})
            continue
        points.append(ParetoPoint.from_allocation(a))
    return ParetoFront(budget_kind, allocate_kwargs.get("metric", "hawq"), table.fp32_bytes,
                       points, skipped)


def plot_pareto(front: ParetoFront, png_path: PathLike, title: Optional[str] = None) -> None:
    """PNG: size (MB, bottom axis; ratio on top) vs predicted sensitivity, and vs WER in a
    second panel if any point has one. All points grey, the front highlighted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    has_wer = any(p.wer is not None for p in front.points)
    fig = Figure(figsize=(11 if has_wer else 6, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_wer else 1, squeeze=False)[0]
    panels = [("sensitivity", f"total sensitivity ({front.metric})")]
    if has_wer:
        panels.append(("wer", "WER (%)"))
    for ax, (obj, ylabel) in zip(axes, panels):
        pts = [p for p in front.points if getattr(p, obj) is not None]
        ax.scatter([p.size_bytes / 1e6 for p in pts], [getattr(p, obj) for p in pts],
                   color="0.6", s=18, label="allocations")
        fr = front.front(obj)
        ax.plot([p.size_bytes / 1e6 for p in fr], [getattr(p, obj) for p in fr], "o-",
                color="C0", label="Pareto front")
        for p in fr:
            ax.annotate(f"{p.avg_bits:.2f}b", (p.size_bytes / 1e6, getattr(p, obj)),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel(ylabel)
        if obj == "sensitivity" and all(getattr(p, obj) > 0 for p in pts) and pts:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fp32_mb = front.fp32_bytes / 1e6
        sec = ax.secondary_xaxis(
            "top", functions=(lambda x: fp32_mb / (x + 1e-12), lambda r: fp32_mb / (r + 1e-12))
        )
        sec.set_xlabel("compression vs fp32 (x)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def write_pareto(front: ParetoFront, json_path: PathLike, png_path: Optional[PathLike] = None,
                 title: Optional[str] = None) -> None:
    """Write ``front`` as JSON (all points, the front's labels, skipped budgets) and, if
    ``png_path`` is given, the plot (:func:`plot_pareto`). Both atomic."""
    atomic_write_json(json_path, front.to_dict())
    if png_path is not None:
        plot_pareto(front, png_path, title=title)

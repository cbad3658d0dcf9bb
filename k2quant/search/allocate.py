"""Mixed-precision bit (and TDNN-F bottleneck) allocation from a sensitivity table.

Choose exactly one weight bit width per layer from a candidate set (default
``{1, 2, 3, 4, 6, 8}``) and, optionally, one bottleneck dimension per TDNN-F pair, minimising
the total sensitivity (:class:`~k2quant.search.sensitivity.SensitivityTable`, metric ``hawq``,
``kl``, ``loss`` or ``mse``) subject to one budget:

* ``avg_bits``: average bit width over the quantized weights, ``sum n_i b_i / sum n_i``;
* ``size_bytes``: model bytes ``sum_i (n_i b_i / 8 + overhead_i + 4 * float_i) + 4 * other``
  with ``overhead_i`` the layer's quantization metadata (per-channel scales, zero points,
  codebooks; measured by freezing the layer, as the packed format stores it), ``float_i``
  its biases and ``other`` the parameters outside the quantized layers (as
  :func:`k2quant.plan.model_size_bytes`, plus the scale overhead);
* ``ratio``: compression vs fp32, i.e. ``size_bytes <= fp32_bytes / ratio``.

Exact ILP (HAWQ-V3, GUIDE section 4) with :func:`scipy.optimize.milp`. Formulation: the
decision is split into *units*, each with one-hot binary option variables ``x_{u,o}``
(``sum_o x_{u,o} = 1``):

* an ordinary layer is a unit whose options are its bit widths ``x_{i,b}``;
* a TDNN-F pair whose bottleneck is searched is *one* unit whose options enumerate the joint
  choices ``(d, b_linear, b_affine)``. The size of a pair under dim ``d`` and bits
  ``(b1, b2)`` is ``n_lin(d) b1 / 8 + n_aff(d) b2 / 8 + ...``: a product of two decisions,
  which the joint enumeration makes linear without product variables (``|D| |B|^2`` options,
  e.g. 4 * 36 = 144 per pair). Its cost is ``S_dim(d) + S(lin, b1 | d) + S(aff, b2 | d)``
  (additive sensitivities; ``S_dim`` of the current dim is 0).

Constraints: the budget row (for ``avg_bits``: ``sum_o x_o (bits_o - B n_o) <= 0``, linear),
and tie rows: for layers ``i, j`` that must share a width and every width ``b``,
``sel(i, b) = sel(j, b)`` where ``sel(i, b)`` sums the options giving layer ``i`` width ``b``.
Per-layer ``min_bits``/``max_bits`` (e.g. keep ``output`` at >= 8 bits) restrict the options.

Greedy fallback (``method="greedy"``, or ``"auto"`` when scipy has no ``milp``, scipy < 1.9):
start with every layer at its widest width and every pair at its current dim; repeatedly
apply the move (one tie group one width lower, or one pair one dim smaller) with the
smallest sensitivity increase per unit of budget saved until the budget holds; then
repeatedly apply the upward move that lowers the sensitivity most while the budget still
holds. Feasible by construction; not guaranteed optimal.
"""
import dataclasses
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from k2quant.plan import LayerConfig, Plan
from k2quant.search._common import (
    BUDGET_KINDS,
    DEFAULT_CANDIDATE_BITS,
    apply_bottleneck_dims,
    check_model_has_layers,
)
from k2quant.search.sensitivity import FLOAT_BITS, METRICS, SensitivityTable
from k2quant.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DEFAULT_CANDIDATE_BITS",
    "BUDGET_KINDS",
    "Allocation",
    "allocate",
    "budget_range",
    "have_milp",
]

_BUDGET_UNITS = {"avg_bits": "avg bits", "size_bytes": "bytes", "ratio": "x compression"}
ALLOCATION_FORMAT = "k2quant-allocation"


def have_milp() -> bool:
    """True if :func:`scipy.optimize.milp` exists (scipy >= 1.9)."""
    try:
        from scipy.optimize import milp  # noqa: F401
    except ImportError:
        return False
    return True


# =============================================================================================
# Result
# =============================================================================================
@dataclass
class Allocation:
    """A chosen configuration.

    Attributes:
      bits: ``{layer: weight bits}`` for every layer of the table.
      dims: ``{pair: bottleneck dim}`` for the pairs whose dimension was searched (apply with
        :meth:`apply_dims` before ``quantize_``).
      size_bytes: predicted model bytes (see the module docstring).
      avg_bits: average weight bits over the quantized weights.
      fp32_bytes: bytes of the float model (4 per parameter).
      sensitivity: total predicted sensitivity (metric ``metric``).
      method: ``"ilp"`` or ``"greedy"``.
      budget: ``{"kind": ..., "value": ...}``.
      quantizer: the weight quantizer the table was computed with (default of :meth:`to_plan`).
    """

    bits: Dict[str, int]
    dims: Dict[str, int]
    size_bytes: float
    avg_bits: float
    fp32_bytes: float
    sensitivity: float
    metric: str
    method: str
    budget: Dict[str, Any] = field(default_factory=dict)
    quantizer: Any = "uniform"

    @property
    def ratio(self) -> float:
        """Compression ratio vs fp32, ``fp32_bytes / size_bytes``."""
        return self.fp32_bytes / self.size_bytes if self.size_bytes > 0 else math.inf

    def _base_config(self, layer: str) -> LayerConfig:
        q = self.quantizer
        if isinstance(q, str):
            return LayerConfig(weight_quantizer=q)
        if isinstance(q, Mapping) and q.get("format") == "k2quant-plan":
            return Plan.from_dict(q).config_for(layer) or LayerConfig()
        if isinstance(q, Mapping):
            return LayerConfig.from_dict(q)
        return LayerConfig()

    def to_plan(
        self,
        weight_quantizer: Optional[str] = None,
        act_bits: Optional[int] = None,
        act_quantizer: Optional[str] = None,
        granularity: Optional[str] = None,
        weight_options: Optional[Dict[str, Any]] = None,
        model: Optional[nn.Module] = None,
    ) -> Plan:
        """A :class:`~k2quant.plan.Plan` with one exact-name key per layer.

        Unset arguments come from the quantizer the sensitivities were computed with
        (``self.quantizer``); ``act_bits`` applies to every layer (``None``: float
        activations). With ``model``, layers the model lacks raise ``ValueError``.
        """
        if model is not None:
            check_model_has_layers(model, self.bits, "allocation")
        layers = {}
        for name, b in self.bits.items():
            base = self._base_config(name)
            kw: Dict[str, Any] = {"weight_bits": int(b), "act_bits": act_bits}
            if weight_quantizer is not None:
                kw["weight_quantizer"] = weight_quantizer
                if weight_quantizer != base.weight_quantizer and weight_options is None:
                    kw["weight_options"] = {}
            if act_quantizer is not None:
                kw["act_quantizer"] = act_quantizer
            if granularity is not None:
                kw["granularity"] = granularity
            if weight_options is not None:
                kw["weight_options"] = dict(weight_options)
            layers[name] = dataclasses.replace(base, **kw)
        return Plan(layers, default=None)

    def apply_dims(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Re-factorise ``model``'s TDNN-F pairs to :attr:`dims` in place (before
        ``quantize_``). Returns the :func:`refactor_bottleneck` infos of the changed layers."""
        return apply_bottleneck_dims(model, self.dims, "allocation")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = ALLOCATION_FORMAT
        d["ratio"] = self.ratio
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Allocation":
        if not isinstance(d, Mapping) or d.get("format") != ALLOCATION_FORMAT:
            raise ValueError(f"not a k2quant allocation (format={ALLOCATION_FORMAT!r}): {str(d)[:200]}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> "Allocation":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# =============================================================================================
# Problem construction
# =============================================================================================
@dataclass
class _Option:
    bits: Dict[str, int]
    dim: Optional[int]
    cost: float
    size: float  # bytes of the unit's layers
    nbits: float  # sum n_i b_i
    nparams: int  # sum n_i


@dataclass
class _Unit:
    name: str  # layer name or pair name
    layers: List[str]
    pair: Optional[str]
    options: List[_Option]


def _expand(table: SensitivityTable, keys: Sequence[str], what: str) -> List[str]:
    names = list(table.layers)
    out, unknown = [], []
    for key in keys:
        if not isinstance(key, str):
            raise ValueError(f"{what}: layer names must be strings; received {key!r}")
        if key.startswith("re:"):
            pat = re.compile(key[3:])
            hit = [n for n in names if pat.fullmatch(n)]
        else:
            hit = [key] if key in table.layers else []
        if not hit:
            unknown.append(key)
        out.extend(h for h in hit if h not in out)
    if unknown:
        raise ValueError(
            f"{what} names layers the sensitivity table lacks: {unknown}; its layers are {names}"
        )
    return out


def _per_layer_limit(table, spec, what) -> Dict[str, int]:
    if spec is None:
        return {}
    if isinstance(spec, int) and not isinstance(spec, bool):
        return {n: spec for n in table.layers}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{what} must be an int or a dict {{layer or 're:...': bits}}; got {spec!r}")
    out: Dict[str, int] = {}
    # exact names beat patterns (as in Plan); among patterns the first match wins
    for key, v in spec.items():
        if key.startswith("re:"):
            for n in _expand(table, [key], what):
                out.setdefault(n, int(v))
    for key, v in spec.items():
        if not key.startswith("re:"):
            _expand(table, [key], what)
            out[key] = int(v)
    return out


class _UnionFind:
    def __init__(self, items):
        self.p = {i: i for i in items}

    def find(self, x):
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[rb] = ra


@dataclass
class _Problem:
    table: SensitivityTable
    metric: str
    units: List[_Unit]
    allowed: Dict[str, List[int]]
    groups: List[List[str]]  # tie groups (each layer in exactly one, singletons included)
    pair_dims: Dict[str, List[int]]
    fixed_bytes: float
    fp32_bytes: float

    def layer_cost(self, layer: str, b: int, dim: Optional[int]) -> float:
        return self.table.score(layer, b, dim, self.metric)


def _resolve_dims(table: SensitivityTable, dims: Any) -> Dict[str, List[int]]:
    if dims is None or dims is False:
        return {}
    if not table.pairs:
        raise ValueError(
            "bottleneck search requested (dims=...) but the sensitivity table has no bottleneck "
            "candidates; compute it with compute_sensitivity(..., dims=[...])"
        )
    if dims is True or dims == "all":
        return {p: list(v["dims"]) for p, v in table.pairs.items()}
    if isinstance(dims, Mapping):
        unknown = [p for p in dims if p not in table.pairs]
        if unknown:
            raise ValueError(
                f"dims names pairs without bottleneck candidates in the table: {unknown}; "
                f"table pairs: {list(table.pairs)}"
            )
        wanted = {p: list(v) for p, v in dims.items()}
    else:
        wanted = {p: list(dims) for p in table.pairs}
    out = {}
    for p, ds in wanted.items():
        have = set(table.pairs[p]["dims"])
        cur = table.pairs[p]["dim"]
        ds = sorted(set(int(d) for d in ds) | {cur})
        missing = [d for d in ds if d not in have]
        if missing:
            raise ValueError(
                f"bottleneck dims {missing} of {p} are not in the sensitivity table (it has "
                f"{sorted(have)}); recompute it with these dims"
            )
        out[p] = ds
    return out


def _build(table, bits, dims, metric, ties, tie_pairs, min_bits, max_bits) -> _Problem:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    if not table.layers:
        raise ValueError("the sensitivity table has no layers")
    cand = sorted({int(b) for b in bits})
    lo = _per_layer_limit(table, min_bits, "min_bits")
    hi = _per_layer_limit(table, max_bits, "max_bits")
    allowed: Dict[str, List[int]] = {}
    for n in table.layers:
        have = table.bits_for(n)
        a = [b for b in cand if b in have and lo.get(n, 0) <= b <= hi.get(n, 99)]
        if not a:
            raise ValueError(
                f"layer {n!r} has no admissible bit width: candidates {cand}, in the table "
                f"{have}, min_bits={lo.get(n)}, max_bits={hi.get(n)}"
            )
        allowed[n] = a
    # ties
    uf = _UnionFind(list(table.layers))
    tie_groups = [list(g) for g in (ties or [])]
    if isinstance(ties, (str,)) or any(isinstance(g, str) for g in (ties or [])):
        raise ValueError(
            "ties must be a list of groups, each a list of layer names or 're:' patterns, e.g. "
            "[['tdnnfs.0.linear', 'tdnnfs.0.affine'], ['re:tdnnfs\\\\..*\\\\.affine']]"
        )
    if tie_pairs:
        pairs = {p: (v["linear"], v["affine"]) for p, v in table.pairs.items()}
        for n in table.layers:  # also pairs without bottleneck candidates
            if n.endswith(".linear") and n[: -len("linear")] + "affine" in table.layers:
                pairs.setdefault(n[: -len(".linear")], (n, n[: -len("linear")] + "affine"))
        tie_groups += [list(v) for v in pairs.values()]
    for g in tie_groups:
        members = _expand(table, g, "ties")
        for m in members[1:]:
            uf.union(members[0], m)
    groups_d: Dict[str, List[str]] = {}
    for n in table.layers:
        groups_d.setdefault(uf.find(n), []).append(n)
    groups = list(groups_d.values())
    for g in groups:
        common = sorted(set.intersection(*(set(allowed[n]) for n in g)))
        if not common:
            raise ValueError(
                f"tied layers {g} have no common admissible bit width "
                f"({ {n: allowed[n] for n in g} }); relax min_bits/max_bits or the ties"
            )
        for n in g:
            allowed[n] = common
    pair_dims = _resolve_dims(table, dims)
    prob = _Problem(table, metric, [], allowed, groups, pair_dims,
                    fixed_bytes=4.0 * table.other_float_params, fp32_bytes=table.fp32_bytes)
    in_pair = {}
    for p in pair_dims:
        in_pair[table.pairs[p]["linear"]] = p
        in_pair[table.pairs[p]["affine"]] = p
    done = set()
    for n in table.layers:
        if n in done:
            continue
        p = in_pair.get(n)
        if p is None:
            opts = []
            for b in allowed[n]:
                e = table.get(n, b)
                opts.append(_Option({n: b}, None, prob.layer_cost(n, b, None), e.size_bytes(),
                                    e.n_params * b, e.n_params))
            prob.units.append(_Unit(n, [n], None, opts))
            done.add(n)
            continue
        lin, aff = table.pairs[p]["linear"], table.pairs[p]["affine"]
        opts = []
        for d in pair_dims[p]:
            dim_cost = table.score(p, FLOAT_BITS, d, metric)
            for b1, b2 in itertools.product(allowed[lin], allowed[aff]):
                e1, e2 = table.get(lin, b1, d), table.get(aff, b2, d)
                opts.append(_Option(
                    {lin: b1, aff: b2}, d,
                    dim_cost + prob.layer_cost(lin, b1, d) + prob.layer_cost(aff, b2, d),
                    e1.size_bytes() + e2.size_bytes(),
                    e1.n_params * b1 + e2.n_params * b2, e1.n_params + e2.n_params,
                ))
        prob.units.append(_Unit(p, [lin, aff], p, opts))
        done.update((lin, aff))
    return prob


# =============================================================================================
# Budget
# =============================================================================================
def _parse_budget(avg_bits, size_bytes, ratio) -> Tuple[str, float]:
    given = [(k, v) for k, v in (("avg_bits", avg_bits), ("size_bytes", size_bytes),
                                 ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            "give exactly one budget: avg_bits=..., size_bytes=... or ratio=... (compression "
            f"vs fp32); received {dict(given) or 'none'}"
        )
    kind, value = given[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"budget {kind} must be a finite number; received {value!r}")
    return kind, float(value)


def _fmt(kind: str, v: float) -> str:
    if kind == "size_bytes":
        return f"{v:,.0f}"
    s = f"{v:.4g}"
    return s if ("." in s or "e" in s or "inf" in s) else s + ".0"


def _floor_state(prob: _Problem) -> Tuple[Dict[str, int], Dict[str, int]]:
    bits = {n: min(prob.allowed[n]) for n in prob.table.layers}
    dims = {p: min(ds) for p, ds in prob.pair_dims.items()}
    return bits, dims


def _measure_state(prob: _Problem, bits: Mapping[str, int], dims: Mapping[str, int]):
    """(size_bytes incl. fixed, sum n b, sum n, sensitivity) of a full assignment."""
    t = prob.table
    dim_of = {}
    for p, d in dims.items():
        dim_of[t.pairs[p]["linear"]] = d
        dim_of[t.pairs[p]["affine"]] = d
    size, nbits, nparams, cost = prob.fixed_bytes, 0.0, 0, 0.0
    for n, b in bits.items():
        d = dim_of.get(n)
        e = t.get(n, b, d)
        size += e.size_bytes()
        nbits += e.n_params * b
        nparams += e.n_params
        cost += prob.layer_cost(n, b, d)
    for p, d in dims.items():
        cost += t.score(p, FLOAT_BITS, d, prob.metric)
    return size, nbits, nparams, cost


def budget_range(table: SensitivityTable, kind: str = "avg_bits", **kwargs) -> Tuple[float, float]:
    """``(floor, ceiling)`` of a budget kind: the floor is every layer at its minimum admissible
    width (and the smallest bottleneck candidates), the ceiling fp32 (32 avg bits,
    ``fp32_bytes``, ratio 1). For ``ratio`` the pair is ``(1.0, max ratio)``. ``kwargs``:
    ``bits``, ``dims``, ``ties``, ``tie_pairs``, ``min_bits``, ``max_bits`` as in
    :func:`allocate`."""
    prob = _build(table, kwargs.get("bits", DEFAULT_CANDIDATE_BITS), kwargs.get("dims"),
                  "hawq" if "hawq" in _available_metrics(table) else _available_metrics(table)[0],
                  kwargs.get("ties"), kwargs.get("tie_pairs", False), kwargs.get("min_bits"),
                  kwargs.get("max_bits"))
    return _range(prob, kind)


def _available_metrics(table: SensitivityTable) -> List[str]:
    e = next(iter(table.entries.values()))
    return [m for m in METRICS if getattr(e, m) is not None] or ["hawq"]


def _range(prob: _Problem, kind: str) -> Tuple[float, float]:
    size, nbits, nparams, _ = _measure_state(prob, *_floor_state(prob))
    if kind == "avg_bits":
        return nbits / max(nparams, 1), float(FLOAT_BITS)
    if kind == "size_bytes":
        return size, prob.fp32_bytes
    return 1.0, prob.fp32_bytes / size


def _check_budget(prob: _Problem, kind: str, value: float) -> None:
    lo, hi = _range(prob, kind)
    unit = _BUDGET_UNITS[kind]
    if kind == "ratio":
        if value < 1.0:
            raise ValueError(
                f"budget ratio {value:.4g}x is above fp32 (ratio 1.0: the float model itself); "
                f"feasible: {_fmt(kind, lo)}..{_fmt(kind, hi)}"
            )
        if value > hi * (1 + 1e-12):
            raise ValueError(
                f"budget ratio {value:.4g}x is below the floor: the largest compression is "
                f"{hi:.4g}x (all layers at their minimum width); feasible: "
                f"{_fmt(kind, lo)}..{_fmt(kind, hi)}"
            )
        return
    if value < lo * (1 - 1e-12):
        raise ValueError(
            f"budget {_fmt(kind, value)} {unit} is below the floor {_fmt(kind, lo)} (all layers "
            f"at their minimum width); feasible: {_fmt(kind, lo)}..{_fmt(kind, hi)}"
        )
    if value > hi * (1 + 1e-12):
        raise ValueError(
            f"budget {_fmt(kind, value)} {unit} is above fp32 ({_fmt(kind, hi)}); "
            f"feasible: {_fmt(kind, lo)}..{_fmt(kind, hi)}"
        )


def _limit_row(prob: _Problem, kind: str, value: float) -> Tuple[List[List[float]], float]:
    """Per unit/option coefficients and the right-hand side of ``row . x <= rhs``."""
    if kind == "avg_bits":
        return [[o.nbits - value * o.nparams for o in u.options] for u in prob.units], 0.0
    limit = value if kind == "size_bytes" else prob.fp32_bytes / value
    return [[o.size for o in u.options] for u in prob.units], limit - prob.fixed_bytes


# =============================================================================================
# Solvers
# =============================================================================================
def _solve_ilp(prob: _Problem, kind: str, value: float, time_limit: Optional[float]):
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    offs, k = [], 0
    for u in prob.units:
        offs.append(k)
        k += len(u.options)
    nvar = k
    cost = np.array([o.cost for u in prob.units for o in u.options], dtype=np.float64)
    scale = float(np.max(np.abs(cost))) if cost.size else 1.0
    c = cost / (scale if scale > 0 else 1.0)
    rows, lbs, ubs = [], [], []

    one_hot = lil_matrix((len(prob.units), nvar))
    for ui, u in enumerate(prob.units):
        for oi in range(len(u.options)):
            one_hot[ui, offs[ui] + oi] = 1.0
    rows.append(one_hot)
    lbs += [1.0] * len(prob.units)
    ubs += [1.0] * len(prob.units)

    coef, rhs = _limit_row(prob, kind, value)
    flat = np.array([x for r in coef for x in r], dtype=np.float64)
    bscale = max(float(np.max(np.abs(flat))) if flat.size else 1.0, abs(rhs), 1e-30)
    brow = lil_matrix((1, nvar))
    for j, x in enumerate(flat):
        if x != 0:
            brow[0, j] = x / bscale
    rows.append(brow)
    lbs.append(-np.inf)
    ubs.append(rhs / bscale + 1e-9)

    # ties: sel(i, b) == sel(j, b)
    unit_of = {n: ui for ui, u in enumerate(prob.units) for n in u.layers}
    tie_rows = []
    for g in prob.groups:
        for n in g[1:]:
            for b in prob.allowed[g[0]]:
                r = {}
                for name, sign in ((g[0], 1.0), (n, -1.0)):
                    ui = unit_of[name]
                    for oi, o in enumerate(prob.units[ui].options):
                        if o.bits[name] == b:
                            r[offs[ui] + oi] = r.get(offs[ui] + oi, 0.0) + sign
                tie_rows.append(r)
    if tie_rows:
        tm = lil_matrix((len(tie_rows), nvar))
        for i, r in enumerate(tie_rows):
            for j, x in r.items():
                if x != 0:
                    tm[i, j] = x
        rows.append(tm)
        lbs += [0.0] * len(tie_rows)
        ubs += [0.0] * len(tie_rows)

    from scipy.sparse import vstack

    A = vstack([r.tocsr() for r in rows]).tocsr()
    options = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(c=c, integrality=np.ones(nvar), bounds=Bounds(0, 1),
               constraints=LinearConstraint(A, np.array(lbs), np.array(ubs)), options=options)
    if res.x is None or res.status not in (0, 1):  # 1: time/iteration limit with a solution
        return None, res.message
    x = np.round(res.x).astype(int)
    bits, dims = {}, {}
    for ui, u in enumerate(prob.units):
        sel = [oi for oi in range(len(u.options)) if x[offs[ui] + oi] == 1]
        if len(sel) != 1:
            return None, f"ILP returned a non one-hot solution for {u.name}"
        o = u.options[sel[0]]
        bits.update(o.bits)
        if u.pair is not None:
            dims[u.pair] = o.dim
    if res.status == 1:
        logger.warning("allocate: the ILP hit its time limit; the solution may not be optimal")
    return (bits, dims), res.message


def _use(prob: _Problem, kind: str, value: float, bits, dims) -> float:
    """Budget usage minus its limit (<= 0 means within budget)."""
    size, nbits, nparams, _ = _measure_state(prob, bits, dims)
    if kind == "avg_bits":
        return nbits - value * nparams
    limit = value if kind == "size_bytes" else prob.fp32_bytes / value
    return size - limit


def _solve_greedy(prob: _Problem, kind: str, value: float):
    tol = 1e-9
    bits = {n: max(prob.allowed[n]) for n in prob.table.layers}
    dims = {p: max(ds) for p, ds in prob.pair_dims.items()}
    groups = prob.groups

    def state_cost(b, d):
        return _measure_state(prob, b, d)[3]

    def moves(b, d, down: bool):
        out = []
        for g in groups:
            a = prob.allowed[g[0]]
            cur = b[g[0]]
            targets = [x for x in a if (x < cur if down else x > cur)]
            if down:
                targets = targets[-1:]  # one step
            for t in targets:
                nb = dict(b)
                for n in g:
                    nb[n] = t
                out.append((nb, d))
        for p, ds in prob.pair_dims.items():
            cur = d[p]
            targets = [x for x in ds if (x < cur if down else x > cur)]
            if down:
                targets = targets[-1:]
            for t in targets:
                nd = dict(d)
                nd[p] = t
                out.append((b, nd))
        return out

    use = _use(prob, kind, value, bits, dims)
    cost = state_cost(bits, dims)
    scale = max(abs(use), 1.0)
    while use > tol * scale:
        best = None
        for nb, nd in moves(bits, dims, down=True):
            u2 = _use(prob, kind, value, nb, nd)
            saved = use - u2
            if saved <= 0:
                continue
            c2 = state_cost(nb, nd)
            key = (c2 - cost) / saved
            if best is None or key < best[0]:
                best = (key, nb, nd, u2, c2)
        if best is None:
            return None, "greedy: no move reaches the budget"
        _, bits, dims, use, cost = best
    # refinement: spend the remaining budget where it lowers the sensitivity most
    while True:
        best = None
        for nb, nd in moves(bits, dims, down=False):
            u2 = _use(prob, kind, value, nb, nd)
            if u2 > tol * scale:
                continue
            c2 = state_cost(nb, nd)
            if c2 < cost - 1e-15 * max(abs(cost), 1.0) and (best is None or c2 < best[0]):
                best = (c2, nb, nd, u2)
        if best is None:
            break
        cost, bits, dims, use = best
    return (bits, dims), "greedy"


# =============================================================================================
# Entry point
# =============================================================================================
def allocate(
    table: SensitivityTable,
    *,
    avg_bits: Optional[float] = None,
    size_bytes: Optional[float] = None,
    ratio: Optional[float] = None,
    bits: Sequence[int] = DEFAULT_CANDIDATE_BITS,
    dims: Union[None, bool, str, Sequence[int], Mapping[str, Sequence[int]]] = None,
    metric: str = "hawq",
    ties: Optional[Sequence[Sequence[str]]] = None,
    tie_pairs: bool = False,
    min_bits: Union[None, int, Mapping[str, int]] = None,
    max_bits: Union[None, int, Mapping[str, int]] = None,
    method: str = "auto",
    model: Optional[nn.Module] = None,
    time_limit: Optional[float] = None,
) -> Allocation:
    """Choose bits per layer (and bottleneck dims) under a budget; see the module docstring.

    Args:
      table: sensitivities (:func:`~k2quant.search.sensitivity.compute_sensitivity`).
      avg_bits / size_bytes / ratio: exactly one budget.
      bits: candidate widths (intersected with the table's).
      dims: ``None`` (keep the current bottlenecks), ``True``/``"all"`` (every candidate in the
        table), a list (for every pair) or ``{pair: [dims]}``.
      metric: ``hawq``, ``kl``, ``loss`` or ``mse``.
      ties: groups of layers sharing one width, each a list of names / ``re:`` patterns
        (one pattern alone ties all layers it matches).
      tie_pairs: tie each TDNN-F pair's ``linear`` and ``affine``.
      min_bits, max_bits: an int for every layer or ``{name or 're:...': bits}`` (exact names
        beat patterns), e.g. ``min_bits={"output": 8}``.
      method: ``"ilp"``, ``"greedy"`` or ``"auto"`` (ILP if scipy has ``milp``).
      model: if given, layers of the table the model lacks raise ``ValueError``.
      time_limit: seconds for the ILP solver.

    Raises:
      ValueError: no or several budgets; a budget below the floor or above fp32 (the message
        gives the feasible range); unknown layers; infeasible constraints.
    """
    if model is not None:
        table.check_model(model)
    if method not in ("auto", "ilp", "greedy"):
        raise ValueError(f"method must be 'auto', 'ilp' or 'greedy'; got {method!r}")
    kind, value = _parse_budget(avg_bits, size_bytes, ratio)
    prob = _build(table, bits, dims, metric, ties, tie_pairs, min_bits, max_bits)
    _check_budget(prob, kind, value)
    use_ilp = method == "ilp" or (method == "auto" and have_milp())
    if method == "ilp" and not have_milp():
        raise ValueError(
            "method='ilp' needs scipy.optimize.milp (scipy >= 1.9); upgrade scipy or use "
            "method='greedy'"
        )
    if use_ilp:
        sol, msg = _solve_ilp(prob, kind, value, time_limit)
        used = "ilp"
    else:
        sol, msg = _solve_greedy(prob, kind, value)
        used = "greedy"
    if sol is None:
        lo, hi = _range(prob, kind)
        raise ValueError(
            f"no allocation satisfies budget {kind}={_fmt(kind, value)} with these constraints "
            f"({msg}); feasible without ties: {_fmt(kind, lo)}..{_fmt(kind, hi)}"
        )
    b, d = sol
    size, nbits, nparams, cost = _measure_state(prob, b, d)
    return Allocation(
        bits={n: int(b[n]) for n in table.layers},
        dims={p: int(v) for p, v in d.items()},
        size_bytes=size,
        avg_bits=nbits / max(nparams, 1),
        fp32_bytes=prob.fp32_bytes,
        sensitivity=cost,
        metric=metric,
        method=used,
        budget={"kind": kind, "value": value},
        quantizer=table.method.get("quantizer", "uniform"),
    )

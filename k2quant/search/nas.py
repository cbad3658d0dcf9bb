"""Differentiable mixed-precision search (DARTS/FBNet-style NAS) for weights, optionally with
the bottleneck dimension of every TDNN-F layer.

Method (arXiv 2112.11438 / 2111.14479, "mixed-precision NAS"): every searched layer ``i``
(``nn.Linear``, ``nn.Conv1d`` or ``nn.Embedding``) becomes a :class:`MixedPrecisionLayer`
whose weight is the mixture of its fake-quantized versions at the candidate bit widths ``B``::

    p_i = softmax(alpha_i / tau)                       (one architecture vector per layer)
    W_i^mix = sum_{b in B} p_{i,b} * Q_b(W_i)           (one quantizer per candidate, shared W_i)

With ``gumbel=True`` the mixture weights of the forward are ``softmax((alpha_i + g) / tau)``
with fresh Gumbel(0, 1) noise ``g`` at every search step (``hard=True``: straight-through
one-hot of that sample). ``tau`` is annealed exponentially from ``tau[0]`` to ``tau[1]``.

Model size (bytes; quantized weights at ``b / 8`` bytes per element, every other float
parameter at 4 bytes as in :func:`k2quant.plan.model_size_bytes`, plus -- with
``count_overhead=True``, the default, as in :mod:`k2quant.search.allocate` -- the quantization
metadata ``m_{i,b}`` (scales, zero points, codebooks) the packed format stores)::

    E[size] = F + sum_i sum_b softmax(alpha_i / tau)_b * (n_i * b / 8 + m_{i,b})

``F`` = the 4-byte float parameters not searched (biases, other layers). The expectation uses
the noise-free relaxed probabilities (also with ``gumbel=True``) and is differentiable in
``alpha``. For an ``avg_bits`` budget the measure is ``E[sum_i n_i b_i] / E[sum_i n_i]``
instead, and ``E - budget`` below is in bits. The search minimises::

    lagrangian (default): L = task_loss + s * lam_t * (E[size] - budget) / budget,
                      lam_{t+1} = max(0, lam_t + lam_lr * (E[size] - budget) / budget)
                      (dual ascent: lambda grows while the budget is exceeded, decays to 0
                      while there is slack, so the expected size settles on the budget)
    hinge:            L = task_loss + s * lam * max(0, E[size] - budget) / budget

``s`` is the running mean of ``|task_loss|`` (``loss_scale="auto"``, detached) so that ``lam``
is relative to the task loss: the same defaults then suit a per-frame toy loss and a summed
LF-MMI loss (``loss_scale=1.0`` gives the raw formulas). On a toy problem the hinge needs a
large ``lam`` (10) to reach the budget and then fights the task gradient of every layer; the
multiplier only grows as much as needed, which is why it is the default.

``task_loss = loss_fn(model, batch)`` is any scalar differentiable loss (LF-MMI from
``k2quant.training``, a KL divergence to the float model, ...); nothing else is assumed.
Architecture parameters and weights are updated on the same batch (first-order DARTS).

Discretisation: each layer takes ``argmax alpha_i`` (ties go to the larger choice); a greedy
repair (:func:`repair_choices`) then makes the *discrete* choice meet the budget: while over
it, apply the move (one layer to any lower candidate) that loses the least log-preference
``log p_{i,cur} - log p_{i,new}`` per unit of the budget's measure saved (bytes or bits); then
(``fill=True``) while some move up fits in what is left, apply the one with the best
log-preference change per unit added. The result never exceeds the budget and has no
single-layer move up left that would fit.

Bottleneck dimensions (``dims``, TDNN-F models only): for each selected TDNN-F layer (pair
``tdnnfs.i.linear``/``tdnnfs.i.affine``) the search copy is first re-factorised at its full
bottleneck ``B`` with :func:`k2quant.models.tdnnf.refactor_bottleneck` (function-preserving up
to rounding), which orders the bottleneck channels by retained energy, so keeping the first
``d`` channels is exactly the rank-``d`` re-factorisation. A dimension choice ``beta_j`` over
candidate dims ``D_j`` then scales the bottleneck channels (the output rows of ``.linear``, after
quantization) by the soft mask ``m = sum_d softmax(beta_j / tau)_d * [c < d]``. Both leaves'
sizes scale with ``d / B``, so ``E[n_i] = n_i * E[d] / B`` enters ``E[size]`` (bits and dims are
independent choices, so ``E[n b] = E[n] E[b]``). Dimensions are discretised and repaired
together with the bits (a move changes one layer's bits or one pair's dim);
:meth:`NasResult.apply_dims` re-factorises a float model to the chosen dims.

Budgets (:class:`Budget`, the same three kinds as :func:`k2quant.search.allocate.allocate`):
``avg_bits`` (average bit width of the searched weights, ``sum_i n_i b_i / sum_i n_i`` with
``n_i`` at the chosen bottleneck dims), ``size_bytes`` (whole model, as above) or ``ratio``
(fp32 model bytes / compressed bytes).

Typical use::

    result = search_mixed_precision(model, loss_fn, batches, avg_bits=4,
                                    steps=300, lr_weights=1e-4, lr_alpha=1e-2)
    result.bits                      # {"tdnn1.affine": 8, "tdnnfs.0.linear": 3, ...}
    result.to_plan()                 # k2quant.plan.Plan, one exact key per searched layer
    model = result.apply(model)      # (dims if searched, then) quantize_(model, result.to_plan())

The original model is never modified: the search runs on a deep copy
(:meth:`MixedPrecisionSupernet.restore` turns the copy back into a plain float model).
"""
import copy
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k2quant.plan import LayerConfig, Plan, model_size_bytes, quantizable_layers, quantize_
from k2quant.search._common import (
    BUDGET_KINDS,
    DEFAULT_CANDIDATE_BITS,
    apply_bottleneck_dims,
    check_model_has_layers,
)
from k2quant.utils.io import atomic_write_json

__all__ = [
    "Budget",
    "MixedPrecisionLayer",
    "BottleneckChoice",
    "MixedPrecisionSupernet",
    "NasResult",
    "search_mixed_precision",
    "relaxed_weights",
    "repair_choices",
    "DEFAULT_CANDIDATE_BITS",
]

PENALTIES = ("hinge", "lagrangian")
OPTIMIZERS = ("adam", "sgd")
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Embedding)
_KIND_OF = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Embedding: "embedding"}


# ---------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    """A model-size budget.

    Attributes:
      kind: ``"avg_bits"`` (average bit width of the searched weights, ``sum n_i b_i /
        sum n_i`` with ``n_i`` at the chosen bottleneck dims; in (0, 32]), ``"size_bytes"``
        (whole-model bytes, see :meth:`MixedPrecisionSupernet.size_bytes`) or ``"ratio"``
        (fp32 model bytes / compressed bytes, > 0).
      value: the number.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(
                f"Budget.kind must be one of {list(BUDGET_KINDS)}; received {self.kind!r}"
            )
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"Budget.value must be a finite number; received {v!r}")
        if v <= 0 or (self.kind == "avg_bits" and v > 32):
            rng = "(0, 32]" if self.kind == "avg_bits" else "> 0"
            raise ValueError(f"Budget {self.kind} must be {rng}; received {v!r}")
        object.__setattr__(self, "value", float(v))

    @classmethod
    def parse(cls, spec: Union["Budget", Mapping[str, float], str]) -> "Budget":
        """Accept a :class:`Budget`, a one-key dict (``{"avg_bits": 4}``), the
        ``{"kind": ..., "value": ...}`` dict of ``Allocation.budget`` or ``"ratio=8"``."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            kind, sep, value = spec.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = None
            if not sep or number is None:
                raise ValueError(
                    f"budget string must look like 'avg_bits=4', 'size_bytes=2e6' or "
                    f"'ratio=8'; received {spec!r}"
                )
            return cls(kind.strip(), number)
        if isinstance(spec, Mapping) and set(spec) == {"kind", "value"}:
            return cls(spec["kind"], spec["value"])  # the Allocation.budget form
        if isinstance(spec, Mapping) and len(spec) == 1:
            (kind, value), = spec.items()
            return cls(kind, value)
        raise ValueError(
            f"budget must be a Budget, a dict with exactly one of {list(BUDGET_KINDS)} "
            f"(e.g. {{'avg_bits': 4}}) or a string like 'ratio=8'; received {spec!r}"
        )

    def to_dict(self) -> Dict[str, Any]:
        """``{"kind": ..., "value": ...}`` (as ``Allocation.budget``)."""
        return {"kind": self.kind, "value": self.value}


# ---------------------------------------------------------------------------------- relaxation
def relaxed_weights(
    alpha: Tensor,
    tau: float,
    gumbel: bool = False,
    hard: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Mixture weights ``softmax((alpha [+ g]) / tau)`` over the last dim.

    Args:
      alpha: 1-D float tensor of architecture logits.
      tau: temperature > 0.
      gumbel: add Gumbel(0, 1) noise ``g`` (drawn from ``generator`` on the CPU).
      hard: straight-through one-hot of the argmax (forward one-hot, softmax gradient).

    Returns:
      A tensor shaped like ``alpha`` whose entries sum to 1.
    """
    logits = alpha
    if gumbel:
        u = torch.rand(alpha.shape, generator=generator, dtype=torch.float64)
        u = u.clamp(1e-12, 1.0 - 1e-12)
        g = -torch.log(-torch.log(u))
        logits = alpha + g.to(device=alpha.device, dtype=alpha.dtype)
    y = torch.softmax(logits / tau, dim=-1)
    if hard:
        one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(dim=-1, keepdim=True), 1.0)
        y = one_hot - y.detach() + y
    return y


class _Relaxation:
    """Temperature and sampling switches shared by all choices of one supernet."""

    def __init__(self, tau: float, gumbel: bool, hard: bool, seed: Optional[int]) -> None:
        self.tau = tau
        self.gumbel = gumbel
        self.hard = hard
        self.sampling = False  # noise only during search steps
        self.generator = torch.Generator()
        self.generator.manual_seed(0 if seed is None else int(seed))

    def weights(self, alpha: Tensor) -> Tensor:
        noisy = self.gumbel and self.sampling
        return relaxed_weights(alpha, self.tau, noisy, self.hard and self.sampling, self.generator)


# ---------------------------------------------------------------------------------- modules
class BottleneckChoice(nn.Module):
    """Soft choice of the bottleneck dimension of one TDNN-F layer.

    Attributes:
      name: the TDNN-F layer (``"tdnnfs.3"``).
      full_dim: its bottleneck ``B`` (channels ordered by retained energy).
      dims: candidate dims, ascending, each in 1..B.
      alpha: ``nn.Parameter`` of shape ``(len(dims),)``.
    """

    def __init__(self, name: str, full_dim: int, dims: Sequence[int], relax: _Relaxation,
                 device: torch.device) -> None:
        super().__init__()
        self.name = name
        self.full_dim = int(full_dim)
        self.dims = tuple(int(d) for d in dims)
        self._relax = relax
        self.alpha = nn.Parameter(torch.zeros(len(self.dims), device=device))
        ar = torch.arange(self.full_dim, device=device)
        masks = torch.stack([(ar < d).to(torch.float32) for d in self.dims])  # (K, B)
        self.register_buffer("masks", masks, persistent=False)

    def probabilities(self) -> Tensor:
        """Relaxed choice weights (noise during search steps with ``gumbel``); sum to 1."""
        return self._relax.weights(self.alpha)

    def mask(self) -> Tensor:
        """``(B,)`` soft channel mask ``sum_d p_d [c < d]`` (non-increasing in ``c``)."""
        return self.probabilities() @ self.masks

    def extra_repr(self) -> str:
        return f"name={self.name!r}, full_dim={self.full_dim}, dims={list(self.dims)}"


class MixedPrecisionLayer(nn.Module):
    """Stand-in for one ``nn.Linear``/``nn.Conv1d``/``nn.Embedding`` during the search.

    Its ``weight`` (and ``bias``) *are* the float module's ``nn.Parameter`` objects; the forward
    uses ``sum_b p_b * Q_b(weight)`` (times the bottleneck mask on the output channels if the
    layer is the ``.linear`` of a TDNN-F pair whose dimension is searched) in place of the
    weight, and otherwise the float module's own computation (``F.linear``, the module's
    ``_conv_forward``, ``F.embedding``).

    Attributes:
      name: fully-qualified name of the layer in the model.
      candidate_bits: the candidate widths, ascending.
      quantizers: one weight quantizer per candidate (per output channel / embedding row with
        ``granularity="channel"``), initialised from the weight.
      alpha: ``nn.Parameter`` of shape ``(len(candidate_bits),)``, zeros at the start.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        candidate_bits: Sequence[int],
        kinds: Mapping[int, str],
        granularity: str,
        options: Mapping[str, Any],
        relax: _Relaxation,
    ) -> None:
        super().__init__()
        if type(module) not in _KIND_OF:
            raise ValueError(
                f"layer {name!r}: mixed-precision search supports exact nn.Linear, nn.Conv1d "
                f"and nn.Embedding; received {type(module).__name__}. Leave it out of `layers`."
            )
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            raise ValueError(
                f"layer {name!r}: nn.Embedding with max_norm or sparse=True cannot be searched "
                f"(the weight is a mixture, not a leaf); leave it out of `layers`"
            )
        self.name = name
        self.layer_kind = _KIND_OF[type(module)]
        self.candidate_bits = tuple(candidate_bits)
        self._float = [module]  # kept unregistered: it shares weight/bias with this module
        self._relax = relax
        self._mask_source: List[BottleneckChoice] = []
        self.weight = module.weight
        if getattr(module, "bias", None) is not None:
            self.bias = module.bias
        else:
            self.register_parameter("bias", None)
        quantizers = []
        for b in self.candidate_bits:
            try:
                from k2quant.quant import make_quantizer

                q = make_quantizer(
                    kinds[b], b, granularity=granularity, ch_axis=0, signed=True,
                    name=f"{name}.weight@{b}bit", **dict(options),
                )
            except ValueError as e:
                raise ValueError(
                    f"layer {name!r}: cannot build the {b}-bit {kinds[b]!r} candidate quantizer "
                    f"(granularity={granularity!r}, options={dict(options)}): {e}"
                ) from e
            q.to(module.weight.device)
            q.init_from(module.weight.detach())
            quantizers.append(q)
        self.quantizers = nn.ModuleList(quantizers)
        #: bits -> (bytes of constant metadata, bytes of per-output-channel metadata)
        self.overhead: Dict[int, Tuple[float, float]] = {
            b: _metadata_bytes(q, module.weight.detach()) for b, q in zip(self.candidate_bits,
                                                                          quantizers)
        }
        device = module.weight.device
        self.alpha = nn.Parameter(torch.zeros(len(self.candidate_bits), device=device))
        self.train(module.training)

    @property
    def float_module(self) -> nn.Module:
        """The float module this layer stands in for (same parameter objects)."""
        return self._float[0]

    def probabilities(self) -> Tensor:
        """Mixture weights of the forward (Gumbel noise during search steps); sum to 1."""
        return self._relax.weights(self.alpha)

    def mixed_weight(self) -> Tensor:
        """``sum_b p_b Q_b(W)`` (masked on dim 0 if a bottleneck choice is attached)."""
        p = self.probabilities()
        w = self.weight
        out = None
        for k, q in enumerate(self.quantizers):
            term = p[k] * q(w)
            out = term if out is None else out + term
        if self._mask_source:
            m = self._mask_source[0].mask().to(out.dtype)
            out = out * m.reshape((-1,) + (1,) * (out.dim() - 1))
        return out

    def forward(self, x: Tensor) -> Tensor:
        w = self.mixed_weight()
        m = self.float_module
        if self.layer_kind == "linear":
            return F.linear(x, w, self.bias)
        if self.layer_kind == "conv1d":
            return m._conv_forward(x, w, self.bias)
        return F.embedding(x, w, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.layer_kind}, bits={list(self.candidate_bits)}"


# ---------------------------------------------------------------------------------- helpers
@torch.no_grad()
def _metadata_bytes(q: nn.Module, w: Tensor) -> Tuple[float, float]:
    """Quantization metadata the packed format stores for ``w`` quantized by ``q`` (what
    ``freeze`` keeps: scale, zero point, codebook; a constant tensor is stored as one element),
    split into ``(constant part, part proportional to the number of output channels)``."""
    _, params = q.quantize(w)
    const, rows = 0.0, 0.0
    for t in (params.scale, params.zero_point, params.codebook):
        if t is None:
            continue
        flat = t.reshape(-1)
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            if q.per_channel:
                rows += flat.numel() * t.element_size()
            else:
                const += flat.numel() * t.element_size()
        else:
            const += t.element_size()
    return const, rows


def _replace_by_id(root: nn.Module, swaps: Dict[int, nn.Module]) -> nn.Module:
    """Replace every child ``c`` with ``swaps[id(c)]`` (aliases included); returns the root."""
    for parent in list(root.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in swaps:
                setattr(parent, child_name, swaps[id(child)])
    return swaps.get(id(root), root)


def _select_layers(model: nn.Module, layers: Any) -> List[str]:
    from k2quant.nn import QuantModule

    found = quantizable_layers(model)
    quant = [n for n, m in found.items() if isinstance(m, QuantModule)]
    if quant:
        raise ValueError(
            f"mixed-precision search expects a float model; layers {quant[:5]} are already "
            f"k2quant.nn quant modules. Search on the float model (before quantize_)."
        )
    names = list(found)
    supported = [n for n in names if type(found[n]) in _SUPPORTED]
    if layers is None:
        chosen = supported
    else:
        if isinstance(layers, (str, re.Pattern)):
            layers = [layers]
        keys = list(layers)
        chosen_set = set()
        for key in keys:
            if isinstance(key, re.Pattern):
                pat, shown = key, f"re:{key.pattern}"
            elif isinstance(key, str) and key.startswith("re:"):
                pat, shown = re.compile(key[3:]), key
            elif isinstance(key, str) and key in found:
                pat, shown = None, key
            elif isinstance(key, str):
                pat, shown = re.compile(key), key  # a bare string that is not a name: a regex
            else:
                raise ValueError(f"layers entries must be str names or regexes; received {key!r}")
            hits = [key] if pat is None else [n for n in names if pat.fullmatch(n)]
            if not hits:
                raise ValueError(
                    f"layers: {shown!r} names no quantizable layer; quantizable layers are "
                    f"{names[:50]}"
                )
            chosen_set.update(hits)
        chosen = [n for n in names if n in chosen_set]
        bad = [n for n in chosen if type(found[n]) not in _SUPPORTED]
        if bad:
            raise ValueError(
                f"layers {bad} are {[type(found[n]).__name__ for n in bad]}; mixed-precision "
                f"search supports exact nn.Linear, nn.Conv1d and nn.Embedding. Select others."
            )
    if not chosen:
        raise ValueError(
            "mixed-precision search found no layer to search (exact nn.Linear, nn.Conv1d or "
            f"nn.Embedding); quantizable layers: {names[:50]}"
        )
    return chosen


def _quantizer_kinds(quantizer: Any, bits: Sequence[int]) -> Dict[int, str]:
    from k2quant.plan import QUANTIZER_KINDS

    if isinstance(quantizer, str):
        kinds = {b: quantizer for b in bits}
    elif isinstance(quantizer, Mapping):
        default = quantizer.get("default")
        kinds = {}
        for b in bits:
            k = quantizer.get(b, default)
            if k is None:
                raise ValueError(
                    f"quantizer mapping {dict(quantizer)!r} has no kind for {b} bits; give one "
                    f"per candidate width or a 'default' entry"
                )
            kinds[b] = k
    else:
        raise ValueError(
            f"quantizer must be a kind name (e.g. 'lsq') or a dict {{bits: kind, 'default': "
            f"kind}}; received {quantizer!r}"
        )
    for b, k in kinds.items():
        if k not in QUANTIZER_KINDS:
            raise ValueError(
                f"quantizer kind {k!r} (for {b} bits) is unknown; known: {list(QUANTIZER_KINDS)}"
            )
    return kinds


def _check_candidate_bits(candidate_bits: Any) -> Tuple[int, ...]:
    try:
        bits = sorted(set(candidate_bits))
    except TypeError:
        bits = None
    if not bits or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8
                           for b in bits):
        raise ValueError(
            f"candidate_bits must be a non-empty sequence of ints in 1..8, e.g. (2, 4, 8); "
            f"received {candidate_bits!r}"
        )
    return tuple(bits)


def _pair_dims(spec: Any, full: int, layer: str) -> Tuple[int, ...]:
    out = set()
    for d in spec:
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise ValueError(f"dims for {layer}: entries must be ints or fractions; got {d!r}")
        if isinstance(d, float):
            if not 0.0 < d <= 1.0:
                raise ValueError(
                    f"dims for {layer}: a fraction must be in (0, 1]; got {d!r} (give ints for "
                    f"absolute dimensions)"
                )
            out.add(max(1, int(round(d * full))))
        else:
            if not 1 <= d <= full:
                raise ValueError(
                    f"dims for {layer}: {d} is outside 1..{full} (its current bottleneck)"
                )
            out.add(int(d))
    if not out:
        raise ValueError(f"dims for {layer}: no candidate dimension given")
    return tuple(sorted(out))


# ---------------------------------------------------------------------------------- repair
def repair_choices(
    logp: Mapping[Any, Sequence[float]],
    start: Mapping[Any, int],
    size_fn: Callable[[Mapping[Any, int]], float],
    budget: float,
    order: Mapping[Any, Sequence[float]],
    fill: bool = True,
) -> Dict[Any, int]:
    """Greedy repair of a discrete choice so that ``size_fn(choice) <= budget``.

    Args:
      logp: per variable, the log-preference of each option (e.g. ``log_softmax(alpha)``).
      start: per variable, the starting option index (e.g. the argmax).
      size_fn: size of a full assignment ``{variable: option index}``.
      budget: the size not to exceed.
      order: per variable, a monotone "cost" of each option (the bit width, the dim): moves to
        lower values shrink, to higher values grow the model.
      fill: after fitting, raise options while the budget allows.

    Returns:
      ``{variable: option index}``. Moves down minimise lost preference per unit of size
      saved; moves up (``fill``) maximise preference change per unit of size added.

    Raises:
      ValueError: even the smallest option everywhere exceeds the budget.
    """
    cur = dict(start)
    size = size_fn(cur)
    tol = 1e-9 * max(1.0, abs(budget))
    keys = list(logp)

    def moves(down: bool):
        for rank, v in enumerate(keys):
            i = cur[v]
            for j in range(len(logp[v])):
                if (order[v][j] < order[v][i]) if down else (order[v][j] > order[v][i]):
                    trial = dict(cur)
                    trial[v] = j
                    yield rank, v, j, size_fn(trial) - size

    while size > budget + tol:
        best = None
        for rank, v, j, delta in moves(down=True):
            if delta >= 0:
                continue
            score = (logp[v][cur[v]] - logp[v][j]) / (-delta)
            key = (score, delta, rank, j)  # ties: larger saving first, then model order
            if best is None or key < best[0]:
                best = (key, v, j, delta)
        if best is None:
            raise ValueError(
                f"the budget of {budget:.1f} bytes cannot be met: the smallest choices give "
                f"{size:.1f} bytes; raise the budget or allow smaller candidates"
            )
        _, v, j, delta = best
        cur[v] = j
        size += delta
    if fill:
        while True:
            best = None
            room = budget + tol - size
            for rank, v, j, delta in moves(down=False):
                if delta <= 0 or delta > room:
                    continue
                score = (logp[v][j] - logp[v][cur[v]]) / delta
                key = (-score, delta, rank, j)
                if best is None or key < best[0]:
                    best = (key, v, j, delta)
            if best is None:
                break
            _, v, j, delta = best
            cur[v] = j
            size += delta
    return cur


# ---------------------------------------------------------------------------------- supernet
class MixedPrecisionSupernet:
    """A model whose selected layers are :class:`MixedPrecisionLayer` (and, optionally, whose
    TDNN-F bottlenecks carry a :class:`BottleneckChoice`). See the module docstring.

    Args:
      model: a float model (``nn.Linear``/``nn.Conv1d``/``nn.Embedding`` leaves are searchable).
      candidate_bits: candidate weight widths (ints in 1..8).
      layers: ``None`` (every searchable layer), an exact name / ``"re:<regex>"`` / regex
        string, or a list of them (exact names win; regexes must ``re.fullmatch``).
      quantizer: weight quantizer kind for every width (``"lsq"``, ``"uniform"``, ...) or a
        dict ``{bits: kind, "default": kind}`` (e.g. ``{1: "binary", 2: "ternary",
        "default": "lsq"}``).
      granularity: ``"channel"`` (per output channel / embedding row) or ``"tensor"``.
      dims: bottleneck-dimension search for a TDNN-F model (needs ``factored_pairs()``):
        ``None`` (off), a sequence of ints (absolute dims) and/or floats in (0, 1] (fractions
        of each layer's bottleneck) for every TDNN-F layer whose two leaves are searched, or a
        dict ``{"tdnnfs.i": [...]}`` for some layers.
      quantizer_options: extra options for every candidate quantizer (JSON-able; they go to
        the plan's ``weight_options`` too).
      tau: initial temperature.
      gumbel, hard: Gumbel-softmax sampling in search steps (see :func:`relaxed_weights`).
      count_overhead: model sizes include the quantization metadata (per-channel scales, zero
        points, codebooks) as the packed format stores them -- the convention of
        :mod:`k2quant.search.allocate`. ``False``: exactly
        :func:`k2quant.plan.model_size_bytes` (weights and float parameters only).
      copy: work on a deep copy (default). With ``copy=False`` the model is wrapped in place
        (and re-factorised in place if ``dims`` is given); :meth:`restore` undoes the wrapping.
      seed: seed of the Gumbel noise generator.

    Attributes:
      model: the wrapped model; pass it to ``loss_fn``.
      layer_names: searched layers in model order.
      layers: name -> :class:`MixedPrecisionLayer`.
      choices: TDNN-F layer name -> :class:`BottleneckChoice` (empty without ``dims``).
      fp32_bytes: fp32 size of the model (4 bytes per parameter).
      fixed_bytes: 4 bytes per float parameter outside the searched weights.
    """

    def __init__(
        self,
        model: nn.Module,
        candidate_bits: Sequence[int] = DEFAULT_CANDIDATE_BITS,
        layers: Any = None,
        quantizer: Union[str, Mapping[Any, str]] = "lsq",
        granularity: str = "channel",
        dims: Any = None,
        quantizer_options: Optional[Mapping[str, Any]] = None,
        tau: float = 1.0,
        gumbel: bool = False,
        hard: bool = False,
        count_overhead: bool = True,
        copy: bool = True,
        seed: Optional[int] = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"expected an nn.Module; received {type(model).__name__}")
        self.candidate_bits = _check_candidate_bits(candidate_bits)
        self.kinds = _quantizer_kinds(quantizer, self.candidate_bits)
        if granularity not in ("channel", "tensor"):
            raise ValueError(
                f"granularity must be 'channel' or 'tensor'; received {granularity!r}"
            )
        self.granularity = granularity
        self.quantizer_options = dict(quantizer_options or {})
        self.count_overhead = bool(count_overhead)
        _check_tau(tau)
        self._relax = _Relaxation(float(tau), bool(gumbel), bool(hard), seed)

        work = _deepcopy_model(model) if copy else model
        self.layer_names = _select_layers(work, layers)
        self.fp32_bytes = float(model_size_bytes(work))

        # ---- bottleneck dims: re-factorise first (the modules are replaced)
        self.choices: Dict[str, BottleneckChoice] = {}
        self._pair_of: Dict[str, str] = {}  # leaf name -> TDNN-F layer name
        dim_specs = self._dim_specs(work, dims)
        if dim_specs:
            from k2quant.models.tdnnf import refactor_bottleneck

            for lname, (full, cand) in dim_specs.items():
                refactor_bottleneck(work, lname, full)  # orders channels by energy; same size

        found = quantizable_layers(work)
        searched_ids = {id(found[n].weight) for n in self.layer_names}
        self._numel = {n: int(found[n].weight.numel()) for n in self.layer_names}
        seen, float_params = set(), 0
        for p in work.parameters():
            if id(p) in seen or not p.is_floating_point() or id(p) in searched_ids:
                continue
            seen.add(id(p))
            float_params += p.numel()
        self.fixed_bytes = 4.0 * float_params

        swaps: Dict[int, nn.Module] = {}
        self.layers: Dict[str, MixedPrecisionLayer] = {}
        self._originals: Dict[int, nn.Module] = {}
        for n in self.layer_names:
            m = found[n]
            mixed = MixedPrecisionLayer(
                m, n, self.candidate_bits, self.kinds, granularity, self.quantizer_options,
                self._relax,
            )
            swaps[id(m)] = mixed
            self._originals[id(mixed)] = m
            self.layers[n] = mixed
        self._rows_follow_dim: Dict[str, bool] = {}
        for lname, (full, cand) in dim_specs.items():
            lin = self.layers[f"{lname}.linear"]
            choice = BottleneckChoice(lname, full, cand, self._relax, lin.weight.device)
            lin._mask_source.append(choice)
            self.choices[lname] = choice
            self._pair_of[f"{lname}.linear"] = lname
            self._pair_of[f"{lname}.affine"] = lname
            self._rows_follow_dim[f"{lname}.linear"] = True  # its output channels = bottleneck
        self.model = _replace_by_id(work, swaps)
        self._restored = False

    # ------------------------------------------------------------------ construction
    def _dim_specs(self, model: nn.Module, dims: Any) -> Dict[str, Tuple[int, Tuple[int, ...]]]:
        if dims is None:
            return {}
        from k2quant.models.tdnnf import TdnnF

        if not isinstance(model, TdnnF):
            raise ValueError(
                f"dims (bottleneck search) needs a k2quant TdnnF model (factored_pairs, "
                f"refactor_bottleneck); received {type(model).__name__}. Pass dims=None."
            )
        pairs = {lin.rsplit(".", 1)[0]: (lin, aff) for lin, aff in model.factored_pairs()}
        if isinstance(dims, Mapping):
            unknown = sorted(set(dims) - set(pairs))
            if unknown:
                raise ValueError(
                    f"dims: unknown TDNN-F layers {unknown}; expected names from {sorted(pairs)}"
                )
            wanted = dict(dims)
        else:
            if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
                raise ValueError(
                    f"dims must be None, a list of ints/fractions or a dict {{'tdnnfs.i': "
                    f"[...]}}; received {dims!r}"
                )
            dims = list(dims)
            wanted = {
                name: dims for name, (lin, aff) in pairs.items()
                if lin in self.layer_names and aff in self.layer_names
            }
            if not wanted:
                raise ValueError(
                    "dims: no TDNN-F layer has both its .linear and .affine leaves among the "
                    "searched layers; include them in `layers` or pass dims=None"
                )
        out = {}
        for name, spec in wanted.items():
            lin, aff = pairs[name]
            missing = [x for x in (lin, aff) if x not in self.layer_names]
            if missing:
                raise ValueError(
                    f"dims for {name}: its leaves {missing} are not searched; the dimension "
                    f"search needs both {lin} and {aff} in `layers`"
                )
            full = int(model.get_submodule(lin).weight.shape[0])
            out[name] = (full, _pair_dims(spec, full, name))
        return out

    # ------------------------------------------------------------------ parameters
    def arch_parameters(self) -> List[nn.Parameter]:
        """All ``alpha`` vectors (bits, then dims), in model order."""
        out = [self.layers[n].alpha for n in self.layer_names]
        return out + [c.alpha for c in self.choices.values()]

    def quantizer_parameters(self) -> List[nn.Parameter]:
        """Learned quantizer parameters (e.g. LSQ step sizes)."""
        return [p for n in self.layer_names for p in self.layers[n].quantizers.parameters()]

    def weight_parameters(self) -> List[nn.Parameter]:
        """The model's own parameters (no alphas, no quantizer parameters)."""
        skip = {id(p) for p in self.arch_parameters()} | {
            id(p) for p in self.quantizer_parameters()
        }
        return [p for p in self.model.parameters() if id(p) not in skip]

    @property
    def tau(self) -> float:
        return self._relax.tau

    def set_temperature(self, tau: float) -> None:
        _check_tau(tau)
        self._relax.tau = float(tau)

    def set_sampling(self, on: bool) -> None:
        """Switch the Gumbel noise (if ``gumbel``) on for search steps / off for evaluation."""
        self._relax.sampling = bool(on)

    # ------------------------------------------------------------------ probabilities
    def mixture_weights(self, name: str) -> Tensor:
        """The mixture weights layer ``name`` uses in its forward (sum to 1)."""
        return self.layers[name].probabilities()

    def probabilities(self, name: str) -> Tensor:
        """Noise-free ``softmax(alpha / tau)`` of a layer (bits) or a TDNN-F layer (dims)."""
        src = self.layers[name] if name in self.layers else self.choices[name]
        return torch.softmax(src.alpha / self.tau, dim=-1)

    # ------------------------------------------------------------------ sizes
    def _terms(self, bit_w, dim_frac):
        """Per layer ``(weight elements, weight bits, metadata bytes)`` given, per layer, the
        bit weights ``bit_w(name) -> {bits: weight}`` and the bottleneck fraction
        ``dim_frac(pair) -> d / B`` (numbers or 0-d tensors: shared by the discrete and the
        expected sizes)."""
        out = []
        for n in self.layer_names:
            frac = dim_frac(self._pair_of[n]) if n in self._pair_of else 1.0
            weights = bit_w(n)
            numel = self._numel[n] * frac
            bits = sum(w * b for b, w in weights.items())
            meta = 0.0
            if self.count_overhead:
                row_frac = frac if self._rows_follow_dim.get(n, False) else 1.0
                ov = self.layers[n].overhead
                meta = sum(w * (ov[b][0] + ov[b][1] * row_frac) for b, w in weights.items())
            out.append((numel, bits, meta))
        return out

    def _discrete_terms(self, bits: Mapping[str, int], dims: Optional[Mapping[str, int]]):
        missing = [n for n in self.layer_names if n not in bits]
        if missing:
            raise ValueError(f"bits missing for searched layers {missing}")
        dims = dict(dims or {})
        return self._terms(
            lambda n: {int(bits[n]): 1.0},
            lambda k: dims.get(k, self.choices[k].full_dim) / self.choices[k].full_dim,
        )

    def _expected_terms(self):
        probs = {n: torch.softmax(self.layers[n].alpha.double() / self.tau, dim=-1)
                 for n in self.layer_names}
        exp_frac = {}
        for k, c in self.choices.items():
            q = torch.softmax(c.alpha.double() / self.tau, dim=-1)
            d = torch.tensor(c.dims, dtype=torch.float64, device=q.device)
            exp_frac[k] = (q * d).sum() / c.full_dim
        return self._terms(
            lambda n: dict(zip(self.candidate_bits, probs[n])), lambda k: exp_frac[k]
        )

    def size_bytes(self, bits: Mapping[str, int],
                   dims: Optional[Mapping[str, int]] = None) -> float:
        """Discrete model size in bytes for ``bits`` per searched layer and ``dims`` per TDNN-F
        layer (default: full): ``sum_i n_i(d) b_i / 8`` + metadata (``count_overhead``) +
        ``fixed_bytes``. With ``count_overhead=False`` this is ``model_size_bytes`` of the
        quantized (re-factorised) model whose other layers stay float."""
        terms = self._discrete_terms(bits, dims)
        return self.fixed_bytes + sum(n * b / 8.0 + m for n, b, m in terms)

    def avg_bits(self, bits: Mapping[str, int], dims: Optional[Mapping[str, int]] = None) -> float:
        """Average bit width ``sum_i n_i(d) b_i / sum_i n_i(d)`` of the searched weights."""
        terms = self._discrete_terms(bits, dims)
        return sum(n * b for n, b, _ in terms) / sum(n for n, _, _ in terms)

    def expected_size_bytes(self) -> Tensor:
        """Differentiable ``E[size]`` in bytes (0-d float64 tensor): :meth:`size_bytes` with
        ``b_i`` and ``d`` replaced by their expectations under ``softmax(alpha / tau)``
        (see the module docstring)."""
        terms = self._expected_terms()
        total = sum(n * b / 8.0 + m for n, b, m in terms)
        return total + self.fixed_bytes

    def expected_avg_bits(self) -> Tensor:
        """Differentiable ``E[sum n b] / E[sum n]`` (0-d float64 tensor)."""
        terms = self._expected_terms()
        return sum(n * b for n, b, _ in terms) / sum(n for n, _, _ in terms)

    def budget_limit(self, budget: Union[Budget, Mapping[str, float], str]) -> float:
        """The budget's limit on its own measure: average bits (``avg_bits``) or model bytes
        (``size_bytes``, ``ratio`` -> ``fp32_bytes / ratio``)."""
        b = Budget.parse(budget)
        if b.kind == "ratio":
            return self.fp32_bytes / b.value
        return b.value

    def usage(self, budget: Union[Budget, Mapping[str, float], str], bits: Mapping[str, int],
              dims: Optional[Mapping[str, int]] = None) -> float:
        """The budget's measure of a discrete choice (average bits or bytes)."""
        if Budget.parse(budget).kind == "avg_bits":
            return self.avg_bits(bits, dims)
        return self.size_bytes(bits, dims)

    def expected_usage(self, budget: Union[Budget, Mapping[str, float], str]) -> Tensor:
        """The budget's measure under the relaxed choices (differentiable, float64)."""
        if Budget.parse(budget).kind == "avg_bits":
            return self.expected_avg_bits()
        return self.expected_size_bytes()

    def smallest(self) -> Tuple[Dict[str, int], Dict[str, int]]:
        """The smallest choice: lowest bits and smallest dims everywhere."""
        return ({n: self.candidate_bits[0] for n in self.layer_names},
                {k: c.dims[0] for k, c in self.choices.items()})

    def check_budget(self, budget: Union[Budget, Mapping[str, float], str]) -> None:
        """``ValueError`` if even :meth:`smallest` exceeds the budget."""
        b = Budget.parse(budget)
        limit = self.budget_limit(b)
        lo = self.usage(b, *self.smallest())
        if lo > limit * (1 + 1e-9):
            unit = "bits" if b.kind == "avg_bits" else "bytes"
            what = (f"{self.candidate_bits[0]}-bit weights" if b.kind == "avg_bits" else
                    f"{self.candidate_bits[0]}-bit searched weights"
                    f"{', smallest dims' if self.choices else ''} plus {self.fixed_bytes:.0f} "
                    f"bytes of float parameters outside the search"
                    f"{' and quantization metadata' if self.count_overhead else ''}")
            raise ValueError(
                f"budget {b.kind}={b.value:g} ({limit:.6g} {unit}) is below the smallest "
                f"reachable {lo:.6g} {unit} ({what}); raise the budget, allow smaller "
                f"candidate bits or search more layers"
            )

    # ------------------------------------------------------------------ discretisation
    def argmax(self) -> Tuple[Dict[str, int], Dict[str, int]]:
        """``(bits, dims)`` from ``argmax alpha`` (ties go to the larger choice)."""
        bits = {n: self.candidate_bits[_argmax_last(self.layers[n].alpha)]
                for n in self.layer_names}
        dims = {k: c.dims[_argmax_last(c.alpha)] for k, c in self.choices.items()}
        return bits, dims

    def discretize(self, budget: Union[Budget, Mapping[str, float], str],
                   fill: bool = True) -> Tuple[Dict[str, int], Dict[str, int]]:
        """Argmax, then :func:`repair_choices` so that the discrete choice meets ``budget``
        (and, with ``fill``, uses it up). Returns ``(bits, dims)``."""
        budget = Budget.parse(budget)
        self.check_budget(budget)
        logp: Dict[Tuple[str, str], List[float]] = {}
        order: Dict[Tuple[str, str], List[float]] = {}
        start: Dict[Tuple[str, str], int] = {}
        for n in self.layer_names:
            a = self.layers[n].alpha.detach().double()
            v = ("bits", n)
            logp[v] = torch.log_softmax(a, dim=-1).tolist()
            order[v] = [float(b) for b in self.candidate_bits]
            start[v] = _argmax_last(a)
        for k, c in self.choices.items():
            a = c.alpha.detach().double()
            v = ("dim", k)
            logp[v] = torch.log_softmax(a, dim=-1).tolist()
            order[v] = [float(d) for d in c.dims]
            start[v] = _argmax_last(a)

        def decode(assign):
            bits = {n: self.candidate_bits[assign[("bits", n)]] for n in self.layer_names}
            dims = {k: c.dims[assign[("dim", k)]] for k, c in self.choices.items()}
            return bits, dims

        def measure(assign):
            return self.usage(budget, *decode(assign))

        assign = repair_choices(logp, start, measure, self.budget_limit(budget), order,
                                fill=fill)
        return decode(assign)

    # ------------------------------------------------------------------ restore
    def restore(self) -> nn.Module:
        """Put the float modules back (same parameter objects, so trained weights are kept)
        and return the plain float model. The supernet is unusable afterwards."""
        if self._restored:
            return self.model
        swaps = {id(m): self._originals[id(m)] for m in self.layers.values()}
        self.model = _replace_by_id(self.model, swaps)
        self._restored = True
        return self.model


def _argmax_last(a: Tensor) -> int:
    """Index of the maximum; ties go to the last (largest) option."""
    vals = a.detach().tolist()
    best = max(vals)
    return max(i for i, v in enumerate(vals) if v == best)


def _check_tau(tau: Any) -> None:
    if (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0
            or not math.isfinite(tau)):
        raise ValueError(f"temperature tau must be a finite number > 0; received {tau!r}")


def _deepcopy_model(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:  # e.g. non-leaf tensors stored as attributes
        raise ValueError(
            f"cannot deep-copy the model for the search ({type(e).__name__}: {e}); the search "
            f"never modifies the model it is given, so it needs a copy"
        ) from e


# ---------------------------------------------------------------------------------- result
@dataclass
class NasResult:
    """Outcome of :func:`search_mixed_precision`; mirrors
    :class:`k2quant.search.allocate.Allocation` (``bits``, ``dims``, ``size_bytes``,
    ``avg_bits``, ``fp32_bytes``, ``ratio``, ``method``, ``budget``, ``to_plan``,
    ``apply_dims``, ``to_dict``/``save``) so that callers can treat both alike.

    Attributes:
      bits: searched layer (exact name) -> weight bits after discretisation and repair.
      dims: TDNN-F layer (``"tdnnfs.i"``) -> bottleneck dim (empty without dims search).
      size_bytes: discrete model bytes (:meth:`MixedPrecisionSupernet.size_bytes`; other
        layers float; metadata included if ``count_overhead``).
      avg_bits: ``sum n_i b_i / sum n_i`` over the searched weights at their chosen dims.
      fp32_bytes: bytes of the float model (4 per parameter).
      method: ``"nas"``.
      budget: ``{"kind": ..., "value": ...}``.
      argmax_bits, argmax_dims: the choices before the repair.
      alphas / dim_alphas: final architecture logits per layer / TDNN-F layer.
      alpha_history / dim_alpha_history: logits recorded every ``history_every`` steps
        (the first entry is the initial zeros).
      history: per recorded step ``step, tau, task_loss, penalty, loss, expected`` (the
        budget's measure under the relaxed choices), ``lam``, ``loss_scale``.
      candidate_bits, candidate_dims, quantizer (bits -> kind), granularity,
      quantizer_options: the search space.
      searched_model: the float model with the search's trained weights (``keep_model=True``).
    """

    bits: Dict[str, int]
    dims: Dict[str, int]
    size_bytes: float
    avg_bits: float
    fp32_bytes: float
    budget: Dict[str, Any]
    argmax_bits: Dict[str, int]
    argmax_dims: Dict[str, int]
    alphas: Dict[str, List[float]]
    dim_alphas: Dict[str, List[float]]
    alpha_history: Dict[str, List[List[float]]]
    dim_alpha_history: Dict[str, List[List[float]]]
    history: List[Dict[str, float]]
    candidate_bits: Tuple[int, ...]
    quantizer: Dict[int, str]
    granularity: str
    quantizer_options: Dict[str, Any]
    candidate_dims: Dict[str, List[int]] = field(default_factory=dict)
    method: str = "nas"
    searched_model: Optional[nn.Module] = None

    @property
    def ratio(self) -> float:
        """Compression ratio vs fp32, ``fp32_bytes / size_bytes``."""
        return self.fp32_bytes / self.size_bytes if self.size_bytes > 0 else math.inf

    def to_plan(
        self,
        weight_quantizer: Optional[str] = None,
        act_bits: Optional[int] = None,
        act_quantizer: Optional[str] = None,
        granularity: Optional[str] = None,
        weight_options: Optional[Dict[str, Any]] = None,
        model: Optional[nn.Module] = None,
        act_options: Optional[Mapping[str, Any]] = None,
    ) -> Plan:
        """The :class:`~k2quant.plan.Plan` with one exact-name key per searched layer
        (other layers float, as the sizes assume).

        Unset arguments come from the search (its quantizer kind per width, granularity and
        options); ``act_bits`` applies to every searched layer (``None``: float activations;
        the search itself keeps activations float). With ``model``, layers the model lacks
        raise ``ValueError``.
        """
        if model is not None:
            check_model_has_layers(model, self.bits, "NAS result")
        layers = {}
        for name, b in self.bits.items():
            kind = weight_quantizer if weight_quantizer is not None else self.quantizer[b]
            if weight_options is not None:
                opts = dict(weight_options)
            elif weight_quantizer is not None and weight_quantizer != self.quantizer[b]:
                opts = {}
            else:
                opts = copy.deepcopy(self.quantizer_options)
            kw: Dict[str, Any] = dict(
                weight_bits=int(b),
                weight_quantizer=kind,
                granularity=granularity or self.granularity,
                weight_options=opts,
                act_bits=act_bits,
                act_options=dict(act_options or {}),
            )
            if act_quantizer is not None:
                kw["act_quantizer"] = act_quantizer
            layers[name] = LayerConfig(**kw)
        return Plan(layers, default=None)

    def apply_dims(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Re-factorise the float TDNN-F ``model`` in place to :attr:`dims` (before
        ``quantize_``; :func:`k2quant.models.tdnnf.refactor_bottleneck`). Layers already at
        their dim are left alone. Returns the refactor infos of the changed layers."""
        return apply_bottleneck_dims(model, self.dims, "NAS result")

    def apply(self, model: nn.Module, **plan_kwargs: Any) -> nn.Module:
        """:meth:`apply_dims` then ``quantize_(model, self.to_plan(**plan_kwargs))`` (in place;
        use the return value)."""
        self.apply_dims(model)
        return quantize_(model, self.to_plan(**plan_kwargs))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary (no model; the alpha histories are included)."""
        return {
            "format": "k2quant-nas",
            "method": self.method,
            "bits": dict(self.bits),
            "dims": dict(self.dims),
            "size_bytes": self.size_bytes,
            "avg_bits": self.avg_bits,
            "fp32_bytes": self.fp32_bytes,
            "ratio": self.ratio,
            "budget": dict(self.budget),
            "argmax_bits": dict(self.argmax_bits),
            "argmax_dims": dict(self.argmax_dims),
            "alphas": copy.deepcopy(self.alphas),
            "dim_alphas": copy.deepcopy(self.dim_alphas),
            "alpha_history": copy.deepcopy(self.alpha_history),
            "dim_alpha_history": copy.deepcopy(self.dim_alpha_history),
            "history": copy.deepcopy(self.history),
            "candidate_bits": list(self.candidate_bits),
            "candidate_dims": copy.deepcopy(self.candidate_dims),
            "quantizer": {str(k): v for k, v in self.quantizer.items()},
            "granularity": self.granularity,
            "quantizer_options": copy.deepcopy(self.quantizer_options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NasResult":
        """Inverse of :meth:`to_dict` (without ``searched_model``)."""
        if not isinstance(d, Mapping) or d.get("format") != "k2quant-nas":
            raise ValueError(
                f"not a k2quant NAS result (format='k2quant-nas'): {str(d)[:200]}"
            )
        return cls(
            bits=dict(d["bits"]), dims=dict(d["dims"]), size_bytes=d["size_bytes"],
            avg_bits=d["avg_bits"], fp32_bytes=d["fp32_bytes"], budget=dict(d["budget"]),
            argmax_bits=dict(d["argmax_bits"]), argmax_dims=dict(d["argmax_dims"]),
            alphas=dict(d["alphas"]), dim_alphas=dict(d["dim_alphas"]),
            alpha_history=dict(d["alpha_history"]),
            dim_alpha_history=dict(d["dim_alpha_history"]), history=list(d["history"]),
            candidate_bits=tuple(d["candidate_bits"]),
            quantizer={int(k): v for k, v in d["quantizer"].items()},
            granularity=d["granularity"], quantizer_options=dict(d["quantizer_options"]),
            candidate_dims=dict(d["candidate_dims"]), method=d.get("method", "nas"),
        )

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write :meth:`to_dict` as JSON (atomic rename)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "NasResult":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ---------------------------------------------------------------------------------- search
def _batch_stream(batches: Iterable) -> Iterable:
    """Yield batches forever, restarting re-iterable inputs (lists, DataLoaders)."""
    if not isinstance(batches, Iterable):
        raise ValueError(
            f"batches must be an iterable of batches (a list, a DataLoader, ...); received "
            f"{type(batches).__name__}"
        )
    served = 0
    while True:
        it = iter(batches)
        one_shot = it is batches
        empty = True
        for b in it:
            empty = False
            served += 1
            yield b
        if empty:
            raise ValueError(
                f"batches ran out after {served} batches; pass a re-iterable (list, "
                f"DataLoader) or enough batches for all steps"
                if served else "batches is empty; give at least one batch"
            )
        if one_shot:
            raise ValueError(
                f"batches (an iterator) ran out after {served} batches; pass a re-iterable "
                f"(list, DataLoader) so that it can be cycled, or fewer steps"
            )


def _make_optimizer(kind: str, params: List[nn.Parameter], lr: float, wd: float):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)


def _temperature(tau: Any, step: int, steps: int) -> float:
    if isinstance(tau, (tuple, list)):
        t0, t1 = float(tau[0]), float(tau[1])
        frac = step / max(steps - 1, 1)
        return t0 * (t1 / t0) ** frac
    return float(tau)


def search_mixed_precision(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable,
    budget: Union[None, Budget, Mapping[str, float], str] = None,
    steps: int = 200,
    lr_weights: float = 0.0,
    lr_alpha: float = 1e-2,
    *,
    avg_bits: Optional[float] = None,
    size_bytes: Optional[float] = None,
    ratio: Optional[float] = None,
    candidate_bits: Sequence[int] = DEFAULT_CANDIDATE_BITS,
    layers: Any = None,
    quantizer: Union[str, Mapping[Any, str]] = "lsq",
    granularity: str = "channel",
    quantizer_options: Optional[Mapping[str, Any]] = None,
    dims: Any = None,
    count_overhead: bool = True,
    penalty: str = "lagrangian",
    lam: Optional[float] = None,
    lam_lr: float = 2.0,
    loss_scale: Union[str, float] = "auto",
    tau: Union[float, Tuple[float, float]] = (1.0, 0.2),
    gumbel: bool = False,
    hard: bool = False,
    warmup_steps: int = 0,
    lr_quant: Optional[float] = None,
    weight_optimizer: str = "adam",
    alpha_optimizer: str = "adam",
    alpha_weight_decay: float = 0.0,
    max_grad_norm: Optional[float] = None,
    model_mode: str = "train",
    on_step: Union[str, None, Callable[[nn.Module, int], Any]] = "auto",
    fill: bool = True,
    seed: int = 0,
    history_every: int = 1,
    log_every: int = 0,
    keep_model: bool = False,
) -> NasResult:
    """Differentiable mixed-precision search (see the module docstring for the method).

    Args:
      model: float model; never modified (the search runs on a deep copy).
      loss_fn: ``loss_fn(search_model, batch) -> 0-d tensor``, the task loss (e.g. LF-MMI);
        ``search_model`` is the wrapped copy, callable like ``model``.
      batches: iterable of batches, cycled for ``steps`` steps (iterators cannot be cycled).
      budget: :class:`Budget`, ``{"avg_bits": 4}`` / ``{"size_bytes": n}`` / ``{"ratio": r}``,
        ``{"kind": ..., "value": ...}`` or ``"ratio=8"``; or give exactly one of the keywords
        ``avg_bits`` / ``size_bytes`` / ``ratio`` instead (as ``allocate`` takes them).
      steps: search steps (one batch each).
      lr_weights: learning rate of the model weights (0: weights frozen, only the
        architecture and, if ``lr_quant`` > 0, the quantizers learn).
      lr_alpha: learning rate of the architecture logits.
      candidate_bits, layers, quantizer, granularity, quantizer_options, dims, gumbel, hard,
      count_overhead: see :class:`MixedPrecisionSupernet`.
      penalty: ``"lagrangian"`` (default: adaptive ``lam``, initial value ``lam``, dual step
        ``lam_lr``; drives ``E[size]`` to the budget whatever the loss scale) or ``"hinge"``
        (``lam * relu(E - B) / B``; settles a little above the budget).
      lam: penalty weight (hinge, default 10) or initial multiplier (lagrangian, default 0),
        >= 0; relative to the task loss with ``loss_scale="auto"``.
      lam_lr: dual-ascent step of the lagrangian multiplier.
      loss_scale: ``"auto"`` (default): the penalty is multiplied by the running mean of
        ``|task_loss|`` (detached), so ``lam`` is relative to the task loss and the defaults
        hold for a per-frame toy loss and a summed LF-MMI loss alike; a number fixes the factor
        (``1.0``: the raw formulas of the module docstring).
      tau: constant temperature or ``(start, end)``: exponential annealing over the steps.
      warmup_steps: steps that train only weights/quantizers before alphas start to move.
      lr_quant: learning rate of the quantizer parameters (default: ``lr_weights``).
      weight_optimizer, alpha_optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
      alpha_weight_decay: weight decay on the alphas.
      max_grad_norm: clip the weight/quantizer gradient norm (LF-MMI can spike).
      model_mode: ``"train"`` (dropout, batch statistics) or ``"eval"`` for the forward passes.
      on_step: called after every update as ``on_step(search_model, step)``; ``"auto"`` calls
        ``search_model.on_step(step)`` if the model has it and weights are trained (TdnnF:
        semi-orthogonal constraint); ``None``: nothing.
      fill: let the repair raise choices to use up the budget.
      seed: seeds torch (inside a forked RNG state, the global one is untouched) and the
        Gumbel noise: equal seeds give equal results on the same device and torch version.
      history_every: record alphas and losses every this many steps (and after the last).
      log_every: ``logging.info`` progress every this many steps (0: never).
      keep_model: also return the searched float model (trained weights) as
        ``result.searched_model``.

    Returns:
      :class:`NasResult`.

    Raises:
      ValueError: bad arguments, an infeasible budget, a non-scalar or non-finite loss.
    """
    for name, v, lo in (("steps", steps, 1), ("warmup_steps", warmup_steps, 0),
                        ("history_every", history_every, 1), ("log_every", log_every, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; received {v!r}")
    lr_quant = lr_weights if lr_quant is None else lr_quant
    if lam is None:
        lam = 10.0 if penalty == "hinge" else 0.0
    for name, v in (("lr_weights", lr_weights), ("lr_alpha", lr_alpha), ("lr_quant", lr_quant),
                    ("lam", lam), ("lam_lr", lam_lr), ("alpha_weight_decay", alpha_weight_decay)):
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                or not math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number >= 0; received {v!r}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {list(PENALTIES)}; received {penalty!r}")
    for name, v in (("weight_optimizer", weight_optimizer), ("alpha_optimizer", alpha_optimizer)):
        if v not in OPTIMIZERS:
            raise ValueError(f"{name} must be one of {list(OPTIMIZERS)}; received {v!r}")
    if model_mode not in ("train", "eval"):
        raise ValueError(f"model_mode must be 'train' or 'eval'; received {model_mode!r}")
    if isinstance(tau, (tuple, list)):
        if len(tau) != 2:
            raise ValueError(f"tau must be a number or (start, end); received {tau!r}")
        _check_tau(tau[0])
        _check_tau(tau[1])
    else:
        _check_tau(tau)
    if max_grad_norm is not None and not (max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0 or None; received {max_grad_norm!r}")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model, batch); received {loss_fn!r}")
    if loss_scale != "auto" and (
        isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float))
        or not loss_scale > 0 or not math.isfinite(loss_scale)
    ):
        raise ValueError(f"loss_scale must be 'auto' or a number > 0; received {loss_scale!r}")
    if isinstance(on_step, str) and on_step != "auto":
        raise ValueError(f"on_step must be 'auto', None or a callable; received {on_step!r}")
    given = [(k, v) for k, v in (("avg_bits", avg_bits), ("size_bytes", size_bytes),
                                 ("ratio", ratio)) if v is not None]
    if (budget is None) == (not given) or len(given) > 1:
        raise ValueError(
            "give exactly one budget: budget=..., or one of avg_bits=..., size_bytes=..., "
            f"ratio=...; received budget={budget!r}, "
            f"{', '.join(f'{k}={v!r}' for k, v in given) or 'no keyword budget'}"
        )
    budget = Budget.parse(budget if budget is not None else {given[0][0]: given[0][1]})

    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        sn = MixedPrecisionSupernet(
            model, candidate_bits, layers=layers, quantizer=quantizer,
            granularity=granularity, dims=dims, quantizer_options=quantizer_options,
            tau=_temperature(tau, 0, steps), gumbel=gumbel, hard=hard,
            count_overhead=count_overhead, copy=True, seed=seed,
        )
        sn.check_budget(budget)
        result = _run_search(
            sn, loss_fn, batches, budget, steps, lr_weights, lr_alpha, lr_quant,
            penalty, float(lam), float(lam_lr), tau, warmup_steps, weight_optimizer,
            alpha_optimizer, alpha_weight_decay, max_grad_norm, model_mode, on_step, fill,
            history_every, log_every, loss_scale,
        )
    if keep_model:
        result.searched_model = sn.restore()
    return result


def _run_search(sn, loss_fn, batches, budget, steps, lr_weights, lr_alpha,
                lr_quant, penalty, lam, lam_lr, tau, warmup_steps, weight_optimizer,
                alpha_optimizer, alpha_weight_decay, max_grad_norm, model_mode, on_step, fill,
                history_every, log_every, loss_scale) -> NasResult:
    model = sn.model
    model.train(model_mode == "train")
    weights = sn.weight_parameters()
    qparams = sn.quantizer_parameters()
    if lr_weights == 0:
        for p in weights:
            p.requires_grad_(False)
    if lr_quant == 0:
        for p in qparams:
            p.requires_grad_(False)
    groups = []
    if lr_weights > 0 and weights:
        groups.append({"params": [p for p in weights if p.requires_grad], "lr": lr_weights})
    if lr_quant > 0 and qparams:
        groups.append({"params": qparams, "lr": lr_quant})
    trained = [p for g in groups for p in g["params"]]
    w_opt = None
    if groups:
        w_opt = (torch.optim.Adam(groups) if weight_optimizer == "adam"
                 else torch.optim.SGD(groups, momentum=0.9))
    alphas = sn.arch_parameters()
    a_opt = _make_optimizer(alpha_optimizer, alphas, lr_alpha, alpha_weight_decay)
    if on_step == "auto":
        hook = getattr(model, "on_step", None)
        on_step = (lambda m, s: m.on_step(s)) if (callable(hook) and lr_weights > 0) else None

    alpha_history = {n: [sn.layers[n].alpha.detach().tolist()] for n in sn.layer_names}
    dim_history = {k: [c.alpha.detach().tolist()] for k, c in sn.choices.items()}
    history: List[Dict[str, float]] = []
    lam_t = lam
    limit = sn.budget_limit(budget)
    abs_sum = 0.0
    stream = _batch_stream(batches)
    for step in range(steps):
        batch = next(stream)
        sn.set_temperature(_temperature(tau, step, steps))
        sn.set_sampling(True)
        task = loss_fn(model, batch)
        if not isinstance(task, Tensor) or task.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor; received "
                f"{type(task).__name__ if not isinstance(task, Tensor) else tuple(task.shape)}"
            )
        task = task.reshape(())
        if not torch.isfinite(task):
            raise ValueError(
                f"loss_fn returned a non-finite loss ({float(task.detach())}) at step {step}; "
                f"lower the learning rates or set max_grad_norm"
            )
        if not task.requires_grad:
            raise ValueError(
                "loss_fn returned a loss without gradient; it must be computed from "
                "model(batch ...) outputs (no torch.no_grad / .detach())"
            )
        expected = sn.expected_usage(budget)
        rel = (expected - limit) / limit
        if loss_scale == "auto":  # running mean of |task loss|: lam is relative to it
            abs_sum += abs(float(task.detach()))
            scale = abs_sum / (step + 1)
        else:
            scale = float(loss_scale)
        pen = scale * (lam * torch.relu(rel) if penalty == "hinge" else lam_t * rel)
        loss = task + pen.to(task.dtype)
        if w_opt is not None:
            w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)
        loss.backward()
        if w_opt is not None:
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
            w_opt.step()
        if step >= warmup_steps:
            a_opt.step()
        sn.set_sampling(False)
        rel_v = float(rel.detach())
        if penalty == "lagrangian":
            lam_t = max(0.0, lam_t + lam_lr * rel_v)
        if on_step is not None:
            on_step(model, step)
        last = step == steps - 1
        if (step + 1) % history_every == 0 or last:
            for n in sn.layer_names:
                alpha_history[n].append(sn.layers[n].alpha.detach().tolist())
            for k, c in sn.choices.items():
                dim_history[k].append(c.alpha.detach().tolist())
            history.append({
                "step": step,
                "tau": sn.tau,
                "task_loss": float(task.detach()),
                "penalty": float(pen.detach()),
                "loss": float(loss.detach()),
                "expected": float(expected.detach()),
                "lam": lam_t if penalty == "lagrangian" else lam,
                "loss_scale": scale,
            })
        if log_every and (step % log_every == 0 or last):
            logging.info(
                "nas step %d/%d: task %.4g, E[%s] %.6g (limit %.6g), tau %.3g",
                step + 1, steps, float(task.detach()), budget.kind, float(expected.detach()),
                limit, sn.tau,
            )

    argmax_bits, argmax_dims = sn.argmax()
    bits, dims = sn.discretize(budget, fill=fill)
    return NasResult(
        bits=bits,
        dims=dims,
        size_bytes=sn.size_bytes(bits, dims),
        avg_bits=sn.avg_bits(bits, dims),
        fp32_bytes=sn.fp32_bytes,
        budget=budget.to_dict(),
        argmax_bits=argmax_bits,
        argmax_dims=argmax_dims,
        alphas={n: sn.layers[n].alpha.detach().tolist() for n in sn.layer_names},
        dim_alphas={k: c.alpha.detach().tolist() for k, c in sn.choices.items()},
        alpha_history=alpha_history,
        dim_alpha_history=dim_history,
        history=history,
        candidate_bits=sn.candidate_bits,
        quantizer=dict(sn.kinds),
        granularity=sn.granularity,
        quantizer_options=dict(sn.quantizer_options),
        candidate_dims={k: list(c.dims) for k, c in sn.choices.items()},
    )

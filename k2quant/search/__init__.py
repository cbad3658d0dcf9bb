"""Compression search: per-layer sensitivity, bit/bottleneck allocation, Pareto fronts.

- :mod:`k2quant.search.sensitivity`: Hutchinson Hessian traces (autograd or finite-difference
  HVPs, checked against each other), HAWQ / KL / loss-increase / output-MSE scores per
  (layer, bits, bottleneck dim), cached as JSON (:class:`SensitivityTable`).
- :mod:`k2quant.search.allocate`: exact ILP (scipy ``milp``) or greedy choice of one bit width
  per layer (and one bottleneck per TDNN-F pair) under an avg-bits / bytes / ratio budget;
  :class:`Allocation` -> :class:`k2quant.plan.Plan`.
- :mod:`k2quant.search.pareto`: budget sweeps, Pareto fronts, JSON + PNG.

The function ``allocate`` is not re-exported here (it would shadow the submodule of the same
name): ``from k2quant.search.allocate import allocate``.
"""
from k2quant.search.allocate import Allocation, budget_range, have_milp
from k2quant.search.pareto import ParetoFront, ParetoPoint, pareto_sweep, write_pareto
from k2quant.search.sensitivity import (
    HvpCheck,
    SensitivityEntry,
    SensitivityTable,
    check_hvp,
    compute_sensitivity,
    hutchinson_trace,
)

__all__ = [
    "Allocation",
    "budget_range",
    "have_milp",
    "ParetoFront",
    "ParetoPoint",
    "pareto_sweep",
    "write_pareto",
    "HvpCheck",
    "SensitivityEntry",
    "SensitivityTable",
    "check_hvp",
    "compute_sensitivity",
    "hutchinson_trace",
]

"""Bit/bottleneck allocation: exact ILP vs brute force, budgets, ties, greedy, errors."""
import itertools
import math
import random

import pytest
import torch
from torch import nn

import k2quant.search.allocate as alloc_mod
from k2quant.plan import convert, model_size_bytes, quantize_
from k2quant.search.allocate import Allocation, allocate, budget_range, have_milp
from k2quant.search.sensitivity import (
    FLOAT_BITS,
    LayerInfo,
    SensitivityEntry,
    SensitivityTable,
    compute_sensitivity,
)

needs_milp = pytest.mark.skipif(not have_milp(), reason="scipy.optimize.milp (scipy >= 1.9)")


# ----------------------------------------------------------------------------- random tables
def make_table(seed, n_layers=4, bits=(1, 2, 4, 8), pairs=0, dims=(2, 4), B=6, other=30):
    """Random table: n_layers plain layers l0.. and `pairs` TDNN-F-like pairs p<k>.{linear,affine}
    with bottleneck B and candidates `dims`. Sensitivity ~ s * 4^-b (+noise), cost of dims
    decreasing in d."""
    rng = random.Random(seed)
    layers, entries, tpairs = {}, {}, {}

    def add_layer(name, n, fp, ch, dim=None, pair=None, role=None, s=None, dn=None):
        s = rng.uniform(0.1, 10.0) if s is None else s
        if dim is None:
            layers[name] = LayerInfo(name, n, fp, pair=pair, role=role)
        for b in bits:
            noise = 1 + 0.3 * rng.random()
            pert = n * 4.0 ** -b * noise
            entries[(name, b, dim)] = SensitivityEntry(
                name, b, dim, n, fp, overhead_bytes=4.0 * ch + 4, perturbation=pert,
                hawq=s * pert / n, kl=s * pert / n * rng.uniform(0.5, 2), loss=None)
        return s

    for i in range(n_layers):
        ch = rng.randint(3, 20)
        add_layer(f"l{i}", ch * rng.randint(3, 30), rng.randint(0, ch), ch)
    for k in range(pairs):
        p = f"p{k}"
        D = rng.randint(8, 20)
        lin, aff = f"{p}.linear", f"{p}.affine"
        s1 = add_layer(lin, B * D * 2, 0, B, pair=p, role="linear")
        s2 = add_layer(aff, B * D * 2, D, D, pair=p, role="affine")
        tpairs[p] = {"linear": lin, "affine": aff, "dim": B, "dims": sorted(set(dims) | {B})}
        for d in dims:
            if d == B:
                continue
            add_layer(lin, d * D * 2, 0, d, dim=d, s=s1)
            add_layer(aff, d * D * 2, D, D, dim=d, s=s2)
            c = rng.uniform(0.01, 2.0) * (B - d) / B
            entries[(p, FLOAT_BITS, d)] = SensitivityEntry(p, FLOAT_BITS, d, 0, perturbation=c,
                                                           hawq=c, kl=c)
    return SensitivityTable(layers, entries, tpairs, other_float_params=other,
                            method={"quantizer": "uniform"})


def brute_force(table, kind, value, bits=(1, 2, 4, 8), metric="hawq", ties=(), min_bits=None,
                use_dims=False):
    names = list(table.layers)
    pairs = list(table.pairs) if use_dims else []
    best = (math.inf, None)
    dim_choices = [table.pairs[p]["dims"] for p in pairs]
    for combo in itertools.product(*[bits] * len(names)):
        b = dict(zip(names, combo))
        if any(len({b[n] for n in g}) > 1 for g in ties):
            continue
        if min_bits and any(b[n] < v for n, v in min_bits.items()):
            continue
        for dcombo in itertools.product(*dim_choices):
            dmap = dict(zip(pairs, dcombo))
            dim_of = {}
            for p, d in dmap.items():
                dim_of[table.pairs[p]["linear"]] = d
                dim_of[table.pairs[p]["affine"]] = d
            size, nb, npar, cost = 4.0 * table.other_float_params, 0.0, 0, 0.0
            for n in names:
                d = dim_of.get(n)
                if d == table.pairs.get(table.layers[n].pair or "", {}).get("dim"):
                    d = None
                e = table.entries[(n, b[n], d)]
                size += e.n_params * b[n] / 8 + e.overhead_bytes + 4 * e.float_params
                nb += e.n_params * b[n]
                npar += e.n_params
                cost += getattr(e, metric)
            for p, d in dmap.items():
                if d != table.pairs[p]["dim"]:
                    cost += getattr(table.entries[(p, FLOAT_BITS, d)], metric)
            ok = {"avg_bits": nb / npar <= value + 1e-12,
                  "size_bytes": size <= value + 1e-9,
                  "ratio": size <= table.fp32_bytes / value + 1e-9}[kind]
            if ok and cost < best[0]:
                best = (cost, (b, dmap, size, nb / npar))
    return best


def check_within_budget(a, kind, value, table):
    if kind == "avg_bits":
        assert a.avg_bits <= value + 1e-9
    elif kind == "size_bytes":
        assert a.size_bytes <= value * (1 + 1e-9)
    else:
        assert a.size_bytes <= table.fp32_bytes / value * (1 + 1e-9)
        assert a.ratio >= value * (1 - 1e-9)


# ----------------------------------------------------------------------------- ILP exactness
@needs_milp
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["avg_bits", "size_bytes", "ratio"])
def test_ilp_matches_brute_force(seed, kind):
    table = make_table(seed)
    lo, hi = budget_range(table, kind, bits=(1, 2, 4, 8))
    rng = random.Random(100 + seed)
    if kind == "avg_bits":
        value = rng.uniform(lo, 8)
    elif kind == "size_bytes":
        widest = allocate(table, avg_bits=8, bits=(1, 2, 4, 8)).size_bytes
        value = rng.uniform(lo, widest)
    else:
        value = rng.uniform(table.fp32_bytes / allocate(table, avg_bits=8).size_bytes, hi)
    a = allocate(table, bits=(1, 2, 4, 8), method="ilp", **{kind: value})
    best, sol = brute_force(table, kind, value)
    assert a.method == "ilp"
    assert a.sensitivity == pytest.approx(best, rel=1e-9, abs=1e-12)
    check_within_budget(a, kind, value, table)
    # the reported figures are those of the chosen bits
    nb = sum(table.get(n, b).n_params * b for n, b in a.bits.items())
    assert a.avg_bits == pytest.approx(nb / sum(table.layers[n].n_params for n in a.bits))


@needs_milp
@pytest.mark.parametrize("seed", range(4))
def test_ilp_matches_brute_force_with_dims_ties_and_min_bits(seed):
    table = make_table(seed, n_layers=2, bits=(1, 2, 4), pairs=2, dims=(2, 4))
    lo, _ = budget_range(table, "size_bytes", bits=(1, 2, 4), dims=True)
    widest = allocate(table, avg_bits=4, bits=(1, 2, 4)).size_bytes
    value = random.Random(seed).uniform(lo, widest)
    ties = [["l0", "p1.affine"]]
    a = allocate(table, size_bytes=value, bits=(1, 2, 4), dims=True, ties=ties,
                 min_bits={"l1": 2}, method="ilp", metric="kl")
    best, (b, dmap, size, _) = brute_force(table, "size_bytes", value, bits=(1, 2, 4),
                                           metric="kl", ties=ties, min_bits={"l1": 2},
                                           use_dims=True)
    assert a.sensitivity == pytest.approx(best, rel=1e-9)
    assert a.size_bytes <= value * (1 + 1e-9)
    assert a.bits["l0"] == a.bits["p1.affine"] and a.bits["l1"] >= 2
    assert set(a.dims) == {"p0", "p1"} and all(d in (2, 4, 6) for d in a.dims.values())


@needs_milp
def test_dims_reduce_size_when_budget_is_tight():
    table = make_table(0, n_layers=1, bits=(1, 2, 4, 8), pairs=2, dims=(2, 4))
    lo_nodims, _ = budget_range(table, "size_bytes", bits=(1, 2, 4, 8))
    lo_dims, _ = budget_range(table, "size_bytes", bits=(1, 2, 4, 8), dims=True)
    assert lo_dims < lo_nodims
    a = allocate(table, size_bytes=(lo_dims + lo_nodims) / 2, dims=True)
    assert any(d < 6 for d in a.dims.values())
    with pytest.raises(ValueError, match="below the floor"):
        allocate(table, size_bytes=(lo_dims + lo_nodims) / 2)


# ----------------------------------------------------------------------------- constraints
@needs_milp
def test_ties_regex_and_pairs_and_min_bits():
    table = make_table(3, n_layers=4, pairs=2)
    a = allocate(table, avg_bits=3, ties=[["re:l[0-2]"]], tie_pairs=True,
                 min_bits={"l3": 8}, max_bits={"re:p.*": 4})
    assert a.bits["l0"] == a.bits["l1"] == a.bits["l2"]
    for p in ("p0", "p1"):
        assert a.bits[f"{p}.linear"] == a.bits[f"{p}.affine"] <= 4
    assert a.bits["l3"] == 8
    assert a.avg_bits <= 3 + 1e-9
    with pytest.raises(ValueError, match="no common admissible bit width"):
        allocate(table, avg_bits=3, ties=[["l0", "l3"]], min_bits={"l3": 8}, max_bits={"l0": 4})


@pytest.mark.parametrize("seed", range(5))
def test_greedy_feasible_and_close_to_ilp(seed):
    table = make_table(seed, n_layers=6, pairs=1)
    for avg in (2.0, 3.5, 5.0):
        g = allocate(table, avg_bits=avg, method="greedy", dims=True)
        assert g.method == "greedy" and g.avg_bits <= avg + 1e-9
        if have_milp():
            i = allocate(table, avg_bits=avg, method="ilp", dims=True)
            assert i.sensitivity <= g.sensitivity + 1e-12
            assert g.sensitivity <= 1.5 * i.sensitivity + 1e-9, (g.sensitivity, i.sensitivity)
    g = allocate(table, ratio=3, method="greedy", tie_pairs=True, min_bits={"l0": 8})
    assert g.ratio >= 3 * (1 - 1e-9) and g.bits["l0"] == 8
    assert g.bits["p0.linear"] == g.bits["p0.affine"]


def test_auto_falls_back_to_greedy_without_milp(monkeypatch):
    monkeypatch.setattr(alloc_mod, "have_milp", lambda: False)
    table = make_table(0)
    a = allocate(table, avg_bits=3)
    assert a.method == "greedy" and a.avg_bits <= 3
    with pytest.raises(ValueError, match="scipy >= 1.9"):
        allocate(table, avg_bits=3, method="ilp")


# ----------------------------------------------------------------------------- errors
def test_bad_budgets_give_feasible_range():
    table = make_table(1)
    with pytest.raises(ValueError, match=r"budget 0\.5 avg bits is below the floor 1\.0 \(all "
                                         r"layers at their minimum width\); feasible: 1\.0\.\.32"):
        allocate(table, avg_bits=0.5)
    with pytest.raises(ValueError, match=r"above fp32 .*feasible: 1\.0\.\.32"):
        allocate(table, avg_bits=33)
    with pytest.raises(ValueError, match=r"below the floor 2\.0"):
        allocate(table, avg_bits=1.5, min_bits=2)
    with pytest.raises(ValueError, match="ratio 0.5x is above fp32"):
        allocate(table, ratio=0.5)
    with pytest.raises(ValueError, match="ratio 1000x is below the floor.*feasible: 1.0.."):
        allocate(table, ratio=1000)
    lo, hi = budget_range(table, "size_bytes")
    with pytest.raises(ValueError, match=f"feasible: {lo:,.0f}..{hi:,.0f}"):
        allocate(table, size_bytes=lo / 2)
    with pytest.raises(ValueError, match="exactly one budget"):
        allocate(table, avg_bits=3, ratio=4)
    with pytest.raises(ValueError, match="exactly one budget"):
        allocate(table)
    # at fp32 everything fits: widest widths
    a = allocate(table, avg_bits=32)
    assert set(a.bits.values()) == {8}


def test_unknown_layers_are_named():
    table = make_table(2)
    with pytest.raises(ValueError, match="nope"):
        allocate(table, avg_bits=4, ties=[["l0", "nope"]])
    with pytest.raises(ValueError, match="re:zz"):
        allocate(table, avg_bits=4, min_bits={"re:zz.*": 4})
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"lacks: \['l0', 'l1', 'l2', 'l3'\]"):
        allocate(table, avg_bits=4, model=model)
    a = allocate(table, avg_bits=4)
    with pytest.raises(ValueError, match="lacks"):
        a.to_plan(model=model)
    with pytest.raises(ValueError, match="no bottleneck candidates"):
        allocate(table, avg_bits=4, dims=True)


# ----------------------------------------------------------------------------- real model
def test_allocation_to_plan_on_real_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(20, 6, generator=g), torch.randint(0, 4, (20,), generator=g))]
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    table = compute_sensitivity(model, loss, batches, bits=(2, 3, 4, 8), n_samples=2,
                                quantizer="lsq")
    a = allocate(table, avg_bits=4, bits=(2, 3, 4, 8), metric="kl", min_bits={"4": 8},
                 model=model)
    assert a.bits["4"] == 8
    plan = a.to_plan(act_bits=8)
    assert set(plan.layers) == {"0", "2", "4"}
    assert plan.layers["0"].weight_quantizer == "lsq" and plan.layers["0"].act_bits == 8
    assert a.to_plan(weight_quantizer="uniform").layers["2"].weight_quantizer == "uniform"
    q = quantize_(__import__("copy").deepcopy(model), a.to_plan())
    convert(q)
    overhead = sum(table.get(n, b).overhead_bytes for n, b in a.bits.items())
    assert model_size_bytes(q) + overhead == pytest.approx(a.size_bytes)
    assert a.ratio == pytest.approx(4 * sum(p.numel() for p in model.parameters()) / a.size_bytes)
    a.save(tmp_path / "alloc.json")
    assert Allocation.load(tmp_path / "alloc.json") == a

"""Differentiable mixed-precision search (k2quant.search.nas) on small MLPs.

The toy task: regress the outputs of a fixed network whose hidden layer is the sum of three
parallel branches; one branch has 10x larger weights, so its quantization error dominates the
output error (the "sensitive" layer), the other two barely matter.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from k2quant.nn import QuantModule
from k2quant.plan import (
    LayerConfig,
    Plan,
    convert,
    model_size_bytes,
    quantizable_layers,
    quantize_,
)
from k2quant.search.nas import (
    Budget,
    MixedPrecisionLayer,
    MixedPrecisionSupernet,
    NasResult,
    relaxed_weights,
    repair_choices,
    search_mixed_precision,
)

SEARCHED = ["sensitive", "quiet1", "quiet2"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Branches(nn.Module):
    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.sensitive = nn.Linear(32, 32)
        self.quiet1 = nn.Linear(32, 32)
        self.quiet2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)
        with torch.no_grad():
            self.sensitive.weight.mul_(scale)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.sensitive(h) + self.quiet1(h) + self.quiet2(h)))


def _task(seed: int = 0):
    torch.manual_seed(seed)
    model = Branches()
    x = torch.randn(256, 8)
    with torch.no_grad():
        y = model(x)
    var = float(y.var())
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]

    def loss_fn(m, batch):
        xb, yb = batch
        return F.mse_loss(m(xb), yb) / var

    return model, loss_fn, batches


def _search(model, loss_fn, batches, budget, **kw):
    args = dict(steps=60, lr_alpha=0.05, candidate_bits=(2, 4, 8), layers=SEARCHED,
                model_mode="eval")
    args.update(kw)
    return search_mixed_precision(model, loss_fn, batches, budget, **args)


def metadata_bytes(qmodel) -> float:
    """Scales / zero points / codebooks of a converted model as the packed format stores
    them (a constant tensor as one element)."""
    total = 0.0
    for m in qmodel.modules():
        if isinstance(m, QuantModule):
            for name, buf in m.named_buffers(recurse=False):
                if name.endswith(("_scale", "_zero_point", "_codebook")):
                    flat = buf.reshape(-1)
                    n = 1 if bool((flat == flat[0]).all()) else flat.numel()
                    total += n * buf.element_size()
    return total


def _quantized_size(model, result: NasResult, overhead: bool = True) -> float:
    """The real size of ``model`` quantized with the result (after its dims)."""
    q = result.apply(copy.deepcopy(model))
    size = model_size_bytes(q)
    if overhead:
        size += metadata_bytes(convert(q))
    return size


# ------------------------------------------------------------------------------ the search
@pytest.mark.parametrize("penalty", ["hinge", "lagrangian"])
def test_sensitive_layer_gets_more_bits(penalty):
    model, loss_fn, batches = _task()
    r = _search(model, loss_fn, batches, {"avg_bits": 4}, penalty=penalty)
    assert r.bits["sensitive"] > max(r.bits["quiet1"], r.bits["quiet2"]), r.bits
    # its alphas prefer the widest candidate more than the quiet layers' alphas do
    pref = {n: a[-1] - a[0] for n, a in r.alphas.items()}
    assert pref["sensitive"] > max(pref["quiet1"], pref["quiet2"]), r.alphas
    assert r.avg_bits <= 4.0 + 1e-9


def test_gumbel_search_also_finds_the_sensitive_layer():
    model, loss_fn, batches = _task()
    r = _search(model, loss_fn, batches, {"avg_bits": 4}, gumbel=True)
    assert r.bits["sensitive"] > max(r.bits["quiet1"], r.bits["quiet2"]), r.bits


@pytest.mark.parametrize(
    "budget", [{"avg_bits": 3}, {"avg_bits": 5.5}, "ratio=6", {"size_bytes": 9000.0}]
)
def test_discrete_plan_meets_budget(budget):
    model, loss_fn, batches = _task()
    r = _search(model, loss_fn, batches, budget, steps=20,
                candidate_bits=(1, 2, 3, 4, 6, 8), layers=None)
    assert set(r.bits) == set(quantizable_layers(model))  # layers=None: every Linear
    size = _quantized_size(model, r)
    assert size == pytest.approx(r.size_bytes, rel=1e-12)  # the size model is the real one
    b = Budget.parse(budget)
    assert r.budget == b.to_dict()
    if b.kind == "avg_bits":
        n = {k: m.weight.numel() for k, m in quantizable_layers(model).items()}
        avg = sum(n[k] * r.bits[k] for k in n) / sum(n.values())
        assert r.avg_bits == pytest.approx(avg) and avg <= b.value + 1e-9
    elif b.kind == "ratio":
        assert model_size_bytes(model) / size >= b.value - 1e-9
        assert r.ratio == pytest.approx(model_size_bytes(model) / size)
        assert r.fp32_bytes == model_size_bytes(model)
    else:
        assert size <= b.value
    # the repair fills the budget: no single layer can go one candidate up and still fit
    sn = MixedPrecisionSupernet(model, (1, 2, 3, 4, 6, 8))
    cands = (1, 2, 3, 4, 6, 8)
    for name, bits in r.bits.items():
        if bits < 8:
            up = dict(r.bits, **{name: cands[cands.index(bits) + 1]})
            assert sn.usage(b, up) > sn.budget_limit(b)


def test_loose_budget_gives_every_layer_the_max_bits():
    model, loss_fn, batches = _task()
    for budget in ({"avg_bits": 8}, {"ratio": 1.0}):
        r = _search(model, loss_fn, batches, budget, steps=10, layers=None,
                    candidate_bits=(2, 3, 4, 6))
        assert set(r.bits.values()) == {6}, r.bits
    # also without the fill step: the task loss alone drives the alphas to the top
    r = _search(model, loss_fn, batches, {"avg_bits": 8}, steps=40, fill=False)
    assert r.bits == r.argmax_bits == {n: 8 for n in SEARCHED}


def test_infeasible_budget_raises():
    model, loss_fn, batches = _task()
    with pytest.raises(ValueError, match=r"avg_bits=1.5 .* below the smallest reachable 2 bits"):
        _search(model, loss_fn, batches, {"avg_bits": 1.5}, steps=1)
    with pytest.raises(ValueError, match="ratio=50 .* below the smallest reachable"):
        _search(model, loss_fn, batches, {"ratio": 50}, steps=1)
    with pytest.raises(ValueError, match="give exactly one budget"):
        _search(model, loss_fn, batches, {"ratio": 5}, avg_bits=4, steps=1)
    with pytest.raises(ValueError, match="give exactly one budget"):
        _search(model, loss_fn, batches, None, steps=1)


def test_deterministic_with_a_seed():
    model, loss_fn, batches = _task()
    kw = dict(steps=15, lr_weights=1e-3, gumbel=True, model_mode="train")
    r1 = _search(model, loss_fn, batches, {"avg_bits": 4}, seed=3, **kw)
    r2 = _search(model, loss_fn, batches, {"avg_bits": 4}, seed=3, **kw)
    r3 = _search(model, loss_fn, batches, {"avg_bits": 4}, seed=4, **kw)
    assert r1.alpha_history == r2.alpha_history
    assert r1.history == r2.history
    assert r1.bits == r2.bits
    assert r1.alpha_history != r3.alpha_history  # the seed drives the Gumbel noise
    assert len(r1.alpha_history["sensitive"]) == 16  # initial + one per step
    assert r1.alpha_history["sensitive"][0] == [0.0, 0.0, 0.0]


def test_original_model_is_unchanged_and_searched_model_is_float():
    model, loss_fn, batches = _task()
    before = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    r = _search(model, loss_fn, batches, {"avg_bits": 4}, steps=10, lr_weights=1e-2,
                model_mode="train", keep_model=True)
    assert torch.equal(torch.get_rng_state(), rng)  # the search forks the global RNG
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(p.requires_grad for p in model.parameters())
    searched = r.searched_model
    assert searched is not model
    assert {n: type(m) for n, m in searched.named_modules()} == types  # plain float again
    assert searched.state_dict().keys() == before.keys()
    assert not torch.equal(searched.sensitive.weight, model.sensitive.weight)  # trained


def test_supernet_in_place_and_restore():
    model, loss_fn, batches = _task()
    orig = {n: getattr(model, n) for n in SEARCHED}
    sn = MixedPrecisionSupernet(model, (2, 8), layers="quiet.|sensitive", copy=False)
    assert sn.model is model
    assert sn.layer_names == SEARCHED
    assert all(isinstance(getattr(model, n), MixedPrecisionLayer) for n in SEARCHED)
    assert all(getattr(model, n).weight is orig[n].weight for n in SEARCHED)  # shared
    restored = sn.restore()
    assert restored is model
    assert all(getattr(model, n) is orig[n] for n in SEARCHED)


# ------------------------------------------------------------------------------ relaxation
def test_mixture_weights_sum_to_one():
    model, _, _ = _task()
    torch.manual_seed(1)
    for gumbel, hard in ((False, False), (True, False), (True, True)):
        sn = MixedPrecisionSupernet(model, (1, 2, 3, 4, 6, 8), tau=0.5, gumbel=gumbel, hard=hard)
        with torch.no_grad():
            for p in sn.arch_parameters():
                p.copy_(torch.randn(p.shape) * 3)
        sn.set_sampling(True)
        for name in sn.layer_names:
            w = sn.mixture_weights(name).detach()
            assert w.shape == (6,)
            assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
            assert (w >= 0).all()
            if hard:
                assert sorted(w.tolist())[-1] == pytest.approx(1.0, abs=1e-6)
            assert float(sn.probabilities(name).detach().sum()) == pytest.approx(1.0, abs=1e-6)


def test_relaxed_weights_temperature_and_noise():
    a = torch.tensor([0.0, 1.0, 2.0])
    assert torch.allclose(relaxed_weights(a, 1.0), torch.softmax(a, 0))
    assert torch.allclose(relaxed_weights(a, 0.5), torch.softmax(2 * a, 0))
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[relaxed_weights(a, 1.0, gumbel=True, generator=g).argmax()] += 1
    # Gumbel-max: argmax frequencies follow softmax(alpha)
    assert torch.allclose(counts / 2000, torch.softmax(a, 0), atol=0.04)


def test_one_hot_supernet_equals_the_quantized_model():
    """With all mass on one width, the supernet's forward is the planned QuantLinear's."""
    model, _, batches = _task()
    sn = MixedPrecisionSupernet(model, (2, 4, 8), layers=SEARCHED)
    with torch.no_grad():
        for name, k in zip(SEARCHED, (2, 0, 1)):
            sn.layers[name].alpha.copy_(torch.full((3,), -1e4).index_fill_(0, torch.tensor(k), 0))
    plan = Plan({n: LayerConfig(weight_bits=b, weight_quantizer="lsq")
                 for n, b in zip(SEARCHED, (8, 2, 4))})
    q = quantize_(copy.deepcopy(model), plan).eval()
    sn.model.eval()
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(sn.model(x), q(x))


# ------------------------------------------------------------------------------ size model
def _fd_check(fn, params, eps=1e-3):
    """Autograd gradient of the float64 scalar ``fn()`` against central differences."""
    for p in params:
        p.grad = None
    fn().backward()
    for p in params:
        for k in range(p.numel()):
            with torch.no_grad():
                old = float(p[k])
                p[k] = old + eps
                up = float(fn())
                p[k] = old - eps
                down = float(fn())
                p[k] = old
            fd = (up - down) / (2 * eps)
            assert float(p.grad[k]) == pytest.approx(fd, rel=2e-3, abs=1e-6 * abs(up) + 1e-9)


@pytest.mark.parametrize("overhead", [False, True])
def test_expected_size_gradient_matches_finite_differences(overhead):
    model, _, _ = _task()
    sn = MixedPrecisionSupernet(model, (1, 2, 3, 4, 6, 8), tau=0.7, count_overhead=overhead)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sn.arch_parameters():
            p.copy_(torch.randn(p.shape))
    e = sn.expected_size_bytes()
    assert e.dtype == torch.float64 and e.dim() == 0
    # value: F + sum_i sum_b p_ib (n_i b / 8 + metadata_ib)
    manual = sn.fixed_bytes
    for n in sn.layer_names:
        probs = torch.softmax(sn.layers[n].alpha.double() / 0.7, 0).tolist()
        for pb, b in zip(probs, sn.candidate_bits):
            meta = sum(sn.layers[n].overhead[b]) if overhead else 0.0
            manual += pb * (sn.layers[n].weight.numel() * b / 8 + meta)
    assert float(e.detach()) == pytest.approx(manual, rel=1e-12)
    _fd_check(sn.expected_size_bytes, sn.arch_parameters())
    _fd_check(sn.expected_avg_bits, sn.arch_parameters())
    # the penalty the search adds is differentiable the same way (hinge, above the budget)
    limit = float(e.detach()) * 0.8
    _fd_check(lambda: torch.relu((sn.expected_size_bytes() - limit) / limit),
              sn.arch_parameters())


@pytest.mark.parametrize("kind,granularity", [("lsq", "channel"), ("uniform", "tensor"),
                                               ("general", "channel")])
def test_size_bytes_matches_the_quantized_model(kind, granularity):
    model, _, _ = _task()
    bits = {"sensitive": 8, "quiet1": 1, "quiet2": 4}
    plan = Plan({n: LayerConfig(weight_bits=b, weight_quantizer=kind, granularity=granularity)
                 for n, b in bits.items()})
    q = quantize_(copy.deepcopy(model), plan)
    plain = MixedPrecisionSupernet(model, (1, 2, 4, 8), layers=SEARCHED, quantizer=kind,
                                   granularity=granularity, count_overhead=False)
    assert plain.fp32_bytes == model_size_bytes(model)
    assert plain.size_bytes(bits) == model_size_bytes(q)
    sn = MixedPrecisionSupernet(model, (1, 2, 4, 8), layers=SEARCHED, quantizer=kind,
                                granularity=granularity)
    assert sn.size_bytes(bits) == model_size_bytes(q) + metadata_bytes(convert(q))
    assert sn.avg_bits(bits) == pytest.approx(13 / 3)
    assert sn.budget_limit("avg_bits=4") == 4.0
    assert sn.budget_limit({"ratio": 2}) == sn.fp32_bytes / 2
    assert sn.budget_limit(Budget("size_bytes", 1234)) == 1234.0
    assert sn.budget_limit({"kind": "ratio", "value": 4}) == sn.fp32_bytes / 4


def test_repair_choices():
    # two variables, options 2/4/8 bits, sizes n=10 and n=30 (bytes = n * b / 8)
    n = {"a": 10, "b": 30}
    bits = [2, 4, 8]

    def size(assign):
        return sum(n[v] * bits[i] / 8 for v, i in assign.items())

    order = {v: bits for v in n}
    logp = {"a": [-5.0, -2.0, -0.1], "b": [-0.5, -1.0, -3.0]}
    start = {"a": 2, "b": 0}  # argmax: a 8-bit, b 2-bit -> 17.5 bytes
    assert repair_choices(logp, start, size, 100.0, order, fill=False) == start
    # budget 15: must lower a (b is already at its minimum)
    assert repair_choices(logp, start, size, 15.0, order, fill=False) == {"a": 1, "b": 0}
    # with fill and a large budget everything goes up
    assert repair_choices(logp, start, size, 100.0, order) == {"a": 2, "b": 2}
    # fill within 28 bytes: b can go 2->4 (+7.5 bytes) but not to 8 (+22.5)
    assert repair_choices(logp, start, size, 28.0, order) == {"a": 2, "b": 1}
    # lowering prefers the move with the least preference lost per byte saved
    logp2 = {"a": [-0.2, -0.1, -0.1], "b": [-9.0, -9.0, -0.1]}
    start2 = {"a": 2, "b": 2}  # 10 + 30 = 40 bytes
    out = repair_choices(logp2, start2, size, 35.0, order, fill=False)
    assert out == {"a": 1, "b": 2}  # a 8->4: nothing lost for 5 bytes; b 8->4: 8.9 lost
    out = repair_choices(logp2, start2, size, 32.5, order, fill=False)
    assert out == {"a": 0, "b": 2}  # then a 4->2: 0.1 lost for 2.5 bytes (b: 8.9 for 15)
    # below that b must drop; the greedy overshoots (b 8->2) and the fill step repairs it
    assert repair_choices(logp2, start2, size, 32.0, order, fill=False) == {"a": 0, "b": 0}
    assert repair_choices(logp2, start2, size, 32.0, order) == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="cannot be met"):
        repair_choices(logp, start, size, 5.0, order)


# ------------------------------------------------------------------------------ plans
def test_to_plan_uses_exact_names_and_the_search_quantizers():
    model, loss_fn, batches = _task()
    r = _search(model, loss_fn, batches, {"avg_bits": 3}, steps=5, candidate_bits=(1, 2, 4),
                quantizer={1: "binary", 2: "ternary", "default": "lsq"})
    plan = r.to_plan(act_bits=8)
    assert list(plan.layers) == SEARCHED and plan.default is None
    for name, cfg in plan.layers.items():
        assert cfg.weight_bits == r.bits[name]
        assert cfg.weight_quantizer == {1: "binary", 2: "ternary", 4: "lsq"}[r.bits[name]]
        assert cfg.act_bits == 8 and cfg.granularity == "channel"
    q = r.apply(copy.deepcopy(model))
    assert all(isinstance(getattr(q, n), QuantModule) for n in SEARCHED)
    assert not isinstance(q.inp, QuantModule)
    d = r.to_dict()
    assert json.loads(json.dumps(d))["bits"] == r.bits
    assert d["method"] == "nas" and d["budget"] == {"kind": "avg_bits", "value": 3.0}
    # overrides, as Allocation.to_plan takes them
    p2 = r.to_plan(weight_quantizer="uniform", granularity="tensor", model=model)
    assert all(c.weight_quantizer == "uniform" and c.granularity == "tensor"
               and c.weight_options == {} for c in p2.layers.values())
    with pytest.raises(ValueError, match="names layers the model lacks"):
        r.to_plan(model=nn.Sequential(nn.Linear(2, 2)))


def test_result_save_load_roundtrip(tmp_path):
    model, loss_fn, batches = _task()
    r = _search(model, loss_fn, batches, None, avg_bits=3, steps=3)
    r.save(tmp_path / "nas.json")
    r2 = NasResult.load(tmp_path / "nas.json")
    assert r2.bits == r.bits and r2.to_plan() == r.to_plan() and r2.ratio == r.ratio
    assert r2.alpha_history == r.alpha_history and r2.quantizer == r.quantizer


def test_any_scalar_loss_works_float64_and_conv_and_embedding():
    """A float64 loss (as LF-MMI returns) and Conv1d/Embedding layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 16))

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.conv = nn.Conv1d(16, 16, 3, padding=1)
            self.out = nn.Linear(16, 5)

        def forward(self, ids):
            h = self.emb(ids).transpose(1, 2)
            return self.out(torch.relu(self.conv(h)).transpose(1, 2))

    model = Conv()
    ids = torch.randint(0, 20, (4, 10))
    with torch.no_grad():
        ref = model(ids).log_softmax(-1)

    def loss_fn(m, batch):
        lp = m(batch).log_softmax(-1)
        return F.kl_div(lp, ref, log_target=True, reduction="sum").double()

    r = search_mixed_precision(model, loss_fn, [ids], {"avg_bits": 4}, steps=5,
                               candidate_bits=(2, 4, 8), lr_weights=1e-3)
    assert set(r.bits) == {"emb", "conv", "out"}
    assert _quantized_size(model, r) == pytest.approx(r.size_bytes, rel=1e-12)
    assert r.avg_bits <= 4


# ------------------------------------------------------------------------------ errors
def test_argument_errors():
    model, loss_fn, batches = _task()
    with pytest.raises(ValueError, match="Budget.kind must be one of"):
        _search(model, loss_fn, batches, {"bits": 4})
    with pytest.raises(ValueError, match="budget string must look like"):
        _search(model, loss_fn, batches, "four bits")
    with pytest.raises(ValueError, match=r"avg_bits must be \(0, 32\]"):
        Budget("avg_bits", 40)
    with pytest.raises(ValueError, match="candidate_bits must be"):
        _search(model, loss_fn, batches, "avg_bits=4", candidate_bits=(0, 4))
    with pytest.raises(ValueError, match="names no quantizable layer"):
        _search(model, loss_fn, batches, "avg_bits=4", layers=["nope"])
    with pytest.raises(ValueError, match="penalty must be one of"):
        _search(model, loss_fn, batches, "avg_bits=4", penalty="l2")
    with pytest.raises(ValueError, match="tau must be"):
        _search(model, loss_fn, batches, "avg_bits=4", tau=(1.0, 0.0))
    with pytest.raises(ValueError, match="unknown quantizer kind|quantizer kind 'foo'"):
        _search(model, loss_fn, batches, "avg_bits=4", quantizer="foo")
    with pytest.raises(ValueError, match="has no kind for 4 bits"):
        _search(model, loss_fn, batches, "avg_bits=4", quantizer={2: "ternary"})
    with pytest.raises(ValueError, match="cannot build the 2-bit 'binary'"):
        _search(model, loss_fn, batches, "avg_bits=4", quantizer="binary")
    with pytest.raises(ValueError, match="needs a k2quant TdnnF"):
        _search(model, loss_fn, batches, "avg_bits=4", dims=[0.5, 1.0])
    with pytest.raises(ValueError, match="scalar tensor"):
        _search(model, lambda m, b: m(b[0]), batches, "avg_bits=4", steps=1)
    with pytest.raises(ValueError, match="without gradient"):
        _search(model, lambda m, b: torch.tensor(1.0), batches, "avg_bits=4", steps=1)
    with pytest.raises(ValueError, match="non-finite"):
        _search(model, lambda m, b: m(b[0]).sum() * math.inf, batches, "avg_bits=4", steps=1)
    with pytest.raises(ValueError, match="ran out after 4 batches"):
        _search(model, loss_fn, iter(batches), "avg_bits=4", steps=5)
    with pytest.raises(ValueError, match="batches is empty"):
        _search(model, loss_fn, [], "avg_bits=4", steps=1)
    lstm = nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="supports exact nn.Linear"):
        MixedPrecisionSupernet(lstm, layers=["0"])
    assert MixedPrecisionSupernet(lstm).layer_names == ["1"]  # LSTMs are skipped by default
    q = quantize_(copy.deepcopy(model), Plan(default=LayerConfig(weight_bits=4)))
    with pytest.raises(ValueError, match="expects a float model"):
        MixedPrecisionSupernet(q)

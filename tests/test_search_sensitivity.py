"""Sensitivity: Hutchinson traces, HVP autograd-vs-FD checks, scores, JSON cache (pure torch)."""
import copy
import logging
import math

import pytest
import torch
from torch import nn

from k2quant.models.tdnnf import TdnnF, TdnnFConfig
from k2quant.search.sensitivity import (
    FLOAT_BITS,
    SensitivityTable,
    _equivalent_affine_delta,
    check_hvp,
    compute_sensitivity,
    hessian_vector_product,
    hutchinson_trace,
    layer_traces,
    model_fingerprint,
    quantize_layer_weights,
)
from k2quant.plan import LayerConfig

from helpers import tdnnf_hvp_case


# ----------------------------------------------------------------------------- fixtures
class Quadratic(nn.Module):
    """loss = 0.5 vec(W)^T A vec(W) for W = self.lin.weight: Hessian A exactly. The model's
    output is vec(W) (hvp='fd' differentiates the loss at the model output)."""

    def __init__(self, A, shape):
        super().__init__()
        self.lin = nn.Linear(shape[1], shape[0], bias=False)
        self.register_buffer("A", A)

    def forward(self):
        return self.lin.weight.reshape(-1)

    def loss(self):
        w = self()
        return 0.5 * w @ (self.A @ w)


def spd(n, seed, offdiag=0.1):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=g, dtype=torch.float64) * offdiag
    return torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 4 + 1) + Q @ Q.t()


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                         nn.Linear(12, 5)).to(dtype)


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def data(n_batches=2, n=24, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g))
            for _ in range(n_batches)]


# ----------------------------------------------------------------------------- Hutchinson
def test_hutchinson_trace_quadratic_known_hessian():
    A = spd(12, 0)
    m = Quadratic(A.float(), (3, 4)).double()
    w = m.lin.weight
    hvp = lambda vs: hessian_vector_product(m, lambda mod, b: mod.loss(), None, [w], vs)  # noqa
    exact, se, count = hutchinson_trace(hvp, [w], basis=True)
    assert count == 12 and se == 0.0
    assert exact == pytest.approx(float(torch.trace(m.A)), rel=1e-10)
    est, se, _ = hutchinson_trace(hvp, [w], n_samples=400,
                                  generator=torch.Generator().manual_seed(3))
    assert est == pytest.approx(exact, rel=0.03), f"Hutchinson {est} vs exact {exact}"
    assert se > 0


@pytest.mark.parametrize("method", ["autograd", "fd"])
def test_layer_traces_quadratic(method):
    A = spd(12, 1)
    m = Quadratic(A.float(), (3, 4)).double()
    out = layer_traces(m, lambda mod, b: mod.loss(), [None], ["lin"], method=method,
                       n_samples=300, seed=5)
    t, se = out["lin"]
    assert t == pytest.approx(float(torch.trace(m.A)), rel=0.04)
    assert 0 < se < 0.05 * t


class TwoBlockQuadratic(nn.Module):
    """loss = 0.5 [w1; w2]^T A [w1; w2] with coupled blocks: Tr(H_i) = trace of block i."""

    def __init__(self, A):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(2, 4, bias=False)
        self.register_buffer("A", A)

    def forward(self):
        return torch.cat([self.a.weight.reshape(-1), self.b.weight.reshape(-1)])

    def loss(self):
        w = self()
        return 0.5 * w @ (self.A @ w)


@pytest.mark.parametrize("method", ["autograd", "fd"])
@pytest.mark.parametrize("probes", ["layer", "joint"])
def test_layer_traces_coupled_blocks(method, probes):
    m = TwoBlockQuadratic(spd(14, 2, offdiag=0.3)).double()
    out = layer_traces(m, lambda mod, b: mod.loss(), [None], ["a", "b"], method=method,
                       n_samples=600, seed=1, probes=probes)
    A = m.A
    assert out["a"][0] == pytest.approx(float(torch.trace(A[:6, :6])), rel=0.05)
    assert out["b"][0] == pytest.approx(float(torch.trace(A[6:, 6:])), rel=0.05)


# ----------------------------------------------------------------------------- HVP check
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-2)])
def test_autograd_hvp_equals_fd_on_mlp(dtype, tol):
    model = mlp(dtype).eval()
    batch = data(1, dtype=dtype)[0]
    for layer in ("0", "2", "4"):
        c = check_hvp(model, ce_loss, batch, layer, n_vectors=2, tol=tol,
                      fd_eps=1e-4 if dtype == torch.float64 else 1e-3)
        assert c.autograd_error is None
        assert c.ok, f"{layer}: relative error {c.rel_err}"
        assert c.vhv_autograd == pytest.approx(c.vhv_fd, rel=10 * tol, abs=1e-8)
    # the explicit API agrees as well
    w = model[2].weight
    v = [torch.randn_like(w)]
    ha = hessian_vector_product(model, ce_loss, batch, [w], v, "autograd")[0]
    hf = hessian_vector_product(model, ce_loss, batch, [w], v, "fd", fd_eps=1e-4)[0]
    assert float((ha - hf).norm() / ha.norm()) < 10 * tol
    # weights restored exactly after FD
    assert torch.equal(model[2].weight, mlp(dtype)[2].weight)


class _NoDoubleBackwardLSE(torch.autograd.Function):
    """logsumexp whose backward is computed without a graph (like k2's get_tot_scores)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.logsumexp(x, dim=-1)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.unsqueeze(-1) * torch.softmax(x.detach(), dim=-1)


def lossy_second_order_loss(model, batch):
    x, y = batch
    logits = model(x)
    return (_NoDoubleBackwardLSE.apply(logits) - logits.gather(1, y[:, None])[:, 0]).mean()


def test_auto_picks_fd_when_autograd_second_derivative_is_wrong(caplog):
    model = mlp().eval()
    batches = data(1)
    c = check_hvp(model, lossy_second_order_loss, batches[0], "4")
    assert not c.ok and c.rel_err > 0.5 and math.isfinite(c.vhv_fd)
    # the same loss with torch's own logsumexp is fine
    assert check_hvp(model, ce_loss, batches[0], "4").ok
    with caplog.at_level(logging.WARNING):
        table = compute_sensitivity(model, lossy_second_order_loss, batches, bits=(2, 8),
                                    metrics=("hawq",), n_samples=2)
    assert table.method["hvp"] == "fd"
    assert "using FD" in caplog.text
    assert all(not c["ok"] for c in table.method["hvp_check"] if c["layer"] == "4")
    table2 = compute_sensitivity(model, ce_loss, batches, bits=(2, 8), metrics=("hawq",),
                                 n_samples=2)
    assert table2.method["hvp"] == "autograd"


def relu_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 5)).eval()


def _rel(a, b):
    return float((a - b).norm() / max(a.norm(), b.norm()))


@pytest.mark.parametrize("layer", ["0", "2", "4"])
def test_fd_hvp_matches_exact_on_relu_network_with_incomplete_double_backward(layer):
    # the exact HVP: autograd through torch's own logsumexp; the FD one sees only the
    # first derivative of the loss (the k2 situation), on a ReLU network in float32
    model = relu_mlp()
    batch = data(1, n=64)[0]
    w = model.get_submodule(layer).weight
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = [torch.randn(w.shape, generator=g)]
        exact = hessian_vector_product(model, ce_loss, batch, [w], v, "autograd")[0]
        fd = hessian_vector_product(model, lossy_second_order_loss, batch, [w], v, "fd")[0]
        wrong = hessian_vector_product(model, lossy_second_order_loss, batch, [w], v,
                                       "autograd")[0]
        assert _rel(fd, exact) < 1e-3, (layer, _rel(fd, exact))
        assert _rel(wrong, exact) > 0.5  # what autograd gives without a second derivative


def test_fd_hvp_matches_autograd_on_tdnnf_layers_in_float32():
    # central differences of weight gradients cross ReLU kinks on this model (measured:
    # 10-40x off, of either sign, at fd_eps 1e-3); output-space differences agree with double
    # backprop to float32 precision on every layer
    model, smooth_loss, batch = tdnnf_hvp_case()
    for layer in ("tdnn1.affine", "tdnnfs.0.linear", "tdnnfs.3.affine", "output"):
        c = check_hvp(model, smooth_loss, batch, layer, n_vectors=2)
        assert c.ok and c.rel_err < 1e-3, (layer, c)
        assert c.vhv_fd == pytest.approx(c.vhv_autograd, rel=1e-3)


@pytest.mark.parametrize("fd_eps", [1e-2, 1e-3, 1e-4])
def test_fd_hvp_is_stable_across_steps(fd_eps):
    model = relu_mlp(1)
    batch = data(1, n=64)[0]
    w = model[2].weight
    v = [torch.randn(w.shape, generator=torch.Generator().manual_seed(0))]
    exact = hessian_vector_product(model, ce_loss, batch, [w], v, "autograd")[0]
    fd = hessian_vector_product(model, lossy_second_order_loss, batch, [w], v, "fd",
                                fd_eps=fd_eps)[0]
    assert _rel(fd, exact) < 5e-3


def test_fd_hvp_preconditions_are_checked():
    model = relu_mlp()
    batch = data(1)[0]
    w = model[0].weight
    v = [torch.ones_like(w)]

    def twice(m, b):
        return ce_loss(m, b) + ce_loss(m, b)

    with pytest.raises(ValueError, match="must call the model exactly once .*2 time"):
        hessian_vector_product(model, twice, batch, [w], v, "fd")

    def penalised(m, b):
        return ce_loss(m, b) + 0.1 * m[0].weight.pow(2).sum()

    with pytest.raises(ValueError, match="other than through the model's output"):
        check_hvp(model, penalised, batch, "0")


# ----------------------------------------------------------------------------- scores
def test_compute_sensitivity_scores_mlp():
    model = mlp().eval()
    batches = data(2)
    before = copy.deepcopy(model.state_dict())
    table = compute_sensitivity(model, ce_loss, batches, bits=(1, 2, 4, 8),
                                metrics=("hawq", "kl", "loss", "mse"), n_samples=4)
    # the model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert list(table.layers) == ["0", "2", "4"]
    assert table.num_utterances == 48 and table.num_batches == 2
    for n, info in table.layers.items():
        assert info.n_params == model.get_submodule(n).weight.numel()
        assert info.float_params == model.get_submodule(n).bias.numel()
        perts = [table.get(n, b).perturbation for b in (1, 2, 4, 8)]
        assert all(a > b for a, b in zip(perts, perts[1:])), perts
        kls = [table.get(n, b).kl for b in (1, 2, 4, 8)]
        assert all(k >= 0 for k in kls) and kls[-1] < kls[0]
        for b in (1, 2, 4, 8):
            e = table.get(n, b)
            assert e.hawq == pytest.approx(info.trace / info.n_params * e.perturbation)
            assert e.mse == pytest.approx(info.trace_mse / info.n_params * e.perturbation)
            assert e.mse >= 0
            # overhead = per-channel scales (+ one constant zero point)
            assert e.overhead_bytes == 4 * model.get_submodule(n).weight.shape[0] + 4
    # perturbation = ||Q(W) - W||^2 with the configured quantizer
    w, _ = quantize_layer_weights(model[2], "2", LayerConfig(weight_bits=4))
    assert table.get("2", 4).perturbation == pytest.approx(
        float((w["weight"].double() - model[2].weight.detach().double()).pow(2).sum()))


def test_quantizer_kind_is_used():
    model = mlp().eval()
    batches = data(1)
    t_u = compute_sensitivity(model, ce_loss, batches, bits=(2,), metrics=("kl",))
    t_l = compute_sensitivity(model, ce_loss, batches, bits=(2,), metrics=("kl",),
                              quantizer="lsq")
    assert t_l.method["quantizer"] == "lsq"
    assert t_u.get("2", 2).perturbation != t_l.get("2", 2).perturbation


def test_unknown_layers_and_bad_args():
    model = mlp()
    with pytest.raises(ValueError, match="nope"):
        compute_sensitivity(model, ce_loss, data(1), layers=["nope", "0"])
    with pytest.raises(ValueError, match="bits must be"):
        compute_sensitivity(model, ce_loss, data(1), bits=(0, 4))
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_sensitivity(model, ce_loss, data(1), metrics=("wer",))
    with pytest.raises(ValueError, match="TDNN-F"):
        compute_sensitivity(model, ce_loss, data(1), dims=[2])
    with pytest.raises(ValueError, match="unknown layer"):
        check_hvp(model, ce_loss, data(1)[0], "7")


# ----------------------------------------------------------------------------- cache
def test_cache_round_trip_and_stale_fingerprint(tmp_path, caplog):
    model = mlp().eval()
    batches = data(1)
    calls = {"n": 0}

    def counting_loss(m, b):
        calls["n"] += 1
        return ce_loss(m, b)

    path = tmp_path / "sens.json"
    t1 = compute_sensitivity(model, counting_loss, batches, bits=(2, 4), n_samples=2,
                             cache_path=path)
    assert path.exists() and calls["n"] > 0
    loaded = SensitivityTable.load(path)
    assert loaded.to_dict() == t1.to_dict()
    assert loaded.get("2", 4).kl == t1.get("2", 4).kl
    assert loaded.fingerprint == model_fingerprint(model)

    calls["n"] = 0
    t2 = compute_sensitivity(model, counting_loss, batches, bits=(2, 4), n_samples=2,
                             cache_path=path)
    assert calls["n"] == 0 and t2.to_dict() == t1.to_dict()

    with torch.no_grad():
        model[0].weight.mul_(1.5)
    with caplog.at_level(logging.WARNING):
        t3 = compute_sensitivity(model, counting_loss, batches, bits=(2, 4), n_samples=2,
                                 cache_path=path)
    assert "stale" in caplog.text and calls["n"] > 0
    assert t3.fingerprint == model_fingerprint(model) != t1.fingerprint
    assert SensitivityTable.load(path).fingerprint == t3.fingerprint
    # other settings -> recomputed too
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        t4 = compute_sensitivity(model, counting_loss, batches, bits=(2, 8), n_samples=2,
                                 cache_path=path)
    assert "other settings" in caplog.text and t4.bits_for("0") == [2, 8]
    with pytest.raises(ValueError, match="not a k2quant sensitivity table"):
        (tmp_path / "x.json").write_text('{"a": 1}')
        SensitivityTable.load(tmp_path / "x.json")


# ----------------------------------------------------------------------------- TDNN-F dims
def tiny_tdnnf(seed=0):
    torch.manual_seed(seed)
    cfg = TdnnFConfig(feat_dim=5, num_classes=7, hidden_dim=12, bottleneck_dims=6,
                      strides=[1, 0, 3], prefinal_bottleneck=6, dropout_schedule=None)
    return TdnnF(cfg).eval()


def frame_ce(model, batch):
    x, y = batch
    lp = model(x)
    return nn.functional.nll_loss(lp.reshape(-1, lp.shape[-1]), y.reshape(-1))


def tdnnf_batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 21, 5, generator=g), torch.randint(0, 7, (2, 7), generator=g))
            for _ in range(n)]


def test_equivalent_affine_reproduces_refactored_layer():
    model = tiny_tdnnf()
    x = torch.randn(2, 30, 5)
    for d in (2, 4, 6):
        m_d = copy.deepcopy(model)
        m_d.refactor_bottleneck("tdnnfs.0", d)
        delta = _equivalent_affine_delta(model.tdnnfs[0], m_d.tdnnfs[0])
        m_eq = copy.deepcopy(model)
        A = m_eq.tdnnfs[0].affine.weight
        D, B, k = A.shape
        with torch.no_grad():
            A_cat = A.double().permute(2, 0, 1).reshape(k * D, B) + delta
            A.copy_(A_cat.reshape(k, D, B).permute(1, 2, 0).float())
        torch.testing.assert_close(m_eq(x), m_d(x), rtol=1e-4, atol=1e-5)
        if d == 6:
            assert float(delta.abs().max()) < 1e-5


def test_dims_entries_on_tdnnf():
    model = tiny_tdnnf()
    batches = tdnnf_batches()
    table = compute_sensitivity(model, frame_ce, batches, bits=(2, 8), dims=[2, 4],
                                layers=["re:tdnnfs\\..*", "output"], n_samples=2)
    assert set(table.pairs) == {"tdnnfs.0", "tdnnfs.1", "tdnnfs.2"}
    assert table.pairs["tdnnfs.1"] == {"linear": "tdnnfs.1.linear", "affine": "tdnnfs.1.affine",
                                       "dim": 6, "dims": [2, 4, 6]}
    assert "tdnn1.affine" not in table.layers
    for p in table.pairs:
        assert table.score(p, FLOAT_BITS, 6) == 0.0
        e2, e4 = table.get(p, FLOAT_BITS, 2), table.get(p, FLOAT_BITS, 4)
        assert e2.perturbation > e4.perturbation > 0
        assert e2.kl > 0 and e2.hawq is not None
        lin = table.pairs[p]["linear"]
        # quantization entries on top of each dim: fewer params at smaller dims
        assert table.get(lin, 2, 2).n_params < table.get(lin, 2, 4).n_params < \
            table.get(lin, 2).n_params
        assert table.get(lin, 2, 6) is table.get(lin, 2)  # current dim == None
        assert table.get(lin, 2, 2).estimated
    # measured instead of estimated
    t2 = compute_sensitivity(model, frame_ce, batches, bits=(2,), dims={"tdnnfs.0": [3]},
                             layers=["re:tdnnfs\\.0\\..*"], metrics=("kl", "loss"),
                             measure_dim_bits=True)
    e = t2.get("tdnnfs.0.affine", 2, 3)
    assert not e.estimated and e.kl > 0
    with pytest.raises(ValueError, match="1..6"):
        compute_sensitivity(model, frame_ce, batches, dims=[8])

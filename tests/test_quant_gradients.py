"""Gradients of the quantizers against their analytic formulas and finite differences."""
import math

import pytest
import torch

from k2quant.quant import grad_scale, make_quantizer, round_ste, straight_through
from k2quant.quant.general import mu_law_centroids, soft_quantize


pytestmark = pytest.mark.usefixtures("one_thread_module")


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_ste_helpers_values_and_gradients():
    x = (randn(50) * 3).requires_grad_()
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))

    x.grad = None
    z = grad_scale(x, 0.25)
    assert torch.equal(z, x.detach())
    (z * 2).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.5))

    x.grad = None
    v = (randn(50, seed=3)).requires_grad_()
    mask = x.detach().abs() < 1
    w = straight_through(v, x, mask)
    assert torch.equal(w, v.detach())
    (w * 3).sum().backward()
    assert torch.equal(x.grad, 3.0 * mask.float())
    assert torch.equal(v.grad, torch.full_like(v, 3.0))


LSQ_CASES = [
    (2, True, "tensor"),
    (4, True, "tensor"),
    (4, True, "channel"),
    (3, False, "tensor"),
    (3, False, "channel"),
    (1, True, "tensor"),
    (8, True, "channel"),
]


@pytest.mark.parametrize("bits,signed,gran", LSQ_CASES)
def test_lsq_gradients_match_formula(bits, signed, gran):
    x = randn(6, 20, seed=bits)
    if not signed:
        x = x.abs()
    q = make_quantizer("lsq", bits, granularity=gran, signed=signed)
    q.init_from(x)
    if signed:
        qp0 = 0.5 if bits == 1 else 2.0 ** (bits - 1) - 1
    else:
        qp0 = 2.0 ** bits - 1
    with torch.no_grad():  # a step size for which ~30% of the range clips
        rowmax = x.abs().amax(dim=1) if gran == "channel" else x.abs().max()
        q.step.copy_(0.7 * rowmax / qp0)
    s_rows = q.step.detach().reshape(-1, 1) if gran == "channel" else q.step.detach()
    xr = x.clone().requires_grad_()
    up = randn(6, 20, seed=100 + bits)
    y = q(xr)
    (y * up).sum().backward()

    if signed:
        qn, qp = (0.5, 0.5) if bits == 1 else (2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1)
    else:
        qn, qp = 0.0, 2.0 ** bits - 1
    v = x / s_rows
    inside = (v >= -qn) & (v <= qp)
    assert inside.any() and (~inside).any(), "test must cover both regions"
    # round(v/s) on the integer grid; on the 1-bit half-integer grid the level is +-0.5.
    level = torch.round(v + 0.5) - 0.5 if (signed and bits == 1) else torch.round(v)
    ds_elem = torch.where(inside, level - v, torch.where(v < -qn, torch.full_like(v, -qn), torch.full_like(v, qp)))
    n = x.numel() // 6 if gran == "channel" else x.numel()
    g = 1.0 / math.sqrt(n * qp)
    assert q.grad_scale_factor(x) == pytest.approx(g)
    if gran == "channel":
        expected_ds = g * (up * ds_elem).sum(dim=1)
    else:
        expected_ds = g * (up * ds_elem).sum()
    assert torch.allclose(q.step.grad, expected_ds, rtol=1e-4, atol=1e-6), (q.step.grad, expected_ds)
    assert torch.allclose(xr.grad, up * inside.float(), atol=1e-6)
    # and the forward value is round(clip(v, -Qn, Qp)) * s
    lv = torch.clamp(v, -qn, qp)
    ref = (torch.round(lv + 0.5) - 0.5 if (signed and bits == 1) else torch.round(lv)) * s_rows
    assert torch.allclose(y.detach(), ref, atol=1e-6)


def test_lsq_init_formula():
    x = randn(300)
    for bits, signed in [(4, True), (4, False), (2, True)]:
        q = make_quantizer("lsq", bits, signed=signed).init_from(x)
        qp = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        assert float(q.step.detach()) == pytest.approx(2 * float(x.abs().mean()) / math.sqrt(qp), rel=1e-6)


@pytest.mark.parametrize("gran", ["tensor", "channel"])
@pytest.mark.parametrize("signed", [False, True])
def test_pact_gradients_match_formula(gran, signed):
    x = randn(4, 30, seed=7) * 3
    q = make_quantizer("pact", 3, granularity=gran, signed=signed, alpha=2.0)
    xr = x.clone().requires_grad_()
    up = randn(4, 30, seed=8)
    y = q(xr)
    (y * up).sum().backward()
    alpha = 2.0
    if signed:
        inside = x.abs() < alpha
        dalpha = torch.where(inside, torch.zeros_like(x), torch.sign(x))
    else:
        inside = (x >= 0) & (x < alpha)
        dalpha = (x >= alpha).float()
    assert torch.equal(xr.grad, up * inside.float())
    expected = (up * dalpha).sum(dim=1) if gran == "channel" else (up * dalpha).sum()
    assert torch.allclose(q.alpha.grad, expected, atol=1e-5)
    # values: clip then uniform on [0, alpha] (or [-alpha, alpha]) with 2**b - 1 steps
    if signed:
        step = 2 * alpha / 7
        ref = (torch.round(torch.clamp(x, -alpha, alpha) / step + 3.5) - 3.5) * step
    else:
        step = alpha / 7
        ref = torch.round(torch.clamp(x, 0, alpha) / step) * step
    assert torch.allclose(y.detach(), ref, atol=1e-6)


def test_pact_regularization_gradient():
    q = make_quantizer("pact", 4, signed=False, alpha=3.0, alpha_l2=0.01)
    r = q.regularization()
    assert float(r.detach()) == pytest.approx(0.01 * 9.0)
    r.backward()
    assert float(q.alpha.grad) == pytest.approx(0.01 * 2 * 3.0)


def test_uniform_ste_zero_outside_clip_range():
    q = make_quantizer("uniform", 4, signed=False, observer=True)
    q.init_from(torch.linspace(0, 1, 100))  # frozen range [0, 1] in eval
    q.eval()
    x = torch.tensor([-0.5, 0.0, 0.3, 0.7, 1.0, 1.5]).requires_grad_()
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_sawb_and_binary_ste():
    x = (randn(40, seed=5) * 0.5).requires_grad_()
    q = make_quantizer("sawb", 2)
    q(x).sum().backward()
    alpha = float(q.clip_value(x))
    assert torch.equal(x.grad, (x.detach().abs() <= alpha).float())
    x.grad = None
    qb = make_quantizer("binary", 1, ste_clip=0.5)
    qb(x).sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() <= 0.5).float())


def test_binary_learned_alpha_gradient():
    x = randn(3, 10, seed=2)
    q = make_quantizer("binary", 1, granularity="channel", learned=True)
    up = randn(3, 10, seed=3)
    (q(x) * up).sum().backward()
    expected = (up * torch.where(x >= 0, 1.0, -1.0)).sum(dim=1)
    assert torch.allclose(q.alpha.grad, expected, atol=1e-5)


def test_general_soft_gradcheck_float64():
    x = randn(2, 5, seed=1, dtype=torch.float64).requires_grad_()
    c = randn(2, 4, seed=2, dtype=torch.float64).requires_grad_()
    a = (torch.rand(2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c, a: soft_quantize(x, c, a, 0.3), (x, c, a))
    u = torch.tensor([-0.9, -0.2, 0.3, 0.8], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, a: mu_law_centroids(u, a, 10.0), (u, a[:1]))


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_general_module_soft_forward_finite_differences(gran):
    """Autograd gradient of the whole soft module (wrt u, alpha and x) == central differences."""
    x = randn(3, 8, seed=4, dtype=torch.float64)
    q = make_quantizer("general", 2, granularity=gran, temperature=0.05)
    q.init_from(x.float())
    q.double()  # after init: lazily created per-channel parameters are float32 until converted
    assert q.u.dtype == torch.float64 and q.alpha.dtype == torch.float64
    with torch.no_grad():  # keep u inside (-1, 1): central differences at the clamp are one-sided
        q.u.mul_(0.9)
    q.train()
    up = randn(3, 8, seed=5, dtype=torch.float64)

    def loss(xx):
        return (q(xx) * up).sum()

    xr = x.clone().requires_grad_()
    loss(xr).backward()
    eps = 1e-6
    for p in (q.u, q.alpha):
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            with torch.no_grad():
                flat[i] = old + eps
                lp = float(loss(x))
                flat[i] = old - eps
                lm = float(loss(x))
                flat[i] = old
            fd = (lp - lm) / (2 * eps)
            assert p.grad.view(-1)[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-6)
    for i in range(0, x.numel(), 5):
        xp, xm = x.clone(), x.clone()
        xp.view(-1)[i] += eps
        xm.view(-1)[i] -= eps
        with torch.no_grad():
            fd = (float(loss(xp)) - float(loss(xm))) / (2 * eps)
        assert xr.grad.view(-1)[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-6)


def test_general_hard_gradient_goes_to_selected_centroid_and_x():
    x = torch.tensor([-0.9, -0.1, 0.05, 0.95, 1.0]).requires_grad_()
    q = make_quantizer("general", 1, mu=10.0)
    q.init_from(x.detach())  # alpha = 1, centroids -1, +1
    y = q(x)
    assert torch.allclose(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]), atol=1e-6)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (y * up).sum().backward()
    assert torch.equal(x.grad, up)  # straight through
    # c = alpha * sign(u) * expm1(|u| log(1+mu)) / mu; at u = +-1 dc/du = alpha * log(1+mu)(1+mu)/mu
    dcdu = math.log(11.0) * 11.0 / 10.0
    assert q.u.grad[0].item() == pytest.approx(3.0 * dcdu, rel=1e-5)  # u=-1 selected by 1st, 2nd
    assert q.u.grad[1].item() == pytest.approx(12.0 * dcdu, rel=1e-5)
    # dy/dalpha = c/alpha = -1 for the lower, +1 for the upper centroid
    assert q.alpha.grad.item() == pytest.approx(-3.0 + 12.0, rel=1e-5)

"""General Quantizer: mu-law constraint, soft-to-hard annealing, hard-mode exactness."""
import math

import pytest
import torch

from k2quant.quant import make_quantizer, sqnr_db, temperature_schedule
from k2quant.quant.general import mu_law_centroids, mu_law_inverse


pytestmark = pytest.mark.usefixtures("one_thread_module")


def weights(seed=0, shape=(16, 40)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_init_uniform_grid_and_mu_law_values():
    w = weights()
    q = make_quantizer("general", 3, mu=10.0).init_from(w)
    assert torch.allclose(q.u.detach(), torch.linspace(-1, 1, 8))
    alpha = float(w.abs().max())
    assert float(q.alpha.detach()) == pytest.approx(alpha)
    c = q.centroids().detach()
    u = torch.linspace(-1, 1, 8)
    expected = alpha * torch.sign(u) * ((1 + 10.0) ** u.abs() - 1) / 10.0
    assert torch.allclose(c, expected, atol=1e-6)
    assert torch.allclose(mu_law_inverse(c, torch.tensor(alpha), 10.0), u, atol=1e-5)


def test_unsigned_centroids_are_non_negative():
    a = weights().abs()
    q = make_quantizer("general", 2, signed=False).init_from(a)
    c = q.centroids().detach()
    assert float(c.min()) == 0.0 and float(c.max()) == pytest.approx(float(a.max()))


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_annealing_converges_soft_to_hard(gran):
    w = weights(1)
    q = make_quantizer("general", 2, granularity=gran, init="kmeans").init_from(w)
    q.train()
    q.set_temperature(0.0)
    hard = q(w).detach()
    gaps = []
    for t in (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        q.set_temperature(t)
        gaps.append(float((q(w).detach() - hard).abs().mean()))
    for a, b in zip(gaps, gaps[1:]):
        assert b < a, f"mean soft/hard gap not shrinking with T: {gaps}"
    assert gaps[0] > 1e-2  # soft is really soft at T = 1
    assert gaps[-1] < 1e-5
    # the max gap too, once T is far below the squared (normalised) distance to the boundaries
    q.set_temperature(1e-7)
    assert float((q(w).detach() - hard).abs().max()) < 1e-3
    # And T = 0 (or eval) is exactly the hard output.
    q.set_temperature(0.0)
    assert torch.equal(q(w).detach(), hard)


def test_temperature_schedule_and_anneal():
    assert temperature_schedule(0, 100, 1.0, 1e-2) == pytest.approx(1.0)
    assert temperature_schedule(50, 100, 1.0, 1e-2) == pytest.approx(0.1)
    assert temperature_schedule(50, 100, 1.0, 0.5, mode="linear") == pytest.approx(0.75)
    assert temperature_schedule(100, 100) == 0.0
    ts = [temperature_schedule(s, 10) for s in range(12)]
    assert all(a > b for a, b in zip(ts[:10], ts[1:11]))
    q = make_quantizer("general", 2)
    assert q.anneal(5, 10, 1.0, 1e-2) == pytest.approx(0.1)
    assert float(q.temperature) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="temperature"):
        q.set_temperature(-1.0)
    with pytest.raises(ValueError, match="mode"):
        temperature_schedule(1, 10, mode="cosine")


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_training_keeps_centroids_in_mu_law_space(gran):
    w = weights(2)
    target = weights(3) * 5  # pulls centroids far outside [-alpha, alpha]
    q = make_quantizer("general", 2, granularity=gran, temperature=0.1)
    q.init_from(w)
    q.train()
    opt = torch.optim.SGD([q.u, q.alpha], lr=5.0)
    for step in range(20):
        q.anneal(step, 20, 0.1, 1e-3)
        loss = (q(w) - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    q(w)  # the training forward projects u
    u = q.u.detach()
    assert float(u.abs().max()) <= 1.0
    assert float(u.abs().max()) == 1.0  # the constraint was active
    c = q.centroids().detach().reshape(-1, 4)
    alpha = q.alpha.detach().reshape(-1, 1)
    assert torch.all(c.abs() <= alpha * (1 + 1e-6))
    # each centroid is exactly the mu-law image of its u
    assert torch.allclose(c, mu_law_centroids(u.reshape(-1, 4), alpha, q.mu))


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_hard_mode_bit_exact_after_training(gran):
    w = weights(4)
    q = make_quantizer("general", 3, granularity=gran, temperature=0.05)
    q.init_from(w)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(5):
        loss = (q(w) - w).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    y = q(w)
    codes, params = q.quantize(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    assert torch.equal(y, q.dequantize(codes, params))
    # codebook sorted; every output is the nearest codebook entry
    cb = params.codebook if gran == "channel" else params.codebook.unsqueeze(0).expand(16, -1)
    assert torch.all(cb[:, 1:] >= cb[:, :-1])
    dist = (w.unsqueeze(-1) - cb.unsqueeze(1)).abs()
    nearest = cb.gather(1, dist.argmin(dim=-1))
    assert torch.allclose(y, nearest)


def test_training_improves_sqnr_over_init():
    w = weights(5, (32, 64))
    q = make_quantizer("general", 2)
    q.init_from(w)
    before = sqnr_db(w, q.eval()(w))
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=2e-2)
    for step in range(60):
        q.anneal(step, 50, 0.05, 1e-3)
        loss = (q(w) - w).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sqnr_db(w, q.eval()(w))
    assert after > before + 1.0, f"{before:.2f} dB -> {after:.2f} dB"
    assert math.isfinite(after)

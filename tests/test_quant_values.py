"""Hand-computed values: binary, ternary, uniform grids, SAWB clip, observer behaviour."""
import math

import pytest
import torch

from k2quant.quant import SAWB_COEFFICIENTS, make_quantizer
from k2quant.quant.sawb import SAWB_PUBLISHED, fit_sawb_coefficients


pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_binary_per_tensor():
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    q = make_quantizer("binary", 1)
    y = q(x)
    a = 0.875  # mean |x|
    assert torch.allclose(y, torch.tensor([[a, -a, a, a]]))
    codes, p = q.quantize(x)
    assert codes.tolist() == [[1, 0, 1, 1]]
    assert float(p.zero_point) == 0.5 and float(p.scale) == pytest.approx(2 * a)


def test_binary_per_channel_and_axis():
    x = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    y = make_quantizer("binary", 1, granularity="channel", ch_axis=0)(x)
    assert torch.equal(y, torch.tensor([[2.0, -2.0], [0.5, 0.5]]))
    y1 = make_quantizer("binary", 1, granularity="channel", ch_axis=1)(x)
    assert torch.allclose(y1, torch.tensor([[0.75, -1.75], [0.75, 1.75]]))


def test_ternary_twn():
    w = torch.tensor([1.0, -1.0, 0.1, -0.05, 2.0, 0.0])
    q = make_quantizer("ternary", 2)
    delta, alpha = q.threshold_and_alpha(w)
    assert float(delta) == pytest.approx(0.7 * 4.15 / 6)
    assert float(alpha) == pytest.approx(4.0 / 3.0)
    y = q(w)
    a = 4.0 / 3.0
    assert torch.allclose(y, torch.tensor([a, -a, 0.0, 0.0, a, 0.0]))
    codes, p = q.quantize(w)
    assert codes.tolist() == [2, 0, 1, 1, 2, 1]
    assert float(p.zero_point) == 1.0


def test_ternary_per_channel():
    w = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 3.0]])
    y = make_quantizer("ternary", 2, granularity="channel")(w)
    assert torch.allclose(y, torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 3.0]]))


def test_uniform_symmetric_grid_values():
    x = torch.tensor([-1.0, -0.4, 0.0, 0.26, 1.0])
    y = make_quantizer("uniform", 2)(x)  # scale 1, levels -2..1
    assert torch.equal(y, torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0]))
    y3 = make_quantizer("uniform", 3)(x)  # scale 1/3
    assert torch.allclose(y3, torch.tensor([-1.0, -1 / 3, 0.0, 1 / 3, 1.0]))
    y1 = make_quantizer("uniform", 1)(x)  # half-integer grid: +-max|x|
    # 0 sits exactly between the two levels: round-half-to-even sends it to code 0 (-max|x|)
    assert torch.equal(y1, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0]))
    codes, p = make_quantizer("uniform", 1).quantize(x)
    assert float(p.zero_point) == 0.5


def test_uniform_asymmetric_and_unsigned():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    q = make_quantizer("uniform", 2, symmetric=False)
    codes, p = q.quantize(x)
    assert codes.tolist() == [0, 1, 2, 3] and float(p.scale) == pytest.approx(1.0)
    assert float(p.zero_point) == 0.0
    x2 = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    codes2, p2 = q.quantize(x2)
    assert float(p2.zero_point) == 1.0 and codes2.tolist() == [0, 1, 2, 3]
    qa = make_quantizer("uniform", 2, signed=False)
    assert torch.equal(qa(torch.tensor([-1.0, 0.0, 1.0, 3.0])), torch.tensor([0.0, 0.0, 1.0, 3.0]))


def test_uniform_percentile_clips_outliers():
    x = torch.linspace(-1, 1, 1001)
    x[0] = -100.0
    q = make_quantizer("uniform", 8, symmetric=False, range_method="percentile", percentile=99.0)
    lo, hi = q.batch_range(x)
    assert -1.0 < float(lo) < -0.9 and 0.9 < float(hi) < 1.0
    assert float(q(x).min()) > -1.0


def test_uniform_observer_ema_train_vs_eval():
    q = make_quantizer("uniform", 4, signed=False, observer=True, momentum=0.5)
    q.train()
    q(torch.tensor([0.0, 2.0]))
    assert float(q.running_max) == pytest.approx(2.0)
    q(torch.tensor([0.0, 4.0]))
    assert float(q.running_max) == pytest.approx(3.0)  # 0.5 * 2 + 0.5 * 4
    q.eval()
    y = q(torch.tensor([0.0, 10.0]))
    assert float(q.running_max) == pytest.approx(3.0)  # frozen in eval
    assert float(y[1]) == pytest.approx(3.0)  # clipped at the frozen range
    q.train()
    q.quantize(torch.tensor([0.0, 100.0]))
    assert float(q.running_max) == pytest.approx(3.0)  # quantize never updates


def test_pact_values_and_init_from_data():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.9, 7.0])
    q = make_quantizer("pact", 2, signed=False, alpha=3.0)
    assert torch.equal(q(x), torch.tensor([0.0, 0.0, 1.0, 3.0, 3.0]))
    q2 = make_quantizer("pact", 2, signed=False, alpha=None, granularity="channel")
    q2.init_from(torch.tensor([[1.0, 4.0], [0.5, 2.0]]))
    assert q2.alpha.tolist() == [4.0, 2.0]


def test_sawb_clip_formula_and_grid():
    w = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    for bits, (c1, c2) in SAWB_PUBLISHED.items():
        q = make_quantizer("sawb", bits)
        expected = c1 * float(w.pow(2).mean().sqrt()) + c2 * float(w.abs().mean())
        assert float(q.clip_value(w)) == pytest.approx(expected, rel=1e-5)
    q = make_quantizer("sawb", 2)
    alpha = float(q.clip_value(w))
    levels = torch.unique(q(w))
    assert torch.allclose(levels, torch.tensor([-alpha, -alpha / 3, alpha / 3, alpha]))
    # all bit widths have coefficients; 1 bit is E|w|
    assert set(SAWB_COEFFICIENTS) == set(range(1, 9))
    assert float(make_quantizer("sawb", 1).clip_value(w)) == pytest.approx(float(w.abs().mean()))


def test_sawb_clip_grows_with_bits_on_gaussian():
    w = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    alphas = [float(make_quantizer("sawb", b).clip_value(w)) for b in range(1, 9)]
    assert all(a < b for a, b in zip(alphas, alphas[1:])), alphas


def test_sawb_fit_procedure_reproduces_published_clip_levels():
    """A quick (small-sample) run of the fitting procedure used for 6/7 bits predicts the
    published 4-bit clip level on a Gaussian to within 10%."""
    c1, c2 = fit_sawb_coefficients(4, num_samples=20_000, candidates=60)
    e2, e1 = 1.0, math.sqrt(2 / math.pi)  # sqrt(E w^2), E|w| of N(0, 1)
    pub = SAWB_PUBLISHED[4][0] * e2 + SAWB_PUBLISHED[4][1] * e1
    fit = c1 * e2 + c2 * e1
    assert fit == pytest.approx(pub, rel=0.1)

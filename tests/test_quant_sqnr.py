"""Quantization quality: SQNR (dB) rises with the bit width, with known levels."""
import pytest
import torch
from torch import nn

from k2quant.quant import make_quantizer, sqnr_db


pytestmark = pytest.mark.usefixtures("one_thread_module")


def gaussian():
    return torch.randn(256, 64, generator=torch.Generator().manual_seed(0))


def laplace():
    """Heavy-tailed "real-layer-like" weight matrix (512x160, a TDNN-F layer with fan-in 160)."""
    u = torch.rand(512, 160, generator=torch.Generator().manual_seed(1)) - 0.5
    return -0.05 * torch.sign(u) * torch.log1p(-2 * u.abs())


def kaiming():
    """A freshly initialised nn.Linear(160, 512) weight (kaiming-uniform, fan-in 160 as the
    TDNN-F 1536x160 bottleneck; fewer rows keep the test fast)."""
    torch.manual_seed(2)
    return nn.Linear(160, 512).weight.detach().clone()


def sqnr_by_bits(w, kind, bits=range(2, 9), **opts):
    out = {}
    for b in bits:
        q = make_quantizer(kind, b, **opts)
        if kind == "lsq":
            q.init_from(w)
        q.eval()
        y = q(w)
        out[b] = sqnr_db(w, y)
    return out


def assert_monotone(s, what):
    bits = sorted(s)
    for lo, hi in zip(bits, bits[1:]):
        assert s[hi] > s[lo], f"{what}: SQNR {hi}-bit {s[hi]:.2f} dB <= {lo}-bit {s[lo]:.2f} dB ({s})"


CONFIGS = [
    ("uniform", {}),
    ("uniform", {"range_method": "mse", "mse_grid": 24}),
    ("uniform", {"granularity": "channel"}),
    ("lsq", {}),
    ("lsq", {"granularity": "channel"}),
    ("sawb", {}),
    ("general", {}),
    ("general", {"granularity": "channel"}),
]


@pytest.mark.parametrize("kind,opts", CONFIGS)
def test_sqnr_monotone_gaussian(kind, opts):
    assert_monotone(sqnr_by_bits(gaussian(), kind, **opts), f"{kind} {opts} on Gaussian")


@pytest.mark.parametrize("kind,opts", CONFIGS)
def test_sqnr_monotone_laplace_layer(kind, opts):
    assert_monotone(sqnr_by_bits(laplace(), kind, **opts), f"{kind} {opts} on Laplace 512x160")


@pytest.mark.parametrize(
    "kind,opts", [c for c in CONFIGS if c[0] in ("uniform", "lsq", "general")]
)
def test_sqnr_monotone_kaiming_layer(kind, opts):
    assert_monotone(sqnr_by_bits(kaiming(), kind, **opts), f"{kind} {opts} on kaiming Linear")


def test_sawb_high_bit_clipping_on_uniform_weights_is_a_known_limit():
    """SAWB's linear clip formula is fitted on bell-shaped distributions; on uniform weights
    (fresh kaiming-uniform init) the 6-8 bit coefficients clip ~20% of the range, so SQNR stops
    rising after 5 bits (published 8-bit: alpha = 0.81 max|w|). Documented in sawb.py."""
    w = kaiming()
    s = sqnr_by_bits(w, "sawb", bits=range(2, 6))
    assert_monotone(s, "sawb 2..5 bits on kaiming-uniform")
    q8 = make_quantizer("sawb", 8)
    ratio = float(q8.clip_value(w)) / float(w.abs().max())
    assert 0.75 < ratio < 0.85


def test_sqnr_levels_uniform():
    g = sqnr_by_bits(gaussian(), "uniform", granularity="channel")
    assert g[8] > 40.0, f"8-bit per-channel uniform SQNR {g[8]:.1f} dB <= 40 dB"
    gt = sqnr_by_bits(gaussian(), "uniform")
    # Each extra bit adds about 6 dB in the mid range (asymptotically 6.02 dB/bit).
    for b in range(3, 8):
        assert gt[b + 1] - gt[b] > 4.0, f"uniform {b}->{b + 1} bits: +{gt[b + 1] - gt[b]:.2f} dB"
    lap = sqnr_by_bits(laplace(), "uniform", granularity="channel")
    for b in range(4, 8):
        assert lap[b + 1] - lap[b] > 4.0


def test_sqnr_mse_range_beats_minmax_at_low_bits():
    w = laplace()[:256]
    for b in (2, 3, 4):
        mm = sqnr_by_bits(w, "uniform", bits=[b])[b]
        mse = sqnr_by_bits(w, "uniform", bits=[b], range_method="mse", mse_grid=32)[b]
        assert mse > mm + 1.0, f"{b}-bit: mse range {mse:.2f} dB vs minmax {mm:.2f} dB"


def test_sqnr_levels_other_kinds():
    w = gaussian()
    assert sqnr_by_bits(w, "sawb", bits=[4])[4] > 18.0
    assert sqnr_by_bits(w, "general", bits=[8])[8] > 40.0
    assert sqnr_by_bits(w, "lsq", bits=[4])[4] > 13.0
    # binary: sign(w) * mean|w| on a Gaussian has SQNR -10 log10(1 - 2/pi) = 4.40 dB
    assert sqnr_db(w, make_quantizer("binary", 1)(w)) == pytest.approx(4.40, abs=0.1)
    # ternary (TWN) on a Gaussian: about 7.3 dB (better than binary, below 2-bit uniform-MSE)
    t = sqnr_db(w, make_quantizer("ternary", 2)(w))
    assert 6.5 < t < 8.5


def test_sqnr_db_helper():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * torch.log10(torch.tensor(25.0)).item())
    with pytest.raises(ValueError, match="same shape"):
        sqnr_db(x, torch.zeros(3))

"""Bad inputs raise clear ValueErrors naming the argument, the value and (if set) the layer."""
import pytest
import torch

from k2quant.quant import QUANTIZER_KINDS, QParams, dequantize, make_quantizer


@pytest.mark.parametrize("kind", ["uniform", "lsq", "pact", "sawb", "general"])
@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(kind, bits):
    with pytest.raises(ValueError, match=rf"bits must be in 1\.\.8, got bits={bits}"):
        make_quantizer(kind, bits)


@pytest.mark.parametrize("bits", [2.5, "4", True, None])
def test_bits_not_an_int(bits):
    with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8, got"):
        make_quantizer("uniform", bits)


def test_binary_and_ternary_fixed_bits():
    with pytest.raises(ValueError, match=r"binary quantizer: bits must be one of \[1\].*got bits=2"):
        make_quantizer("binary", 2)
    with pytest.raises(ValueError, match=r"ternary quantizer: bits must be one of \[2\].*got bits=3"):
        make_quantizer("ternary", 3)
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.8, got bits=0"):
        make_quantizer("binary", 0)


@pytest.mark.parametrize("kind", list(QUANTIZER_KINDS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_in_forward_and_quantize(kind, bad):
    bits = {"binary": 1, "ternary": 2}.get(kind, 4)
    q = make_quantizer(kind, bits, name="tdnnf.3.linear.weight")
    w = torch.randn(4, 5)
    w[1, 2] = bad
    with pytest.raises(ValueError, match=r"'tdnnf\.3\.linear\.weight'.*contains NaN/Inf"):
        q(w)
    with pytest.raises(ValueError, match=r"contains NaN/Inf \(\d NaN, \d Inf out of 20"):
        q.quantize(w)
    with pytest.raises(ValueError, match="contains NaN/Inf"):
        q.init_from(w)


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(ValueError, match=r"unknown quantizer kind 'apot'; known kinds: uniform, lsq, pact, sawb, general, binary, ternary"):
        make_quantizer("apot", 4)


def test_unknown_option_lists_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['percentil'\] for quantizer kind 'uniform'.*percentile"):
        make_quantizer("uniform", 4, percentil=99.0)


@pytest.mark.parametrize("gran", ["row", "per_channel", None])
def test_bad_granularity(gran):
    with pytest.raises(ValueError, match=r"granularity must be one of \['tensor', 'channel'\], got"):
        make_quantizer("lsq", 4, granularity=gran)


def test_ch_axis_out_of_range():
    q = make_quantizer("uniform", 4, granularity="channel", ch_axis=2, name="lin.weight")
    with pytest.raises(ValueError, match=r"'lin\.weight'.*ch_axis=2 is out of range for a tensor with 2 dims"):
        q(torch.randn(3, 4))
    with pytest.raises(ValueError, match="ch_axis must be an int"):
        make_quantizer("uniform", 4, granularity="channel", ch_axis="0")
    # per tensor ignores ch_axis
    make_quantizer("uniform", 4, ch_axis=5)(torch.randn(3))


def test_per_channel_count_mismatch():
    q = make_quantizer("lsq", 4, granularity="channel", name="a.weight")
    q.init_from(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"'a\.weight'.*3 per-channel parameters but the input has 5 channels"):
        q(torch.randn(5, 4))


def test_other_option_errors():
    with pytest.raises(ValueError, match="range_method must be one of"):
        make_quantizer("uniform", 4, range_method="kl")
    with pytest.raises(ValueError, match="percentile must be in"):
        make_quantizer("uniform", 4, percentile=120)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        make_quantizer("pact", 4, alpha=-1.0)
    with pytest.raises(ValueError, match="signed=False"):
        make_quantizer("sawb", 4, signed=False)
    with pytest.raises(ValueError, match="signed=True only"):
        make_quantizer("binary", 1, signed=False)
    with pytest.raises(ValueError, match="mu must be > 0"):
        make_quantizer("general", 2, mu=0)
    with pytest.raises(ValueError, match="init must be one of"):
        make_quantizer("general", 2, init="random")
    with pytest.raises(ValueError, match="expected a floating-point tensor"):
        make_quantizer("uniform", 4)(torch.arange(4))


def test_dequantize_checks():
    q = make_quantizer("uniform", 4)
    codes, p = q.quantize(torch.randn(5))
    with pytest.raises(ValueError, match="expected codes of dtype torch.uint8, got torch.int64"):
        q.dequantize(codes.long(), p)
    with pytest.raises(ValueError, match="params.bits=3 does not match"):
        q.dequantize(codes, QParams(3, p.scale, p.zero_point))
    # module-free dequantize, with a missing zero point meaning 0
    x_hat = dequantize(codes, QParams(4, p.scale, None))
    assert torch.equal(x_hat, codes.float() * p.scale)


def test_empty_tensor():
    with pytest.raises(ValueError, match="cannot quantize an empty tensor"):
        make_quantizer("uniform", 4)(torch.zeros(0, 3))

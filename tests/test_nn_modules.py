"""QuantLinear / QuantConv1d / QuantEmbedding: accuracy, freeze exactness, gradients, errors."""
import pytest
import torch
from torch import nn

from k2quant.nn import QuantConv1d, QuantEmbedding, QuantLinear, QuantModule
from k2quant.plan import LayerConfig
from k2quant.quant import QUANTIZER_KINDS

# (kind, bits) pairs for weight quantizers that exist in k2quant.quant right now.
_WEIGHT_KINDS = [
    (k, b)
    for k, b in [("uniform", 4), ("lsq", 4), ("sawb", 4), ("general", 3), ("binary", 1), ("ternary", 2)]
    if k in QUANTIZER_KINDS
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_case(kind: str):
    """(float module, quant class, input) for each module kind."""
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        m = nn.Linear(24, 12)
        return m, QuantLinear, torch.randn(3, 5, 24, generator=g)
    if kind == "conv":
        m = nn.Conv1d(8, 6, kernel_size=3, stride=1, padding=2, dilation=2)
        return m, QuantConv1d, torch.randn(2, 8, 20, generator=g)
    if kind == "embedding":
        m = nn.Embedding(30, 10, padding_idx=0)
        return m, QuantEmbedding, torch.randint(0, 30, (4, 7), generator=g)
    raise AssertionError(kind)


KINDS = ["linear", "conv", "embedding"]


@pytest.mark.parametrize("kind", KINDS)
def test_8bit_matches_float(kind):
    torch.manual_seed(0)
    m, cls, x = make_case(kind)
    q = cls.from_float(m, LayerConfig(weight_bits=8, act_bits=8), name="layer")
    assert isinstance(q, QuantModule)
    y_float, y_q = m(x), q(x)
    assert y_q.shape == y_float.shape
    err = rel_err(y_q, y_float)
    assert err < 0.01, f"8-bit {kind}: relative error {err:.4f} should be < 1%"
    # fewer bits, larger error (the quantizer is really in the path)
    q4 = cls.from_float(m, LayerConfig(weight_bits=3), name="layer")
    assert rel_err(q4(x), y_float) > err


@pytest.mark.parametrize("kind", KINDS)
def test_quant_disabled_is_float_exactly(kind):
    m, cls, x = make_case(kind)
    q = cls.from_float(m, LayerConfig(weight_bits=2, act_bits=2), name="layer")
    q.set_quant_enabled(weights=False, acts=False)
    assert torch.equal(q(x), m(x))


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_is_exact_and_has_uint8_codes(kind):
    m, cls, x = make_case(kind)
    q = cls.from_float(m, LayerConfig(weight_bits=4, act_bits=8), name="layer").eval()
    with torch.no_grad():
        q(x)  # activation observers initialise
        expected = q(x)
    q.freeze()
    assert q.frozen
    assert "weight" not in dict(q.named_parameters()), "float weight should be gone"
    codes = q.weight_codes
    assert codes.dtype == torch.uint8 and codes.shape == m.weight.shape
    assert int(codes.max()) <= 15
    assert q.quantized_tensors() == {"weight_codes": 4}
    assert {"weight_codes", "weight_scale", "weight_zero_point"} <= set(q.state_dict())
    with torch.no_grad():
        got = q(x)
    assert torch.equal(got, expected), "frozen forward must equal the fake-quant forward bit for bit"
    q.freeze()  # idempotent
    assert torch.equal(q(x), expected)


@pytest.mark.parametrize("wkind,bits", _WEIGHT_KINDS)
def test_freeze_exact_for_each_weight_quantizer(wkind, bits):
    torch.manual_seed(1)
    m = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    cfg = LayerConfig(weight_bits=bits, weight_quantizer=wkind)
    q = QuantLinear.from_float(m, cfg, name="out").eval()
    with torch.no_grad():
        expected = q(x)
    q.freeze()
    assert q.weight_codes.dtype == torch.uint8
    assert q.quantized_tensors() == {"weight_codes": bits}
    if wkind == "general":
        assert "weight_codebook" in q.state_dict()
    with torch.no_grad():
        assert torch.equal(q(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_skeleton_loads_state_dict(kind):
    m, cls, x = make_case(kind)
    cfg = LayerConfig(weight_bits=4, act_bits=8)
    q = cls.from_float(m, cfg, name="layer")
    q.train()
    q(x)  # one training step worth of observer updates
    q.eval().freeze()
    with torch.no_grad():
        expected = q(x)
    torch.manual_seed(123)
    skeleton_float, _, _ = make_case(kind)
    with torch.no_grad():
        for p in skeleton_float.parameters():
            p.normal_()  # different weights
    skel = cls.from_float(skeleton_float, cfg, name="layer").eval().freeze()
    skel.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(skel(x), expected)


def test_loading_frozen_state_into_unfrozen_module_explains():
    m, cls, x = make_case("linear")
    cfg = LayerConfig(weight_bits=4)
    q = cls.from_float(m, cfg, name="layer").eval().freeze()
    fresh = cls.from_float(m, cfg, name="layer")
    with pytest.raises(RuntimeError, match="call k2quant.plan.convert"):
        fresh.load_state_dict(q.state_dict())
    with pytest.raises(RuntimeError, match="load float state dicts before"):
        q.load_state_dict(fresh.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_weights(kind):
    m, cls, x = make_case(kind)
    q = cls.from_float(m, LayerConfig(weight_bits=4, act_bits=8), name="layer").train()
    q(x).square().sum().backward()
    for pname, p in q.named_parameters():
        if pname.startswith(("weight_quantizers", "act_quantizers")):
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {pname}"


@pytest.mark.skipif("lsq" not in QUANTIZER_KINDS, reason="lsq quantizer not available yet")
def test_gradients_reach_learned_quantizer_params():
    m, cls, x = make_case("linear")
    cfg = LayerConfig(weight_bits=4, weight_quantizer="lsq", act_bits=4, act_quantizer="lsq")
    q = cls.from_float(m, cfg, name="layer").train()
    qparams = [n for n, _ in q.named_parameters() if "quantizers" in n]
    assert any(n.startswith("weight_quantizers") for n in qparams), qparams
    q(x).square().sum().backward()
    q(x)  # activation quantizer created its parameters lazily on the first call
    for n, p in q.named_parameters():
        if n.startswith("weight_quantizers"):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {n}"


def test_conv1d_options_match_float():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 17)
    for kwargs in [
        dict(stride=2, padding=1),
        dict(groups=2, padding=0, bias=False),
        dict(padding=1, padding_mode="reflect"),
        dict(padding="same", dilation=3),
    ]:
        m = nn.Conv1d(8, 4, 3, **kwargs)
        q = QuantConv1d.from_float(m, LayerConfig(weight_bits=8), name="conv")
        q.set_quant_enabled(weights=False)
        assert torch.equal(q(x), m(x)), kwargs
        q.set_quant_enabled(weights=True)
        assert rel_err(q(x), m(x)) < 0.01, kwargs
        back = q.to_float()
        assert type(back) is nn.Conv1d and torch.equal(back(x), m(x)), kwargs


def test_embedding_is_quantized_per_row():
    m = nn.Embedding(12, 6)
    with torch.no_grad():
        m.weight.mul_(torch.logspace(-3, 1, 12)[:, None])  # rows of very different ranges
    q = QuantEmbedding.from_float(m, LayerConfig(weight_bits=4), name="embed").eval().freeze()
    assert q.weight_scale.numel() == 12
    deq = q.quant_weight("weight")
    row_err = (deq - m.weight).norm(dim=1) / m.weight.norm(dim=1)
    assert row_err.max() < 0.2, f"per-row quantization keeps every row's relative error small: {row_err}"


def test_embedding_unsupported_options():
    with pytest.raises(ValueError, match="max_norm"):
        QuantEmbedding.from_float(nn.Embedding(5, 3, max_norm=1.0), LayerConfig(), name="e")
    with pytest.raises(ValueError, match="sparse"):
        QuantEmbedding.from_float(nn.Embedding(5, 3, sparse=True), LayerConfig(), name="e")


def test_quantizer_names_and_nan_errors():
    m = nn.Linear(4, 3)
    q = QuantLinear.from_float(m, LayerConfig(weight_bits=8, act_bits=8), name="encoder.out")
    assert q.weight_quantizers["weight"].name == "encoder.out.weight"
    assert q.act_quantizers["input"].name == "encoder.out.input"
    with pytest.raises(ValueError, match="encoder.out.input"):
        q(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'encoder\.out'.*'weight'.*NaN"):
        QuantLinear.from_float(m, LayerConfig(), name="encoder.out")


def test_from_float_type_error_and_to_float():
    with pytest.raises(TypeError, match="expects an torch.nn.modules.linear.Linear"):
        QuantLinear.from_float(nn.Conv1d(2, 2, 1), LayerConfig())
    m = nn.Linear(5, 2)
    q = QuantLinear.from_float(m, LayerConfig(weight_bits=4))
    back = q.to_float()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, m.weight) and torch.equal(back.bias, m.bias)
    q.eval().freeze()
    back = q.to_float()
    assert torch.equal(back.weight, q.quant_weight("weight"))


def test_tensor_granularity_has_one_scale():
    q = QuantLinear.from_float(nn.Linear(6, 5), LayerConfig(weight_bits=4, granularity="tensor"))
    q.eval().freeze()
    assert q.weight_scale.numel() == 1


def test_frozen_module_cannot_disable_weight_quant():
    q = QuantLinear.from_float(nn.Linear(6, 5), LayerConfig()).eval().freeze()
    with pytest.raises(RuntimeError, match="frozen"):
        q.set_quant_enabled(weights=False)


def test_quant_embedding_effective_weight_is_the_forward_table():
    import torch
    from k2quant.nn import QuantEmbedding
    from k2quant.plan import LayerConfig

    torch.manual_seed(0)
    emb = QuantEmbedding.from_float(torch.nn.Embedding(11, 6), LayerConfig(weight_bits=3))
    emb.eval()
    ids = torch.arange(11)
    assert torch.equal(emb(ids), emb.effective_weight())
    # 3-bit per-row table: at most 8 distinct values per row
    assert all(len(torch.unique(r)) <= 8 for r in emb.effective_weight())
    emb.freeze()
    assert torch.equal(emb(ids), emb.effective_weight())

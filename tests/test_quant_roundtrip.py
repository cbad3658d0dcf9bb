"""Bit-exact round trip q(x) == dequantize(*quantize(x)) for every kind, bit width and granularity."""
import json

import pytest
import torch

from k2quant.quant import QUANTIZER_KINDS, QParams, Quantizer, make_quantizer


pytestmark = pytest.mark.usefixtures("one_thread_module")

WEIGHT_ONLY = ("sawb", "binary", "ternary")


def allowed_bits(kind):
    return {"binary": [1], "ternary": [2]}.get(kind, list(range(1, 9)))


CASES = [
    (kind, bits, gran)
    for kind in QUANTIZER_KINDS
    for bits in allowed_bits(kind)
    for gran in ("tensor", "channel")
]


def weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 10, generator=g) * 0.05


def activation(seed=1):
    """Post-ReLU activations of shape (N, C, T), channel axis 1, some large outliers."""
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(3, 12, 7, generator=g)) * 2.0
    a[0, 0, 0] = 9.0
    return a


def check_round_trip(q: Quantizer, x: torch.Tensor):
    q.train()
    q(x)  # initialise / update observers / learned parameters
    q.eval()
    y = q(x)
    codes, params = q.quantize(x)
    assert isinstance(params, QParams)
    assert codes.dtype == torch.uint8
    assert codes.shape == x.shape
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** q.bits - 1
    assert params.bits == q.bits
    assert params.scale.dtype == torch.float32 and params.zero_point.dtype == torch.float32
    x_hat = q.dequantize(codes, params)
    assert x_hat.dtype == torch.float32
    assert torch.equal(y, x_hat), f"{q}: forward and dequantize(quantize) differ"
    # Only values of the declared grid are produced.
    if params.codebook is None:
        assert torch.equal(x_hat, (codes.float() - params.zero_point) * params.scale)
    return codes, params


@pytest.mark.parametrize("kind,bits,gran", CASES)
def test_round_trip_weights(kind, bits, gran):
    q = make_quantizer(kind, bits, granularity=gran, ch_axis=0, signed=True)
    codes, params = check_round_trip(q, weight())
    if gran == "channel":
        assert params.ch_axis == 0
        assert params.scale.shape == (24, 1)
        if params.codebook is not None:
            assert params.codebook.shape == (24, 2 ** bits)
    else:
        assert params.ch_axis is None
        assert params.scale.dim() == 0
        if params.codebook is not None:
            assert params.codebook.shape == (2 ** bits,)


@pytest.mark.parametrize(
    "kind,bits,gran", [c for c in CASES if c[0] not in WEIGHT_ONLY]
)
def test_round_trip_activations(kind, bits, gran):
    q = make_quantizer(kind, bits, granularity=gran, ch_axis=1, signed=False)
    codes, params = check_round_trip(q, activation())
    if gran == "channel":
        assert params.scale.shape == (1, 12, 1)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_round_trip_uniform_variants(method, symmetric, gran):
    for bits in (1, 3, 8):
        q = make_quantizer(
            "uniform", bits, granularity=gran, symmetric=symmetric, range_method=method,
            percentile=99.0,
        )
        check_round_trip(q, weight(seed=bits))


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_round_trip_uniform_observer_and_negative_axis(gran):
    q = make_quantizer("uniform", 4, granularity=gran, ch_axis=-2, signed=False, observer=True)
    check_round_trip(q, activation())


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("general", {"init": "kmeans"}),
        ("general", {"mu": 255.0}),
        ("binary", {"learned": True}),
        ("pact", {"alpha": None}),
        ("sawb", {"coefficients": (3.0, -2.0)}),
    ],
)
def test_round_trip_options(kind, opts):
    for gran in ("tensor", "channel"):
        bits = {"binary": 1}.get(kind, 2)
        check_round_trip(make_quantizer(kind, bits, granularity=gran, **opts), weight())


def test_general_round_trip_in_training_mode_when_hard():
    q = make_quantizer("general", 3, granularity="channel")
    x = weight()
    q.train()
    y = q(x)  # temperature 0: hard even in training
    assert torch.equal(y, q.dequantize(*q.quantize(x)))


def test_uint8_codes_unsigned_grid_starts_at_zero():
    # unsigned LSQ/PACT: zero maps to code 0 and zero_point is 0.
    for kind in ("lsq", "pact"):
        q = make_quantizer(kind, 4, signed=False).eval()
        x = activation()
        codes, params = q.quantize(x)
        assert float(params.zero_point) == 0.0
        assert torch.all(codes[x == 0] == 0)


@pytest.mark.parametrize("kind", list(QUANTIZER_KINDS))
def test_options_are_json_and_recreate(kind):
    bits = {"binary": 1, "ternary": 2}.get(kind, 3)
    q = make_quantizer(kind, bits, granularity="channel", ch_axis=1)
    opts = json.loads(json.dumps(q.options()))
    q2 = make_quantizer(**opts)
    assert type(q2) is type(q)
    assert q2.options() == q.options()
    assert q2.kind == kind and q2.bits == bits and q2.granularity == "channel" and q2.ch_axis == 1
    assert kind in repr(q).lower() or type(q).__name__ in repr(q)

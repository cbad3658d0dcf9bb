"""Every TDNN-F weight is its own quantizable leaf: quantize_ gives each layer its own bits."""
import pytest
import torch
from torch import nn

from k2quant.models.tdnnf import TdnnF, get_preset

try:  # written in parallel; skip until the plan/nn modules import
    from k2quant.nn import QuantModule
    from k2quant.plan import LayerConfig, Plan, convert, quantizable_layers, quantize_
except ImportError as e:  # pragma: no cover - depends on the state of the tree
    pytest.skip(f"k2quant.plan / k2quant.nn not importable yet: {e}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model() -> TdnnF:
    torch.manual_seed(0)
    return TdnnF(get_preset("small", 80, 30)).eval()


def test_quantize_gives_each_factored_leaf_its_own_bits():
    model = _model()
    float_leaves = {
        n for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Linear)
    }
    assert set(quantizable_layers(model)) == float_leaves
    x = torch.randn(2, 45, 80)
    with torch.no_grad():
        ref = model(x)
    plan = Plan(
        {
            "tdnnfs.3.linear": LayerConfig(weight_bits=4),
            r"re:tdnnfs\.\d+\.affine": LayerConfig(weight_bits=6),
        },
        default=LayerConfig(weight_bits=8),
    )
    model = quantize_(model, plan)
    layers = quantizable_layers(model)
    assert set(layers) == float_leaves
    assert all(isinstance(m, QuantModule) for m in layers.values())
    resolved = model.k2quant_plan
    assert resolved.match("tdnnfs.3.linear")[1].weight_bits == 4
    assert resolved.match("tdnnfs.3.affine")[1].weight_bits == 6
    assert resolved.match("tdnnfs.4.linear")[1].weight_bits == 8
    assert resolved.match("output")[1].weight_bits == 8
    with torch.no_grad():
        y = model(x)
    assert y.shape == ref.shape
    assert torch.allclose(y.exp().sum(-1), torch.ones(2, 15), atol=1e-5)
    # weight-only 4..8 bit: the log-probs move, but stay close
    assert (y - ref).abs().mean() < 0.1 * ref.abs().mean()

    # the semi-orthogonal constraint acts on the float shadow weights during QAT ...
    assert model.constrain_orthonormal() == len(model.semi_orthogonal_layer_names())
    # ... and refactoring needs the float model
    with pytest.raises(ValueError, match="before quantize_"):
        model.refactor_bottleneck("tdnnfs.3", 8)

    convert(model)
    with torch.no_grad():
        y_frozen = model(x)
    assert y_frozen.shape == ref.shape and torch.isfinite(y_frozen).all()
    assert model.constrain_orthonormal() == 0  # frozen integer weights are left alone

"""State dict save/load of learned quantizers (lazy per-channel parameters) restores outputs."""
import io

import pytest
import torch

from k2quant.quant import make_quantizer


pytestmark = pytest.mark.usefixtures("one_thread_module")


def train_a_bit(q, x, steps=5):
    q.train()
    q(x)  # lazy init
    params = list(q.parameters())
    if params:
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(steps):
            loss = (q(x) - x).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    q.eval()
    return q


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


CASES = [
    ("lsq", 4, {}, True),
    ("lsq", 3, {}, False),
    ("pact", 4, {"alpha": None}, False),
    ("general", 3, {"temperature": 0.1}, True),
    ("binary", 1, {"learned": True}, True),
    ("uniform", 6, {"observer": True}, False),
]


@pytest.mark.parametrize("gran", ["tensor", "channel"])
@pytest.mark.parametrize("kind,bits,opts,signed", CASES)
def test_state_dict_roundtrip_restores_outputs(kind, bits, opts, signed, gran):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g)
    if not signed:
        x = x.abs()
    q = make_quantizer(kind, bits, granularity=gran, signed=signed, **opts)
    train_a_bit(q, x)
    y = q(x)
    codes, params = q.quantize(x)

    fresh = make_quantizer(**q.options())
    result = fresh.load_state_dict(roundtrip(q.state_dict()))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    assert bool(fresh.initialized)
    assert torch.equal(fresh(x), y)
    codes2, params2 = fresh.quantize(x)
    assert torch.equal(codes2, codes)
    assert torch.equal(fresh.dequantize(codes2, params2), y)
    # Loaded parameters are real nn.Parameters (trainable again).
    assert {n for n, _ in fresh.named_parameters()} == {n for n, _ in q.named_parameters()}


def test_per_channel_lsq_inside_a_module():
    """A module owning a per-channel LSQ quantizer saves/loads through the parent's state dict."""

    class Owner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 5, generator=torch.Generator().manual_seed(3)))
            self.wq = make_quantizer("lsq", 2, granularity="channel", name="owner.weight")

        def forward(self, x):
            return x @ self.wq(self.weight).t()

    m = Owner()
    x = torch.randn(2, 5)
    m(x)
    with torch.no_grad():
        m.wq.step.mul_(torch.linspace(0.5, 1.5, 8))
    m.eval()
    y = m(x)
    assert "wq.step" in m.state_dict() and m.state_dict()["wq.step"].shape == (8,)
    m2 = Owner()
    assert m2.wq.step is None  # not yet initialised: created on load
    m2.load_state_dict(roundtrip(m.state_dict()))
    m2.eval()
    assert torch.equal(m2(x), y)
    assert torch.equal(m2.wq.step, m.wq.step)

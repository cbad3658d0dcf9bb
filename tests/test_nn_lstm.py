"""QuantLSTM: float equivalence, 8-bit accuracy, per-location quantizers, gradients, freeze."""
import pytest
import torch
from torch import nn

from k2quant.nn import QuantLSTM
from k2quant.plan import LayerConfig
from k2quant.quant import QUANTIZER_KINDS

FLOAT_LOCATIONS = {"input": None, "hidden": None, "cell": None, "gate_weights": None}


def make_lstm(**kw):
    torch.manual_seed(0)
    args = dict(input_size=6, hidden_size=8, num_layers=2)
    args.update(kw)
    return nn.LSTM(**args)


def make_input(lstm: nn.LSTM, T=9, N=3):
    g = torch.Generator().manual_seed(1)
    shape = (N, T, lstm.input_size) if lstm.batch_first else (T, N, lstm.input_size)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"batch_first": True},
        {"bidirectional": True},
        {"bias": False, "num_layers": 1},
        {"num_layers": 3, "batch_first": True, "bidirectional": True},
    ],
)
def test_float_config_equals_nn_lstm(kw):
    lstm = make_lstm(**kw)
    x = make_input(lstm)
    q = QuantLSTM.from_float(lstm, LayerConfig(locations=dict(FLOAT_LOCATIONS)), name="lstm")
    assert len(q.weight_quantizers) == 0 and len(q.act_quantizers) == 0
    D = 2 if lstm.bidirectional else 1
    h0 = torch.randn(lstm.num_layers * D, 3, lstm.hidden_size)
    c0 = torch.randn(lstm.num_layers * D, 3, lstm.hidden_size)
    for hx, fused in [(None, True), (None, False), ((h0, c0), True), ((h0, c0), False)]:
        q.use_fused = fused  # False: the step-by-step loop used when states are quantized
        y_ref, (h_ref, c_ref) = lstm(x, hx)
        y, (h, c) = q(x, hx)
        assert y.shape == y_ref.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
        torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(c, c_ref, atol=1e-6, rtol=0)


def test_weight_only_fused_path_matches_step_loop():
    lstm = make_lstm(bidirectional=True, batch_first=True)
    q = QuantLSTM.from_float(lstm, LayerConfig(weight_bits=4, locations={"input": {"bits": 8}}), name="l")
    assert set(q.act_quantizers) == {"input_l0", "input_l1"}
    x = make_input(lstm)
    q.eval()
    y_fused, (h_fused, _) = q(x)
    q.use_fused = False
    y_loop, (h_loop, _) = q(x)
    torch.testing.assert_close(y_fused, y_loop, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_fused, h_loop, atol=1e-6, rtol=0)
    y_fused.sum().backward()
    assert lstm.weight_hh_l1_reverse.grad.abs().sum() > 0


def test_disabled_quantization_equals_nn_lstm_and_unbatched_input():
    lstm = make_lstm(bidirectional=True)
    q = QuantLSTM.from_float(lstm, LayerConfig(weight_bits=2, act_bits=2), name="lstm")
    q.set_quant_enabled(weights=False, acts=False)
    x = make_input(lstm)
    torch.testing.assert_close(q(x)[0], lstm(x)[0], atol=1e-6, rtol=0)
    x1 = x[:, 0]  # unbatched (T, C)
    y_ref, (h_ref, _) = lstm(x1)
    y, (h, _) = q(x1)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"bidirectional": True, "batch_first": True}])
def test_8bit_close_to_float(kw):
    lstm = make_lstm(**kw)
    x = make_input(lstm)
    q = QuantLSTM.from_float(lstm, LayerConfig(weight_bits=8, act_bits=8), name="lstm")
    with torch.no_grad():
        for _ in range(3):  # calibrate the activation observers (training mode)
            q.train()(x)
        q.eval()
        y_ref, (h_ref, c_ref) = lstm(x)
        y, (h, c) = q(x)
    max_diff = (y - y_ref).abs().max().item()
    nerr = ((y - y_ref).norm() / y_ref.norm()).item()
    assert max_diff < 2e-2, f"8-bit QuantLSTM max abs diff {max_diff:.4g} should be < 2e-2"
    assert nerr < 0.01, f"8-bit QuantLSTM normalised error {nerr:.4g} should be < 1%"
    assert (c - c_ref).abs().max().item() < 5e-2


def test_one_quantizer_per_location_configurable():
    lstm = make_lstm(bidirectional=True)
    cfg = LayerConfig(
        weight_bits=4,
        act_bits=8,
        locations={
            "input": {"bits": 6},
            "cell": {"bits": 5},
            "gate_weights": {"bits": 3},
            "gate_weights_g": {"bits": 5, "granularity": "tensor"},
        },
    )
    q = QuantLSTM.from_float(lstm, cfg, name="enc.lstm")
    wq, aq = q.weight_quantizers, q.act_quantizers
    # 2 layers x 2 directions x (ih, hh) x 4 gates
    assert len(wq) == 2 * 2 * 2 * 4
    assert set(aq) == {
        "input_l0", "input_l1",
        "hidden_l0", "hidden_l0_reverse", "hidden_l1", "hidden_l1_reverse",
        "cell_l0", "cell_l0_reverse", "cell_l1", "cell_l1_reverse",
    }  # fmt: skip
    assert aq["input_l1"].bits == 6 and aq["hidden_l0"].bits == 8 and aq["cell_l1_reverse"].bits == 5
    assert wq["weight_ih_l0_i"].bits == 3 and wq["weight_hh_l1_reverse_o"].bits == 3
    assert wq["weight_ih_l1_g"].bits == 5 and wq["weight_ih_l1_g"].granularity == "tensor"
    assert wq["weight_hh_l0_f"].granularity == "channel"
    assert wq["weight_hh_l0_f"].name == "enc.lstm.weight_hh_l0_f"
    assert aq["cell_l0"].name == "enc.lstm.cell_l0"
    # all quantizer modules are distinct objects
    assert len({id(m) for m in list(wq.values()) + list(aq.values())}) == len(wq) + len(aq)
    x = make_input(lstm)
    y, _ = q(x)
    assert torch.isfinite(y).all()


def test_locations_default_to_layer_settings():
    q = QuantLSTM.from_float(make_lstm(num_layers=1), LayerConfig(weight_bits=5), name="l")
    assert len(q.act_quantizers) == 0  # act_bits=None: float states
    assert {m.bits for m in q.weight_quantizers.values()} == {5}
    q = QuantLSTM.from_float(
        make_lstm(num_layers=1), LayerConfig(weight_bits=5, locations={"hidden": {"bits": 4}}), name="l"
    )
    assert set(q.act_quantizers) == {"hidden_l0"}


def test_gradients_reach_all_weights():
    lstm = make_lstm(bidirectional=True)
    q = QuantLSTM.from_float(lstm, LayerConfig(weight_bits=4, act_bits=8), name="lstm").train()
    y, (h, c) = q(make_input(lstm))
    (y.square().sum() + h.sum() + c.sum()).backward()
    names = [n for n, _ in lstm.named_parameters()]
    for n in names:
        p = getattr(q, n)
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {n}"


@pytest.mark.skipif("lsq" not in QUANTIZER_KINDS, reason="lsq quantizer not available yet")
def test_gradients_reach_quantizer_params():
    lstm = make_lstm(num_layers=1)
    cfg = LayerConfig(weight_bits=4, weight_quantizer="lsq", act_bits=8, act_quantizer="lsq")
    q = QuantLSTM.from_float(lstm, cfg, name="lstm").train()
    x = make_input(lstm)
    q(x)  # lazily created activation parameters
    q.zero_grad()
    y, _ = q(x)
    y.square().sum().backward()
    qparams = [(n, p) for n, p in q.named_parameters() if "quantizers" in n]
    assert qparams
    for n, p in qparams:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {n}"


@pytest.mark.parametrize(
    "act_bits,locations", [(8, {}), (8, {"gate_weights_f": None}), (None, {})]  # last: fused path
)
def test_freeze_exact(act_bits, locations):
    lstm = make_lstm(bidirectional=True)
    cfg = LayerConfig(weight_bits=4, act_bits=act_bits, locations=locations)
    q = QuantLSTM.from_float(lstm, cfg, name="lstm")
    x = make_input(lstm)
    q.train()
    q(x)
    q.eval()
    with torch.no_grad():
        y0, (h0, c0) = q(x)
    q.freeze()
    qt = q.quantized_tensors()
    n_gates = 3 if locations else 4
    assert len(qt) == 2 * 2 * 2 * n_gates and set(qt.values()) == {4}
    assert q.weight_ih_l0_i_codes.shape == (8, 6) and q.weight_ih_l0_i_codes.dtype == torch.uint8
    params = dict(q.named_parameters())
    if locations:
        assert "weight_ih_l0" in params  # the float forget gate still lives there
        assert "weight_ih_l0_f_codes" not in q.state_dict()
    else:
        assert "weight_ih_l0" not in params and "weight_hh_l1_reverse" not in params
    with torch.no_grad():
        y1, (h1, c1) = q(x)
    assert torch.equal(y0, y1) and torch.equal(h0, h1) and torch.equal(c0, c1)
    # rebuild from a skeleton and load the frozen state
    skel = QuantLSTM(6, 8, num_layers=2, bidirectional=True, layer_config=cfg, name="lstm")
    skel.eval().freeze()
    skel.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(skel(x)[0], y0)
    back = q.to_float()
    assert type(back) is nn.LSTM
    torch.testing.assert_close(back(x)[0], y0, atol=0.05, rtol=0)


def test_bad_inputs():
    q = QuantLSTM.from_float(make_lstm(num_layers=1), LayerConfig(), name="enc.lstm")
    with pytest.raises(ValueError, match=r"enc\.lstm.*input_size=6"):
        q(torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="h_0 of shape"):
        q(torch.randn(4, 2, 6), (torch.zeros(2, 2, 8), torch.zeros(2, 2, 8)))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(4, 2, 6), [4, 3])
    with pytest.raises(ValueError, match="PackedSequence"):
        q(packed)
    with pytest.raises(ValueError, match="proj_size"):
        QuantLSTM.from_float(nn.LSTM(6, 8, proj_size=4), LayerConfig(), name="l")


def test_dropout_between_layers_in_training():
    lstm = make_lstm(dropout=0.5)
    q = QuantLSTM.from_float(lstm, LayerConfig(weight_bits=8), name="l").train()
    x = make_input(lstm)
    torch.manual_seed(0)
    y1, _ = q(x)
    torch.manual_seed(1)
    y2, _ = q(x)
    assert not torch.equal(y1, y2)
    q.eval()
    assert torch.equal(q(x)[0], q(x)[0])

"""quantize_ / convert / model_size_bytes on an icefall-style TDNN + LSTM model."""
import pytest
import torch
from torch import nn

from k2quant.nn import QuantConv1d, QuantEmbedding, QuantLinear, QuantLSTM, QuantModule
from k2quant.plan import LayerConfig, Plan, convert, model_size_bytes, quantizable_layers, quantize_
from k2quant.quant import QUANTIZER_KINDS


class TdnnLstm(nn.Module):
    """Shaped like icefall's tdnn_lstm recipe: Conv1d/ReLU/BatchNorm stack (subsampling 3),
    LSTMs with BatchNorm, a linear output; forward (N, T, C) -> log-probs (N, T', classes)."""

    def __init__(self, num_features: int = 10, num_classes: int = 7, hidden: int = 16) -> None:
        super().__init__()
        self.subsampling_factor = 3
        self.input_embed = nn.Sequential(
            nn.Conv1d(num_features, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden, affine=False),
            nn.Conv1d(hidden, hidden, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden, affine=False),
            nn.Conv1d(hidden, hidden, 3, stride=self.subsampling_factor, padding=0),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden, affine=False),
        )
        self.lstms = nn.ModuleList([nn.LSTM(hidden, hidden, num_layers=1) for _ in range(2)])
        self.lstm_bnorms = nn.ModuleList([nn.BatchNorm1d(hidden) for _ in range(2)])
        self.heads = nn.ModuleDict({"output": nn.Linear(hidden, num_classes)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_embed(x.permute(0, 2, 1))  # (N, C, T')
        x = x.permute(2, 0, 1)  # (T', N, C)
        for lstm, bn in zip(self.lstms, self.lstm_bnorms):
            y = lstm(x)[0]
            x = bn((x + y).permute(1, 2, 0)).permute(2, 0, 1)
        return self.heads["output"](x.transpose(0, 1)).log_softmax(dim=-1)


NAMES = ["input_embed.0", "input_embed.3", "input_embed.6", "lstms.0", "lstms.1", "heads.output"]


def build(seed: int = 0) -> TdnnLstm:
    torch.manual_seed(seed)
    return TdnnLstm()


def features(seed: int = 5) -> torch.Tensor:
    return torch.randn(2, 30, 10, generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, steps: int = 2) -> None:
    """A few SGD steps so learned quantizer parameters and observers move."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for i in range(steps):
        loss = -model(features(i)).max(dim=-1).values.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def mixed_plan(wkind: str = "uniform", akind: str = "uniform") -> Plan:
    return Plan(
        {
            "heads.output": LayerConfig(weight_bits=8, act_bits=8, weight_quantizer=wkind, act_quantizer=akind),
            "re:lstms\\.\\d+": LayerConfig(
                weight_bits=4,
                act_bits=8,
                weight_quantizer=wkind,
                act_quantizer=akind,
                locations={"cell": {"bits": 8}, "gate_weights_g": {"bits": 6}},
            ),
            "input_embed.0": None,
        },
        default=LayerConfig(weight_bits=6, act_bits=8, weight_quantizer=wkind, act_quantizer=akind),
    )


def test_quantize_swaps_layers_everywhere_and_matches_float_at_8_bits():
    model = build()
    ref = build()
    assert list(quantizable_layers(model)) == NAMES
    plan = Plan({}, default=LayerConfig(weight_bits=8, act_bits=8))
    out = quantize_(model, plan)
    assert out is model
    assert isinstance(model.input_embed[0], QuantConv1d) and isinstance(model.input_embed[6], QuantConv1d)
    assert isinstance(model.input_embed[2], nn.BatchNorm1d)  # untouched
    assert isinstance(model.lstms[1], QuantLSTM) and isinstance(model.heads["output"], QuantLinear)
    assert list(quantizable_layers(model)) == NAMES
    assert model.heads["output"].weight_quantizers["weight"].name == "heads.output.weight"
    assert model.lstms[0].act_quantizers["cell_l0"].name == "lstms.0.cell_l0"
    assert model.k2quant_source_plan is plan
    assert model.k2quant_plan == Plan({n: LayerConfig(weight_bits=8, act_bits=8) for n in NAMES})
    # calibrate activation observers in training mode, compare in eval mode
    ref.train()
    model.train()
    with torch.no_grad():
        for i in range(3):
            ref(features(i))
            model(features(i))
    ref.eval()
    model.eval()
    x = features()
    with torch.no_grad():
        y_ref, y = ref(x), model(x)
    assert y.shape == y_ref.shape == (2, 10, 7)
    err = ((y.exp() - y_ref.exp()).norm() / y_ref.exp().norm()).item()
    assert err < 0.02, f"8-bit model posteriors differ from float by {err:.4f} (> 2%)"


def test_convert_is_exact_and_stores_codes():
    model = quantize_(build(), mixed_plan())
    assert type(model.input_embed[0]) is nn.Conv1d  # None in the plan
    assert model.lstms[0].weight_quantizers["weight_ih_l0_g"].bits == 6
    train_steps(model)
    model.eval()
    x = features()
    with torch.no_grad():
        expected = model(x)
    assert convert(model) is model
    assert not model.training
    qmods = [m for m in model.modules() if isinstance(m, QuantModule)]
    assert len(qmods) == 5 and all(m.frozen for m in qmods)
    sd = model.state_dict()
    assert "heads.output.weight" not in sd and sd["heads.output.weight_codes"].dtype == torch.uint8
    assert sd["lstms.1.weight_hh_l0_o_codes"].shape == (16, 16)
    assert model.lstms[1].quantized_tensors()["weight_ih_l0_g_codes"] == 6
    assert "input_embed.0.weight" in sd  # float layer keeps its weight
    with torch.no_grad():
        assert torch.equal(model(x), expected), "convert() must not change eval outputs"


_KIND_PAIRS = [("uniform", "uniform")] + [
    (w, a)
    for w, a in [("lsq", "lsq"), ("sawb", "pact"), ("general", "uniform")]
    if w in QUANTIZER_KINDS and a in QUANTIZER_KINDS
]


@pytest.mark.parametrize("wkind,akind", _KIND_PAIRS)
def test_frozen_model_rebuilt_from_skeleton_plan_and_state_dict(wkind, akind, tmp_path):
    model = quantize_(build(0), mixed_plan(wkind, akind))
    train_steps(model, steps=1)
    convert(model)
    x = features()
    with torch.no_grad():
        expected = model(x)
    model.k2quant_plan.save(tmp_path / "plan.json")
    state = model.state_dict()

    # what the packed exporter does: skeleton -> quantize_(plan) -> convert -> load_state_dict
    skeleton = build(seed=1)  # different random weights, never run
    skeleton = quantize_(skeleton, Plan.load(tmp_path / "plan.json"))
    convert(skeleton)
    assert set(skeleton.state_dict()) == set(state)
    for k, v in skeleton.state_dict().items():
        assert v.shape == state[k].shape and v.dtype == state[k].dtype, k
    skeleton.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(skeleton(x), expected)


def test_nan_weights_error_names_the_layer():
    model = build()
    with torch.no_grad():
        model.lstms[1].weight_hh_l0[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'lstms\.1'.*'weight_hh_l0'.*NaN"):
        quantize_(model, Plan({}, default=LayerConfig()))
    # keeping that layer float is the documented way out
    quantize_(model, Plan({"lstms.1": None}, default=LayerConfig()))
    assert type(model.lstms[1]) is nn.LSTM


def test_model_size_bytes():
    model = build()
    n_float = sum(p.numel() for p in model.parameters())
    assert model_size_bytes(model) == 4 * n_float
    quantize_(model, Plan({"input_embed.0": None}, default=LayerConfig(weight_bits=4)))
    quantized = [m.weight for m in (model.input_embed[3], model.input_embed[6], model.heads["output"])]
    quantized += [getattr(l, n) for l in model.lstms for n in ("weight_ih_l0", "weight_hh_l0")]
    n_q = sum(w.numel() for w in quantized)
    expected = n_q * 4 / 8 + 4 * (n_float - n_q)
    assert model_size_bytes(model) == expected
    convert(model)
    assert model_size_bytes(model) == expected


def test_requantize_same_changed_none_and_frozen():
    model = build()
    plan = Plan({"heads.output": LayerConfig(weight_bits=8)})
    quantize_(model, plan)
    head = model.heads["output"]
    quantize_(model, plan)
    assert model.heads["output"] is head  # same config: left alone
    w = head.weight.detach().clone()
    quantize_(model, Plan({"heads.output": LayerConfig(weight_bits=4)}))
    assert model.heads["output"] is not head
    assert model.heads["output"].weight_quantizers["weight"].bits == 4
    assert torch.equal(model.heads["output"].weight, w)
    quantize_(model, Plan({"lstms.0": LayerConfig()}))  # not mentioned: left alone
    assert isinstance(model.heads["output"], QuantLinear)
    assert set(model.k2quant_plan.layers) == {"lstms.0", "heads.output"}
    quantize_(model, Plan({"heads.output": None}))  # explicit None: back to float
    assert type(model.heads["output"]) is nn.Linear
    assert torch.equal(model.heads["output"].weight, w)
    convert(model)
    with pytest.raises(ValueError, match=r"layer 'lstms\.0' is frozen"):
        quantize_(model, Plan({"lstms.0": LayerConfig(weight_bits=3)}))


def test_root_module_and_special_modules():
    lin = nn.Linear(4, 3)
    q = quantize_(lin, Plan({}, default=LayerConfig()))
    assert isinstance(q, QuantLinear) and q.k2quant_plan.layers == {"": LayerConfig()}
    model = nn.Sequential(nn.Embedding(20, 8), nn.TransformerEncoderLayer(8, 2, dim_feedforward=16))
    quantize_(model, Plan({}, default=LayerConfig()))
    assert isinstance(model[0], QuantEmbedding)
    assert isinstance(model[1].linear1, QuantLinear)
    # nn.MultiheadAttention reads out_proj.weight directly: its Linear subclass is not swapped
    assert not isinstance(model[1].self_attn.out_proj, QuantModule)
    model.eval()
    assert model(torch.randint(0, 20, (5, 2))).shape == (5, 2, 8)
    with pytest.raises(ValueError, match="plan must be a k2quant.plan.Plan"):
        quantize_(model, {"0": LayerConfig()})


def test_tied_weights_and_shared_modules_stay_shared():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.out = nn.Linear(8, 20, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(self.embed(ids))

    lm = TiedLM()
    quantize_(lm, Plan({}, default=LayerConfig(weight_bits=4)))
    assert isinstance(lm.embed, QuantEmbedding) and isinstance(lm.out, QuantLinear)
    assert lm.embed.weight is lm.out.weight, "weight tying must survive quantize_"
    lm(torch.randint(0, 20, (3, 4))).sum().backward()
    assert lm.embed.weight.grad is not None

    lin = nn.Linear(6, 6)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    assert list(quantizable_layers(seq)) == ["0"]
    quantize_(seq, Plan({"0": LayerConfig()}))
    assert isinstance(seq[0], QuantLinear) and seq[0] is seq[2]


def test_frozen_layers_store_no_second_copy_of_the_scale():
    """After convert, LSQ steps etc. are gone: codes + scale (+ zero point) only."""
    import torch
    from k2quant.plan import LayerConfig, Plan, convert, quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    quantize_(model, Plan(default=LayerConfig(weight_bits=4, weight_quantizer="lsq")))
    x = torch.randn(5, 16)
    model.eval()
    y = model(x)
    assert any("weight_quantizers" in k for k in model.state_dict())
    convert(model)
    keys = list(model.state_dict())
    assert not any("weight_quantizers" in k for k in keys), keys
    assert {"0.weight_codes", "0.weight_scale", "2.weight_codes"} <= set(keys)
    assert torch.equal(model(x), y)

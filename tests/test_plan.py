"""LayerConfig validation and Plan precedence / serialisation."""
import json

import pytest
from torch import nn

from k2quant.plan import LayerConfig, Plan, quantizable_layers


def small_model() -> nn.Module:
    return nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8)),
            "blocks": nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)]),
            "embed": nn.Embedding(10, 8),
            "lstm": nn.LSTM(8, 8),
            "output": nn.Linear(8, 5),
        }
    )


NAMES = [
    "encoder.0",
    "encoder.2",
    "blocks.0",
    "blocks.1",
    "blocks.2",
    "embed",
    "lstm",
    "output",
]


# ---------------------------------------------------------------------------- LayerConfig
@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, "8", None])
def test_weight_bits_validation(bits):
    with pytest.raises(ValueError, match=r"weight_bits must be an int in 1\.\.8; received"):
        LayerConfig(weight_bits=bits)


@pytest.mark.parametrize("bits", [0, 9])
def test_act_bits_validation(bits):
    with pytest.raises(ValueError, match=rf"act_bits must be an int in 1\.\.8 or None.*received {bits}"):
        LayerConfig(act_bits=bits)
    LayerConfig(act_bits=None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight_quantizer": "int4"}, r"weight_quantizer must be one of .*'uniform'.*received 'int4'"),
        ({"act_quantizer": "foo"}, r"act_quantizer must be one of"),
        ({"granularity": "row"}, r"granularity must be one of \['channel', 'tensor'\]; received 'row'"),
        ({"weight_quantizer": "binary"}, r"weight_quantizer='binary' needs weight_bits=1; received weight_bits=8"),
        ({"weight_quantizer": "ternary", "weight_bits": 3}, r"needs weight_bits=2"),
        ({"weight_options": {"bits": 3}}, r"weight_options must not contain \['bits'\]"),
        ({"weight_options": {"x": object()}}, r"weight_options must be JSON-serialisable"),
        ({"act_options": [1]}, r"act_options must be a dict"),
        ({"act_signed": "yes"}, r"act_signed must be True, False or None"),
        ({"locations": {"output_gate": {}}}, r"unknown location 'output_gate'; allowed locations"),
        ({"locations": {"cell": {"bits": 9}}}, r"locations\['cell'\]\['bits'\] must be an int in 1\.\.8"),
        ({"locations": {"cell": {"width": 4}}}, r"unknown keys \['width'\]"),
        ({"locations": {"cell": 4}}, r"must be None \(float\) or a dict"),
        ({"locations": {"gate_weights": {"kind": "binary", "bits": 3}}}, r"kind 'binary' needs bits=1"),
    ],
)
def test_layer_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerConfig(**kwargs)


def test_layer_config_dict_round_trip_and_specs():
    cfg = LayerConfig(
        weight_bits=4,
        act_bits=8,
        weight_quantizer="uniform",
        act_quantizer="pact",
        granularity="tensor",
        weight_options={"range_method": "mse"},
        locations={"cell": None, "gate_weights_i": {"bits": 3}, "gate_weights": {"kind": "binary"}},
    )
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert LayerConfig.from_dict(d) == cfg
    assert cfg.act_spec().signed is False  # pact activations are unsigned by default
    assert cfg.weight_spec().options == {"range_method": "mse"}
    assert cfg.location_spec("cell") is None
    assert cfg.location_spec("gate_weights_i").bits == 3
    assert cfg.location_spec("gate_weights_f").kind == "binary"
    assert cfg.location_spec("gate_weights_f").bits == 1  # follows the method
    assert cfg.location_spec("hidden").bits == 8
    with pytest.raises(ValueError, match=r"unknown keys \['wbits'\]; allowed keys are"):
        LayerConfig.from_dict({"wbits": 4})


# ---------------------------------------------------------------------------- Plan
def test_quantizable_layers_names():
    assert list(quantizable_layers(small_model())) == NAMES


def test_precedence_exact_beats_regex_first_regex_wins_default_and_none():
    c8, c4, c2, c6 = (LayerConfig(weight_bits=b) for b in (8, 4, 2, 6))
    plan = Plan(
        {
            "re:blocks\\.\\d+": c4,
            "blocks.1": c8,  # exact beats the regex listed before it
            "re:blocks\\.2|output": c2,  # blocks.2 already matched by the first regex
            "re:out.*": c6,  # output already matched above
            "embed": None,  # keep float
            "re:enc.*": None,
        },
        default=LayerConfig(weight_bits=3),
    )
    resolved = plan.resolve(small_model())
    bits = {n: c.weight_bits for n, c in resolved.items()}
    assert bits == {"blocks.0": 4, "blocks.1": 8, "blocks.2": 4, "output": 2, "lstm": 3}
    assert plan.match("blocks.1") == ("blocks.1", c8)
    assert plan.match("blocks.0") == ("re:blocks\\.\\d+", c4)
    assert plan.match("lstm") == (None, LayerConfig(weight_bits=3))
    assert plan.config_for("embed") is None


def test_regex_is_full_match():
    plan = Plan({"re:block": LayerConfig()})
    with pytest.raises(ValueError, match="unknown layer pattern 're:block'"):
        plan.resolve(small_model())  # 'block' does not fully match 'blocks.0'


def test_no_default_keeps_unnamed_layers_float():
    plan = Plan({"output": LayerConfig()})
    assert list(plan.resolve(small_model())) == ["output"]


@pytest.mark.parametrize("key", ["blocks.3", "re:decoder\\..*", "encoder"])
def test_unknown_layer_pattern(key):
    plan = Plan({key: LayerConfig()})
    with pytest.raises(ValueError, match=r"unknown layer pattern .*quantizable layers are: \[encoder\.0, "):
        plan.resolve(small_model())


def test_bad_plan_inputs():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Plan({"re:(": LayerConfig()})
    with pytest.raises(ValueError, match=r"Plan.layers\['x'\] must be a LayerConfig"):
        Plan({"x": 4})
    with pytest.raises(ValueError, match="weight_bits"):
        Plan({"x": {"weight_bits": 0}})


def test_json_round_trip(tmp_path):
    plan = Plan(
        {
            "output": LayerConfig(weight_bits=8, act_bits=8),
            "re:blocks\\.[01]": LayerConfig(weight_bits=4, weight_options={"range_method": "mse"}),
            "embed": None,
            "lstm": LayerConfig(weight_bits=4, act_bits=8, locations={"cell": {"bits": 8}, "input": None}),
        },
        default=LayerConfig(weight_bits=6, granularity="tensor"),
    )
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert list(again.layers) == list(plan.layers)  # order (regex precedence) survives
    assert again.resolve(small_model()) == plan.resolve(small_model())
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    assert json.loads(path.read_text())["format"] == "k2quant-plan"
    assert Plan.load(path) == plan
    assert not list(path.parent.glob(".tmp-*")), "atomic write leaves no temporary file"
    assert Plan.load(path).default == LayerConfig(weight_bits=6, granularity="tensor")
    assert Plan.from_dict(Plan().to_dict()) == Plan()


def test_load_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON plan file"):
        Plan.load(bad)
    with pytest.raises(ValueError, match="unsupported plan format version 99"):
        Plan.from_dict({"version": 99, "layers": {}})
    with pytest.raises(ValueError, match="expects a dict with keys 'layers'"):
        Plan.from_dict({"default": None})


def test_plan_kinds_match_the_quantizer_registry():
    from k2quant.plan import QUANTIZER_KINDS as plan_kinds
    from k2quant.quant import QUANTIZER_KINDS as quant_kinds

    assert set(plan_kinds) == set(quant_kinds), "LayerConfig validation is out of date"

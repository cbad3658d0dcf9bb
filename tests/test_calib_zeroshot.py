"""Zero-shot calibration features, activation-range collection and the calibrate CLI."""
import json

import pytest
import torch

from k2quant.infer.calibrate import (
    bn_statistics_loss,
    calibrate_model,
    collect_activation_ranges,
    load_acoustic_model,
    point_bits_from_plan,
    synthesize_features,
)
from k2quant.infer.fold import activation_points
from k2quant.models.tdnnf import TdnnF, get_preset

from helpers import fbank_like

FEAT = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def speech_like(n, t, seed):
    """Stationary, temporally smooth, fbank-like random features (N, T, FEAT)."""
    return fbank_like(n, t, seed, FEAT)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TdnnF(get_preset("small", FEAT, 50, hidden_dim=64, bottleneck_dims=16,
                         prefinal_bottleneck=32))
    m.train()
    m.set_dropout_proportion(0.0)
    with torch.no_grad():
        for i in range(20):
            m(speech_like(4, 200, i))
    return m.eval()


def test_zero_shot_reduces_bn_loss(model):
    feats, info = synthesize_features(model, num_utts=4, frames=100, steps=150, lr=0.1,
                                      tv_weight=0.0, seed=0)
    assert feats.shape == (4, 100, FEAT)
    assert torch.isfinite(feats).all()
    assert info["final_bn_loss"] == pytest.approx(bn_statistics_loss(model, feats), rel=1e-4)
    factor = info["initial_bn_loss"] / info["final_bn_loss"]
    assert factor > 4.0, f"BN-statistics loss only reduced {factor:.2f}x"
    # the model is left as it was
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_zero_shot_tv_prior_smooths(model):
    rough, _ = synthesize_features(model, num_utts=2, frames=80, steps=40, tv_weight=0.0)
    smooth, _ = synthesize_features(model, num_utts=2, frames=80, steps=40, tv_weight=5.0)
    tv = lambda x: (x[:, 1:] - x[:, :-1]).abs().mean()
    assert tv(smooth) < tv(rough)


def test_zero_shot_calibrated_engine_close_to_fp32(model):
    feats, _ = synthesize_features(model, num_utts=4, frames=100, steps=100, lr=0.1)
    eng, ranges = calibrate_model(model, [feats])
    x = speech_like(3, 300, 99)
    with torch.no_grad():
        ref = model(x)
    agree = float((eng(x).argmax(-1) == ref.argmax(-1)).float().mean())
    assert agree > 0.85, f"zero-shot int8 top-1 agreement with fp32 {agree:.3f}"
    assert set(activation_points(len(model.tdnnfs))) <= set(ranges)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_range_methods(model, method):
    r = collect_activation_ranges(model, [speech_like(2, 150, 5)], method=method)
    mm = collect_activation_ranges(model, [speech_like(2, 150, 5)], method="minmax")
    for p in activation_points(len(model.tdnnfs)):
        assert r[p]["lo"] <= r[p]["hi"]
        assert mm[p]["lo"] <= r[p]["lo"] + 1e-6 and r[p]["hi"] <= mm[p]["hi"] + 1e-6
    with pytest.raises(ValueError, match="range method"):
        collect_activation_ranges(model, [speech_like(1, 50, 5)], method="kl")


def test_point_bits_from_plan(model):
    from k2quant.plan import LayerConfig, Plan

    plan = Plan({"tdnnfs.2.affine": LayerConfig(weight_bits=4, act_bits=4)},
                default=LayerConfig(weight_bits=8))
    bits = point_bits_from_plan(model, plan, default=8)
    assert bits["tdnnfs.2.linear"] == 4
    assert sum(b == 4 for b in bits.values()) == 1


def test_load_checkpoint_and_errors(model, tmp_path):
    from k2quant.training.checkpoint import save_checkpoint

    p = tmp_path / "epoch-1.pt"
    save_checkpoint(p, model, epoch=1, rng=False)
    back = load_acoustic_model(p, allow_pickle=True)
    x = speech_like(1, 60, 1)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="no 'model_spec'"):
        load_acoustic_model(tmp_path / "sd.pt")


def test_calibrate_cli_zero_shot(model, tmp_path):
    from click.testing import CliRunner

    from k2quant.bin.calibrate import main
    from k2quant.infer import IntTdnnF
    from k2quant.training.checkpoint import save_checkpoint

    ckpt = tmp_path / "epoch-1.pt"
    save_checkpoint(ckpt, model, epoch=1, rng=False)
    out = tmp_path / "int8"
    res = CliRunner().invoke(main, ["--model", str(ckpt), "--allow-pickle", "--zero-shot",
                                    "--num-utts", "2", "--frames", "60", "--steps", "20",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("int_model.pt", "act_ranges.json", "model.k2q", "calibration.json"):
        assert (out / f).is_file(), f
    info = json.loads((out / "calibration.json").read_text())
    assert info["zero_shot"]["final_bn_loss"] < info["zero_shot"]["initial_bn_loss"]
    eng = IntTdnnF.load(out / "int_model.pt", expected_spec=model.model_spec())
    ranges = json.loads((out / "act_ranges.json").read_text())
    eng2 = IntTdnnF.from_packed(out / "model.k2q", ranges)
    x = speech_like(1, 90, 2)
    assert torch.equal(eng(x), eng2(x))
    bad = CliRunner().invoke(main, ["--model", str(ckpt), "--allow-pickle", "--out", str(out)])
    assert bad.exit_code != 0 and "exactly one of --zero-shot or --cuts" in bad.output

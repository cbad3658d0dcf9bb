"""``k2quant decode-int`` / :mod:`k2quant.infer.evaluate`: the integer engine decoded through
the HLG decoder, scored, and compared with an fp32 baseline (issue 6's WER acceptance).

The end-to-end tests build a tiny lang + HLG (as in test_decode.py), a tiny TdnnF whose
BatchNorm statistics are warmed up on fbank-like noise, a lhotse CutSet of random features,
calibrate it zero-shot with ``k2quant calibrate`` and decode it; they need k2, kaldilm and
lhotse (skipped otherwise). A few seconds.
"""
import json

import pytest
import torch

from k2quant.infer.evaluate import (
    acceptance,
    calibration_summary,
    locate_int_model,
    resolve_utt_cmn,
)

from helpers import TINY_ARPA as ARPA
from helpers import TINY_LEXICON as LEXICON
from helpers import fbank_like

FEAT = 20
TEXTS = ["A C B", "B", "C A", "A", "C C", "B A C"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_cuts(d, feat_dim=FEAT, texts=TEXTS, name="cuts_dev.jsonl.gz"):
    lhotse = pytest.importorskip("lhotse")
    from lhotse.features.io import NumpyFilesWriter

    d.mkdir(parents=True, exist_ok=True)
    cuts = []
    with NumpyFilesWriter(d / f"feats-{feat_dim}") as w:
        for i, text in enumerate(texts):
            T = 60 + 17 * i
            arr = fbank_like(1, T, 100 + i, feat_dim)[0].numpy()
            cid = f"utt{i}"
            key = w.write(cid, arr)
            feats = lhotse.Features(
                type="synthetic", num_frames=T, num_features=feat_dim, frame_shift=0.01,
                sampling_rate=16000, start=0.0, duration=T * 0.01, storage_type=w.name,
                storage_path=str(w.storage_path), storage_key=key, recording_id=cid)
            sup = lhotse.SupervisionSegment(cid, cid, 0.0, T * 0.01, text=text)
            cuts.append(lhotse.MonoCut(cid, 0.0, T * 0.01, 0, features=feats,
                                       supervisions=[sup]))
    path = d / name
    lhotse.CutSet.from_cuts(cuts).to_file(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(lang_dir, cuts, exp_dir with epoch-1.pt, calibrated dir, fp32 baseline per_utt)."""
    pytest.importorskip("k2")
    pytest.importorskip("kaldilm")
    pytest.importorskip("lhotse")
    from click.testing import CliRunner

    from k2quant.bin.calibrate import main as calibrate
    from k2quant.decode.graph import compile_hlg
    from k2quant.decode.run import run_decode
    from k2quant.lang import Lang, prepare_lang
    from k2quant.models.tdnnf import TdnnF, get_preset
    from k2quant.training.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("decode_int")
    lang_dir = prepare_lang(LEXICON, tmp / "lang", topo="chain")
    (tmp / "lm.arpa").write_text(ARPA)
    compile_hlg(lang_dir, tmp / "lm.arpa")
    num_pdfs = Lang(lang_dir).num_pdfs
    torch.manual_seed(0)
    model = TdnnF(get_preset("small", FEAT, num_pdfs, hidden_dim=64, bottleneck_dims=16,
                             prefinal_bottleneck=32))
    model.train()
    model.set_dropout_proportion(0.0)
    with torch.no_grad():
        for i in range(10):
            x = fbank_like(4, 120, i, FEAT)
            model(x - x.mean(dim=1, keepdim=True))  # utt_cmn'd, as the data loader does
    model.eval()
    exp = tmp / "exp"
    exp.mkdir()
    save_checkpoint(exp / "epoch-1.pt", model, epoch=1, rng=False, config={"utt_cmn": True})
    cuts = write_cuts(tmp / "data")
    calib = tmp / "int8"
    res = CliRunner().invoke(calibrate, [
        "--model", str(exp / "epoch-1.pt"), "--allow-pickle", "--zero-shot", "--num-utts", "2",
        "--frames", "60", "--steps", "10", "--out", str(calib)])
    assert res.exit_code == 0, res.output
    run_decode(str(exp), 1, 1, str(lang_dir), str(cuts), str(tmp / "fp32"), tag="dev-fp32")
    baseline = tmp / "fp32" / "per_utt-dev-fp32.tsv"
    assert baseline.is_file()
    return {"tmp": tmp, "lang": lang_dir, "cuts": cuts, "exp": exp, "calib": calib,
            "baseline": baseline, "model": model}


def _decode_int(args):
    from click.testing import CliRunner

    from k2quant.bin.decode_int import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_calibrate_records_feature_normalisation(setup):
    info = json.loads((setup["calib"] / "calibration.json").read_text())
    assert info["utt_cmn"] is True
    assert "epoch-1.pt" in info["utt_cmn_source"]


def test_calibrate_cuts_normalises_like_training(setup):
    """--cuts features get the per-utterance mean normalisation the model was trained with
    (whole utterance, before cropping to --frames), and calibration.json records it."""
    from click.testing import CliRunner

    from k2quant.bin.calibrate import main as calibrate
    from k2quant.infer.calibrate import collect_activation_ranges, load_cut_features

    out = setup["tmp"] / "int8_real"
    res = CliRunner().invoke(calibrate, [
        "--model", str(setup["exp"] / "epoch-1.pt"), "--allow-pickle", "--cuts",
        str(setup["cuts"]), "--num-utts", "4", "--frames", "80", "--out", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "calibration.json").read_text())
    assert info["utt_cmn"] is True and info["num_utts"] == 4
    ranges = json.loads((out / "act_ranges.json").read_text())
    feats = [f - f.mean(dim=1, keepdim=True) for f in
             load_cut_features(setup["cuts"], 4, max_frames=10 ** 9)]
    want = collect_activation_ranges(setup["model"], [f[:, :80] for f in feats])
    # the input point (after input_bn) sees the features only; later points also see the
    # 8-bit weights calibrate quantises first
    assert ranges["input"]["lo"] == pytest.approx(want["input"]["lo"], rel=1e-6, abs=1e-6)
    assert ranges["input"]["hi"] == pytest.approx(want["input"]["hi"], rel=1e-6, abs=1e-6)
    raw = setup["tmp"] / "int8_raw"
    res = CliRunner().invoke(calibrate, [
        "--model", str(setup["exp"] / "epoch-1.pt"), "--allow-pickle", "--cuts",
        str(setup["cuts"]), "--num-utts", "4", "--frames", "80", "--no-utt-cmn",
        "--out", str(raw)])
    assert res.exit_code == 0, res.output
    info = json.loads((raw / "calibration.json").read_text())
    assert info["utt_cmn"] is False and info["utt_cmn_source"] == "command line"
    assert json.loads((raw / "act_ranges.json").read_text())["input"] != ranges["input"]


def test_decode_int_end_to_end_with_significance(setup):
    from k2quant.scoring import read_per_utt_errors

    out = setup["tmp"] / "dec"
    res = _decode_int(["--int-model", setup["calib"], "--lang-dir", setup["lang"],
                       "--cuts", setup["cuts"], "--out-dir", out, "--tag", "dev-zs",
                       "--baseline-errors", setup["baseline"], "--bootstrap-samples", "500",
                       "--float-model", setup["exp"] / "epoch-1.pt", "--allow-pickle"])
    assert res.exit_code == 0, res.output
    assert "%WER" in res.output and "vs baseline" in res.output
    for f in ("hyps-dev-zs.txt", "ref-dev-zs.txt", "per_utt-dev-zs.tsv", "errs-dev-zs.txt",
              "wer-dev-zs.json", "wer-summary-dev-zs.txt", "summary-dev-zs.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary-dev-zs.json").read_text())
    assert s["utt_cmn"] is True and s["utt_cmn_source"] == "calibration.json"
    assert s["backend"] in ("qtensor", "int_mm", "fbgemm", "float64")
    assert s["calibration"]["data"] == "zero-shot"
    assert s["wer"]["num_utts"] == len(TEXTS)
    assert s["wer"]["ref_words"] == sum(len(t.split()) for t in TEXTS)
    per_utt = read_per_utt_errors(out / "per_utt-dev-zs.tsv")
    assert per_utt.errors == s["wer"]["errors"]
    agr = s["agreement_with_float"]
    assert agr["frames"] > 0 and 0.0 <= agr["top1_agreement"] <= 1.0
    assert agr["mean_kl"] >= -1e-6 and agr["max_abs_logprob_diff"] >= 0.0
    assert "agreement with the float model" in res.output
    sig = s["significance"]
    for k in ("lossless", "p_value", "alpha", "mapsswe", "bootstrap", "acceptance"):
        assert k in sig, k
    base = read_per_utt_errors(setup["baseline"])
    assert sig["mapsswe"]["errors_a"] == base.errors
    assert sig["mapsswe"]["errors_b"] == per_utt.errors
    assert sig["bootstrap"]["num_utts"] == len(TEXTS)
    assert 0.0 <= sig["mapsswe"]["p_value"] <= 1.0 and 0.0 <= sig["bootstrap"]["p_value"] <= 1.0
    assert sig["p_value"] == min(sig["mapsswe"]["p_value"], sig["bootstrap"]["p_value"])
    acc = sig["acceptance"]
    assert acc["wer_delta_abs"] == pytest.approx(sig["wer_b"] - sig["wer_a"])
    assert acc["accepted"] == (acc["within_tolerance"] and acc["not_significantly_worse"])


def test_decode_int_matches_engine_and_backends(setup):
    """The hyps of decode-int are those of decode_cuts on the loaded engine; the exact
    float64 back end decodes too (from the model file itself)."""
    out = setup["tmp"] / "dec64"
    res = _decode_int(["--int-model", setup["calib"] / "int_model.pt", "--lang-dir",
                       setup["lang"], "--cuts", setup["cuts"], "--out-dir", out,
                       "--backend", "float64", "--lm-scale", "1.0", "--lm-scale", "0.5"])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary-dev-int.json").read_text())
    assert s["backend"] == "float64" and "significance" not in s
    assert set(s["wer_by_lm_scale"]) == {"1", "0.5"}
    assert (out / "hyps-dev-int-lm_scale_0.5.txt").is_file()


def test_decode_int_bad_inputs(setup):
    tmp = setup["tmp"]
    common = ["--lang-dir", setup["lang"], "--out-dir", tmp / "bad"]
    # features of another dimension
    cuts40 = write_cuts(tmp / "data40", feat_dim=FEAT + 4)
    res = _decode_int(["--int-model", setup["calib"], "--cuts", cuts40, *common])
    assert res.exit_code != 0 and f"feat_dim={FEAT}" in res.output, res.output
    # a directory that is not a calibrate output
    res = _decode_int(["--int-model", tmp / "exp", "--cuts", setup["cuts"], *common])
    assert res.exit_code != 0 and "int_model.pt" in res.output
    # a file that is not an integer model (a training checkpoint)
    res = _decode_int(["--int-model", tmp / "exp" / "epoch-1.pt", "--cuts", setup["cuts"],
                       *common])
    assert res.exit_code != 0 and "integer model" in res.output
    # a baseline of other utterances
    other = write_cuts(tmp / "data_other", texts=TEXTS[:3], name="cuts_other.jsonl.gz")
    res = _decode_int(["--int-model", setup["calib"], "--cuts", other, "--baseline-errors",
                       setup["baseline"], *common])
    assert res.exit_code != 0 and "same utterances" in res.output, res.output


# ------------------------------------------------------------------ no k2 needed
def test_acceptance_rule():
    v = {"p_value": 0.3, "mapsswe": {"wer_a_percent": 10.0, "wer_b_percent": 10.4}}
    a = acceptance(v)
    assert a["within_tolerance"] and a["not_significantly_worse"] and a["accepted"]
    assert a["wer_delta_abs"] == pytest.approx(0.4)
    assert not acceptance({**v, "p_value": 0.01})["accepted"]
    assert not acceptance({**v, "mapsswe": {"wer_a_percent": 10.0, "wer_b_percent": 10.6}})[
        "accepted"]
    assert acceptance({**v, "mapsswe": {"wer_a_percent": 10.0, "wer_b_percent": 10.5}})[
        "within_tolerance"]


def test_resolve_utt_cmn_order(tmp_path):
    assert resolve_utt_cmn(False, {"utt_cmn": True}) == (False, "command line")
    assert resolve_utt_cmn(None, {"utt_cmn": False}) == (False, "calibration.json")
    # from the train-config.json next to the calibrated checkpoint
    (tmp_path / "train-config.json").write_text(json.dumps({"config": {"utt_cmn": False}}))
    (tmp_path / "epoch-1.pt").write_bytes(b"not a torch file")
    val, src = resolve_utt_cmn(None, {"model": str(tmp_path / "epoch-1.pt")})
    assert val is False and "train-config.json" in src
    assert resolve_utt_cmn(None, {}) == (True, "training default")


def test_locate_int_model_and_summary(tmp_path):
    with pytest.raises(FileNotFoundError, match="int_model.pt"):
        locate_int_model(tmp_path)
    (tmp_path / "int_model.pt").write_bytes(b"x")
    (tmp_path / "calibration.json").write_text(json.dumps(
        {"cuts": "/x/cuts_train.jsonl.gz", "method": "mse", "num_utts": 300}))
    f, info = locate_int_model(tmp_path)
    assert f == tmp_path / "int_model.pt" and info["method"] == "mse"
    assert calibration_summary(info)["data"] == "real"
    (tmp_path / "calibration.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        locate_int_model(tmp_path / "int_model.pt")

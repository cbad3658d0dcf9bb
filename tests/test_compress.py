"""``k2quant compress`` end to end on the tiny setup of ``test_qat.py`` (k2, lhotse), and its
bad-input errors."""
import json
import re
import shutil

import pytest

pytest.importorskip("k2")
pytest.importorskip("lhotse")
pytest.importorskip("kaldilm")

from click.testing import CliRunner  # noqa: E402

from k2quant.bin.cli import cli  # noqa: E402

from test_qat import tiny_setup  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("compress_tiny"))


def _args(tiny, out, *extra):
    return ["compress", "--model", str(tiny["model"]), "--lang-dir", str(tiny["lang"]),
            "--cuts", str(tiny["train"]), "--dev-cuts", str(tiny["dev"]), "--out-dir", str(out),
            "--qat-epochs", "1", "--qat-max-duration", "2", "--sens-utts", "8",
            "--sens-samples", "1", "--bits", "2,4,8", *extra]


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_compress_hessian_end_to_end(tiny, tmp_path):
    out = tmp_path / "hessian"
    r = _run(_args(tiny, out, "--method", "hessian", "--budget", "3bits",
                   "--fp32-dir", str(tmp_path / "fp32")))
    assert r.exit_code == 0, r.output
    assert "avg bits" in r.output and "lossless" in r.output
    for f in ("plan.json", "dims.json", "model.k2q", "report.json", "allocation.json",
              "sensitivity-hawq.json", "qat/qat-epoch-1.pt", "decode/per_utt-compressed.tsv"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    for k in ("system", "method", "avg_bits", "params", "bytes_on_disk", "fp32_bytes", "ratio",
              "wer", "fp32", "significance", "lossless", "timings", "bits", "files", "qat"):
        assert k in rep, k
    assert rep["method"] == "hessian" and rep["avg_bits"] <= 3 + 1e-9
    assert rep["bits"]["output"] == 8  # --min-bits output=8 (default)
    assert rep["bytes_on_disk"] == (out / "model.k2q").stat().st_size
    assert rep["ratio"] == pytest.approx(rep["fp32_bytes"] / rep["bytes_on_disk"])
    assert rep["fp32_bytes"] == 4 * rep["fp32_params"]
    assert rep["params"] == rep["fp32_params"]  # no bottleneck change: same parameters
    sig = rep["significance"]
    assert 0 <= sig["mapsswe"]["p_value"] <= 1 and 0 <= sig["bootstrap"]["p_value"] <= 1
    assert rep["lossless"] == (min(sig["mapsswe"]["p_value"], sig["bootstrap"]["p_value"]) >= 0.05)
    assert rep["wer"]["num_utts"] == 8
    for stage in ("sensitivity", "allocation", "qat", "export", "decode", "total"):
        assert rep["timings"][stage] >= 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == "k2quant-plan" and set(plan["layers"]) == set(rep["bits"])
    # a second run with a different budget reuses the fp32 decode and the sensitivity cache
    out2 = tmp_path / "hessian8"
    r = _run(_args(tiny, out2, "--method", "hessian", "--ratio", "2.5", "--fp32-dir",
                   str(tmp_path / "fp32"), "--sensitivity-cache",
                   str(out / "sensitivity-hawq.json")))
    assert r.exit_code == 0, r.output
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["ratio"] >= 2.5, rep2["search"]
    assert rep2["fp32"]["wer"] == rep["fp32"]["wer"]


def test_compress_uniform_and_subspace(tiny, tmp_path):
    out = tmp_path / "u"
    r = _run(_args(tiny, out, "--method", "uniform", "--bits", "4"))
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["bits"].values()) == {4} and rep["avg_bits"] == pytest.approx(4.0)
    out = tmp_path / "kl-sub"
    r = _run(_args(tiny, out, "--method", "kl", "--subspace", "--dims", "4,8", "--ratio", "3",
                   "--fp32-errors", str(tmp_path / "u" / "fp32" / "per_utt-fp32.tsv")))
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["subspace"] and rep["ratio"] >= 3.0, (rep["bytes_on_disk"], rep["search"])
    assert json.loads((out / "dims.json").read_text()) == rep["dims"]
    assert all(d in (4, 8, 12) for d in rep["dims"].values())
    assert rep["params"] <= rep["fp32_params"]


def test_budget_outside_the_feasible_range(tiny, tmp_path):
    r = CliRunner().invoke(cli, _args(tiny, tmp_path / "a", "--budget", "0.5bits", "--bits",
                                      "1,2,4,8", "--min-bits", "none"))
    assert r.exit_code != 0
    assert "below the floor" in r.output and "feasible 1..32 avg bits" in r.output
    r = CliRunner().invoke(cli, _args(tiny, tmp_path / "a", "--budget", "1.5bits"))
    assert r.exit_code != 0  # floor: 2-bit layers and the 8-bit output layer
    assert re.search(r"below the floor: feasible 2\.\d+\.\.32 avg bits", r.output), r.output
    r = CliRunner().invoke(cli, _args(tiny, tmp_path / "b", "--budget", "40bits"))
    assert r.exit_code != 0 and "above fp32" in r.output and "feasible" in r.output
    r = CliRunner().invoke(cli, _args(tiny, tmp_path / "c", "--ratio", "1000"))
    assert r.exit_code != 0 and "below the floor" in r.output
    assert "feasible 1x.." in r.output
    r = CliRunner().invoke(cli, _args(tiny, tmp_path / "d", "--ratio", "0.5"))
    assert r.exit_code != 0 and "above fp32" in r.output
    r = CliRunner().invoke(cli, _args(tiny, tmp_path / "e", "--method", "kl"))
    assert r.exit_code != 0 and "needs a budget" in r.output


def test_plan_naming_unknown_layers(tiny, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "k2quant-plan", "version": 1, "default": None,
                                "layers": {"tdnnfs.9.affine": {"weight_bits": 4}}}))
    r = CliRunner().invoke(cli, _args(tiny, tmp_path / "p", "--method", "plan", "--plan",
                                      str(plan)))
    assert r.exit_code != 0
    assert "names layers the model lacks" in r.output and "tdnnfs.9.affine" in r.output
    r = CliRunner().invoke(cli, _args(tiny, tmp_path / "m", "--budget", "4bits", "--min-bits",
                                      "nope=8"))
    assert r.exit_code != 0 and "--min-bits names layers the model lacks" in r.output


def test_model_lang_mismatch(tiny, tmp_path):
    from k2quant.lang import prepare_lang

    lang = prepare_lang([("X", ["A"]), ("Y", ["B"]), ("V", ["C"])], tmp_path / "lang3")
    shutil.copy(tiny["lang"] / "HLG.pt", lang / "HLG.pt")
    args = _args(tiny, tmp_path / "x", "--budget", "4bits")
    args[args.index("--lang-dir") + 1] = str(lang)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0
    assert "model/lang mismatch: the model outputs 7 classes" in r.output
    assert "num_pdfs=9" in r.output and "tokens.txt has 9 tokens" in r.output


def test_compress_nas(tiny, tmp_path):
    out = tmp_path / "nas"
    r = _run(_args(tiny, out, "--method", "nas", "--budget", "3bits", "--nas-steps", "3"))
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "nas" and rep["avg_bits"] <= 3 + 1e-9
    assert rep["bits"]["output"] == 8 and (out / "nas.json").is_file()
    out = tmp_path / "nas-r"
    r = _run(_args(tiny, out, "--method", "nas", "--ratio", "2.5", "--nas-steps", "3",
                   "--fp32-dir", str(tmp_path / "nas" / "fp32")))
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["ratio"] >= 2.5 * 0.98, rep["search"]


def test_decode_packed_model_matches_compress(tiny, tmp_path):
    """``k2quant decode --model model.k2q`` decodes the packed export as compress did (same
    per-utterance errors), records the AM size with its lattices, and reads the feature
    normalisation from the packed header."""
    from k2quant.export import read_header
    from k2quant.scoring import read_per_utt_errors

    out = tmp_path / "u4"
    r = _run(_args(tiny, out, "--method", "uniform", "--bits", "4"))
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    meta = read_header(out / "model.k2q").extra
    assert meta["utt_cmn"] is True and meta["fp32_params"] == rep["fp32_params"]
    dec = tmp_path / "dec"
    r = _run(["decode", "--model", str(out / "model.k2q"), "--lang-dir", str(tiny["lang"]),
              "--cuts", str(tiny["dev"]), "--out-dir", str(dec), "--save-lattices",
              "--tag", "packed", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    got = read_per_utt_errors(dec / "per_utt-packed.tsv")
    want = read_per_utt_errors(out / "decode" / "per_utt-compressed.tsv")
    assert {u: (e.errors, e.ref_len) for u, e in got.utts.items()} == \
        {u: (e.errors, e.ref_len) for u, e in want.utts.items()}
    am = json.loads((dec / "lattices-packed" / "am-info.json").read_text())
    assert am["packed"] is True and am["bytes"] == (out / "model.k2q").stat().st_size
    assert am["fp32_params"] == rep["fp32_params"]
    assert len(list((dec / "lattices-packed").glob("*.pt"))) == 8
    # a training checkpoint through --model == --exp-dir/--epoch
    r1 = _run(["decode", "--model", str(tiny["model"]), "--lang-dir", str(tiny["lang"]),
               "--cuts", str(tiny["dev"]), "--out-dir", str(dec), "--tag", "ckpt",
               "--save-lattices", "--device", "cpu"])
    r2 = _run(["decode", "--exp-dir", str(tiny["model"].parent), "--epoch", "1",
               "--lang-dir", str(tiny["lang"]), "--cuts", str(tiny["dev"]), "--out-dir",
               str(dec), "--tag", "exp", "--device", "cpu"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert (dec / "hyps-ckpt.txt").read_text() == (dec / "hyps-exp.txt").read_text()
    am = json.loads((dec / "lattices-ckpt" / "am-info.json").read_text())
    assert am["packed"] is False and am["bytes"] == 4 * am["params"] == 4 * rep["fp32_params"]


def test_decode_model_bad_inputs(tiny, tmp_path):
    common = ["--lang-dir", str(tiny["lang"]), "--cuts", str(tiny["dev"]),
              "--out-dir", str(tmp_path / "d"), "--device", "cpu"]
    r = CliRunner().invoke(cli, ["decode", "--model", str(tiny["model"]), "--exp-dir",
                                 str(tiny["model"].parent), "--epoch", "1", *common])
    assert r.exit_code != 0 and "either --model or --exp-dir" in r.output
    r = CliRunner().invoke(cli, ["decode", *common])
    assert r.exit_code != 0 and "--model FILE" in r.output
    r = CliRunner().invoke(cli, ["decode", "--model", str(tmp_path / "none.k2q"), *common])
    assert r.exit_code != 0 and "none.k2q: no such file" in r.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    r = CliRunner().invoke(cli, ["decode", "--model", str(junk), *common])
    assert r.exit_code != 0 and "neither a packed .k2q export nor a k2quant checkpoint" in r.output

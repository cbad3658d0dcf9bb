"""``k2quant report``: the table from hand-made compress reports (no k2 needed)."""
import json

import pytest
from click.testing import CliRunner

from k2quant.bin.cli import cli
from k2quant.report import build_rows, load_reports, make_report, render_markdown


def _per_utt(path, errors, ref_len=10):
    rows = ["utt_id\tref_words\terrors\tins\tdel\tsub"]
    for i, e in enumerate(errors):
        rows.append(f"u{i:03d}\t{ref_len}\t{e}\t0\t0\t{e}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _report(d, system, method, avg_bits, params, model_bytes, wer, fp32_per_utt=None,
            per_utt=None, sig=None, subspace=False):
    d.mkdir(parents=True, exist_ok=True)
    model = d / "model.k2q"
    model.write_bytes(b"\0" * model_bytes)
    fp32_packed = d / "fp32.k2q"
    fp32_packed.write_bytes(b"\0" * 4100)
    r = {
        "format": "k2quant-compress-report", "version": 1, "system": system, "method": method,
        "subspace": subspace, "avg_bits": avg_bits, "params": params, "bytes_on_disk": model_bytes,
        "fp32_bytes": 4000, "fp32_params": 1000,
        "wer": {"wer": wer, "errors": int(wer * 10), "ref_words": 1000},
        "fp32": {"wer": {"wer": 5.0, "errors": 50, "ref_words": 1000}, "packed": str(fp32_packed),
                 "params": 1000, "model": "exp/epoch-6.pt", "avg": 2, "bytes_on_disk": 4100},
        "files": {"model": str(model),
                  "per_utt": str(per_utt) if per_utt else None,
                  "fp32_per_utt": str(fp32_per_utt) if fp32_per_utt else None},
        "significance": sig,
    }
    (d / "report.json").write_text(json.dumps(r))
    return d


def _sig(pm, pb):
    return {"mapsswe": {"p_value": pm}, "bootstrap": {"p_value": pb}, "lossless": None}


def test_rows_ratio_and_lossless(tmp_path):
    fp32 = _per_utt(tmp_path / "fp32.tsv", [0, 1, 0, 2, 1] * 20)
    same = _per_utt(tmp_path / "same.tsv", [0, 1, 0, 2, 1] * 20)
    worse = _per_utt(tmp_path / "worse.tsv", [1, 2, 1, 3, 2] * 20)
    a = _report(tmp_path / "a", "hessian-4bits", "hessian", 3.7, 1000, 500, 5.0, fp32, same)
    b = _report(tmp_path / "b", "uniform-2bit", "uniform", 2.0, 1000, 250, 15.0, fp32, worse)
    c = _report(tmp_path / "c", "kl+sub-12x", "kl", 2.9, 800, 320, 5.5, sig=_sig(0.2, 0.3),
                subspace=True)
    d = _report(tmp_path / "d", "nas-2bits", "nas", 2.0, 1000, 260, 6.0, sig=_sig(0.04, 0.3))
    rows = build_rows(load_reports([a, b, c, d]))
    assert [r["system"] for r in rows] == ["fp32", "hessian-4bits", "uniform-2bit", "kl+sub-12x",
                                           "nas-2bits"]
    fp, h, u, k, n = rows
    # ratio = 4 bytes/param of fp32 / bytes of the file on disk
    assert fp["ratio"] == pytest.approx(4000 / 4100) and fp["bytes_on_disk"] == 4100
    assert h["ratio"] == pytest.approx(8.0) and u["ratio"] == pytest.approx(16.0)
    assert k["ratio"] == pytest.approx(12.5) and k["method"] == "kl+subspace"
    # recomputed from the per-utterance files: identical errors -> p = 1 / 1 -> lossless
    assert h["significance_source"] == "per-utterance files"
    assert h["p_mapsswe"] == pytest.approx(0.5) and h["p_bootstrap"] == 1.0 and h["lossless"]
    # one more error on every utterance: significant
    assert u["p_mapsswe"] < 1e-6 and u["p_bootstrap"] == 0.0 and u["lossless"] is False
    # stored p-values: lossless needs both >= 0.05
    assert k["lossless"] is True and k["significance_source"] == "report"
    assert n["lossless"] is False
    assert fp["lossless"] is None and fp["p_mapsswe"] is None

    md = render_markdown(rows, "AN4 dev")
    lines = md.splitlines()
    assert lines[0] == "# AN4 dev"
    assert lines[2].startswith("| system | method | avg bits | params | bytes on disk | ratio vs fp32")
    assert "| fp32 | - | 32.00 | 1,000 | 4,100 | 0.98x | 5.00 | - | - | - |" in md
    assert "| hessian-4bits | hessian | 3.70 | 1,000 | 500 | 8.00x | 5.00 | 0.500 | 1.000 | yes |" in md
    assert "| uniform-2bit | uniform | 2.00 | 1,000 | 250 | 16.00x | 15.00 | <0.001 | <0.001 | no |" in md
    assert "| nas-2bits | nas | 2.00 | 1,000 | 260 | 15.38x | 6.00 | 0.040 | 0.300 | no |" in md


def test_report_cli_writes_markdown_and_json(tmp_path):
    a = _report(tmp_path / "a", "uniform-8bit", "uniform", 8.0, 1000, 1100, 5.1,
                sig=_sig(0.4, 0.45))
    b = _report(tmp_path / "b", "hessian-4bits", "hessian", 3.9, 1000, 520, 5.2,
                sig=_sig(0.3, 0.2))
    out = tmp_path / "table" / "report.md"
    out.parent.mkdir()
    r = CliRunner().invoke(cli, ["report", "--rows", f"{a},{b / 'report.json'}", "--out",
                                 str(out), "--title", "t"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "| uniform-8bit | uniform | 8.00 |" in r.output
    assert out.read_text() == r.output
    js = json.loads(out.with_suffix(".json").read_text())
    assert [row["system"] for row in js["rows"]] == ["fp32", "uniform-8bit", "hessian-4bits"]
    assert js["rows"][2]["ratio"] == pytest.approx(4000 / 520) and js["rows"][2]["lossless"]
    # the file on disk wins over the recorded size (it is what "bytes on disk" means)
    (a / "model.k2q").write_bytes(b"\0" * 1000)
    rows = make_report([a], tmp_path / "r2.md")
    assert rows[1]["bytes_on_disk"] == 1000 and rows[1]["ratio"] == pytest.approx(4.0)


def test_report_bad_inputs(tmp_path):
    r = CliRunner().invoke(cli, ["report", "--rows", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "r.md")])
    assert r.exit_code != 0 and "no compress report" in r.output
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "report.json").write_text('{"format": "other"}')
    r = CliRunner().invoke(cli, ["report", "--rows", str(tmp_path / "x"), "--out",
                                 str(tmp_path / "r.md")])
    assert r.exit_code != 0 and "not a k2quant compress report" in r.output

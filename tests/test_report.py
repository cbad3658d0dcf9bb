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


# ---- AM + LM systems (k2quant report --systems) ----------------------------------------------
def _system(d, am_bytes, am_packed, lm_bytes, lm_packed, errs_by_setting, baseline_errs,
            num_utts=100):
    """A hand-made ``k2quant rescore --out`` directory."""
    d.mkdir(parents=True, exist_ok=True)
    details, wer = {}, {}
    for name, errs in [("1best", baseline_errs), *errs_by_setting.items()]:
        _per_utt(d / f"per_utt-{name}.tsv", errs)
        details[name] = {"wer": 100.0 * sum(errs) / (10 * len(errs)), "errors": sum(errs),
                         "ref_words": 10 * len(errs)}
        if name != "1best":
            wer[name] = details[name]["wer"]
    best = min(wer, key=wer.get)
    s = {"lattice_dir": str(d / "lats"), "lm": str(d / ("lm.k2q" if lm_packed else "epoch-20.pt")),
         "lm_size": {"params": 1000, "packed": lm_packed, "bytes": lm_bytes},
         "am": {"model": str(d / ("model.k2q" if am_packed else "epoch-6.pt (avg 2)")),
                "params": 5000, "packed": am_packed, "bytes": am_bytes, "fp32_params": 5000},
         "num_utts": num_utts, "baseline_wer": details["1best"]["wer"], "wer": wer,
         "wer_details": details, "best_setting": best, "best_wer": wer[best],
         "utts_per_second": 10.0}
    (d / "rescore-summary.json").write_text(json.dumps(s))
    return d


def test_system_rows_sizes_setting_and_verdict(tmp_path):
    from k2quant.report import build_system_rows, load_rescore_summaries

    base = [0, 1, 0, 2, 1] * 20
    ref = _system(tmp_path / "fp32am-fp32lm", 20000, False, 4000, False,
                  {"lm_scale_0.3": [0, 1, 0, 1, 1] * 20, "lm_scale_0.5": [0, 1, 0, 2, 1] * 20},
                  base)
    same = _system(tmp_path / "c", 1500, True, 300, True,
                   {"lm_scale_0.3": [0, 1, 0, 1, 1] * 20, "lm_scale_0.5": [0, 0, 0, 1, 1] * 20},
                   base)
    worse = _system(tmp_path / "w", 1000, True, 200, True,
                    {"lm_scale_0.3": [1, 2, 1, 2, 2] * 20, "lm_scale_0.5": [1, 2, 1, 2, 2] * 20},
                    base)
    rows = build_system_rows(load_rescore_summaries([str(ref), f"small={same}", str(worse)]))
    r0, r1, r2 = rows
    assert [r["system"] for r in rows] == ["fp32am-fp32lm", "small", "w"]
    # the reference's best setting is used for all rows (not each row's own best)
    assert all(r["setting"] == "lm_scale_0.3" for r in rows)
    assert r1["own_best_setting"] == "lm_scale_0.5" and r1["wer"] == pytest.approx(6.0)
    assert r1["bytes"] == 1800 and r1["ratio"] == pytest.approx(24000 / 1800)
    assert r2["ratio"] == pytest.approx(20.0)
    assert r0["lossless"] is None and r0["ratio"] == pytest.approx(1.0)
    assert r1["lossless"] is True and r1["p_mapsswe"] >= 0.05
    assert r2["lossless"] is False and r2["p_mapsswe"] < 0.001
    # an explicit setting
    rows = build_system_rows(load_rescore_summaries([str(ref), str(same)]),
                             setting="lm_scale_0.5")
    assert rows[1]["wer"] == pytest.approx(4.0)


def test_system_report_cli_and_errors(tmp_path):
    base = [0, 1, 0, 2, 1] * 20
    ref = _system(tmp_path / "ref", 20000, False, 4000, False, {"lm_scale_0.3": base}, base)
    comp = _system(tmp_path / "comp", 1500, True, 300, True, {"lm_scale_0.3": base}, base)
    out = tmp_path / "systems.md"
    r = CliRunner().invoke(cli, ["report", "--systems", f"{ref},{comp}", "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = out.read_text()
    assert "| comp | comp/model.k2q | comp/lm.k2q | 1,500 | 300 | 1,800 | 13.33x |" in md
    assert md.splitlines()[3].endswith("| yes | 10.00 |")
    js = json.loads(out.with_suffix(".json").read_text())
    assert js["format"] == "k2quant-system-table" and js["setting"] == "lm_scale_0.3"
    # the reference must be the fp32 system
    r = CliRunner().invoke(cli, ["report", "--systems", f"{comp},{ref}", "--out", str(out)])
    assert r.exit_code != 0 and "must be the fp32 reference" in r.output
    # unknown setting, missing dir, --rows and --systems together
    r = CliRunner().invoke(cli, ["report", "--systems", f"{ref},{comp}", "--setting",
                                 "lm_scale_9", "--out", str(out)])
    assert r.exit_code != 0 and "no rescoring setting 'lm_scale_9'" in r.output
    r = CliRunner().invoke(cli, ["report", "--systems", f"{ref},{tmp_path / 'nope'}",
                                 "--out", str(out)])
    assert r.exit_code != 0 and "rescore-summary.json" in r.output
    r = CliRunner().invoke(cli, ["report", "--systems", str(ref), "--rows", str(ref),
                                 "--out", str(out)])
    assert r.exit_code != 0 and "exactly one of --rows" in r.output
    # a different utterance set
    other = _system(tmp_path / "other", 1500, True, 300, True, {"lm_scale_0.3": base}, base,
                    num_utts=99)
    r = CliRunner().invoke(cli, ["report", "--systems", f"{ref},{other}", "--out", str(out)])
    assert r.exit_code != 0 and "rescore the same set" in r.output
    # summary without sizes (old rescore / foreign lattices)
    s = json.loads((comp / "rescore-summary.json").read_text())
    s["am"] = None
    (comp / "rescore-summary.json").write_text(json.dumps(s))
    r = CliRunner().invoke(cli, ["report", "--systems", f"{ref},{comp}", "--out", str(out)])
    assert r.exit_code != 0 and "am-info.json" in r.output

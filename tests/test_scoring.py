"""WER scoring on hand-computed cases (no k2 needed)."""
import json
import math

import pytest

pytest.importorskip("kaldialign")

from click.testing import CliRunner  # noqa: E402

from k2quant.scoring import (  # noqa: E402
    compute_wer,
    read_per_utt_errors,
    read_text,
    write_error_report,
    write_hyps,
    write_per_utt_errors,
)


def test_sub_and_ins():
    r = compute_wer({"u1": "A B C".split()}, {"u1": "A X C D".split()})
    u = r.utts["u1"]
    assert (u.ref_len, u.ins, u.dels, u.sub, u.errors) == (3, 1, 0, 1, 2)
    assert r.wer_percent == pytest.approx(200 / 3)
    assert f"{r.wer_percent:.2f}" == "66.67"
    assert r.summary().startswith("%WER 66.67 [ 2 / 3, 1 ins, 0 del, 1 sub ]")


def test_empty_hyp_and_missing_hyp_are_deletions():
    refs = {"u1": ["A", "B"], "u2": ["C", "D", "E"]}
    r = compute_wer(refs, {"u1": []})
    assert (r.utts["u1"].dels, r.utts["u1"].errors) == (2, 2)
    assert r.utts["u2"].dels == 3 and r.utts["u2"].missing_hyp
    assert r.missing == ["u2"]
    assert r.wer_percent == pytest.approx(100.0)


def test_empty_ref():
    r = compute_wer({"u1": []}, {"u1": []})
    assert r.errors == 0 and r.wer_percent == 0.0
    r = compute_wer({"u1": []}, {"u1": ["A"]})
    assert r.ins == 1 and math.isinf(r.wer_percent)


def test_multiple_utterance_totals():
    refs = {"a": "THE CAT SAT".split(), "b": "ON THE MAT".split(), "c": "HELLO".split()}
    hyps = {"a": "THE CAT SAT".split(), "b": "ON MAT".split(), "c": "HELLO THERE WORLD".split()}
    r = compute_wer(refs, hyps)
    assert [u.errors for u in r.utts.values()] == [0, 1, 2]
    assert (r.ins, r.dels, r.sub, r.ref_words) == (2, 1, 0, 7)
    assert r.wer_percent == pytest.approx(300 / 7)
    assert r.num_utts_with_errors == 2
    assert list(r.utts) == ["a", "b", "c"]  # reference order


def test_hyp_without_ref():
    with pytest.raises(ValueError, match="have no reference.*allow_extra_hyps"):
        compute_wer({"a": ["X"]}, {"a": ["X"], "zz": ["Y"]})
    r = compute_wer({"a": ["X"]}, {"a": ["X"], "zz": ["Y"]}, allow_extra_hyps=True)
    assert r.errors == 0 and r.ignored_hyps == ["zz"]


def test_string_instead_of_words():
    with pytest.raises(TypeError, match="list of words"):
        compute_wer({"a": "A B"}, {"a": ["A"]})


def test_per_utt_roundtrip_and_report(tmp_path):
    refs = {"u1": "A B C".split(), "u2": "D E".split(), "u3": "F".split()}
    hyps = {"u1": "A X C D".split(), "u2": ["D"]}
    r = compute_wer(refs, hyps)
    p = tmp_path / "per_utt.tsv"
    write_per_utt_errors(r, p)
    lines = p.read_text().splitlines()
    assert lines[0] == "utt_id\tref_words\terrors\tins\tdel\tsub"
    assert lines[1] == "u1\t3\t2\t1\t0\t1"
    r2 = read_per_utt_errors(p)
    assert list(r2.utts) == list(r.utts)
    for k in r.utts:
        a, b = r.utts[k], r2.utts[k]
        assert (a.ref_len, a.ins, a.dels, a.sub) == (b.ref_len, b.ins, b.dels, b.sub)
    assert (r2.errors, r2.ref_words) == (r.errors, r.ref_words) == (4, 6)

    rep = tmp_path / "errs.txt"
    write_error_report(r, refs, hyps, rep)
    text = rep.read_text()
    assert text.startswith("%WER = 66.67\n")
    assert "u1:\tA (B->X) C (*->D)" in text
    assert "u2:\tD (E->*)" in text
    assert "u3:\t(F->*)  [NO HYPOTHESIS]" in text
    assert "1   B -> X" in text.split("\nSUBSTITUTIONS: count")[1]
    # the report can be rebuilt from a per-utterance file (no stored alignments)
    write_error_report(r2, refs, hyps, rep)
    assert "u1:\tA (B->X) C (*->D)" in rep.read_text()


def test_bad_per_utt_file(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("utt\tn\n")
    with pytest.raises(ValueError, match="expected the header"):
        read_per_utt_errors(p)
    p.write_text("utt_id\tref_words\terrors\tins\tdel\tsub\nu\t3\t5\t1\t1\t1\n")
    with pytest.raises(ValueError, match="errors=5 but ins\\+del\\+sub=3"):
        read_per_utt_errors(p)


def test_text_io(tmp_path):
    p = tmp_path / "hyp.txt"
    write_hyps({"b": ["X", "Y"], "a": []}, p)
    assert p.read_text() == "a\nb X Y\n"
    assert read_text(p) == {"a": [], "b": ["X", "Y"]}
    p.write_text("a X\na Y\n")
    with pytest.raises(ValueError, match="duplicate utterance id 'a'"):
        read_text(p)


def test_score_cli(tmp_path):
    from k2quant.bin.score import main

    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("u1 A B C\nu2 D\n")
    hyp.write_text("u1 A X C D\nu2 D\n")
    res = CliRunner().invoke(main, ["--ref", str(ref), "--hyp", str(hyp),
                                    "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "%WER 50.00 [ 2 / 4, 1 ins, 0 del, 1 sub ]" in res.output
    summary = json.loads((tmp_path / "out" / "wer-hyp.json").read_text())
    assert summary["wer"] == pytest.approx(50.0) and summary["ins"] == 1
    assert (tmp_path / "out" / "per_utt-hyp.tsv").is_file()
    assert (tmp_path / "out" / "errs-hyp.txt").is_file()

    hyp.write_text("u1 A\nzz B\n")
    res = CliRunner().invoke(main, ["--ref", str(ref), "--hyp", str(hyp)])
    assert res.exit_code != 0 and "have no reference" in res.output

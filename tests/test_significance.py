"""Significance tests against hand-computed cases."""
import math

import pytest

from k2quant.significance import (
    errors_from_table,
    lossless_verdict,
    mapsswe,
    paired_bootstrap,
)


def _tables(err_a, err_b, n_ref):
    a = errors_from_table([(f"u{i}", e, n) for i, (e, n) in enumerate(zip(err_a, n_ref))])
    b = errors_from_table([(f"u{i}", e, n) for i, (e, n) in enumerate(zip(err_b, n_ref))])
    return a, b


def test_mapsswe_hand_computed():
    # Z = e_B - e_A = [1, 1, 0, 2]; mean 1; sample var 2/3; W = 1 / sqrt((2/3)/4) = sqrt(6)
    a, b = _tables([1, 0, 2, 1], [2, 1, 2, 3], [5, 5, 5, 5])
    r = mapsswe(a, b, "greater")
    assert r.statistic == pytest.approx(math.sqrt(6), rel=1e-12)
    # P(Z > sqrt 6) = 0.5 * erfc(sqrt(3)) = 0.0071529...
    assert r.p_value == pytest.approx(0.5 * math.erfc(math.sqrt(3)), rel=1e-12)
    assert r.p_value == pytest.approx(0.00715, abs=5e-5)
    assert r.errors_a == 4 and r.errors_b == 8 and r.ref_words == 20
    assert r.wer_a_percent == pytest.approx(20.0) and r.wer_b_percent == pytest.approx(40.0)
    two = mapsswe(a, b, "two-sided")
    assert two.p_value == pytest.approx(2 * r.p_value)
    less = mapsswe(a, b, "less")
    assert less.p_value == pytest.approx(1 - r.p_value)
    assert r.significant(0.05) and not less.significant(0.05)


def test_mapsswe_identical_systems_not_significant():
    a, b = _tables([1, 0, 2], [1, 0, 2], [3, 4, 5])
    r = mapsswe(a, b, "greater")
    assert r.statistic == 0.0 and r.p_value == 0.5
    assert mapsswe(a, b, "two-sided").p_value == 1.0


def test_mapsswe_constant_difference_is_certain():
    a, b = _tables([0, 0, 0], [1, 1, 1], [3, 3, 3])
    r = mapsswe(a, b)
    assert math.isinf(r.statistic) and r.p_value == 0.0


def test_bootstrap_matches_exact_enumeration():
    # Z = [1, -1]: resamples of 2 draws give sums 2, 0, 0, -2 with equal probability,
    # so P(delta* <= 0) = 3/4 and P(delta* >= 0) = 3/4.
    a, b = _tables([0, 1], [1, 0], [2, 2])
    r = paired_bootstrap(a, b, num_samples=20000, seed=1)
    assert r.p_value == pytest.approx(0.75, abs=0.015)
    assert r.statistic == pytest.approx(0.0)
    r2 = paired_bootstrap(a, b, num_samples=20000, seed=1, alternative="two-sided")
    assert r2.p_value == 1.0


def test_bootstrap_detects_clear_degradation_and_is_seeded():
    err_a = [0] * 50 + [1] * 10
    err_b = [1] * 40 + [0] * 10 + [1] * 10
    a, b = _tables(err_a, err_b, [4] * 60)
    r = paired_bootstrap(a, b, num_samples=5000, seed=3)
    assert r.p_value < 0.001
    assert r.statistic == pytest.approx(100 * 40 / 240)
    assert paired_bootstrap(a, b, num_samples=5000, seed=3).p_value == r.p_value
    v = lossless_verdict(a, b)
    assert v["lossless"] is False and v["p_value"] < 0.05
    v_same = lossless_verdict(a, a)
    assert v_same["lossless"] is True


def test_bad_inputs():
    a, b = _tables([1, 2], [1, 2], [3, 3])
    b_missing = dict(b)
    del b_missing["u1"]
    with pytest.raises(ValueError, match=r"same utterances.*only in A \(e\.g\. \['u1'\]\)"):
        mapsswe(a, b_missing)
    b_ref = dict(b)
    b_ref["u0"] = (1, 4)
    with pytest.raises(ValueError, match="reference words"):
        mapsswe(a, b_ref)
    with pytest.raises(ValueError, match="alternative must be one of"):
        mapsswe(a, b, "bigger")
    with pytest.raises(ValueError, match="appears twice"):
        errors_from_table([("x", 1, 2), ("x", 0, 2)])
    with pytest.raises(ValueError, match="at least one utterance"):
        mapsswe({}, {})


def test_load_errors_reads_scoring_output(tmp_path):
    from k2quant.scoring import compute_wer, write_per_utt_errors
    from k2quant.significance import load_errors

    refs = {"u1": "A B C".split(), "u2": "D E".split()}
    hyps = {"u1": "A X C D".split(), "u2": "D E".split()}
    write_per_utt_errors(compute_wer(refs, hyps), tmp_path / "per_utt.tsv")
    assert load_errors(tmp_path / "per_utt.tsv") == {"u1": (2, 3), "u2": (0, 2)}

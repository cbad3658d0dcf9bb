"""NIST scoring (sclite, hubscr.pl, sc_stats) and k2quant's NIST MAPSSWE against it.

The tests that run SCTK need its binaries (Debian package ``sctk``; ``.ci/run`` installs it).
"""
import random

import pytest

from fake_ldc import STM_HEADER
from k2quant.scoring import align_words, align_words_nist, compute_wer
from k2quant.significance import (
    compare_systems,
    mapsswe_nist,
    nist_segments,
    sctk_table_p_value,
)
from k2quant.sctk import filter_hyp_words, have_sctk, subset_lines, write_ctm

needs_sctk = pytest.mark.skipif(
    not have_sctk(), reason="NIST SCTK (sclite, sc_stats, hubscr.pl) not installed: "
    "apt-get install sctk, or tools/install.sh --with-sctk"
)


def test_nist_alignment_tie_breaking():
    # cases where sclite's equal-cost alignment differs from kaldialign's (sclite 2.10 output)
    ref, hyp = "G N P L N L A K".split(), "G H N P L N C A A K".split()
    assert align_words_nist(ref, hyp) == [
        ("G", "G"), (None, "H"), ("N", "N"), ("P", "P"), ("L", "L"), ("N", "N"),
        (None, "C"), ("L", "A"), ("A", "A"), ("K", "K")]
    ref, hyp = "I L K K D J".split(), "I L K H J".split()
    assert align_words_nist(ref, hyp) == [
        ("I", "I"), ("L", "L"), ("K", None), ("K", "K"), ("D", "H"), ("J", "J")]
    assert align_words_nist([], ["A"]) == [(None, "A")]
    assert align_words_nist(["A"], []) == [("A", None)]
    rng = random.Random(0)

    def cost(ali):
        return sum(0 if a == b else 3 if a is None or b is None else 4 for a, b in ali)

    more = 0
    for _ in range(300):  # a minimum-cost alignment of ref and hyp, >= Levenshtein errors
        r = [rng.choice("ABC") for _ in range(rng.randint(0, 7))]
        h = [rng.choice("ABC") for _ in range(rng.randint(0, 7))]
        nist, lev = align_words_nist(r, h), align_words(r, h)
        assert [a for a, _ in nist if a is not None] == r
        assert [b for _, b in nist if b is not None] == h
        assert cost(nist) <= cost(lev)
        errs = [sum(1 for a, b in ali if a != b) for ali in (nist, lev)]
        assert errs[0] >= errs[1]
        more += errs[0] > errs[1]
    assert 0 < more < 60


def C(w):
    return (w, w)


def test_nist_segments_by_hand():
    ok = [C(w) for w in "ABCDEFGH"]
    assert nist_segments(ok, ok) == []
    # one substitution of A at word 2: segment = 2 correct words before (1 available) ... 2 after
    a = [C("A"), ("B", "X"), C("C"), C("D"), C("E"), C("F"), C("G"), C("H")]
    assert nist_segments(a, ok) == [(4, 1, 0)]
    # two errors separated by one correct word: one segment; by two: two segments
    a = [C("A"), C("B"), ("C", "X"), C("D"), ("E", None), C("F"), C("G"), C("H")]
    assert nist_segments(a, ok) == [(7, 2, 0)]
    a = [C("A"), ("B", "X"), C("C"), C("D"), ("E", "Y"), C("F"), C("G"), C("H")]
    assert nist_segments(a, ok) == [(4, 1, 0), (5, 1, 0)]  # C D [E] F G: boundaries shared
    # B's trailing insertion after A's last word, and B's leading insertion
    b = ok + [(None, "Z")]
    assert nist_segments(ok, b) == [(2, 0, 1)]
    b = [(None, "Z")] + ok
    assert nist_segments(ok, b) == [(2, 0, 1)]
    with pytest.raises(ValueError, match="different reference words"):
        nist_segments(ok, [C("A")])


def test_mapsswe_nist_statistic_and_table_p():
    ok = [C(w) for w in "ABCDEFGH"]
    bad1 = [C("A"), ("B", "X")] + ok[2:]
    bad2 = [C("A"), ("B", "X"), ("C", "Y")] + ok[3:]
    alis_a = {"u1": ok, "u2": ok, "u3": bad1, "u4": ok}
    alis_b = {"u1": bad1, "u2": bad2, "u3": bad1, "u4": bad2}
    r = mapsswe_nist(alis_a, alis_b)
    # segment differences (B - A): 1, 2, 0, 2 -> mean 1.25, sd 0.9574, Z = 2.611
    assert r.num_segments == 4 and r.statistic == pytest.approx(1.25 / (0.957427 / 2), 1e-4)
    assert r.p_value == pytest.approx(0.00902, abs=2e-5)
    assert r.errors_a == 1 and r.errors_b == 6 and r.ref_words == 32
    assert sctk_table_p_value(2.6112) == pytest.approx(2 * (1 - 0.9954729), abs=1e-6)
    one = mapsswe_nist(alis_a, alis_b, "greater")
    assert one.p_value == pytest.approx(r.p_value / 2)
    with pytest.raises(ValueError, match="same utterances"):
        mapsswe_nist(alis_a, {"u1": ok})


def _random_systems(seed, n=150):
    rng = random.Random(seed)
    vocab = "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA".split()
    refs, a, b = {}, {}, {}
    for u in range(n):
        r = [rng.choice(vocab) for _ in range(rng.randint(2, 14))]

        def noisy(p):
            out = []
            for w in r:
                x = rng.random()
                if x < p:
                    out.append(rng.choice(vocab))
                elif x > p * 1.4:
                    out.append(w)
                if rng.random() < p / 3:
                    out.append(rng.choice(vocab))
            return out

        spk = f"spk{u % 7}"
        refs[f"{spk}-utt{u:03d}"] = r
        a[f"{spk}-utt{u:03d}"] = noisy(0.12)
        b[f"{spk}-utt{u:03d}"] = noisy(0.14)
    return refs, a, b


@needs_sctk
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mapsswe_matches_sc_stats(tmp_path, seed):
    from k2quant.sctk import sc_stats_mapsswe, score_trn

    refs, a, b = _random_systems(seed)
    part_a, sgml_a = score_trn(refs, a, tmp_path, "A")
    part_b, sgml_b = score_trn(refs, b, tmp_path, "B")
    ours_a = compute_wer(refs, a)
    assert part_a.ref_words == ours_a.ref_words
    assert part_a.wer_percent == pytest.approx(ours_a.wer_percent, abs=0.051)
    st = sc_stats_mapsswe(sgml_a, sgml_b, tmp_path)
    res = compare_systems(refs, a, b, num_samples=200)
    nist = res["mapsswe_nist"]
    assert st.num_segments == nist["num_segments"]
    assert -st.z == pytest.approx(nist["statistic"], abs=6e-4)  # printed with 3 decimals
    assert abs(st.p_two_sided - nist["p_value"]) < 1e-3
    if st.p_printed is not None:
        assert abs(st.p_printed - res["sctk_table_p"]) <= 1.5e-3


def test_filter_and_ctm(tmp_path):
    assert filter_hyp_words("UH I [NOISE] KNOW <UNK> WH- UM-HUM um [LAUGHTER]".split()) == [
        "I", "KNOW", "UM-HUM"]
    write_ctm({"u1": ["A", "B"], "u2": []}, {"u1": ("en_4156", "A", 1.0, 1.0),
                                             "u2": ("en_4156", "B", 0.0, 1.0)},
              tmp_path / "x.ctm")
    assert (tmp_path / "x.ctm").read_text() == (
        "en_4156 A 1.000 0.500 A\nen_4156 A 1.500 0.500 B\n")
    with pytest.raises(ValueError, match="have no segment"):
        write_ctm({"u3": ["A"]}, {}, tmp_path / "y.ctm")
    lines = [";; x\n", "sw_1 A ...\n", "en_2 A ...\n"]
    assert subset_lines(lines, ("en_",)) == [";; x\n", "en_2 A ...\n"]


GLM = """;; rules in the format of LDC2002T43's en20000405_hub5.glm
* name "en20000405_hub5.glm"
* desc "test"
* format = 'NIST1'
* max_nrules = '1000'
* copy_no_hit = 'T'
* case_sensitive = 'F'

UH => %HESITATION / [ ] __ [ ]
UM => %HESITATION / [ ] __ [ ]
WE'RE => {WE'RE / WE ARE} / [ ] __ [ ]
OKAY => {OKAY / O.K.} / [ ] __ [ ]
"""


@needs_sctk
def test_score_stm_subsets(tmp_path):
    from k2quant.sctk import score_stm

    stm = tmp_path / "hub5e00.english.000405.stm"
    stm.write_text(STM_HEADER + """\
en_4156 A en_4156_A 1.00 2.50 <O,en,F,en-F> we're starting (%HESITATION) okay (TH-)
en_4156 B en_4156_B 2.60 3.50 <O,en,M,en-M> what do you mean
sw_4390 A sw_4390_A 0.50 2.00 <O,sw,F,sw-F> yeah right i know
sw_4390 B sw_4390_B 2.10 3.00 <O,sw,M,sw-M> uh-huh
""")
    glm = tmp_path / "en20000405_hub5.glm"
    glm.write_text(GLM)  # the hesitation, contraction and spelling rules the test relies on
    hyps = {  # glm alternatives (WE ARE, O.K.), hesitation and noise removed, optional TH-
        "en_4156-A-0001": "WE ARE UM STARTING [NOISE] O.K.".split(),
        "en_4156-B-0001": "WHAT DO YOU".split(),  # 1 deletion
        "sw_4390-A-0001": "YEAH RIGHT I NO".split(),  # 1 substitution
        "sw_4390-B-0001": "UH-HUH".split(),
    }
    segs = {"en_4156-A-0001": ("en_4156", "A", 1.0, 1.5), "en_4156-B-0001": ("en_4156", "B", 2.6, 0.9),
            "sw_4390-A-0001": ("sw_4390", "A", 0.5, 1.5), "sw_4390-B-0001": ("sw_4390", "B", 2.1, 0.9)}
    res = score_stm(hyps, segs, stm, glm, tmp_path / "score", "sys")
    assert set(res) == {"total", "swbd", "callhome"}
    tot, sw, ch = (res[k][0] for k in ("total", "swbd", "callhome"))
    assert tot.errors == 2 and sw.errors == 1 and ch.errors == 1
    assert tot.ref_words == sw.ref_words + ch.ref_words
    assert sw.wer_percent == pytest.approx(100 / sw.ref_words, abs=0.06)
    assert res["total"][1].is_file()  # the SGML sc_stats reads
    with pytest.raises(FileNotFoundError, match="en20000405_hub5.glm"):
        score_stm(hyps, segs, stm, tmp_path / "none.glm", tmp_path / "score", "sys")

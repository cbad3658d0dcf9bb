"""Lang dir preparation: lexicon reading, disambiguation, tables, L, topologies."""
import itertools
import json
import math

import pytest

from k2quant.lang import (
    Lang,
    SymbolTable,
    add_disambig_symbols,
    add_position_marks,
    num_pdfs_for,
    prepare_lang,
    read_lexicon,
    token_symbols,
)

LEX = """\
;;; CMU-style test dictionary
A  AH
A(2)  EY
AB  AH B
ABC  AH B K
BE  B IY
BEE  B IY
SIL  SIL
"""


def _table(path):
    return [line.split() for line in open(path, encoding="utf-8") if line.strip()]


@pytest.fixture(scope="module")
def lex_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("lex") / "lex.dic"
    p.write_text(LEX)
    return p


@pytest.fixture(scope="module")
def lang_dir(tmp_path_factory, lex_file):
    pytest.importorskip("k2")
    d = tmp_path_factory.mktemp("lang")
    prepare_lang(lex_file, d, sil_phone="SIL")
    return d


def test_read_lexicon_formats(tmp_path):
    p = tmp_path / "lexiconp.txt"
    p.write_text("HELLO 1.0 HH AH L OW\nHELLO(2) 0.5 HH EH L OW\n\nWORLD W ER L D\n")
    assert read_lexicon(p) == [
        ("HELLO", ["HH", "AH", "L", "OW"]),
        ("HELLO", ["HH", "EH", "L", "OW"]),
        ("WORLD", ["W", "ER", "L", "D"]),
    ]
    bad = tmp_path / "bad.txt"
    bad.write_text("OK O K\nEMPTY\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: .*without phones"):
        read_lexicon(bad)


def test_disambig_symbols_kaldi_rules():
    lex = [("A", ["AH"]), ("A", ["EY"]), ("AB", ["AH", "B"]), ("ABC", ["AH", "B", "K"]),
           ("BE", ["B", "IY"]), ("BEE", ["B", "IY"]), ("SEA", ["B", "IY"]), ("K", ["K"])]
    out, max_d = add_disambig_symbols(lex)
    assert out == [
        ("A", ["AH", "#1"]),          # prefix of AH B
        ("A", ["EY"]),
        ("AB", ["AH", "B", "#1"]),     # prefix of AH B K
        ("ABC", ["AH", "B", "K"]),
        ("BE", ["B", "IY", "#1"]),     # homophones: numbered per pronunciation
        ("BEE", ["B", "IY", "#2"]),
        ("SEA", ["B", "IY", "#3"]),
        ("K", ["K"]),
    ]
    assert max_d == 3
    assert add_disambig_symbols([("X", ["X"])]) == ([("X", ["X"])], 0)


def test_position_marks():
    assert add_position_marks(["A"]) == ["A_S"]
    assert add_position_marks(["A", "B"]) == ["A_B", "B_E"]
    assert add_position_marks(["A", "B", "C", "D"]) == ["A_B", "B_I", "C_I", "D_E"]
    assert add_position_marks(["SIL"], silence=["SIL"]) == ["SIL"]


def test_tables_consistent(lang_dir):
    phones = _table(lang_dir / "phones.txt")
    words = _table(lang_dir / "words.txt")
    # ids are 0..n-1 in order
    assert [int(i) for _, i in phones] == list(range(len(phones)))
    assert [int(i) for _, i in words] == list(range(len(words)))
    psyms = [s for s, _ in phones]
    assert psyms[0] == "<eps>"
    assert psyms[1:3] == ["SIL", "SPN"]  # silence phone first, then the created OOV phone
    assert psyms[3:8] == ["AH", "B", "EY", "IY", "K"]
    # A AH #1, AB .. #1, BE #1, BEE #2 -> max 2, plus #0 and one silence disambig (#3)
    assert psyms[8:] == ["#0", "#1", "#2", "#3"]
    wsyms = [s for s, _ in words]
    assert wsyms == ["<eps>", "<UNK>", "A", "AB", "ABC", "BE", "BEE", "SIL", "#0", "<s>", "</s>"]
    cfg = json.loads((lang_dir / "lang.json").read_text())
    assert cfg["topo"] == "chain" and cfg["num_phones"] == 7 and cfg["num_pdfs"] == 15
    assert cfg["oov"] == "<UNK>" and cfg["first_disambig_phone_id"] == 8
    tokens = _table(lang_dir / "tokens.txt")
    assert len(tokens) == cfg["num_pdfs"]
    assert tokens[1] == ["SIL/0", "1"] and tokens[2] == ["SIL/1", "2"]
    assert tokens[2 * 3 - 1] == ["AH/0", "5"]  # phone 3 -> pdfs 5, 6
    lexd = _table(lang_dir / "lexicon_disambig.txt")
    assert ["A", "AH", "#1"] in lexd and ["BEE", "B", "IY", "#2"] in lexd
    assert ["<UNK>", "SPN"] in _table(lang_dir / "lexicon.txt")
    lang = Lang(lang_dir)
    assert lang.oov_id == 1 and lang.num_pdfs == 15 and lang.disambig_phone_ids == [8, 9, 10, 11]
    assert lang.lexicon["A"] == [["AH"], ["EY"]]
    assert lang.words_to_ids(["A", "NOPE", "<s>"]) == ([2, 1, 1], 2)
    assert lang.words_to_phones(["ABC", "NOPE"]) == (["AH", "B", "K", "SPN"], 1)


def _phone_paths(k2, L, phone_ids):
    """{word-id sequence: log-prob} of L's paths reading exactly ``phone_ids``."""
    lin = k2.linear_fsa(phone_ids)
    lin.aux_labels = lin.labels.clone()  # compose() wants a transducer on the left
    res = k2.connect(k2.compose(lin, k2.arc_sort(L), treat_epsilons_specially=True))
    if res.num_arcs == 0:
        return {}
    return _enumerate_acyclic(res)


def _enumerate_acyclic(fsa):
    arcs = fsa.arcs.values().tolist()
    scores = fsa.scores.tolist()
    aux = fsa.aux_labels.tolist()
    by_src = {}
    for i, a in enumerate(arcs):
        by_src.setdefault(a[0], []).append(i)
    out = {}

    def dfs(state, words, score):
        for i in by_src.get(state, []):
            w = words + ((aux[i],) if aux[i] > 0 else ())
            if arcs[i][2] == -1:
                prev = math.exp(out[w]) if w in out else 0.0
                out[w] = math.log(prev + math.exp(score + scores[i]))
            else:
                dfs(arcs[i][1], w, score + scores[i])

    dfs(0, (), 0.0)
    return out


def test_L_accepts_right_phone_sequences(lang_dir):
    k2 = pytest.importorskip("k2")
    lang = Lang(lang_dir)
    L = lang.L()
    P, W = lang.phones, lang.words
    ph = lambda s: [P[x] for x in s.split()]  # noqa: E731
    ws = lambda s: tuple(W[x] for x in s.split())  # noqa: E731
    half = math.log(0.5)
    # "A AB" read as AH AH B: no silence -> start(no sil) + after A (no sil) + after AB (no sil)
    assert _phone_paths(k2, L, ph("AH AH B")) == pytest.approx({ws("A AB"): 3 * half})
    # the alternate pronunciation
    assert _phone_paths(k2, L, ph("EY")) == pytest.approx({ws("A"): 2 * half})
    # AH B K is ABC, or A followed by... no word starts with B K -> only ABC
    assert set(_phone_paths(k2, L, ph("AH B K"))) == {ws("ABC")}
    # homophones: B IY is BE or BEE
    assert set(_phone_paths(k2, L, ph("B IY"))) == {ws("BE"), ws("BEE")}
    # optional silence between words and at the start; SIL alone is also the word SIL
    paths = _phone_paths(k2, L, ph("SIL EY SIL AH"))
    assert set(paths) == {ws("A A"), ws("SIL A SIL A"), ws("SIL A A"), ws("A SIL A")}
    assert paths[ws("A A")] == pytest.approx(3 * half)  # sil at start, sil after A, no sil at end
    # wrong sequences are rejected
    assert _phone_paths(k2, L, ph("B K")) == {}
    assert _phone_paths(k2, L, ph("AH SIL SIL SIL SIL B")) == {}
    assert _phone_paths(k2, L, ph("SPN")) == {ws("<UNK>"): pytest.approx(2 * half)}


def test_L_disambig(lang_dir):
    k2 = pytest.importorskip("k2")
    lang = Lang(lang_dir)
    Ld = lang.L_disambig()
    P, W = lang.phones, lang.words
    ph = lambda s: [P[x] for x in s.split()]  # noqa: E731
    assert set(_phone_paths(k2, Ld, ph("B IY #2"))) == {(W["BEE"],)}
    assert set(_phone_paths(k2, Ld, ph("AH #1 AH B #1"))) == {(W["A"], W["AB"])}
    assert _phone_paths(k2, Ld, ph("AH B")) == {}  # AB now needs its #1
    # silence is followed by the silence disambig #3; #0:#0 self-loop on the loop state
    assert set(_phone_paths(k2, Ld, ph("SIL #3 EY #0"))) == {(W["A"], W["#0"])}


def test_position_marked_lang(tmp_path, lex_file):
    pytest.importorskip("k2")
    prepare_lang(lex_file, tmp_path, sil_phone="SIL", position_marks=True, topo="ctc")
    lang = Lang(tmp_path)
    syms = lang.phones.symbols
    assert syms[1:3] == ["SIL", "SPN"]
    assert syms[3:7] == ["AH_B", "AH_E", "AH_I", "AH_S"]
    assert lang.num_phones == 2 + 5 * 4 and lang.num_pdfs == lang.num_phones + 1
    assert lang.lexicon["ABC"] == [["AH_B", "B_I", "K_E"]]
    assert lang.lexicon["A"] == [["AH_S"], ["EY_S"]]
    # with marks, A (AH_S) is no longer a prefix of AB (AH_B B_E); BE/BEE still homophones
    lexd = _table(tmp_path / "lexicon_disambig.txt")
    assert ["A", "AH_S"] in lexd and ["BEE", "B_B", "IY_E", "#2"] in lexd
    assert lang.tokens.symbols[:3] == ["<blk>", "SIL", "SPN"]


def test_prepare_lang_errors(tmp_path):
    pytest.importorskip("k2")
    with pytest.raises(ValueError, match="reserved"):
        prepare_lang([("<s>", ["A"])], tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        prepare_lang([("X", ["#1"])], tmp_path)
    with pytest.raises(ValueError, match="topo must be one of"):
        prepare_lang([("X", ["A"])], tmp_path, topo="hmm3")
    with pytest.raises(FileNotFoundError, match="prepare-lang"):
        Lang(tmp_path / "nothing")


def test_symbol_table_roundtrip(tmp_path):
    t = SymbolTable.from_symbols(["<eps>", "a", "b"])
    t.write(tmp_path / "t.txt")
    u = SymbolTable.from_file(tmp_path / "t.txt")
    assert u["b"] == 2 and u[1] == "a" and "a" in u and 3 not in u and len(u) == 3
    assert num_pdfs_for("chain", 3) == 7 and num_pdfs_for("ctc", 3) == 4
    assert token_symbols("chain", ["x"]) == ["<unused>", "x/0", "x/1"]


# ----------------------------------------------------------------------------- topologies
def _nfa_outputs(fsa, labels):
    """Set of aux-label outputs (0s dropped) of all accepting paths reading ``labels``."""
    arcs = fsa.arcs.values().tolist()
    aux = fsa.aux_labels.tolist()
    by_src = {}
    for i, a in enumerate(arcs):
        by_src.setdefault(a[0], []).append(i)
    cur = {(0, ())}
    for lab in labels:
        nxt = set()
        for s, out in cur:
            for i in by_src.get(s, []):
                if arcs[i][2] == lab:
                    nxt.add((arcs[i][1], out + ((aux[i],) if aux[i] > 0 else ())))
        cur = nxt
    return {out for s, out in cur for i in by_src.get(s, []) if arcs[i][2] == -1}


def _chain_parse(seq, num_phones):
    """Phones of a pdf sequence under 'A B*' per phone, or None if invalid."""
    phones = []
    for lab in seq:
        if lab % 2 == 1:  # A of phone (lab+1)/2
            phones.append((lab + 1) // 2)
        elif not phones or phones[-1] != lab // 2:
            return None  # B must continue the same phone
    return tuple(phones)


def test_chain_topo_accepts_exactly_A_Bstar():
    k2 = pytest.importorskip("k2")
    from k2quant.lang import chain_topo

    P = 2
    topo = chain_topo(P)
    assert int(topo.labels[topo.labels != -1].min()) >= 1  # no label 0 anywhere
    assert int(topo.labels.max()) == 2 * P
    assert topo.properties & k2.fsa_properties.ARC_SORTED_AND_DETERMINISTIC
    assert topo.properties & k2.fsa_properties.EPSILON_FREE
    n_ok = 0
    for n in range(0, 5):
        for seq in itertools.product(range(0, 2 * P + 1), repeat=n):
            expected = _chain_parse(seq, P) if 0 not in seq else None
            got = _nfa_outputs(topo, seq)
            if expected is None:
                assert got == set(), seq
            else:
                assert got == {expected}, seq
                n_ok += 1
    # number of valid strings of length n: 1, 2, 6, 18, 54 (2 * 3^(n-1) for n >= 1)
    assert n_ok == 1 + 2 + 6 + 18 + 54


def test_ctc_topo_collapses():
    pytest.importorskip("k2")
    from k2quant.lang import ctc_topo

    topo = ctc_topo(2)
    for n in range(0, 5):
        for seq in itertools.product(range(3), repeat=n):
            collapsed = tuple(k for k, _ in itertools.groupby(seq) if k != 0)
            assert _nfa_outputs(topo, seq) == {collapsed}, seq


def test_cli_prepare_lang_and_phone_lm(tmp_path, lex_file):
    pytest.importorskip("k2")
    from click.testing import CliRunner

    from k2quant.bin.cli import cli
    from k2quant.lm.ngram import ArpaLM

    lang_dir = tmp_path / "lang"
    args = ["prepare-lang", "--lexicon", str(lex_file), "--lang-dir", str(lang_dir),
            "--sil-phone", "SIL", "--topo", "ctc"]
    runner = CliRunner()
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    cfg = json.loads((lang_dir / "lang.json").read_text())
    assert cfg["topo"] == "ctc" and cfg["prepare_args"]["sil_phone"] == "SIL"
    mtime = (lang_dir / "L.pt").stat().st_mtime_ns
    assert runner.invoke(cli, args).exit_code == 0  # up to date: no-op
    assert (lang_dir / "L.pt").stat().st_mtime_ns == mtime

    text = tmp_path / "text"
    text.write_text("u1 A AB\nu2 BEE ABC UNSEEN\n")
    out = tmp_path / "P.arpa"
    res = runner.invoke(cli, ["train-ngram", "--text", str(text), "--skip-first-field",
                              "--order", "2", "--out", str(out), "--phones-from-lang",
                              str(lang_dir)])
    assert res.exit_code == 0, res.output
    lm = ArpaLM(out)
    # closed phone vocabulary: every phone, no <UNK>, no disambiguation symbols
    assert set(lm.vocab) == {"<s>", "</s>", "SIL", "SPN", "AH", "B", "EY", "IY", "K"}
    assert lm.logprob("B", ("AH",)) > lm.logprob("EY", ("AH",))

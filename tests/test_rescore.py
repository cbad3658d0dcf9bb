"""N-best rescoring of hand-made k2 lattices with a tiny trained Transformer LM."""
import json
import logging
import random

import pytest

k2 = pytest.importorskip("k2")

import torch  # noqa: E402

from k2quant.decode.lattice import save_lattices  # noqa: E402
from k2quant.rescore.nbest import (  # noqa: E402
    ScaleSetting,
    WordsMismatchError,
    get_nbest,
    pick_best,
    read_lattice_file,
    rescore_lattices,
    score_word_sequences,
)

NUMS = "zero one two three four five six seven eight nine".split()
WORDS_TXT = "<eps> 0\n" + "".join(f"{w} {i + 1}\n" for i, w in enumerate(NUMS)) + \
    "<sil> 11\n#0 12\n<s> 13\n</s> 14\n"
W = {w: i + 1 for i, w in enumerate(NUMS)}
ID2WORD = {i + 1: w for i, w in enumerate(NUMS)}
ID2WORD[11] = "<sil>"


def counting_text(n, seed):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        k, L = r.randrange(10), r.randint(3, 6)
        out.append(" ".join(NUMS[(k + i) % 10] for i in range(L)))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory):
    """A word LM trained for a few seconds on counting sentences ("one two three ...")."""
    from k2quant.lm.train import LmTrainConfig, train_lm

    d = tmp_path_factory.mktemp("rescore_lm")
    (d / "train.txt").write_text(counting_text(300, 1))
    (d / "valid.txt").write_text(counting_text(40, 2))
    cfg = LmTrainConfig(train_text=str(d / "train.txt"), valid_text=str(d / "valid.txt"),
                        exp_dir=str(d / "exp"), d_model=32, num_heads=2, num_layers=1,
                        dim_feedforward=64, dropout=0.0, num_epochs=6, lr=3e-3,
                        warmup_steps=10, max_tokens=200, device="cpu", log_interval=0,
                        num_threads=1)
    train_lm(cfg)
    return d / "exp" / "epoch-6.pt"


@pytest.fixture(scope="module")
def lm(lm_ckpt):
    from k2quant.models.transformer_lm import load_lm

    return load_lm(lm_ckpt)


def make_lattice(ragged=False):
    """Three word sequences; (am, graph) scores per path:

    - "one five three": am -4.7, graph -4  -> total -8.7 (lattice 1-best)
    - "one nine three": am -4.6, graph -5  -> total -9.6 (best acoustic score)
    - "one two three":  am -5.2, graph -4  -> total -9.2 (the truth; the LM likes it)

    An arc without a word (aux 0) sits before "three". With ``ragged``, "nine three" is
    a single arc carrying two words (as HLG lattices have ragged aux_labels).
    """
    # src dst label word am lm
    arcs = [
        (0, 1, 1, W["one"], -1.0, -1.0),
        (1, 2, 2, W["two"], -3.0, -2.0),
        (1, 2, 3, W["five"], -2.5, -2.0),
    ]
    if ragged:
        arcs += [(1, 4, 4, [W["nine"], W["three"]], -3.4, -4.0)]
    else:
        arcs += [(1, 2, 4, W["nine"], -2.4, -3.0)]
    arcs += [(2, 3, 7, 0, -0.2, 0.0), (3, 4, 6, W["three"], -1.0, -1.0), (4, 5, -1, -1, 0.0, 0.0)]
    arcs.sort(key=lambda a: (a[0], a[2]))
    text = "\n".join(f"{s} {d} {lab} {a + l}" for s, d, lab, _, a, l in arcs) + "\n5"
    fsa = k2.Fsa.from_str(text)
    words = [a[3] if isinstance(a[3], list) else [a[3]] for a in arcs]
    words = [[] if w == [0] else w for w in words]
    if ragged:
        fsa.aux_labels = k2.RaggedTensor(words)
    else:
        fsa.aux_labels = torch.tensor([w[0] if w else 0 for w in words], dtype=torch.int32)
    fsa.lm_scores = torch.tensor([a[5] for a in arcs], dtype=torch.float32)
    return fsa


def empty_lattice():
    fsa = k2.connect(k2.Fsa.from_str("0 1 1 0\n2"))  # no path to the final state
    assert fsa.num_arcs == 0
    fsa.aux_labels = torch.zeros(0, dtype=torch.int32)
    fsa.lm_scores = torch.zeros(0)
    return fsa


def seq(*ws):
    return tuple(W[w] for w in ws)


@pytest.mark.parametrize("ragged", [False, True])
def test_get_nbest_scores(ragged):
    lat = make_lattice(ragged)
    lat.am_scores = lat.scores - lat.lm_scores
    torch.manual_seed(0)
    nb = get_nbest(k2.create_fsa_vec([lat]), num_paths=30)
    assert len(nb) == 1
    cands = {c.word_ids: (round(c.am_score, 4), round(c.ngram_score, 4)) for c in nb[0]}
    assert cands == {
        seq("one", "five", "three"): (-4.7, -4.0),
        seq("one", "nine", "three"): (-4.6, -5.0) if not ragged else (-4.4, -5.0),
        seq("one", "two", "three"): (-5.2, -4.0),
    }
    assert nb[0][0].word_ids == seq("one", "five", "three"), "lattice 1-best comes first"


def test_lm_scale_flips_to_lm_preferred(lm):
    lat = make_lattice()
    lat.am_scores = lat.scores - lat.lm_scores
    vec = k2.create_fsa_vec([lat, empty_lattice_with_am()])
    torch.manual_seed(0)
    nb = get_nbest(vec, num_paths=30)
    assert nb[1] == [], "empty lattice: no candidates"
    cands = nb[0]
    scores = score_word_sequences(lm, [c.word_ids for c in cands], ID2WORD)
    for c, s in zip(cands, scores.tolist()):
        c.lm_score = s
    by = {c.word_ids: c for c in cands}
    truth, base, am_best = seq("one", "two", "three"), seq("one", "five", "three"), \
        seq("one", "nine", "three")
    # precondition: the LM learned counting
    assert by[truth].lm_score > max(by[base].lm_score, by[am_best].lm_score) + 1.0
    assert pick_best(cands, ScaleSetting(0.0, 0.0)).word_ids == am_best
    assert pick_best(cands, ScaleSetting(0.0, 1.0)).word_ids == base
    assert pick_best(cands, ScaleSetting(1.0, 0.0)).word_ids == truth
    assert pick_best(cands, ScaleSetting(1.0, 1.0)).word_ids == truth
    # a huge insertion penalty cannot change equal-length hypotheses; an LM score does
    assert pick_best(cands, ScaleSetting(0.0, 1.0, wip=-5.0)).word_ids == base
    assert pick_best([], ScaleSetting(1.0)) is None
    # score_sentences agrees with scoring each candidate alone
    one = score_word_sequences(lm, [truth], ID2WORD)
    assert float(one[0]) == pytest.approx(by[truth].lm_score, abs=1e-5)


def empty_lattice_with_am():
    e = empty_lattice()
    e.am_scores = torch.zeros(0)
    return e


def test_skip_words_and_oov(lm):
    from k2quant.rescore.nbest import LmMapStats

    st = LmMapStats()
    a = score_word_sequences(lm, [(W["one"], 11, W["two"]), (W["one"], W["two"])], ID2WORD,
                             stats=st)
    assert float(a[0]) == pytest.approx(float(a[1]), abs=1e-6), "<sil> is skipped"
    st = LmMapStats()
    score_word_sequences(lm, [(W["one"], 11)], {**ID2WORD, 11: "eleven"}, skip_words=(),
                         stats=st)
    assert st.num_oov == 1 and st.oov_words == {"eleven": 1}
    with pytest.raises(ValueError, match="word id 99 of a lattice is not in words.txt"):
        score_word_sequences(lm, [(99,)], ID2WORD)


# ------------------------------------------------------------------------------ files + CLI


@pytest.fixture()
def lattice_dir(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text(WORDS_TXT)
    d = tmp_path / "lats"
    # word ids as a plain tensor (utt1, utt3) or ragged (utt2): files of both kinds batch
    for uid, lat in (("utt1", make_lattice(False)), ("utt2", make_lattice(True)),
                     ("utt3", empty_lattice())):
        save_lattices(k2.create_fsa_vec([lat]), [uid], d, words_txt=words)
    # a bare as_dict() file, as an icefall decode script would save it
    bare = make_lattice(False)
    torch.save(bare.as_dict(), d / "utt4.pt")
    refs = tmp_path / "text"
    refs.write_text("utt1 one two three\nutt2 one two three\nutt3 four\nutt4 one two three\n")
    return d, words, refs


def test_rescore_lattices_files(lattice_dir, lm, caplog):
    d, words, refs = lattice_dir
    from k2quant.decode.graph import file_sha256
    from k2quant.rescore.nbest import list_lattice_files

    files = list_lattice_files(d)
    assert [f.stem for f in files] == ["utt1", "utt2", "utt3", "utt4"]
    settings = [ScaleSetting(0.0), ScaleSetting(2.0), ScaleSetting(0.0, 1.0)]
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        res = rescore_lattices(files, lm, ID2WORD, settings, num_paths=30, batch_size=3,
                               words_txt_sha256=file_sha256(words), progress=False)
    assert "utt4.pt has no words.txt sha256" in caplog.text
    assert res.empty == ["utt3"] and res.num_utts == 4
    h = res.hyps
    assert set(h) == {"lm_scale_0-ngram_scale_0", "lm_scale_2-ngram_scale_0",
                      "lm_scale_0-ngram_scale_1"}
    truth = ["one", "two", "three"]
    for u in ("utt1", "utt2", "utt4"):
        assert res.baseline[u] == ["one", "five", "three"]
        assert h["lm_scale_2-ngram_scale_0"][u] == truth
        assert h["lm_scale_0-ngram_scale_1"][u] == res.baseline[u]
    assert h["lm_scale_0-ngram_scale_0"]["utt1"] == ["one", "nine", "three"]
    assert h["lm_scale_0-ngram_scale_0"]["utt2"] == ["one", "nine", "three"]
    for name in h:
        assert h[name]["utt3"] == []
    assert res.baseline["utt3"] == []
    assert res.num_candidates == 9


def test_words_mismatch_and_bad_files(lattice_dir, tmp_path):
    d, words, refs = lattice_dir
    from k2quant.decode.graph import file_sha256

    other = tmp_path / "other_words.txt"
    other.write_text(WORDS_TXT.replace("nine 10", "nein 10"))
    with pytest.raises(WordsMismatchError, match=r"utt1\.pt: this lattice was decoded with a "
                       r"words\.txt whose sha256"):
        read_lattice_file(d / "utt1.pt", words_txt_sha256=file_sha256(other))
    fsa, meta = read_lattice_file(d / "utt4.pt", words_txt_sha256=file_sha256(other))
    assert meta["has_meta"] is False and meta["cut_id"] == "utt4"
    assert hasattr(fsa, "am_scores") and not hasattr(fsa, "phones")
    torch.save({"something": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt: not a lattice file"):
        read_lattice_file(tmp_path / "junk.pt")
    two = k2.create_fsa_vec([make_lattice(), make_lattice()])
    torch.save(two.as_dict(), tmp_path / "two.pt")
    with pytest.raises(ValueError, match="holds 2 lattices; expected one lattice per file"):
        read_lattice_file(tmp_path / "two.pt")


def test_stored_one_best_for_empty_lattice(tmp_path, lm):
    from k2quant.decode.lattice import LATTICE_FORMAT

    payload = {"format": LATTICE_FORMAT, "lattice": empty_lattice().as_dict(), "cut_id": "e1",
               "words_txt_sha256": None, "one_best": [W["four"]]}
    torch.save(payload, tmp_path / "e1.pt")
    res = rescore_lattices([tmp_path / "e1.pt"], lm, ID2WORD, [ScaleSetting(1.0)],
                           num_paths=5, progress=False)
    assert res.empty == ["e1"]
    assert res.hyps["lm_scale_1-ngram_scale_0"]["e1"] == ["four"]


def test_cli_end_to_end(lattice_dir, lm_ckpt, tmp_path):
    from click.testing import CliRunner

    from k2quant.bin.cli import cli

    d, words, refs = lattice_dir
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, [
        "rescore", "--lattices", str(d), "--lm", str(lm_ckpt), "--words", str(words),
        "--refs", str(refs), "--num-paths", "30", "--lm-scale", "0,2.0", "--out", str(out),
        "--no-progress",
    ])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "rescored 4 utterances (1 empty lattices)" in r.output
    for f in ("hyps-1best.txt", "hyps-lm_scale_0.txt", "hyps-lm_scale_2.txt", "ref.txt",
              "per_utt-1best.tsv", "per_utt-lm_scale_2.txt".replace(".txt", ".tsv"),
              "errs-lm_scale_2.txt", "wer-summary.txt", "rescore-summary.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "rescore-summary.json").read_text())
    assert s["num_utts"] == 4 and s["num_empty_lattices"] == 1 and s["empty_lattices"] == ["utt3"]
    assert s["utts_per_second"] > 0
    # sizes for the system report: float LM = 4 bytes/param; these lattices have no am-info
    from k2quant.models.transformer_lm import load_lm
    n = sum(p.numel() for p in load_lm(lm_ckpt).parameters())
    assert s["lm_size"] == {"params": n, "packed": False, "bytes": 4 * n}
    assert s["am"] is None
    # 10 reference words; baseline: 3 substitutions + 1 deletion (empty utt3)
    assert s["baseline_wer"] == pytest.approx(40.0)
    assert s["wer"]["lm_scale_2"] == pytest.approx(10.0)
    assert s["best_setting"] == "lm_scale_2"
    hyps = (out / "hyps-lm_scale_2.txt").read_text().splitlines()
    assert hyps == ["utt1 one two three", "utt2 one two three", "utt3", "utt4 one two three"]
    per_utt = (out / "per_utt-lm_scale_2.tsv").read_text().splitlines()
    assert per_utt[0].split("\t") == ["utt_id", "ref_words", "errors", "ins", "del", "sub"]
    assert per_utt[3].split("\t") == ["utt3", "1", "1", "0", "1", "0"]

    # a words.txt other than the decoding graph's: clear error naming the lattice file
    other = tmp_path / "words2.txt"
    other.write_text(WORDS_TXT + "extra 15\n")
    r = CliRunner().invoke(cli, ["rescore", "--lattices", str(d), "--lm", str(lm_ckpt),
                                 "--words", str(other), "--out", str(tmp_path / "o2"),
                                 "--no-progress"])
    assert r.exit_code != 0
    assert "utt1.pt: this lattice was decoded with a words.txt whose sha256" in r.output
    r = CliRunner().invoke(cli, ["rescore", "--lattices", str(d), "--lm", str(lm_ckpt),
                                 "--words", str(words), "--out", str(tmp_path / "o3"),
                                 "--lm-scale", "0.5,x"])
    assert r.exit_code != 0 and "--lm-scale: expected comma-separated numbers" in r.output


def test_cli_with_packed_quantized_lm(lattice_dir, lm_ckpt, tmp_path):
    """--lm accepts a packed .k2q file (8-bit LM): same decisions as the float LM here."""
    from click.testing import CliRunner

    from k2quant.bin.cli import cli
    from k2quant.export import save_packed
    from k2quant.models.transformer_lm import load_lm
    from k2quant.plan import LayerConfig, Plan, quantize_

    d, words, refs = lattice_dir
    lm8 = load_lm(lm_ckpt)
    quantize_(lm8, Plan({}, default=LayerConfig(weight_bits=8)))
    save_packed(lm8.eval(), tmp_path / "lm8.k2q")
    out = tmp_path / "out8"
    r = CliRunner().invoke(cli, [
        "rescore", "--lattices", str(d), "--lm", str(tmp_path / "lm8.k2q"), "--words",
        str(words), "--refs", str(refs), "--num-paths", "30", "--lm-scale", "2", "--out",
        str(out), "--no-progress",
    ])
    assert r.exit_code == 0, r.output + repr(r.exception)
    s = json.loads((out / "rescore-summary.json").read_text())
    assert s["wer"]["lm_scale_2"] == pytest.approx(10.0)
    assert s["lm_size"]["packed"] is True
    assert s["lm_size"]["bytes"] == (tmp_path / "lm8.k2q").stat().st_size


def test_bpe_lm_scores_words(tmp_path):
    pytest.importorskip("sentencepiece")
    from k2quant.lm.text import train_bpe
    from k2quant.models.transformer_lm import TransformerLM, TransformerLMConfig

    tok = train_bpe([s.split() for s in counting_text(100, 3).splitlines()], 25)
    torch.manual_seed(0)
    lm = TransformerLM(TransformerLMConfig(vocab_size=len(tok), d_model=16, num_heads=2,
                                           num_layers=1, dim_feedforward=32,
                                           tokenizer=tok.to_dict())).eval()
    seqs = [seq("one", "two", "three"), seq("nine"), ()]
    got = score_word_sequences(lm, seqs, ID2WORD)
    ref = lm.score_sentences(tok.encode([["one", "two", "three"], ["nine"], []]).ids)
    assert torch.equal(got, ref) and bool(torch.isfinite(got).all())


def test_read_refs_text_and_cuts(tmp_path):
    from k2quant.rescore.run import parse_scales, read_refs

    (tmp_path / "text").write_text("u1 one two\nu2\n")
    assert read_refs(tmp_path / "text") == {"u1": ["one", "two"], "u2": []}
    assert parse_scales("0.3, 0.5,0.3", "--lm-scale") == [0.3, 0.5]
    with pytest.raises(ValueError, match="--lm-scale: no value given"):
        parse_scales(" , ", "--lm-scale")
    lhotse = pytest.importorskip("lhotse")
    sup = lhotse.SupervisionSegment
    cuts = lhotse.CutSet.from_cuts([
        lhotse.MonoCut("c1", 0.0, 1.0, 0, supervisions=[sup("s1", "r1", 0.0, 1.0, text="one two")]),
        lhotse.MonoCut("c2", 0.0, 2.0, 0, supervisions=[
            sup("s2", "r2", 0.0, 1.0, text="three"), sup("s3", "r2", 1.0, 1.0, text="four")]),
    ])
    cuts.to_file(tmp_path / "cuts_test.jsonl.gz")
    assert read_refs(tmp_path / "cuts_test.jsonl.gz") == {
        "c1": ["one", "two"], "c2-0": ["three"], "c2-1": ["four"]}

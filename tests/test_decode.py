"""HLG compilation, lattice decoding, 1-best and lattice files on a tiny lang (fast)."""
import pytest

k2 = pytest.importorskip("k2")
pytest.importorskip("kaldilm")

import torch  # noqa: E402

from k2quant.decode.graph import (  # noqa: E402
    arpa_to_g,
    check_hlg,
    compile_hlg,
    compile_hlg_from_fsas,
    load_hlg,
)
from k2quant.decode.lattice import (  # noqa: E402
    get_lattice,
    load_lattice,
    load_lattices,
    one_best,
    save_lattices,
    subsample_segments,
)
from k2quant.lang import Lang, prepare_lang  # noqa: E402

from helpers import TINY_ARPA as ARPA  # noqa: E402
from helpers import TINY_LEXICON as LEXICON  # noqa: E402


def _write_lm(tmp_path):
    p = tmp_path / "lm.arpa"
    p.write_text(ARPA)
    return p


LANG_VARIANTS = {
    "chain": dict(topo="chain"),
    "ctc": dict(topo="ctc"),
    # optional silence (with its extra disambiguation symbol) and word-position phones
    "chain-sil-pos": dict(topo="chain", sil_phone="SIL", position_marks=True),
}


@pytest.fixture(scope="module", params=list(LANG_VARIANTS))
def lang_hlg(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"lang_{request.param}")
    lang_dir = prepare_lang(LEXICON, tmp / "lang", **LANG_VARIANTS[request.param])
    HLG = compile_hlg(lang_dir, _write_lm(tmp))
    return Lang(lang_dir), HLG


def pdf_sequence(lang, words, frames_per_phone=3):
    """A frame-level network-column sequence for ``words`` under the lang's topology."""
    phones, n_oov = lang.words_to_phones(words)
    assert n_oov == 0
    ids = [lang.phones[p] for p in phones]
    seq = []
    prev = None
    for p in ids:
        if lang.topo_kind == "chain":
            seq += [2 * p - 1] + [2 * p] * (frames_per_phone - 1)
        else:  # ctc: phone frames, a blank between repeats and (here) after every phone
            if p == prev:
                seq.append(0)
            seq += [p] * (frames_per_phone - 1) + [0]
        prev = p
    return seq


def peaked_log_probs(seq, num_pdfs, peak=8.0):
    logits = torch.zeros(len(seq), num_pdfs)
    logits[torch.arange(len(seq)), torch.tensor(seq)] = peak
    return logits.log_softmax(dim=-1)


def words_of(lang, ids):
    return [lang.words[i] for i in ids]


# ----------------------------------------------------------------------------- graph


def test_hlg_properties(lang_hlg, tmp_path):
    lang, HLG = lang_hlg
    assert HLG.properties & k2.fsa_properties.ARC_SORTED
    labels = HLG.labels
    assert int(labels.max()) < lang.num_pdfs and int(labels.min()) >= -1
    if lang.topo_kind == "chain":
        assert not bool((labels == 0).any()), "chain HLG must never use column 0"
    aux = HLG.aux_labels.values
    assert int(aux.max()) < lang.words["#0"], "word disambiguation symbols left in HLG"
    assert int(HLG.phones.max()) <= lang.num_phones, "phone disambiguation symbols left"
    assert torch.equal(HLG.lm_scores, HLG.scores)
    # saved next to the lang, readable by load_hlg
    saved = load_hlg(lang.lang_dir / "HLG.pt")
    assert torch.equal(saved.arcs.values(), HLG.arcs.values())
    assert (lang.lang_dir / "G.fst.txt").is_file()
    with pytest.raises(ValueError, match=r"network output columns in \[0, 3\)"):
        check_hlg(HLG, 3)


@pytest.mark.parametrize(
    "words", [["A"], ["B"], ["A", "C", "B"], ["C", "A"], ["B", "B", "C"], ["C", "C", "A", "B"]]
)
def test_hlg_accepts_word_sequences(lang_hlg, words):
    lang, HLG = lang_hlg
    seq = pdf_sequence(lang, words)
    lin = k2.linear_fsa(seq)
    # Network columns are ordinary symbols here (CTC blank = 0 too): no epsilon handling.
    out = k2.connect(k2.intersect(lin, HLG, treat_epsilons_specially=False))
    assert out.num_arcs > 0, f"HLG rejects the pdf sequence of {words}"
    best = k2.shortest_path(k2.create_fsa_vec([out]), use_double_scores=True)
    from k2quant.decode.lattice import path_aux_labels

    assert words_of(lang, path_aux_labels(best)[0]) == words


def test_hlg_rejects_non_words(lang_hlg):
    lang, HLG = lang_hlg
    # phone "c" alone is not a word
    seq = pdf_sequence(lang, ["C"])[: len(pdf_sequence(lang, ["C"])) // 2]
    out = k2.connect(k2.intersect(k2.linear_fsa(seq), HLG, treat_epsilons_specially=False))
    assert out.num_arcs == 0


LN10 = 2.302585092994046
LM_ACB = -0.30103 * 4 * LN10  # <s> A, A C, C B, B </s>: all explicit bigrams


def test_lm_scores_in_hlg(lang_hlg):
    """The path score of "A C B" through HLG is its bigram LM log-prob (ln)."""
    lang, HLG = lang_hlg
    if lang.sil_prob > 0:
        pytest.skip("L's optional-silence probabilities add to the graph score")
    seq = pdf_sequence(lang, ["A", "C", "B"])
    out = k2.intersect(k2.linear_fsa(seq), HLG, treat_epsilons_specially=False)
    score = k2.create_fsa_vec([k2.connect(out)]).get_tot_scores(
        use_double_scores=True, log_semiring=False)
    assert float(score) == pytest.approx(LM_ACB, abs=1e-3)


def test_compile_hlg_from_fsas_hand_made(tmp_path):
    """Without k2quant.lang: hand-written chain H, L_disambig and a G from the ARPA."""
    # phones a=1 b=2 c=3 #0=4 #1=5 ; words A=1 B=2 C=3 #0=4 <s>=5 </s>=6
    (tmp_path / "words.txt").write_text("<eps> 0\nA 1\nB 2\nC 3\n#0 4\n<s> 5\n</s> 6\n")
    G = arpa_to_g(_write_lm(tmp_path), tmp_path / "words.txt")
    # L_disambig: loop state 0; A = a b #1, B = a b c, C = c a; #0:#0 self-loop
    arcs = [
        (0, 1, 1, 1), (1, 2, 2, 0), (2, 0, 5, 0),  # A
        (0, 3, 1, 2), (3, 4, 2, 0), (4, 0, 3, 0),  # B
        (0, 5, 3, 3), (5, 0, 1, 0),                # C
        (0, 0, 4, 4),                              # #0:#0
        (0, 6, -1, -1),
    ]
    L = k2.Fsa.from_str(
        "\n".join(f"{a} {b} {c} {d} 0" for a, b, c, d in sorted(arcs)) + "\n6",
        num_aux_labels=1,
    )
    # chain H: phone p -> pdf 2p-1 then (2p)*
    P, lines = 3, []
    for s in range(P + 1):
        for q in range(1, P + 1):
            if s == q:
                lines.append(f"{s} {s} {2 * q} 0 0")
            lines.append(f"{s} {q} {2 * q - 1} {q} 0")
        lines.append(f"{s} {P + 1} -1 -1 0")
    H = k2.arc_sort(k2.Fsa.from_str("\n".join(lines + [str(P + 1)]), num_aux_labels=1))
    HLG = compile_hlg_from_fsas(H, L, G, first_phone_disambig_id=4, first_word_disambig_id=4,
                                num_pdfs=2 * P + 1)
    # "A C B" = phones 1 2 | 3 1 | 1 2 3
    seq = [p for ph in [1, 2, 3, 1, 1, 2, 3] for p in (2 * ph - 1, 2 * ph)]
    nnet = peaked_log_probs(seq, 2 * P + 1).unsqueeze(0)
    lat = get_lattice(nnet, HLG, torch.tensor([[0, 0, len(seq)]], dtype=torch.int32))
    assert one_best(lat) == [[1, 3, 2]]


def test_arpa_to_g_cache(tmp_path):
    (tmp_path / "words.txt").write_text("<eps> 0\nA 1\nB 2\nC 3\n#0 4\n<s> 5\n</s> 6\n")
    arpa = _write_lm(tmp_path)
    cache = tmp_path / "G.fst.txt"
    G1 = arpa_to_g(arpa, tmp_path / "words.txt", cache_path=cache)
    assert cache.is_file() and (tmp_path / "G.fst.json").is_file()
    cache.write_text(cache.read_text())  # unchanged inputs: the cache is used
    G2 = arpa_to_g(arpa, tmp_path / "words.txt", cache_path=cache)
    assert torch.equal(G1.arcs.values(), G2.arcs.values())
    # a changed ARPA invalidates the cache (unigram-only model: different G)
    G3 = arpa_to_g(arpa, tmp_path / "words.txt", cache_path=cache, max_order=1)
    assert G3.num_arcs != G1.num_arcs
    (tmp_path / "bad_words.txt").write_text("<eps> 0\nA 1\n")
    with pytest.raises(ValueError, match=r"lacks \['#0', '<s>', '</s>'\]"):
        arpa_to_g(arpa, tmp_path / "bad_words.txt")


# --------------------------------------------------------------------------- decoding


UTTS = [["A", "C", "B"], ["C", "A"], ["B"]]


def _batch(lang, utts, offsets):
    """Padded (N, T, C) peaked log-probs; utterance i starts at frame offsets[i]."""
    seqs = [pdf_sequence(lang, w) for w in utts]
    T = max(o + len(s) for o, s in zip(offsets, seqs))
    out = torch.full((len(utts), T, lang.num_pdfs), -5.0)
    for i, (o, s) in enumerate(zip(offsets, seqs)):
        out[i, o:o + len(s)] = peaked_log_probs(s, lang.num_pdfs)
    return out, seqs


def test_decode_sf1(lang_hlg):
    lang, HLG = lang_hlg
    nnet, seqs = _batch(lang, UTTS, offsets=[0, 2, 0])
    # rows need not be sorted for decoding; lattice order = row order
    segments = torch.tensor([[1, 2, len(seqs[1])], [0, 0, len(seqs[0])], [2, 0, len(seqs[2])]],
                            dtype=torch.int32)
    lat = get_lattice(nnet, HLG, segments)
    assert lat.shape[0] == 3
    hyps = [words_of(lang, h) for h in one_best(lat)]
    assert hyps == [UTTS[1], UTTS[0], UTTS[2]]


def test_decode_sf3(lang_hlg):
    """Segments in input frames, divided by 3; the longest one overruns T by one output frame
    after rounding up, which allow_truncate = sf - 1 absorbs."""
    lang, HLG = lang_hlg
    nnet, seqs = _batch(lang, UTTS, offsets=[0, 0, 0])
    T = nnet.shape[1]
    num_in = [3 * len(s) + 2 for s in seqs]  # input frames; // 3 gives the output length
    num_in[0] = 3 * T + 3  # ceil-style rounding: one output frame past the end
    segments = torch.tensor([[i, 0, n] for i, n in enumerate(num_in)], dtype=torch.int32)
    sub = subsample_segments(segments, 3)
    assert sub[:, 2].tolist() == [T + 1, len(seqs[1]), len(seqs[2])]
    lat = get_lattice(nnet, HLG, sub, subsampling_factor=3)
    assert [words_of(lang, h) for h in one_best(lat)] == UTTS
    with pytest.raises(ValueError, match="end after the network output"):
        get_lattice(nnet, HLG, sub, subsampling_factor=1)


def test_lattice_am_lm_split(lang_hlg):
    """Along the best path, lm_scores sum to the graph score and am_scores = scores -
    lm_scores to the network log-probs of the frames."""
    lang, HLG = lang_hlg
    words = ["A", "C", "B"]
    seq = pdf_sequence(lang, words)
    logp = peaked_log_probs(seq, lang.num_pdfs)
    lat = get_lattice(logp.unsqueeze(0), HLG, torch.tensor([[0, 0, len(seq)]], dtype=torch.int32))
    from k2quant.decode.lattice import best_paths

    best = best_paths(lat)
    assert [words_of(lang, h) for h in one_best(lat)] == [words]
    am = float((best.scores - best.lm_scores).sum())
    assert am == pytest.approx(float(logp[torch.arange(len(seq)), torch.tensor(seq)].sum()),
                               abs=1e-4)
    if lang.sil_prob == 0:
        assert float(best.lm_scores.sum()) == pytest.approx(LM_ACB, abs=1e-3)


def test_empty_lattice_gives_empty_hyp(lang_hlg):
    """One frame cannot hold a word (each has >= 2 phones): empty lattice, empty hypothesis."""
    lang, HLG = lang_hlg
    nnet, seqs = _batch(lang, [["B"]], offsets=[0])
    segments = torch.tensor([[0, 0, 1], [0, 0, len(seqs[0])]], dtype=torch.int32)
    lat = get_lattice(nnet, HLG, segments)
    assert lat.shape[0] == 2
    assert [words_of(lang, h) for h in one_best(lat)] == [[], ["B"]]


def test_empty_lattice_save_load(lang_hlg, tmp_path):
    """An empty lattice after a non-empty one in the batch is saved and read back empty."""
    lang, HLG = lang_hlg
    nnet, seqs = _batch(lang, [["B"]], offsets=[0])
    segments = torch.tensor([[0, 0, len(seqs[0])], [0, 0, 1]], dtype=torch.int32)
    lat = get_lattice(nnet, HLG, segments)
    assert [words_of(lang, h) for h in one_best(lat)] == [["B"], []]
    paths = save_lattices(lat, ["full", "empty"], tmp_path, words_txt=lang.lang_dir / "words.txt")
    full, _ = load_lattice(paths[0])
    empty, meta = load_lattice(paths[1])
    assert meta["cut_id"] == "empty"
    assert one_best(k2.create_fsa_vec([empty])) == [[]]
    assert [words_of(lang, h) for h in one_best(k2.create_fsa_vec([full]))] == [["B"]]


def test_get_lattice_errors(lang_hlg):
    lang, HLG = lang_hlg
    nnet = torch.zeros(1, 5, lang.num_pdfs).log_softmax(-1)
    with pytest.raises(ValueError, match="int32 CPU tensor"):
        get_lattice(nnet, HLG, torch.tensor([[0, 0, 5]]))
    with pytest.raises(ValueError, match=r"seq_idx must be in \[0, 1\)"):
        get_lattice(nnet, HLG, torch.tensor([[1, 0, 5]], dtype=torch.int32))
    with pytest.raises(ValueError, match="nnet_output has only 2 columns"):
        get_lattice(nnet[..., :2], HLG, torch.tensor([[0, 0, 5]], dtype=torch.int32))
    with pytest.raises(ValueError, match="3-D tensor"):
        get_lattice(nnet[0], HLG, torch.tensor([[0, 0, 5]], dtype=torch.int32))


# ------------------------------------------------------------------------ lattice files


def test_lattice_save_load_roundtrip(lang_hlg, tmp_path):
    lang, HLG = lang_hlg
    nnet, seqs = _batch(lang, UTTS, offsets=[0, 0, 0])
    segments = torch.tensor([[i, 0, len(s)] for i, s in enumerate(seqs)], dtype=torch.int32)
    lat = get_lattice(nnet, HLG, segments, output_beam=20)
    ids = ["utt-a", "utt-b", "utt-c"]
    paths = save_lattices(lat, ids, tmp_path / "lats", words_txt=lang.lang_dir / "words.txt",
                          subsampling_factor=1, supervision_segments=segments,
                          extra_meta={"model": "peaked"})
    assert [p.name for p in paths] == ["utt-a.pt", "utt-b.pt", "utt-c.pt"]

    for i, p in enumerate(paths):
        lat_i, meta = load_lattice(p)
        ref = lat[i]
        assert meta["cut_id"] == ids[i] and meta["model"] == "peaked"
        assert meta["num_frames"] == len(seqs[i]) and meta["start_frame"] == 0
        assert meta["subsampling_factor"] == 1 and len(meta["words_txt_sha256"]) == 64
        assert set(meta["score_attributes"]) == {"scores", "lm_scores", "am_scores"}
        assert torch.equal(lat_i.arcs.values(), ref.arcs.values())
        assert torch.equal(lat_i.scores, ref.scores)
        assert lat_i.aux_labels.tolist() == ref.aux_labels.tolist()
        assert torch.equal(lat_i.lm_scores, ref.lm_scores)
        assert torch.equal(lat_i.phones, ref.phones)
        assert torch.allclose(lat_i.am_scores + lat_i.lm_scores, lat_i.scores)
        # the file is a plain dict: Fsa.from_dict works without k2quant
        raw = torch.load(p)
        assert torch.equal(k2.Fsa.from_dict(raw["lattice"]).scores, ref.scores)

    vec, metas = load_lattices(paths)
    assert [m["cut_id"] for m in metas] == ids
    assert one_best(vec) == one_best(lat)
    assert [words_of(lang, h) for h in one_best(vec)] == UTTS

    with pytest.raises(ValueError, match="words.txt with sha256"):
        load_lattice(paths[0], words_txt_sha256="0" * 64)
    with pytest.raises(ValueError, match="got 2 cut ids for 3 lattices"):
        save_lattices(lat, ids[:2], tmp_path / "x")
    with pytest.raises(ValueError, match="cannot be used as a file name"):
        save_lattices(lat, ["a", "b/c", "d"], tmp_path / "x")
    torch.save({"arcs": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a k2quant lattice file"):
        load_lattice(tmp_path / "junk.pt")


def test_compile_hlg_cli(tmp_path):
    from click.testing import CliRunner

    from k2quant.bin.cli import cli

    lang_dir = prepare_lang(LEXICON, tmp_path / "lang", topo="chain")
    arpa = _write_lm(tmp_path)
    args = ["compile-hlg", "--lang-dir", str(lang_dir), "--lm", str(arpa)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (lang_dir / "HLG.pt").is_file()
    HLG = load_hlg(lang_dir / "HLG.pt")
    check_hlg(HLG, Lang(lang_dir).num_pdfs)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "skipped" in res.output
    res = CliRunner().invoke(cli, ["compile-hlg", "--lang-dir", str(tmp_path), "--lm", str(arpa)])
    assert res.exit_code != 0 and "lang.json" in res.output


@pytest.mark.parametrize("topo", ["chain", "ctc"])
def test_end_to_end_with_trained_lm(tmp_path, topo):
    """prepare_lang -> train_ngram (trigram KN) -> compile_hlg -> get_lattice -> one_best -> WER."""
    from k2quant.lm.ngram import train_ngram
    from k2quant.scoring import compute_wer

    lang_dir = prepare_lang(LEXICON, tmp_path / "lang", topo=topo)
    lang = Lang(lang_dir)
    arpa = train_ngram([u for u in UTTS for _ in range(3)] + [["A", "B"]], 3, tmp_path / "lm.arpa",
                       vocab=[w for w, _ in LEXICON])
    compile_hlg(lang_dir, arpa, lm_order=3)
    HLG = load_hlg(lang_dir / "HLG.pt")
    nnet, seqs = _batch(lang, UTTS, offsets=[0, 0, 0])
    segments = torch.tensor([[i, 0, len(s)] for i, s in enumerate(seqs)], dtype=torch.int32)
    hyps = one_best(get_lattice(nnet, HLG, segments))
    refs = {f"u{i}": w for i, w in enumerate(UTTS)}
    result = compute_wer(refs, {f"u{i}": words_of(lang, h) for i, h in enumerate(hyps)})
    assert result.errors == 0 and result.wer_percent == 0.0


def _unigram_arpa(logprobs):
    lines = ["\\data\\", f"ngram 1={len(logprobs) + 2}", "", "\\1-grams:",
             "-1.0 </s>", "-99 <s>"]
    lines += [f"{lp} {w}" for w, lp in logprobs.items()]
    return "\n".join(lines + ["", "\\end\\", ""])


@pytest.mark.parametrize("favoured", ["A", "D"])
def test_lm_decides_between_homophones(tmp_path, favoured):
    """"A" and "D" sound the same (lexicon disambiguation #1/#2 keep L o G determinizable);
    identical acoustics, so the LM alone picks the word."""
    lex = LEXICON + [("D", ["a", "b"])]
    lang_dir = prepare_lang(lex, tmp_path / "lang", topo="chain", sil_phone="SIL")
    lang = Lang(lang_dir)
    probs = {"A": -1.0, "B": -1.0, "C": -1.0, "D": -1.0}
    probs[favoured] = -0.3
    (tmp_path / "lm.arpa").write_text(_unigram_arpa(probs))
    HLG = compile_hlg(lang_dir, tmp_path / "lm.arpa")
    seq = pdf_sequence(lang, ["A", "C"])
    nnet = peaked_log_probs(seq, lang.num_pdfs).unsqueeze(0)
    lat = get_lattice(nnet, HLG, torch.tensor([[0, 0, len(seq)]], dtype=torch.int32))
    assert [words_of(lang, h) for h in one_best(lat)] == [[favoured, "C"]]

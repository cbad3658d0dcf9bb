"""Rescoring lattices produced by the decode module (HLG with ragged word labels, phones,
lm_scores) end to end: tiny lang + bigram HLG, soft synthetic network output."""
import pytest

k2 = pytest.importorskip("k2")
pytest.importorskip("kaldilm")

import torch  # noqa: E402

from k2quant.decode.graph import compile_hlg, file_sha256  # noqa: E402
from k2quant.decode.lattice import get_lattice, one_best, save_lattices  # noqa: E402
from k2quant.lang import Lang, prepare_lang  # noqa: E402
from k2quant.rescore.nbest import (  # noqa: E402
    ScaleSetting,
    get_nbest,
    list_lattice_files,
    read_lattice_file,
    rescore_lattices,
)

from helpers import TINY_ARPA as ARPA  # noqa: E402
from helpers import TINY_LEXICON as LEXICON  # noqa: E402

UTTS = [["A", "C", "B"], ["C", "A"], ["B", "B", "C"]]


def pdf_sequence(lang, words, frames_per_phone=3):
    phones, _ = lang.words_to_phones(words)
    seq = []
    for p in (lang.phones[q] for q in phones):
        seq += [2 * p - 1] + [2 * p] * (frames_per_phone - 1)
    return seq


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dec")
    lang_dir = prepare_lang(LEXICON, tmp / "lang", topo="chain")
    (tmp / "lm.arpa").write_text(ARPA)
    HLG = compile_hlg(lang_dir, tmp / "lm.arpa")
    lang = Lang(lang_dir)
    seqs = [pdf_sequence(lang, w) for w in UTTS]
    T = max(len(s) for s in seqs)
    torch.manual_seed(0)
    x = torch.randn(len(UTTS), T, lang.num_pdfs)
    for i, s in enumerate(seqs):
        x[i, torch.arange(len(s)), torch.tensor(s)] += 3.0  # soft peaks: rich lattices
    nnet = x.log_softmax(-1)
    segments = torch.tensor([[i, 0, len(s)] for i, s in enumerate(seqs)], dtype=torch.int32)
    lat = get_lattice(nnet, HLG, segments, output_beam=10)
    words_txt = lang.lang_dir / "words.txt"
    save_lattices(lat, ["u1", "u2", "u3"], tmp / "lats", words_txt=words_txt)
    # one frame cannot hold a word: an empty lattice (decoded alone: k2 cannot index an
    # empty FSA that follows a non-empty one in an FsaVec with ragged attributes)
    empty = get_lattice(nnet[:1], HLG, torch.tensor([[0, 0, 1]], dtype=torch.int32))
    save_lattices(empty, ["u4"], tmp / "lats", words_txt=words_txt)
    return lang, lat, tmp / "lats", words_txt, empty


@pytest.fixture(scope="module")
def abc_lm(tmp_path_factory):
    from k2quant.lm.text import build_vocab
    from k2quant.models.transformer_lm import TransformerLM, TransformerLMConfig

    tok = build_vocab([["A", "B", "C"]])
    torch.manual_seed(0)
    return TransformerLM(TransformerLMConfig(vocab_size=len(tok), d_model=16, num_heads=2,
                                             num_layers=1, dim_feedforward=32,
                                             tokenizer=tok.to_dict())).eval()


def test_nbest_of_decoded_lattices(decoded):
    lang, lat, lat_dir, words_txt, _ = decoded
    files = list_lattice_files(lat_dir)
    fsas = [read_lattice_file(f, words_txt_sha256=file_sha256(words_txt))[0] for f in files]
    assert not hasattr(fsas[0], "phones")
    vec = k2.create_fsa_vec(fsas)
    torch.manual_seed(0)
    nb = get_nbest(vec, num_paths=50)
    assert nb[3] == []
    assert get_nbest(decoded[4], num_paths=5) == [[]]  # in-memory lattice too
    best = one_best(lat)
    paths = k2.shortest_path(lat, use_double_scores=True)
    for i in range(3):
        assert len(nb[i]) >= 2, "soft network output should give several word sequences"
        c = nb[i][0]
        assert list(c.word_ids) == best[i]
        p = paths[i]
        assert c.am_score == pytest.approx(float((p.scores - p.lm_scores).double().sum()), abs=1e-3)
        assert c.ngram_score == pytest.approx(float(p.lm_scores.double().sum()), abs=1e-3)
        # every candidate's total is at most the best path's total
        assert all(x.am_score + x.ngram_score <= c.am_score + c.ngram_score + 1e-4 for x in nb[i])
        assert len(set(x.word_ids for x in nb[i])) == len(nb[i])


def test_rescore_decoded_lattices(decoded, abc_lm):
    lang, lat, lat_dir, words_txt, _ = decoded
    from k2quant.rescore.run import read_words_txt

    id2word = read_words_txt(words_txt)
    torch.manual_seed(0)
    res = rescore_lattices(list_lattice_files(lat_dir), abc_lm, id2word,
                           [ScaleSetting(0.0, 1.0), ScaleSetting(0.7, 1.0)], num_paths=20,
                           words_txt_sha256=file_sha256(words_txt), progress=False)
    base = [[id2word[i] for i in h] for h in one_best(lat)][:3]
    assert [res.baseline[u] for u in ("u1", "u2", "u3")] == base
    assert [res.hyps["lm_scale_0-ngram_scale_1"][u] for u in ("u1", "u2", "u3")] == base
    assert res.empty == ["u4"] and res.hyps["lm_scale_0.7-ngram_scale_1"]["u4"] == []
    assert res.lm_stats.num_oov == 0
    for h in res.hyps["lm_scale_0.7-ngram_scale_1"].values():
        assert set(h) <= {"A", "B", "C"}

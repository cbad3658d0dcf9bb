"""N-gram estimation: normalisation, ARPA validity (kaldilm), perplexity sanity, CLI."""
import math
import random

import pytest

from k2quant.lm.ngram import ArpaLM, train_ngram

WORDS = "the cat dog sat ran on a mat fast slowly".split()


def _corpus(n=120, seed=0):
    """Sentences from a small grammar (so word order carries information)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = ["the", rng.choice(["cat", "dog"]), rng.choice(["sat", "ran"])]
        if rng.random() < 0.6:
            s += ["on", rng.choice(["a", "the"]), "mat"]
        if rng.random() < 0.3:
            s.append(rng.choice(["fast", "slowly"]))
        out.append(s)
    return out


def _check_normalised(lm, histories, tol=1e-6):
    vocab = [w for w in lm.vocab if w != "<s>"]
    for h in histories:
        tot = sum(math.exp(lm.logprob(w, h)) for w in vocab)
        assert abs(tot - 1.0) < tol, (h, tot)


HISTORIES = [(), ("<s>",), ("the",), ("<s>", "the"), ("the", "cat"), ("cat", "sat"),
             ("mat",), ("zebra",), ("on", "zebra"), ("zebra", "the"), ("fast", "fast", "mat")]


@pytest.mark.parametrize("method", ["kneser_ney", "witten_bell"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_normalisation(tmp_path, method, order):
    arpa = train_ngram(_corpus(), order, tmp_path / "lm.arpa", method=method,
                       vocab=WORDS + ["zebra"])
    lm = ArpaLM(arpa)
    assert lm.order == order
    assert "zebra" in lm.vocab and "<UNK>" in lm.vocab and "</s>" in lm.vocab
    _check_normalised(lm, HISTORIES)
    assert lm.logprob("zebra", ("the",)) > -math.inf  # unseen vocabulary word has mass


@pytest.mark.parametrize("method", ["kneser_ney", "witten_bell"])
def test_tiny_data_and_singletons(tmp_path, method):
    # one sentence, all counts 1: the count-of-counts give no valid modified-KN discounts
    arpa = train_ngram([["a"]], 3, tmp_path / "a.arpa", method=method)
    lm = ArpaLM(arpa)
    _check_normalised(lm, [(), ("<s>",), ("a",), ("<s>", "a")])
    assert lm.logprob("a", ("<s>",)) > lm.logprob("</s>", ("<s>",))
    # higher order than the data support -> lowered with a warning, still valid
    arpa = train_ngram([["a"], ["b"]], 5, tmp_path / "b.arpa", method=method)
    lm = ArpaLM(arpa)
    assert lm.order == 3
    _check_normalised(lm, [("<s>",), ("a",), ("<s>", "b")])


def test_kn_continuation_counts(tmp_path):
    # "francisco" is frequent but only after "san": KN gives it a small unigram (continuation)
    # probability compared with a word seen as often in many contexts.
    sents = [["san", "francisco"]] * 10 + [[w, "glasses"] for w in "a b c d e f g h i j".split()]
    lm = ArpaLM(train_ngram(sents, 2, tmp_path / "kn.arpa"))
    assert lm.logprob("glasses", ("zzz",)) > lm.logprob("francisco", ("zzz",)) + 1.0
    assert lm.logprob("francisco", ("san",)) > math.log(0.8)


def test_vocab_maps_oov_to_unk(tmp_path, caplog):
    arpa = train_ngram([["a", "x", "b"]], 2, tmp_path / "v.arpa", vocab=["a", "b"])
    lm = ArpaLM(arpa)
    assert "x" not in lm.vocab and ("a", "<UNK>") in lm.prob
    with pytest.raises(ValueError, match="not in the vocabulary"):
        train_ngram([["a", "x"]], 2, tmp_path / "w.arpa", vocab=["a"], unk=None)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        train_ngram([["a"]], 0, tmp_path / "x.arpa")
    with pytest.raises(ValueError, match="method must be one of"):
        train_ngram([["a"]], 2, tmp_path / "x.arpa", method="good_turing")
    with pytest.raises(ValueError, match="without <s>"):
        train_ngram([["<s>", "a"]], 2, tmp_path / "x.arpa")
    with pytest.raises(ValueError, match="no training sentences"):
        train_ngram([], 2, tmp_path / "x.arpa")


def test_perplexity_ordering(tmp_path):
    train = _corpus(200, seed=1)
    test = _corpus(50, seed=2)
    rng = random.Random(3)
    shuffled = [rng.sample(s, len(s)) for s in test]
    for method in ("kneser_ney", "witten_bell"):
        lm = ArpaLM(train_ngram(train, 3, tmp_path / f"{method}.arpa", method=method))
        ppl, ppl_shuf = lm.perplexity(test), lm.perplexity(shuffled)
        assert ppl < 0.5 * ppl_shuf, (method, ppl, ppl_shuf)
        # a trigram beats a unigram on structured text
        uni = ArpaLM(train_ngram(train, 1, tmp_path / "uni.arpa", method=method))
        assert ppl < uni.perplexity(test)


def test_arpa_readable_by_kaldilm(tmp_path):
    kaldilm = pytest.importorskip("kaldilm")
    arpa = train_ngram(_corpus(), 2, tmp_path / "lm.arpa", vocab=WORDS)
    lm = ArpaLM(arpa)
    words = ["<eps>"] + sorted(WORDS + ["<UNK>"]) + ["#0", "<s>", "</s>"]
    (tmp_path / "words.txt").write_text("".join(f"{w} {i}\n" for i, w in enumerate(words)))
    wid = {w: i for i, w in enumerate(words)}
    text = kaldilm.arpa2fst(str(arpa), disambig_symbol="#0",
                            read_symbol_table=str(tmp_path / "words.txt"))
    lines = [ln.split() for ln in text.strip().splitlines()]
    arcs = [ln for ln in lines if len(ln) >= 4]
    start = arcs[0][0]  # OpenFst text: the first line's source is the start state (<s> history)
    labels = {int(a[2]) for a in arcs}
    assert {wid[w] for w in WORDS + ["<UNK>"]} <= labels and wid["#0"] in labels
    # arc weight (-ln p) of a seen bigram from the start state matches the ARPA probability
    (cost,) = [float(a[4]) for a in arcs if a[0] == start and int(a[2]) == wid["the"]]
    assert cost == pytest.approx(-lm.logprob("the", ("<s>",)), abs=1e-4)
    finals = [ln for ln in lines if len(ln) <= 2]
    assert finals, "no final state: </s> was lost"


def test_cli(tmp_path):
    from click.testing import CliRunner

    from k2quant.bin.train_ngram import main

    text = tmp_path / "text"
    text.write_text("".join(f"utt{i} {' '.join(s)}\n" for i, s in enumerate(_corpus(30))))
    vocab = tmp_path / "words.txt"
    vocab.write_text("<eps> 0\n" + "".join(f"{w} {i + 1}\n" for i, w in enumerate(WORDS)))
    out = tmp_path / "lm.arpa"
    res = CliRunner().invoke(main, ["--text", str(text), "--order", "3", "--out", str(out),
                                    "--skip-first-field", "--vocab", str(vocab)])
    assert res.exit_code == 0, res.output
    lm = ArpaLM(out)
    assert lm.order == 3 and "utt0" not in lm.vocab and "<eps>" not in lm.vocab
    _check_normalised(lm, [("<s>", "the"), ("cat",)])

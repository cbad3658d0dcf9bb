"""N-gram language models estimated in pure Python and written as ARPA files.

Used for (a) the phone n-gram of the LF-MMI denominator graph (``k2quant.training``) and (b) the
word n-gram G of HLG decoding (converted to an FST with ``kaldilm.arpa2fst``).

Models are *interpolated*: for an n-gram ``h w`` of order k

    P_k(w | h) = max(c_k(h w) - D_k(c), 0) / c_k(h .) + gamma_k(h) * P_{k-1}(w | h')

where ``h'`` drops the oldest word of ``h`` and the order-0 distribution is uniform over the
vocabulary (every predicted word: the vocabulary plus ``</s>``, never ``<s>``).

* ``kneser_ney`` (default): interpolated *modified* Kneser-Ney (Chen & Goodman 1998). The top
  order uses raw counts; lower orders use continuation counts N1+(. h w) except for n-grams that
  start with ``<s>`` (which have no left context, so raw counts, as SRILM). Three discounts per
  order D1, D2, D3+ from the count-of-counts; when the data are too small for them to be valid
  (some count-of-count is 0, or a discount falls outside (0, c)) it falls back to a single
  absolute discount D = n1 / (n1 + 2 n2) (or 0.5), clamped into (0, 1).
* ``witten_bell``: interpolated Witten-Bell on raw counts,
  gamma(h) = N1+(h .) / (c(h .) + N1+(h .)).

ARPA output: every n-gram with a non-zero (modified) count is listed with its interpolated
log10 probability; the back-off weight of a history is gamma(h) (exact for interpolated
models), so reading the ARPA file with standard back-off semantics gives exactly P_k and the
distributions sum to 1 for every history (tested). ``<s>`` is listed as a unigram with
log10 probability -99 (it is only a context). ``</s>`` is predicted.

With ``vocab`` given, words outside it map to ``unk`` (``<UNK>``) and every vocabulary word is
listed as a unigram (unseen ones get their share of the uniform order-0 distribution), which
the phone LM of the denominator graph needs (all phones must be possible).
"""
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from k2quant.utils.io import atomic_open

PathLike = Union[str, os.PathLike]
NGram = Tuple[str, ...]

BOS, EOS, UNK = "<s>", "</s>", "<UNK>"
METHODS = ("kneser_ney", "witten_bell")
LOG10_ZERO = -99.0

logger = logging.getLogger(__name__)


def read_sentences(path: PathLike, skip_first_field: bool = False) -> List[List[str]]:
    """Whitespace-tokenised lines of a text file (empty lines skipped).

    ``skip_first_field=True`` drops an utterance id in the first column (Kaldi ``text``).
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            toks = line.split()
            if skip_first_field:
                toks = toks[1:]
            if toks:
                out.append(toks)
    return out


def _discounts(coc: Dict[int, int]) -> Tuple[float, float, float]:
    """Modified-KN discounts (D1, D2, D3+) from count-of-counts ``coc[c]`` (c = 1..4)."""
    n1, n2, n3, n4 = (coc.get(i, 0) for i in (1, 2, 3, 4))
    if n1 > 0 and n2 > 0 and n3 > 0 and n4 > 0:
        y = n1 / (n1 + 2.0 * n2)
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0.0 < di < c for di, c in zip(d, (1, 2, 3))):
            return d
    # small data: one absolute discount
    if n1 > 0 and n2 > 0:
        dd = n1 / (n1 + 2.0 * n2)
    else:
        dd = 0.5
    dd = min(max(dd, 0.05), 0.95)
    return dd, dd, dd


class _Model:
    """Interpolated n-gram model in memory (probabilities in natural floats)."""

    def __init__(self, order: int):
        self.order = order
        # prob[k][ngram] = P_k(w | h) for listed n-grams of order k (1-based)
        self.prob: List[Dict[NGram, float]] = [dict() for _ in range(order + 1)]
        # bow[h] = gamma(h) for listed histories (any order < self.order)
        self.bow: Dict[NGram, float] = {}


def _estimate(
    sentences: List[List[str]], order: int, vocab: List[str], method: str
) -> _Model:
    # raw counts per order
    raw: List[Dict[NGram, int]] = [defaultdict(int) for _ in range(order + 1)]
    for sent in sentences:
        toks = [BOS] + sent + [EOS]
        for i in range(1, len(toks)):  # position of the predicted token
            for k in range(1, order + 1):
                if i - k + 1 < 0:
                    break
                raw[k][tuple(toks[i - k + 1: i + 1])] += 1

    # counts used at each order
    counts: List[Dict[NGram, int]] = [dict() for _ in range(order + 1)]
    counts[order] = dict(raw[order])
    for k in range(1, order):
        if method == "kneser_ney":
            cont: Dict[NGram, int] = defaultdict(int)
            for g in raw[k + 1]:
                cont[g[1:]] += 1
            ck = {}
            for g, c in raw[k].items():
                ck[g] = c if g[0] == BOS else cont.get(g, 0)
            counts[k] = {g: c for g, c in ck.items() if c > 0}
        else:
            counts[k] = dict(raw[k])

    predicted = [w for w in vocab if w != BOS]
    if EOS not in predicted:
        predicted.append(EOS)
    uniform = 1.0 / len(predicted)

    model = _Model(order)

    def lower_prob(k: int, g: NGram) -> float:
        # P_{k-1}(w | h') for n-gram g of order k
        if k == 1:
            return uniform
        h2 = g[1:]
        p = model.prob[k - 1].get(h2)
        if p is not None:
            return p
        return _backoff_prob(model, h2)

    for k in range(1, order + 1):
        ck = counts[k]
        # per-history totals and count-of-count statistics
        tot: Dict[NGram, int] = defaultdict(int)
        nbin: Dict[NGram, List[int]] = defaultdict(lambda: [0, 0, 0])
        coc: Dict[int, int] = defaultdict(int)
        for g, c in ck.items():
            h = g[:-1]
            tot[h] += c
            nbin[h][min(c, 3) - 1] += 1
            if c <= 4:
                coc[c] += 1
        d = _discounts(coc) if method == "kneser_ney" else None
        gammas: Dict[NGram, float] = {}
        for h, t in tot.items():
            n = nbin[h]
            if method == "kneser_ney":
                gammas[h] = (d[0] * n[0] + d[1] * n[1] + d[2] * n[2]) / t
            else:
                types = n[0] + n[1] + n[2]
                gammas[h] = types / (t + types)
        probs = model.prob[k]
        for g, c in ck.items():
            h = g[:-1]
            if method == "kneser_ney":
                disc = d[min(c, 3) - 1]
                main = max(c - disc, 0.0) / tot[h]
            else:
                types = sum(nbin[h])
                main = c / (tot[h] + types)
            probs[g] = main + gammas[h] * lower_prob(k, g)
        if k == 1:
            # unigrams: every predicted vocabulary word is listed
            g1 = gammas.get((), 1.0)
            for w in predicted:
                if (w,) not in probs:
                    probs[(w,)] = g1 * uniform
            probs.pop((BOS,), None)
        for h, gm in gammas.items():
            if h:
                model.bow[h] = gm
    return model


def _backoff_prob(model: _Model, g: NGram) -> float:
    """P(w | h) for g = h + (w,) with standard back-off over the listed n-grams."""
    bow = 1.0
    while True:
        p = model.prob[len(g)].get(g) if len(g) <= model.order else None
        if p is not None:
            return bow * p
        if len(g) == 1:
            return 0.0
        bow *= model.bow.get(g[:-1], 1.0)
        g = g[1:]


def _fmt(x: float) -> str:
    return f"{x:.7f}"


def _log10(p: float) -> float:
    return math.log10(p) if p > 0 else LOG10_ZERO


def train_ngram(
    sentences: Iterable[Sequence[str]],
    order: int,
    out_arpa: PathLike,
    *,
    method: str = "kneser_ney",
    vocab: Optional[Iterable[str]] = None,
    unk: Optional[str] = UNK,
) -> Path:
    """Estimate an interpolated n-gram LM and write it as an ARPA file.

    Args:
      sentences: token sequences (without ``<s>``/``</s>``; those are added).
      order: n-gram order >= 1. If the data have no n-grams of the top orders (e.g. order 4 on
        one-word sentences, which only give ``<s> w </s>``) the order is lowered (warning).
      out_arpa: output path (written atomically).
      method: ``"kneser_ney"`` (interpolated modified KN) or ``"witten_bell"``.
      vocab: optional vocabulary; out-of-vocabulary tokens become ``unk`` (added to the
        vocabulary) and all vocabulary words are listed. Without it the vocabulary is the
        training tokens.
      unk: the unknown-word token; ``None`` (with ``vocab``) makes out-of-vocabulary tokens an
        error instead (e.g. for a phone LM, whose vocabulary is closed).

    Returns:
      ``Path(out_arpa)``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if int(order) != order or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    sents: List[List[str]] = []
    num_oov = 0
    vocab_set = None
    if vocab is not None:
        vocab_set = set(vocab) | ({unk} if unk is not None else set())
        vocab_set.discard(BOS)
        vocab_set.discard(EOS)
    for s in sentences:
        s = list(s)
        for t in s:
            if t in (BOS, EOS):
                raise ValueError(
                    f"sentence contains {t!r}: give sentences without <s>/</s>, they are added"
                )
        if vocab_set is not None:
            if unk is None:
                bad = [t for t in s if t not in vocab_set]
                if bad:
                    raise ValueError(
                        f"token {bad[0]!r} is not in the vocabulary (unk=None); add it to vocab "
                        "or pass unk='<UNK>' to map unknown tokens"
                    )
            mapped = [t if t in vocab_set else unk for t in s]
            num_oov += sum(1 for a, b in zip(s, mapped) if a != b)
            s = mapped
        sents.append(s)
    if not sents:
        raise ValueError("no training sentences: expected at least one sentence")
    if num_oov:
        logger.warning("train_ngram: %d OOV tokens mapped to %s", num_oov, unk)
    words = set(vocab_set) if vocab_set is not None else {t for s in sents for t in s}
    vocab_list = sorted(words) + [EOS]

    model = _estimate(sents, order, vocab_list, method)
    while order > 1 and not model.prob[order]:
        order -= 1
    if order < model.order:
        logger.warning(
            "train_ngram: no n-grams above order %d; writing an order-%d LM", order, order
        )
        model.order = order

    _write_arpa(model, out_arpa)
    return Path(out_arpa)


def _write_arpa(model: _Model, out_arpa: PathLike) -> None:
    order = model.order
    with atomic_open(out_arpa, "w") as f:
        f.write("\n\\data\\\n")
        nums = [len(model.prob[1]) + 1] + [len(model.prob[k]) for k in range(2, order + 1)]
        for k, n in enumerate(nums, 1):
            f.write(f"ngram {k}={n}\n")
        for k in range(1, order + 1):
            f.write(f"\n\\{k}-grams:\n")
            entries = sorted(model.prob[k].items())
            if k == 1:
                entries = [((BOS,), None)] + entries
            for g, p in entries:
                lp = LOG10_ZERO if p is None else _log10(p)
                line = f"{_fmt(lp)}\t{' '.join(g)}"
                if k < order and g[-1] != EOS:
                    bow = model.bow.get(g)
                    if bow is not None:
                        line += f"\t{_fmt(_log10(bow))}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")


class ArpaLM:
    """A back-off LM read from an ARPA file (for tests, perplexity and phone-LM checks).

    ``logprob(word, history)`` is the natural-log P(word | history) with standard back-off;
    ``history`` is a sequence of preceding tokens (``<s>`` first for sentence starts).
    """

    def __init__(self, path: PathLike):
        self.prob: Dict[NGram, float] = {}  # log10
        self.bow: Dict[NGram, float] = {}  # log10
        self.order = 0
        section = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("ngram ") or line == "\\data\\":
                    continue
                if line == "\\end\\":
                    break
                if line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:line.index("-")])
                    self.order = max(self.order, section)
                    continue
                fields = line.split()
                if section == 0 or len(fields) < section + 1:
                    raise ValueError(f"{path}:{lineno}: malformed ARPA line {line!r}")
                g = tuple(fields[1:section + 1])
                self.prob[g] = float(fields[0])
                if len(fields) == section + 2:
                    self.bow[g] = float(fields[-1])
        self.vocab = sorted({g[0] for g in self.prob if len(g) == 1})

    def logprob(self, word: str, history: Sequence[str] = ()) -> float:
        h = tuple(history)[-(self.order - 1):] if self.order > 1 else ()
        bow = 0.0
        while True:
            g = h + (word,)
            lp = self.prob.get(g)
            if lp is not None:
                return (bow + lp) * math.log(10)
            if not h:
                return -math.inf
            bow += self.bow.get(h, 0.0)
            h = h[1:]

    def sentence_logprob(self, sentence: Sequence[str]) -> float:
        """ln P(sentence </s> | <s>)."""
        hist = [BOS]
        tot = 0.0
        for w in list(sentence) + [EOS]:
            tot += self.logprob(w, hist)
            hist.append(w)
        return tot

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> float:
        """exp(-mean ln P) over all predicted tokens (words and ``</s>``)."""
        tot, n = 0.0, 0
        for s in sentences:
            tot += self.sentence_logprob(s)
            n += len(s) + 1
        return math.exp(-tot / max(n, 1))

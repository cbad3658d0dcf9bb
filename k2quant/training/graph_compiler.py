"""LF-MMI graph compiler: the denominator graph (topology o phone n-gram) and numerator graphs.

Graphs (k2 FSAs; ``-1`` only on arcs into the final state):

* ``P`` (phone LM): acceptor over phone ids ``1..P`` built from an ARPA file with
  ``kaldilm.arpa2fst(disambig_symbol="#0")`` (``<s>``/``</s>`` become epsilons); the back-off
  arcs (``#0``) are mapped to epsilon and removed (``k2.remove_epsilon``), then connected and
  arc-sorted. Scores are natural-log probabilities.
* den graph ``= topo o P``: ``labels`` = pdf ids (network columns; ``log_probs[..., label]``),
  ``aux_labels`` = phone ids (0 on arcs that start no phone), scores = phone-LM log-probs.
  Built once and cached (:meth:`MmiGraphCompiler.save_den_graph` / ``den_graph=path``).
* num graph for a transcript ``= topo o P o T``: ``T`` is the phone acceptor of the transcript
  (``L^-1`` applied to the word sequence, so pronunciation alternates and optional silence stay
  as alternatives). By default the lexicon weights (silence probability) are dropped and ``T``
  is determinized, so every numerator path is a denominator path with the same score
  (num "is a subset of" den, hence ``num_tot <= den_tot`` and the loss is >= 0). Same
  labels/aux as the den graph.

As icefall's ``MmiTrainingGraphCompiler`` but for phones and the chain (or CTC) topology of
:mod:`k2quant.lang`. The phone LM is estimated with :func:`k2quant.lm.ngram.train_ngram` on
phone transcripts (first pronunciation of each word; silence inserted between words with the
lang's ``sil_prob`` by a seeded RNG so the LM has silence statistics); every phone is in its
vocabulary, so any phone sequence has a path in the den graph.
"""
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from k2quant.lang import Lang
from k2quant.lm.ngram import train_ngram
from k2quant.utils.deps import import_k2, optional_import
from k2quant.utils.io import atomic_torch_save, load_trusted

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)


def phone_lm_sentences(
    lang: Lang,
    texts: Iterable[str],
    *,
    sil_prob: Optional[float] = None,
    seed: int = 0,
) -> Tuple[List[List[str]], int]:
    """Phone sequences for the denominator phone LM from word transcripts.

    Each word takes its first pronunciation (OOVs that of the lang's OOV word); with a silence
    phone in the lang, silence is inserted before the first word and after each word with
    probability ``sil_prob`` (default: the lang's) using ``random.Random(seed)``.

    Returns ``(sentences, num_oov_words)``.
    """
    sil = lang.sil_phone
    p = lang.sil_prob if sil_prob is None else sil_prob
    rng = random.Random(seed)
    out, n_oov = [], 0
    for text in texts:
        seq: List[str] = []
        words = text.split()
        if sil is not None and p > 0 and rng.random() < p:
            seq.append(sil)
        for w in words:
            phones, n = lang.words_to_phones([w])
            n_oov += n
            seq.extend(phones)
            if sil is not None and p > 0 and rng.random() < p:
                seq.append(sil)
        if seq:
            out.append(seq)
    return out, n_oov


def arpa_to_phone_fsa(arpa: PathLike, lang: Lang, device=None):
    """Phone-LM acceptor P from an ARPA file (labels = phone ids, epsilon-free, arc-sorted)."""
    k2 = import_k2()
    kaldilm = optional_import("kaldilm")
    text = kaldilm.arpa2fst(
        input_arpa=str(arpa),
        disambig_symbol="#0",
        read_symbol_table=str(lang.lang_dir / "phones.txt"),
    )
    P = k2.Fsa.from_openfst(text, acceptor=False)
    first_disambig = lang.num_phones + 1
    labels = P.labels.clone()
    labels[labels >= first_disambig] = 0
    P.labels = labels
    del P.aux_labels
    P = k2.connect(k2.remove_epsilon(P))
    P = k2.arc_sort(P)
    return P.to(device) if device is not None else P


def compose_topo_P(topo, P):
    """``topo o P``: labels = pdf ids, aux_labels = phone ids; connected and arc-sorted."""
    k2 = import_k2()
    P_loops = k2.arc_sort(k2.add_epsilon_self_loops(P))
    den = k2.compose(topo, P_loops, treat_epsilons_specially=False)
    den = k2.arc_sort(k2.connect(den))
    den.scores.requires_grad_(False)
    return den


class MmiGraphCompiler:
    """Compile LF-MMI numerator graphs and hold the (cached) denominator graph.

    Args:
      lang_dir: a lang dir from :func:`k2quant.lang.prepare_lang`.
      device: device of the graphs.
      den_lm_order: order of the phone n-gram P (2 = bigram, as icefall; Kaldi chain uses 4).
      train_texts: word transcripts to estimate P from (if neither ``den_graph`` nor an existing
        ``phone_lm`` is given).
      phone_lm: ARPA file of P. Used if it exists; otherwise, with ``train_texts``, P is
        estimated and written there.
      den_graph: a file written by :meth:`save_den_graph`; if it exists it is loaded and no LM is
        needed (the caller is responsible for it matching the lang dir).
      oov: word that replaces out-of-vocabulary words (default: the lang's, ``<UNK>``).
      use_lexicon_weights: keep L's optional-silence log-probabilities in the numerator (then the
        transcript FSA is not determinized and num is no longer a subset of den in score).
      sil_prob: silence insertion probability for the phone-LM text (default: the lang's).
      seed: RNG seed of that silence insertion.

    Caution:
      Word transcripts are whitespace-separated words of ``words.txt``; unknown words map to
      ``oov`` (counted in :attr:`num_oov_words` and logged), never an error.
    """

    def __init__(
        self,
        lang_dir: PathLike,
        device: Union[str, torch.device] = "cpu",
        *,
        den_lm_order: int = 2,
        train_texts: Optional[Iterable[str]] = None,
        phone_lm: Optional[PathLike] = None,
        den_graph: Optional[PathLike] = None,
        oov: Optional[str] = None,
        use_lexicon_weights: bool = False,
        sil_prob: Optional[float] = None,
        seed: int = 0,
    ):
        k2 = import_k2()
        self.lang = Lang(lang_dir)
        self.device = torch.device(device)
        self.den_lm_order = den_lm_order
        self.oov = oov or self.lang.oov
        if self.oov not in self.lang.words:
            raise ValueError(
                f"oov word {self.oov!r} is not in {self.lang.lang_dir}/words.txt; "
                f"use the lang's OOV word {self.lang.oov!r}"
            )
        self.use_lexicon_weights = use_lexicon_weights
        self.num_oov_words = 0  # cumulative over compile() calls
        self.last_num_oov_words = 0

        self.topo = self.lang.topo(self.device)
        L = self.lang.L(self.device)
        self.L_inv = k2.arc_sort(L.invert())

        if den_graph is not None and Path(den_graph).is_file():
            self.den_graph = self.load_den_graph(den_graph, self.device)
            logger.info("loaded den graph from %s (%d arcs)", den_graph, self.den_graph.num_arcs)
        else:
            P = self._build_P(phone_lm, train_texts, sil_prob, seed)
            self.den_graph = compose_topo_P(self.topo, P)
            logger.info(
                "den graph: topo=%s, %d-gram phone LM, %d states, %d arcs",
                self.lang.topo_kind, den_lm_order, int(self.den_graph.shape[0]),
                self.den_graph.num_arcs,
            )
            if den_graph is not None:
                self.save_den_graph(den_graph)
        self._den_vec = k2.create_fsa_vec([self.den_graph])

    # ------------------------------------------------------------------ den graph
    def _build_P(self, phone_lm, train_texts, sil_prob, seed):
        if phone_lm is not None and Path(phone_lm).is_file():
            return arpa_to_phone_fsa(phone_lm, self.lang, self.device)
        if train_texts is None:
            raise ValueError(
                "MmiGraphCompiler needs a denominator phone LM: pass den_graph=<saved den graph>, "
                "phone_lm=<existing ARPA>, or train_texts=<word transcripts> to estimate one "
                f"(got den_graph/phone_lm that do not exist: {phone_lm!r})"
            )
        sents, n_oov = phone_lm_sentences(self.lang, train_texts, sil_prob=sil_prob, seed=seed)
        if not sents:
            raise ValueError("train_texts gave no phone sequences: expected non-empty transcripts")
        if n_oov:
            logger.warning("phone LM text: %d OOV words mapped to %s", n_oov, self.lang.oov)
        vocab = self.lang.phones.symbols[1:self.lang.num_phones + 1]
        if phone_lm is not None:
            arpa = train_ngram(sents, self.den_lm_order, phone_lm, vocab=vocab, unk=None)
            return arpa_to_phone_fsa(arpa, self.lang, self.device)
        with tempfile.TemporaryDirectory(prefix="k2quant-P-") as tmp:
            arpa = train_ngram(
                sents, self.den_lm_order, Path(tmp) / "P.arpa", vocab=vocab, unk=None
            )
            return arpa_to_phone_fsa(arpa, self.lang, self.device)

    def save_den_graph(self, path: PathLike) -> None:
        """``torch.save(den_graph.as_dict())`` (atomic)."""
        atomic_torch_save(self.den_graph.as_dict(), path)

    @staticmethod
    def load_den_graph(path: PathLike, device=None):
        k2 = import_k2()
        den = k2.Fsa.from_dict(load_trusted(path))
        den = den.to(device) if device is not None else den
        den.scores.requires_grad_(False)
        return den

    # ------------------------------------------------------------------ numerator
    def texts_to_word_ids(self, texts: Sequence[str]) -> List[List[int]]:
        """Word ids per transcript; OOVs -> ``oov`` (counted and logged)."""
        out, n_oov = [], 0
        for t in texts:
            ids, n = self.lang.words_to_ids(t.split(), self.oov)
            out.append(ids)
            n_oov += n
        self.last_num_oov_words = n_oov
        self.num_oov_words += n_oov
        if n_oov:
            logger.warning(
                "%d OOV word(s) in %d transcripts mapped to %s (total so far: %d)",
                n_oov, len(texts), self.oov, self.num_oov_words,
            )
        return out

    def transcript_fsas(self, texts: Sequence[str]):
        """Phone acceptors of the transcripts (FsaVec; labels = phone ids, epsilon-free)."""
        k2 = import_k2()
        word_ids = self.texts_to_word_ids(texts)
        words = k2.arc_sort(k2.add_epsilon_self_loops(k2.linear_fsa(word_ids, self.device)))
        # labels = words, aux_labels = phones -> invert: labels = phones
        fsa = k2.intersect(self.L_inv, words, treat_epsilons_specially=False).invert_()
        del fsa.aux_labels
        if not self.use_lexicon_weights:
            fsa.scores = torch.zeros_like(fsa.scores)
        fsa = k2.connect(k2.remove_epsilon(fsa))
        if not self.use_lexicon_weights:
            # One FSA at a time: k2 1.23.4's determinize crashes on non-trivial FsaVecs; it
            # is also CPU-only. All scores are 0, so this only merges duplicate phone paths.
            dev = fsa.device
            fsa = fsa.to("cpu")
            fsa = k2.create_fsa_vec(
                [k2.determinize(k2.arc_sort(fsa[i])) for i in range(fsa.shape[0])]
            ).to(dev)
        return k2.arc_sort(fsa)

    def compile_num(self, texts: Sequence[str]):
        """Numerator graphs (FsaVec, one per text): ``topo o P o transcript``."""
        k2 = import_k2()
        trans = k2.arc_sort(k2.add_epsilon_self_loops(self.transcript_fsas(texts)))
        num = k2.compose(self.den_graph, trans, treat_epsilons_specially=False)
        num = k2.arc_sort(k2.connect(num))
        return num

    def den_graphs(self, n: int):
        """The den graph replicated ``n`` times (FsaVec)."""
        k2 = import_k2()
        idx = torch.zeros(n, dtype=torch.int32, device=self.device)
        return k2.index_fsa(self._den_vec, idx)

    def compile(self, texts: Sequence[str], replicate_den: bool = True):
        """``(num_graphs, den_graphs)`` for ``texts``.

        Returns:
          num_graphs: FsaVec with ``len(texts)`` graphs (labels = pdf ids, aux = phone ids).
          den_graphs: the den graph replicated ``len(texts)`` times, or an FsaVec holding it
            once if ``replicate_den=False`` (for ``k2.intersect_dense_pruned``).
        """
        num = self.compile_num(texts)
        den = self.den_graphs(len(texts)) if replicate_den else self._den_vec
        return num, den

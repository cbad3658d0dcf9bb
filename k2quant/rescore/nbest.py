"""N-best rescoring of k2 lattices with a neural LM (``k2quant rescore``).

For each lattice (an acceptor over network columns whose ``aux_labels`` are word ids, see
:mod:`k2quant.decode.lattice`):

1. **N-best** (:func:`get_nbest`), as icefall's ``Nbest.from_lattice`` + ``Nbest.intersect``:
   ``num_paths`` paths are sampled with ``k2.random_paths`` from the lattice whose scores are
   multiplied by ``nbest_scale`` (< 1 flattens the distribution: more distinct paths); their
   word sequences (``aux_labels`` without 0/-1) are made unique, and the lattice's own 1-best
   word sequence is always added first (so the baseline is always a candidate). The list is
   therefore *sampled*, not an exact n-best: it holds at most ``num_paths + 1`` distinct word
   sequences. Each word sequence is then intersected with the lattice (epsilon self-loops on
   the linear word FSA, ``k2.intersect_device`` against the inverted, arc-sorted lattice) and
   the best alignment of that word sequence is kept: its ``am_scores`` and ``lm_scores``
   (the graph/n-gram part) summed along the path give the candidate's acoustic and n-gram
   scores. This is exact for the word sequence (the max over all its alignments in the
   lattice), not the scores of the particular sampled path.
2. **LM scores** (:func:`score_word_sequences`): all distinct candidates of a batch of
   lattices are scored *once* by the LM; words are mapped to LM tokens with the LM's own
   tokenizer (word vocabulary or BPE); words unknown to the LM become ``<unk>`` (counted);
   ``skip_words`` (silence fillers such as ``<sil>``) are removed before scoring only.
3. **Combination** (:func:`pick_best`), for every (lm_scale, ngram_scale) pair, without
   re-scoring::

       total = am + ngram_scale * ngram + lm_scale * lm_nn + wip * num_words

   and the candidate with the highest total is the hypothesis (ties: the earlier candidate,
   i.e. the lattice 1-best first). With ``lm_scale = ngram_scale = 0`` and ``wip = 0`` this is
   the best acoustic score in the list; with ``ngram_scale = 1, lm_scale = 0`` it is the
   lattice 1-best.

Lattice scores. Our lattice files carry ``am_scores`` and ``lm_scores`` (graph part). Files
with only ``lm_scores`` get ``am_scores = scores - lm_scores``; files with neither are taken
as purely acoustic (``am_scores = scores``, ``lm_scores = 0``; warned).

Empty lattices (no arcs, or no successful path) produce no candidates: the utterance keeps the
1-best stored in the lattice file under ``one_best`` (a list of words or word ids), if any, or
an empty hypothesis; they are listed in :attr:`RescoreResult.empty` and counted in the summary.

**Lattices from any icefall decode script.** Save one lattice per utterance with
``torch.save(lattice[i].as_dict(), f"{out_dir}/{cut_id}.pt")`` (``lattice`` being the FsaVec
returned by ``get_lattice``; keep ``lm_scores``, which icefall's HLG already has) and keep the
``words.txt`` the HLG was built with. ``k2quant rescore --lattices out_dir --words words.txt``
accepts such bare ``as_dict()`` files: the utterance id is the file name without ``.pt``;
with no metadata there is no sha256 check of ``words.txt`` (a warning says so), so passing
the wrong ``words.txt`` silently gives wrong words. Files written by
:func:`k2quant.decode.lattice.save_lattices` carry the sha256 of their ``words.txt``; a
mismatch with ``--words`` is an error naming the file.

k2 is imported lazily (:func:`k2quant.utils.deps.import_k2`).
"""
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from k2quant.decode.lattice import fsa_from_dict
from k2quant.utils.deps import import_k2
from k2quant.utils.io import PathLike, load_trusted

log = logging.getLogger(__name__)

Fsa = Any  # k2.Fsa (k2 is imported lazily)
DEFAULT_SKIP_WORDS = ("<sil>", "<SIL>", "!SIL")
_KEEP_ATTRS = ("aux_labels", "am_scores", "lm_scores")


@dataclass
class Candidate:
    """One distinct word sequence of an utterance's n-best list."""

    word_ids: Tuple[int, ...]
    am_score: float
    ngram_score: float
    lm_score: float = 0.0  # neural LM log-prob, filled by score_word_sequences


@dataclass
class ScaleSetting:
    """One way of combining the scores (see the module docstring)."""

    lm_scale: float
    ngram_scale: float = 0.0
    wip: float = 0.0

    def name(self, show_ngram: bool = True) -> str:
        s = f"lm_scale_{self.lm_scale:g}"
        if show_ngram:
            s += f"-ngram_scale_{self.ngram_scale:g}"
        if self.wip:
            s += f"-wip_{self.wip:g}"
        return s


# ---------------------------------------------------------------------------- lattice files


class WordsMismatchError(ValueError):
    """A lattice file was produced with another ``words.txt`` than the one given."""


def read_lattice_file(
    path: PathLike, *, words_txt_sha256: Optional[str] = None, words_txt_name: str = "--words"
) -> Tuple[Fsa, Dict[str, Any]]:
    """Load one lattice file: ours (:func:`k2quant.decode.lattice.save_lattices`) or a bare
    ``Fsa.as_dict()`` (e.g. from an icefall decode script).

    Returns:
      ``(fsa, meta)``: a single FSA with ragged ``aux_labels`` (a plain tensor of word ids
      is converted), ``am_scores`` and ``lm_scores`` (other attributes dropped; see the
      module docstring for missing score attributes) and
      metadata with at least ``cut_id`` and ``has_meta`` (False for bare files).

    Raises:
      WordsMismatchError: the file records a ``words.txt`` sha256 different from
        ``words_txt_sha256``.
      ValueError: not a lattice file, or several lattices in one file.
    """
    k2 = import_k2()
    from k2quant.decode.lattice import LATTICE_FORMAT

    path = Path(path)
    d = load_trusted(path)
    if isinstance(d, dict) and d.get("format") == LATTICE_FORMAT and "lattice" in d:
        meta = {k: v for k, v in d.items() if k != "lattice"}
        meta["has_meta"] = True
        stored = meta.get("words_txt_sha256")
        if words_txt_sha256 is not None and stored is not None and stored != words_txt_sha256:
            raise WordsMismatchError(
                f"{path}: this lattice was decoded with a words.txt whose sha256 is {stored}, "
                f"but {words_txt_name} has sha256 {words_txt_sha256}; word ids would be "
                f"misread. Pass the words.txt of the lang dir used for decoding."
            )
        lat_dict = d["lattice"]
    elif isinstance(d, dict) and "arcs" in d:
        meta = {"has_meta": False}
        lat_dict = d
    else:
        got = sorted(d)[:6] if isinstance(d, dict) else type(d).__name__
        raise ValueError(
            f"{path}: not a lattice file; expected a k2quant lattice (format "
            f"{LATTICE_FORMAT!r}) or a dict from k2.Fsa.as_dict() (key 'arcs'), got {got}"
        )
    meta.setdefault("cut_id", path.name[:-3] if path.name.endswith(".pt") else path.stem)
    if meta.get("cut_id") is None:
        meta["cut_id"] = path.stem
    fsa = fsa_from_dict(lat_dict)
    if len(fsa.shape) == 3:
        if fsa.shape[0] != 1:
            raise ValueError(f"{path}: holds {fsa.shape[0]} lattices; expected one lattice per "
                             f"file (save lattice[i].as_dict() for each utterance)")
        fsa = fsa[0]
    if not hasattr(fsa, "aux_labels"):
        raise ValueError(f"{path}: the lattice has no aux_labels (word ids); expected a lattice "
                         f"from an HLG/LG decoding graph")
    meta["score_source"] = _normalise_scores(fsa)
    if isinstance(fsa.aux_labels, torch.Tensor):
        # one word id (or 0) per arc -> ragged, like HLG lattices, so that files of both
        # kinds can share one FsaVec
        aux = fsa.aux_labels.to(torch.int32)
        shape = k2.ragged.regular_ragged_shape(dim0=aux.numel(), dim1=1)
        fsa.aux_labels = k2.RaggedTensor(shape, aux).remove_values_eq(0)
    _drop_attrs(fsa)
    props = fsa.properties
    need = k2.fsa_properties.ACCESSIBLE | k2.fsa_properties.COACCESSIBLE
    if fsa.num_arcs > 0 and (props & need) != need:
        fsa = k2.connect(fsa)
    if fsa.num_arcs > 0 and not (fsa.properties & k2.fsa_properties.TOPSORTED):
        fsa = k2.top_sort(fsa)  # path sampling needs forward scores of a top-sorted FSA
    return fsa, meta


def _normalise_scores(fsa: Fsa) -> str:
    """Make sure ``am_scores``/``lm_scores`` exist; returns how they were obtained."""
    has_am, has_lm = hasattr(fsa, "am_scores"), hasattr(fsa, "lm_scores")
    if has_am and has_lm:
        return "stored"
    if has_lm:
        fsa.am_scores = fsa.scores - fsa.lm_scores
        return "am=scores-lm"
    if has_am:
        fsa.lm_scores = fsa.scores - fsa.am_scores
        return "lm=scores-am"
    fsa.am_scores = fsa.scores.clone()
    fsa.lm_scores = torch.zeros_like(fsa.scores)
    return "scores-only"


def _drop_attrs(fsa: Fsa) -> None:
    """Keep only the attributes rescoring needs, so lattices from different sources batch."""
    keep = set(_KEEP_ATTRS) | {"scores", "labels", "labels_version"}
    names = set(getattr(fsa, "_tensor_attr", {})) | set(getattr(fsa, "_non_tensor_attr", {}))
    for name in names - keep:
        delattr(fsa, name)


# ---------------------------------------------------------------------------------- n-best


def _num_arcs_per_fsa(fsas: Fsa) -> List[int]:
    """Number of arcs of each FSA of an FsaVec (without indexing it)."""
    splits = fsas.arcs.shape().remove_axis(1).row_splits(1).to(torch.int64)
    return (splits[1:] - splits[:-1]).tolist()


def _path_sums(paths: Fsa, attr: str) -> torch.Tensor:
    """Sum of ``attr`` along each FSA of an FsaVec (float64, one value per FSA)."""
    shape = paths.arcs.shape().remove_axis(1)  # [fsa][arc]
    row = shape.row_ids(1).to(torch.int64)
    out = torch.zeros(paths.shape[0], dtype=torch.float64)
    out.index_add_(0, row, getattr(paths, attr).to(torch.float64))
    return out


def _word_seqs_of_paths(lattice: Fsa, paths) -> List[List[List[int]]]:
    """Word ids ([utt][path][word]) of arc-index paths from ``k2.random_paths``."""
    k2 = import_k2()
    aux = lattice.aux_labels
    if isinstance(aux, torch.Tensor):
        seq = k2.ragged.index(aux, paths)
    else:
        seq = aux.index(paths)
        seq = seq.remove_axis(seq.num_axes - 2)
    return seq.remove_values_leq(0).tolist()


def get_nbest(
    lattices: Fsa,
    num_paths: int,
    *,
    nbest_scale: float = 0.5,
    use_double_scores: bool = True,
    include_one_best: bool = True,
) -> List[List[Candidate]]:
    """Distinct word sequences of each lattice with their am and n-gram scores.

    Args:
      lattices: FsaVec (axes [utt][state][arc]) with ``aux_labels`` (word ids) and
        ``am_scores``/``lm_scores`` (missing ones are derived as in
        :func:`read_lattice_file`, on a copy). Empty FSAs allowed.
      num_paths: paths sampled per lattice.
      nbest_scale: scale of the lattice scores for sampling only.
      include_one_best: put the lattice's 1-best word sequence first in each list.
    Returns:
      One list per lattice (``[]`` for a lattice with no path), candidates in the order:
      1-best, then the order of first appearance among the sampled paths.

    Caution:
      The lattices must be connected (every arc on a successful path) and top-sorted; those
      from ``get_lattice`` and from :func:`read_lattice_file` are.
    """
    k2 = import_k2()
    if len(lattices.shape) != 3:
        raise ValueError("get_nbest expects an FsaVec; wrap a single lattice with "
                         "k2.create_fsa_vec([lattice])")
    if num_paths < 1:
        raise ValueError(f"num_paths must be >= 1, got {num_paths}")
    if not (hasattr(lattices, "am_scores") and hasattr(lattices, "lm_scores")):
        lattices = lattices.clone()  # e.g. straight from get_lattice: add am_scores
        _normalise_scores(lattices)
    n_utt = lattices.shape[0]
    arcs_per_fsa = _num_arcs_per_fsa(lattices)
    nonempty = [i for i in range(n_utt) if arcs_per_fsa[i] > 0]
    out: List[List[Candidate]] = [[] for _ in range(n_utt)]
    if not nonempty:
        return out
    if len(nonempty) != n_utt:
        # (k2 cannot index an empty FSA of an FsaVec that has ragged attributes: select)
        lattices = k2.index_fsa(lattices, torch.tensor(nonempty, dtype=torch.int32))

    # 1) sampled word sequences (+ the 1-best), unique per utterance, order-preserving
    sample_lat = lattices.clone()
    sample_lat.scores = lattices.scores * nbest_scale
    paths = k2.random_paths(sample_lat, use_double_scores=use_double_scores, num_paths=num_paths)
    sampled = _word_seqs_of_paths(lattices, paths)
    seqs_per_utt: List[List[Tuple[int, ...]]] = []
    if include_one_best:
        from k2quant.decode.lattice import path_aux_labels

        best = path_aux_labels(k2.shortest_path(lattices, use_double_scores=use_double_scores))
    for j in range(len(nonempty)):
        seen: Dict[Tuple[int, ...], None] = {}
        if include_one_best:
            seen[tuple(best[j])] = None
        for s in sampled[j]:
            seen.setdefault(tuple(s), None)
        seqs_per_utt.append(list(seen))

    # 2) best alignment of every word sequence in its lattice (icefall's Nbest.intersect)
    flat = [list(s) for seqs in seqs_per_utt for s in seqs]
    seq_to_utt = torch.tensor([j for j, seqs in enumerate(seqs_per_utt) for _ in seqs],
                              dtype=torch.int32)
    word_fsa = k2.linear_fsa(flat)
    word_fsa_loops = k2.add_epsilon_self_loops(word_fsa)
    inv = k2.arc_sort(k2.invert(lattices))
    path_lat = k2.intersect_device(inv, word_fsa_loops, b_to_a_map=seq_to_utt,
                                   sorted_match_a=True)
    path_lat = k2.top_sort(k2.connect(path_lat))
    one = k2.shortest_path(path_lat, use_double_scores=use_double_scores)
    am = _path_sums(one, "am_scores")
    ng = _path_sums(one, "lm_scores")
    num_arcs = _num_arcs_per_fsa(one)

    k = 0
    for j, seqs in enumerate(seqs_per_utt):
        cands = []
        for s in seqs:
            if num_arcs[k] > 0:
                cands.append(Candidate(word_ids=s, am_score=float(am[k]), ngram_score=float(ng[k])))
            else:  # pragma: no cover - a sampled sequence is always in its lattice
                log.warning("word sequence %s not found in its lattice; dropped", s)
            k += 1
        out[nonempty[j]] = cands
    return out


# ------------------------------------------------------------------------------- LM scores


@dataclass
class LmMapStats:
    """Words given to the LM and how many it did not know."""

    num_words: int = 0
    num_oov: int = 0
    oov_words: Dict[str, int] = field(default_factory=dict)


def score_word_sequences(
    lm,
    seqs: Sequence[Sequence[int]],
    id2word: Dict[int, str],
    *,
    skip_words: Iterable[str] = DEFAULT_SKIP_WORDS,
    max_tokens: int = 4000,
    stats: Optional[LmMapStats] = None,
) -> torch.Tensor:
    """Neural-LM log-probs (float64, one per sequence) of word-id sequences.

    Words come from ``id2word`` (the decoding graph's ``words.txt``), minus ``skip_words``,
    and are tokenised with ``lm.tokenizer`` (unknown words -> ``<unk>``, counted in ``stats``).
    """
    skip = set(skip_words)
    try:
        sents = [[id2word[i] for i in s] for s in seqs]
    except KeyError as e:
        raise ValueError(f"word id {e.args[0]} of a lattice is not in words.txt "
                         f"({len(id2word)} entries); is --words the graph's words.txt?") from e
    sents = [[w for w in s if w not in skip] for s in sents]
    enc = lm.tokenizer.encode(sents)
    if stats is not None:
        stats.num_words += enc.num_words
        stats.num_oov += enc.num_oov
        for w, c in enc.oov_counts.items():
            stats.oov_words[w] = stats.oov_words.get(w, 0) + c
    if not enc.ids:
        return torch.zeros(0, dtype=torch.float64)
    return lm.score_sentences(enc.ids, max_tokens=max_tokens)


def pick_best(cands: Sequence[Candidate], setting: ScaleSetting) -> Optional[Candidate]:
    """The candidate with the highest combined score (first one on ties); None if empty."""
    best, best_score = None, -math.inf
    for c in cands:
        t = (c.am_score + setting.ngram_scale * c.ngram_score + setting.lm_scale * c.lm_score
             + setting.wip * len(c.word_ids))
        if best is None or t > best_score:
            best, best_score = c, t
    return best


# ------------------------------------------------------------------------------- the driver


@dataclass
class RescoreResult:
    """Hypotheses (utt id -> words) per setting name, plus the lattice 1-best baseline."""

    hyps: Dict[str, Dict[str, List[str]]]
    settings: Dict[str, ScaleSetting]
    baseline: Dict[str, List[str]]
    empty: List[str]
    num_utts: int
    num_candidates: int
    seconds: float
    lm_seconds: float
    lm_stats: LmMapStats
    score_sources: Dict[str, int]

    @property
    def utts_per_second(self) -> float:
        return self.num_utts / max(self.seconds, 1e-9)


def list_lattice_files(lattice_dir: PathLike) -> List[Path]:
    """``*.pt`` files of a lattice directory, sorted by name."""
    d = Path(lattice_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"lattice directory {d} not found; write lattices with "
                                f"'k2quant decode --save-lattices'")
    files = sorted(p for p in d.iterdir() if p.suffix == ".pt" and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{d}: no lattice files (*.pt) found")
    return files


def _stored_one_best(meta: Dict[str, Any], id2word: Dict[int, str]) -> List[str]:
    ob = meta.get("one_best")
    if not ob:
        return []
    return [id2word.get(w, str(w)) if isinstance(w, int) else str(w) for w in ob]


def rescore_lattices(
    lattice_files: Sequence[PathLike],
    lm,
    id2word: Dict[int, str],
    settings: Sequence[ScaleSetting],
    *,
    num_paths: int = 100,
    nbest_scale: float = 0.5,
    words_txt_sha256: Optional[str] = None,
    words_txt_name: str = "--words",
    batch_size: int = 16,
    max_tokens: int = 4000,
    skip_words: Iterable[str] = DEFAULT_SKIP_WORDS,
    show_ngram: bool = True,
    progress: bool = True,
) -> RescoreResult:
    """Rescore lattice files with ``lm`` for every setting (LM scored once per candidate).

    Args:
      lattice_files: one lattice per file (:func:`read_lattice_file`).
      lm: a :class:`k2quant.models.transformer_lm.TransformerLM` (or anything with
        ``tokenizer`` and ``score_sentences``), in eval mode.
      id2word: word id -> word, from the ``words.txt`` of the decoding graph.
      settings: score combinations; hypotheses are keyed by ``setting.name(show_ngram)``.
      words_txt_sha256: if given, lattice files recording another hash raise
        :class:`WordsMismatchError`.
      batch_size: lattices processed together (one FsaVec).
    """
    k2 = import_k2()
    from k2quant.decode.lattice import path_aux_labels

    if not settings:
        raise ValueError("rescore_lattices: give at least one ScaleSetting (lm scale)")
    names = [s.name(show_ngram) for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate scale settings: {names}")
    hyps: Dict[str, Dict[str, List[str]]] = {n: {} for n in names}
    baseline: Dict[str, List[str]] = {}
    empty: List[str] = []
    seen_ids: Dict[str, Path] = {}
    sources: Dict[str, int] = {}
    stats = LmMapStats()
    n_cands = 0
    lm_seconds = 0.0
    warned_nometa = False
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(lattice_files), desc="rescore", unit="utt", leave=False)
    for start in range(0, len(lattice_files), batch_size):
        chunk = lattice_files[start:start + batch_size]
        fsas, metas = [], []
        for p in chunk:
            fsa, meta = read_lattice_file(p, words_txt_sha256=words_txt_sha256,
                                          words_txt_name=words_txt_name)
            uid = str(meta["cut_id"])
            if uid in seen_ids:
                raise ValueError(f"utterance id {uid!r} appears in both {seen_ids[uid]} and {p}")
            seen_ids[uid] = Path(p)
            if not warned_nometa and (not meta["has_meta"] or meta.get("words_txt_sha256") is None):
                log.warning("%s has no words.txt sha256 (bare Fsa.as_dict() or no --words at "
                            "decode time): assuming its word ids follow %s without checking",
                            p, words_txt_name)
                warned_nometa = True
            src = meta["score_source"]
            if src == "scores-only" and src not in sources:
                log.warning("%s has neither lm_scores nor am_scores: all lattice scores are "
                            "treated as acoustic (ngram scores = 0)", p)
            sources[src] = sources.get(src, 0) + 1
            fsas.append(fsa)
            metas.append(meta)
        vec = k2.create_fsa_vec(fsas)
        nbest = get_nbest(vec, num_paths, nbest_scale=nbest_scale)
        base_ids = path_aux_labels(k2.shortest_path(vec, use_double_scores=True))
        flat = [c for cands in nbest for c in cands]
        n_cands += len(flat)
        t_lm = time.time()
        lm_scores = score_word_sequences(lm, [c.word_ids for c in flat], id2word,
                                         skip_words=skip_words, max_tokens=max_tokens, stats=stats)
        lm_seconds += time.time() - t_lm
        for c, s in zip(flat, lm_scores.tolist()):
            c.lm_score = s
        for meta, cands, b in zip(metas, nbest, base_ids):
            uid = str(meta["cut_id"])
            if not cands:
                empty.append(uid)
                words = _stored_one_best(meta, id2word)
                baseline[uid] = words
                for n in names:
                    hyps[n][uid] = list(words)
                continue
            baseline[uid] = [id2word[i] for i in b]
            for n, setting in zip(names, settings):
                best = pick_best(cands, setting)
                hyps[n][uid] = [id2word[i] for i in best.word_ids]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    if empty:
        log.warning("%d of %d lattices are empty (no path); they keep their stored 1-best or an "
                    "empty hypothesis, e.g. %s", len(empty), len(lattice_files), empty[:5])
    if stats.num_oov:
        log.warning("%d of %d n-best words (%.2f%%) are not in the LM vocabulary and were scored "
                    "as <unk>, e.g. %s", stats.num_oov, stats.num_words,
                    100 * stats.num_oov / max(1, stats.num_words),
                    sorted(stats.oov_words.items(), key=lambda kv: -kv[1])[:5])
    return RescoreResult(hyps=hyps, settings=dict(zip(names, settings)), baseline=baseline,
                         empty=empty, num_utts=len(lattice_files), num_candidates=n_cands,
                         seconds=seconds, lm_seconds=lm_seconds, lm_stats=stats,
                         score_sources=sources)


__all__ = [
    "Candidate",
    "ScaleSetting",
    "WordsMismatchError",
    "DEFAULT_SKIP_WORDS",
    "read_lattice_file",
    "get_nbest",
    "score_word_sequences",
    "pick_best",
    "RescoreResult",
    "list_lattice_files",
    "rescore_lattices",
]

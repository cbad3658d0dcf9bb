"""HLG decoding-graph compilation (H: topology, L: lexicon, G: word n-gram LM).

The recipe follows icefall's ``local/compile_hlg.py``:

1. ``G`` from an ARPA file with ``kaldilm.arpa2fst`` (word ids from ``words.txt``,
   disambiguation symbol ``#0`` on the backoff arcs; ``<s>``/``</s>`` become epsilons).
   The text FST is cached as ``G.fst.txt`` next to the output, with ``G.fst.json`` recording
   the hashes of the ARPA file and ``words.txt`` it came from; the cache is used only when
   both match.
2. ``LG = L_disambig o G``; connect, determinize, connect; phone disambiguation symbols
   (``#0``, ``#1``, ... in ``phones.txt``, all numbered after the real phones) and word
   disambiguation symbols (ids ``>= words.txt['#0']``, i.e. ``#0``, ``<s>``, ``</s>``) are
   replaced by epsilon; remove epsilons; connect; arc-sort.
   Because the phone disambiguation symbols are removed from LG, ``H`` needs no
   disambiguation self-loops.
3. ``HLG = H o LG``, connect, arc-sort. ``H`` is the topology of the lang dir (``lang.json``
   ``topo``: ``"chain"`` or ``"ctc"``), an FST with labels = network output columns (pdf ids)
   and aux_labels = phone ids.

Result: an ``k2.Fsa`` whose ``labels`` are network output columns (``< num_pdfs``, plus -1
on final arcs) and whose ``aux_labels`` (ragged) are word ids; the matched phone ids are kept
in the attribute ``phones``; ``lm_scores`` is a copy of ``scores`` (the graph scores) so that
lattices produced with it carry the graph part of each arc score (see
:mod:`k2quant.decode.lattice`). Saved as ``torch.save(HLG.as_dict())``.
"""
import hashlib
import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch

from k2quant.utils.deps import import_k2, optional_import
from k2quant.utils.io import PathLike, atomic_torch_save, atomic_write_json, atomic_write_text, load_trusted

log = logging.getLogger(__name__)

Fsa = Any  # k2.Fsa (k2 is imported lazily)


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_symbol_table(path: PathLike) -> dict:
    """``symbol id`` lines -> {symbol: id}."""
    table = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'symbol id', got {line.strip()!r}")
            table[fields[0]] = int(fields[1])
    return table


def load_fsa(path: PathLike) -> Fsa:
    """Load an FSA saved with ``torch.save(fsa.as_dict())``."""
    k2 = import_k2()
    d = load_trusted(path)
    if not isinstance(d, dict) or "arcs" not in d:
        raise ValueError(
            f"{path}: expected a dict from k2.Fsa.as_dict() (with key 'arcs'), got "
            f"{type(d).__name__}; save FSAs with torch.save(fsa.as_dict(), path)"
        )
    return k2.Fsa.from_dict(d)


# ------------------------------------------------------------------------------------ G


def arpa_to_g(
    arpa_path: PathLike,
    words_txt: PathLike,
    *,
    max_order: int = -1,
    cache_path: Optional[PathLike] = None,
) -> Fsa:
    """Build G (word acceptor with LM scores, ``#0`` on backoff arcs) from an ARPA file.

    Args:
      arpa_path: ARPA LM over the words of ``words_txt`` (words missing from it are skipped
        by arpa2fst with a warning).
      words_txt: the lang dir's ``words.txt``; it must contain ``#0``, ``<s>`` and ``</s>``.
      max_order: use n-grams up to this order only (-1: all orders in the file).
      cache_path: if given, the OpenFst text of G is cached there (with a ``.json`` sidecar
        holding the input hashes) and reused when the inputs are unchanged.
    Returns:
      ``k2.Fsa`` with labels = aux_labels = word ids, scores = LM log-probs (natural log;
      backoff weights on the ``#0`` arcs).
    """
    k2 = import_k2()
    words = read_symbol_table(words_txt)
    missing = [s for s in ("#0", "<s>", "</s>") if s not in words]
    if missing:
        raise ValueError(
            f"{words_txt} lacks {missing}; words.txt must contain <eps> 0, the words, #0, <s> "
            f"and </s> (see k2quant.lang)"
        )
    key = {
        "arpa_sha256": file_sha256(arpa_path),
        "words_txt_sha256": file_sha256(words_txt),
        "max_order": int(max_order),
    }
    text = None
    if cache_path is not None:
        cache_path = Path(cache_path)
        meta_path = cache_path.with_suffix(".json")
        if cache_path.is_file() and meta_path.is_file():
            import json

            try:
                if json.loads(meta_path.read_text()) == key:
                    text = cache_path.read_text()
                    log.info("Using cached %s", cache_path)
            except ValueError:
                text = None
    if text is None:
        kaldilm = optional_import("kaldilm")
        log.info("Converting %s to G with kaldilm (max_order=%d)", arpa_path, max_order)
        text = kaldilm.arpa2fst(
            str(arpa_path),
            disambig_symbol="#0",
            read_symbol_table=str(words_txt),
            max_order=int(max_order),
        )
        if not text.strip():
            raise ValueError(f"kaldilm.arpa2fst produced an empty G from {arpa_path}")
        if cache_path is not None:
            atomic_write_text(cache_path, text)
            atomic_write_json(cache_path.with_suffix(".json"), key)
    return k2.Fsa.from_openfst(text, acceptor=False)


# ----------------------------------------------------------------------------------- LG


def _zero_ids_at_or_above(values: torch.Tensor, first: int) -> None:
    values[values >= first] = 0


def compile_lg(L_disambig: Fsa, G: Fsa, first_phone_disambig_id: int,
               first_word_disambig_id: int) -> Fsa:
    """``det(L_disambig o G)`` with disambiguation symbols removed, epsilon-free, arc-sorted.

    Caution:
      All phone ids ``>= first_phone_disambig_id`` and word ids ``>= first_word_disambig_id``
      must be disambiguation symbols (true for the icefall lang layout).
    """
    k2 = import_k2()
    L = k2.arc_sort(L_disambig)
    G = k2.arc_sort(G)
    LG = k2.connect(k2.compose(L, G))
    if LG.num_arcs == 0:
        raise ValueError(
            "L o G is empty: the LM's words do not match L's words; was the ARPA built "
            "over the words of this lang dir's words.txt?"
        )
    log.debug("LG before determinize: %s arcs", LG.num_arcs)
    LG = k2.connect(k2.determinize(LG))

    _zero_ids_at_or_above(LG.labels, first_phone_disambig_id)
    # Changing labels in place invalidates the cached properties (k2 issue #874).
    LG.__dict__["_properties"] = None
    if isinstance(LG.aux_labels, torch.Tensor):
        _zero_ids_at_or_above(LG.aux_labels, first_word_disambig_id)
    else:
        _zero_ids_at_or_above(LG.aux_labels.values, first_word_disambig_id)

    LG = k2.connect(k2.remove_epsilon(LG))
    if not isinstance(LG.aux_labels, torch.Tensor):
        LG.aux_labels = LG.aux_labels.remove_values_eq(0)
    return k2.arc_sort(LG)


# ---------------------------------------------------------------------------------- HLG


def compile_hlg_from_fsas(
    H: Fsa,
    L_disambig: Fsa,
    G: Fsa,
    *,
    first_phone_disambig_id: int,
    first_word_disambig_id: int,
    num_pdfs: Optional[int] = None,
) -> Fsa:
    """``H o LG`` (see the module docstring). ``num_pdfs`` enables the label range check."""
    k2 = import_k2()
    if not isinstance(H.aux_labels, torch.Tensor):
        raise ValueError("H must be an FST with tensor aux_labels (phone ids), got ragged ones")
    LG = compile_lg(L_disambig, G, first_phone_disambig_id, first_word_disambig_id)
    HLG = k2.compose(H, LG, inner_labels="phones")
    HLG = k2.arc_sort(k2.connect(HLG))
    if HLG.num_arcs == 0:
        raise ValueError(
            "H o LG is empty: the topology's phone ids (H.aux_labels) do not match L's phone "
            "ids; build H from the same lang dir as L"
        )
    HLG.lm_scores = HLG.scores.clone()
    if num_pdfs is not None:
        check_hlg(HLG, num_pdfs)
    log.info("HLG: %d states, %d arcs", HLG.shape[0], HLG.num_arcs)
    return HLG


def check_hlg(HLG: Fsa, num_pdfs: int) -> None:
    """Assert that HLG's labels are network columns: -1 (final arcs) or in [0, num_pdfs)."""
    labels = HLG.labels
    bad = labels[(labels < -1) | (labels >= num_pdfs)]
    if bad.numel():
        raise ValueError(
            f"HLG labels must be network output columns in [0, {num_pdfs}) (or -1 on final "
            f"arcs), got {sorted(set(bad.tolist()))[:10]}; does lang.json's num_pdfs match "
            f"the topology?"
        )
    if HLG.num_arcs and not bool((labels == -1).any()):
        raise ValueError("HLG has no final arcs (label -1); it accepts nothing")


def compile_hlg_from_lang(lang: Any, G: Fsa) -> Fsa:
    """HLG from a :class:`k2quant.lang.Lang` and a G (e.g. from :func:`arpa_to_g`).

    Uses ``lang.topo()`` (H), ``lang.L_disambig()``, ``lang.phones['#0']``,
    ``lang.words['#0']`` and ``lang.num_pdfs``.
    """
    return compile_hlg_from_fsas(
        lang.topo(),
        lang.L_disambig(),
        G,
        first_phone_disambig_id=lang.phones["#0"],
        first_word_disambig_id=lang.words["#0"],
        num_pdfs=lang.num_pdfs,
    )


def compile_hlg(
    lang_dir: PathLike,
    arpa_path: PathLike,
    *,
    out_path: Optional[PathLike] = None,
    lm_order: int = -1,
) -> Fsa:
    """Compile ``<lang_dir>/HLG.pt`` (or ``out_path``) from a lang dir and a word ARPA LM.

    Args:
      lang_dir: icefall-style lang dir (see :mod:`k2quant.lang`).
      arpa_path: word n-gram LM in ARPA format (e.g. from ``k2quant.lm.ngram.train_ngram``).
      out_path: where to save ``HLG.as_dict()`` (atomically); default ``lang_dir/HLG.pt``.
      lm_order: use n-grams up to this order (-1: all).
    Returns:
      The HLG ``k2.Fsa``.
    """
    from k2quant.lang import Lang

    lang_dir = Path(lang_dir)
    out_path = Path(out_path) if out_path is not None else lang_dir / "HLG.pt"
    lang = Lang(lang_dir)
    G = arpa_to_g(arpa_path, lang_dir / "words.txt", max_order=lm_order,
                  cache_path=out_path.parent / "G.fst.txt")
    HLG = compile_hlg_from_lang(lang, G)
    atomic_torch_save(HLG.as_dict(), out_path)
    log.info("Saved %s", out_path)
    return HLG


def load_hlg(path: PathLike, device: Union[str, torch.device] = "cpu") -> Fsa:
    """Load an HLG saved by :func:`compile_hlg`; arc-sorted, with ``lm_scores`` present."""
    k2 = import_k2()
    HLG = load_fsa(path)
    if not hasattr(HLG, "lm_scores"):
        HLG.lm_scores = HLG.scores.clone()
    HLG = k2.arc_sort(HLG)
    return HLG.to(device)

"""Lang directories: lexicon -> phones/words/tokens tables, the lexicon FSA L, HMM topologies.

The layout follows icefall (``local/prepare_lang.py``) and Kaldi (``utils/prepare_lang.sh``):

=========================  ==================================================================
``phones.txt``             ``<eps> 0``, phones ``1..P``, then disambiguation ``#0 .. #K``
``words.txt``              ``<eps> 0``, the words sorted, then ``#0``, ``<s>``, ``</s>``
``tokens.txt``             the network's output units (pdf ids of the topology, see below)
``lexicon.txt``            ``word p1 p2 ...`` (phones with position marks if enabled)
``lexicon_disambig.txt``   the same with ``#1 ..`` appended where needed (add_lex_disambig.pl)
``L.pt`` / ``L_disambig.pt``  ``torch.save(fsa.as_dict())`` of the lexicon FSAs
``lang.json``              topology kind, num_phones, num_pdfs, position marks, oov, silence
=========================  ==================================================================

FSA conventions (all FSAs are k2 FSAs; ``-1`` labels only on arcs entering the final state):

* ``L`` / ``L_disambig``: ``labels`` = phone ids (``phones.txt``), ``aux_labels`` = word ids
  (``words.txt``); 0 is epsilon on both sides. The word id sits on the first arc of a
  pronunciation. With a silence phone, optional silence may occur at the start and after every
  word with probability ``sil_prob`` (scores are natural-log probabilities, as icefall's
  ``lexicon_to_fst``). ``L_disambig`` has the lexicon disambiguation symbols appended to the
  pronunciations, a ``#0:#0`` self-loop on the word-loop state (for G's back-off arcs), and,
  when there is a silence phone, the silence arc is followed by one extra disambiguation symbol
  (Kaldi's ``--sil-disambig``) so that ``L o G`` stays determinizable.
* Topologies: ``labels`` = pdf ids = columns of the network output (the acoustic model's
  ``log_probs[..., label]``), ``aux_labels`` = phone ids (0 on arcs that emit no phone).

  - ``chain`` (Kaldi chain 2-state topology, as ``run_tdnn_7q``): phone ``p`` (1-based) is one
    frame of pdf ``A = 2p - 1`` followed by zero or more frames of pdf ``B = 2p`` (self-loop).
    Network output dim ``num_pdfs = 2P + 1``; **column 0 is never used** (it keeps every label
    non-zero so that no arc looks like an epsilon/blank). The FSA is epsilon-free and
    deterministic: state 0 is the start, state ``p`` means "inside phone p", ``P + 1`` is final.
  - ``ctc``: ``k2.ctc_topo(P)``: blank = label 0 (column 0), phone ``p`` = label ``p``;
    ``num_pdfs = P + 1``.

Disambiguation follows Kaldi's ``add_lex_disambig.pl``: a pronunciation that is a proper prefix
of another one, or that occurs more than once, gets ``#1``, ``#2``, ... (numbered per
pronunciation). ``#0`` is reserved for G's back-off arcs.

Word-position marks (``position_marks=True``) use Kaldi's ``_B _E _I _S`` suffixes; every
non-silence phone gets all four variants. Silence phones (the silence phone, the OOV phone and
``silence_phones``) stay unmarked.

Only the FSA parts need k2; they import it lazily (:func:`k2quant.utils.deps.import_k2`).
"""
import json
import logging
import math
import os
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from k2quant.utils.deps import import_k2
from k2quant.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text, load_trusted

PathLike = Union[str, os.PathLike]
Lexicon = List[Tuple[str, List[str]]]

logger = logging.getLogger(__name__)

TOPOLOGIES = ("chain", "ctc")
POSITION_SUFFIXES = ("_B", "_E", "_I", "_S")
RESERVED_WORDS = ("<eps>", "#0", "<s>", "</s>")


# ----------------------------------------------------------------------------- lexicon files
def _strip_alternate(word: str) -> str:
    """``WORD(2)`` (CMU Sphinx alternate pronunciation) -> ``WORD``."""
    if word.endswith(")") and "(" in word:
        base, _, num = word[:-1].rpartition("(")
        if base and num.isdigit():
            return base
    return word


def _is_prob(tok: str) -> bool:
    try:
        v = float(tok)
    except ValueError:
        return False
    return 0.0 < v <= 1.0


def read_lexicon(path: PathLike) -> Lexicon:
    """Read a pronunciation lexicon.

    Accepts Kaldi ``lexicon.txt`` (``word p1 p2 ...``), Kaldi ``lexiconp.txt`` (``word prob p1 ..``;
    the probability is dropped) and CMU Sphinx ``.dic`` files, whose alternates are written
    ``A(2)  EY`` (mapped to ``A``). Blank lines and lines starting with ``;;;`` are skipped.

    Returns:
      A list of ``(word, [phone, ...])`` in file order (duplicates kept; ``prepare_lang`` drops
      exact duplicates).
    """
    entries: Lexicon = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith(";;;"):
                continue
            word, phones = _strip_alternate(fields[0]), fields[1:]
            if phones and _is_prob(phones[0]):
                phones = phones[1:]
            if not phones:
                raise ValueError(
                    f"{path}:{lineno}: expected 'word phone [phone ...]', got {line.strip()!r} "
                    "(a word without phones); give it a pronunciation or remove the line"
                )
            entries.append((word, phones))
    return entries


def write_lexicon(path: PathLike, lexicon: Lexicon) -> None:
    atomic_write_text(path, "".join(f"{w} {' '.join(p)}\n" for w, p in lexicon))


def add_disambig_symbols(lexicon: Lexicon) -> Tuple[Lexicon, int]:
    """Append ``#1, #2, ..`` to pronunciations that need them (Kaldi ``add_lex_disambig.pl``).

    A pronunciation needs one if it is a proper prefix of another pronunciation or if it occurs
    more than once (homophones); the symbols are numbered per pronunciation, starting at 1.

    Returns:
      ``(lexicon_disambig, max_disambig)``; ``max_disambig`` is 0 if none was needed.
    """
    count: Dict[Tuple[str, ...], int] = defaultdict(int)
    prefixes = set()
    for _, phones in lexicon:
        p = tuple(phones)
        count[p] += 1
        for i in range(1, len(p)):
            prefixes.add(p[:i])
    last_used: Dict[Tuple[str, ...], int] = {}
    max_disambig = 0
    out: Lexicon = []
    for word, phones in lexicon:
        p = tuple(phones)
        if p in prefixes or count[p] > 1:
            cur = last_used.get(p, 0) + 1
            last_used[p] = cur
            max_disambig = max(max_disambig, cur)
            out.append((word, list(phones) + [f"#{cur}"]))
        else:
            out.append((word, list(phones)))
    return out, max_disambig


def add_position_marks(phones: Sequence[str], silence: Iterable[str] = ()) -> List[str]:
    """``[a, b, c] -> [a_B, b_I, c_E]``, ``[a] -> [a_S]``; phones in ``silence`` unchanged."""
    silence = set(silence)
    n = len(phones)
    out = []
    for i, p in enumerate(phones):
        if p in silence:
            out.append(p)
        elif n == 1:
            out.append(p + "_S")
        elif i == 0:
            out.append(p + "_B")
        elif i == n - 1:
            out.append(p + "_E")
        else:
            out.append(p + "_I")
    return out


# ----------------------------------------------------------------------------- symbol tables
class SymbolTable:
    """A bidirectional symbol <-> id map (pure Python; mirrors the k2.SymbolTable interface).

    ``table["a"] -> id``, ``table[id] -> "a"``, ``"a" in table``, ``len(table)``.
    """

    def __init__(self, pairs: Iterable[Tuple[str, int]] = ()):
        self._sym2id: Dict[str, int] = OrderedDict()
        self._id2sym: Dict[int, str] = {}
        for sym, i in pairs:
            self.add(sym, i)

    def add(self, sym: str, i: int) -> None:
        if sym in self._sym2id or i in self._id2sym:
            raise ValueError(f"duplicate symbol {sym!r} or id {i} in symbol table")
        self._sym2id[sym] = i
        self._id2sym[i] = sym

    @classmethod
    def from_symbols(cls, symbols: Sequence[str]) -> "SymbolTable":
        return cls((s, i) for i, s in enumerate(symbols))

    @classmethod
    def from_file(cls, path: PathLike) -> "SymbolTable":
        pairs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                    raise ValueError(f"{path}:{lineno}: expected 'symbol id', got {line.strip()!r}")
                pairs.append((fields[0], int(fields[1])))
        return cls(pairs)

    def to_str(self) -> str:
        return "".join(f"{s} {i}\n" for s, i in sorted(self._sym2id.items(), key=lambda x: x[1]))

    def write(self, path: PathLike) -> None:
        atomic_write_text(path, self.to_str())

    def to_k2(self):
        """The same table as a ``k2.SymbolTable``."""
        k2 = import_k2()
        return k2.SymbolTable.from_str(self.to_str())

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._sym2id[key]
        return self._id2sym[int(key)]

    def __contains__(self, key) -> bool:
        return (key in self._sym2id) if isinstance(key, str) else (int(key) in self._id2sym)

    def __len__(self) -> int:
        return len(self._sym2id)

    @property
    def symbols(self) -> List[str]:
        return list(self._sym2id)

    @property
    def ids(self) -> List[int]:
        return list(self._id2sym)

    @property
    def max_id(self) -> int:
        return max(self._id2sym)


# ----------------------------------------------------------------------------- topologies
def num_pdfs_for(topo: str, num_phones: int) -> int:
    """Network output dimension for a topology over phones ``1..num_phones``."""
    if topo == "chain":
        return 2 * num_phones + 1
    if topo == "ctc":
        return num_phones + 1
    raise ValueError(f"topo must be one of {TOPOLOGIES}, got {topo!r}")


def chain_pdf_ids(phone: int) -> Tuple[int, int]:
    """``(A, B)`` pdf ids of 1-based phone ``phone`` in the chain topology: ``(2p-1, 2p)``."""
    if phone < 1:
        raise ValueError(f"phone ids are 1-based, got {phone}")
    return 2 * phone - 1, 2 * phone


def chain_topo(num_phones: int, device=None):
    """Kaldi chain 2-state topology for phones ``1..num_phones`` as a k2 FSA.

    Phone ``p`` = one frame of pdf ``2p-1`` then zero or more frames of pdf ``2p``.
    ``labels`` = pdf ids (never 0), ``aux_labels`` = ``p`` on the arc of the first frame, else 0.
    States: 0 = start (nothing emitted yet), ``p`` = inside phone ``p``, ``P+1`` = final.
    Accepts the empty sequence and any concatenation of phones. Arc-sorted and deterministic.
    """
    if num_phones < 1:
        raise ValueError(f"num_phones must be >= 1, got {num_phones}")
    k2 = import_k2()
    final = num_phones + 1
    lines = []
    for src in range(0, num_phones + 1):
        for q in range(1, num_phones + 1):
            a, b = chain_pdf_ids(q)
            if src == q:
                lines.append(f"{src} {src} {b} 0 0")
            lines.append(f"{src} {q} {a} {q} 0")
        lines.append(f"{src} {final} -1 -1 0")
    lines.append(f"{final}")
    # sort arcs of each state by label (self-loop pdf 2p sits between 2p-1 and 2p+1)
    fsa = k2.Fsa.from_str("\n".join(lines), num_aux_labels=1)
    fsa = k2.arc_sort(fsa)
    return fsa.to(device) if device is not None else fsa


def ctc_topo(num_phones: int, device=None):
    """Standard CTC topology (``k2.ctc_topo``): blank = label 0, phone ``p`` = label ``p``.

    ``labels`` = network columns ``0..P``, ``aux_labels`` = phone ids (0 where none is emitted).
    """
    if num_phones < 1:
        raise ValueError(f"num_phones must be >= 1, got {num_phones}")
    k2 = import_k2()
    fsa = k2.arc_sort(k2.ctc_topo(max_token=num_phones, modified=False))
    return fsa.to(device) if device is not None else fsa


def build_topo(topo: str, num_phones: int, device=None):
    if topo == "chain":
        return chain_topo(num_phones, device)
    if topo == "ctc":
        return ctc_topo(num_phones, device)
    raise ValueError(f"topo must be one of {TOPOLOGIES}, got {topo!r}")


def token_symbols(topo: str, phones: Sequence[str]) -> List[str]:
    """Names of the network's output units (``tokens.txt``), index = column.

    chain: ``<unused>``, then ``p/0`` (first frame) and ``p/1`` (self-loop) for each phone.
    ctc: ``<blk>``, then the phones.
    """
    if topo == "chain":
        out = ["<unused>"]
        for p in phones:
            out += [f"{p}/0", f"{p}/1"]
        return out
    if topo == "ctc":
        return ["<blk>"] + list(phones)
    raise ValueError(f"topo must be one of {TOPOLOGIES}, got {topo!r}")


# ----------------------------------------------------------------------------- L
def lexicon_to_arcs(
    lexicon: Lexicon,
    phone2id: Dict[str, int],
    word2id: Dict[str, int],
    *,
    sil_phone: Optional[str] = None,
    sil_prob: float = 0.5,
    sil_disambig: Optional[str] = None,
    loop_disambig: Optional[Tuple[str, str]] = None,
) -> Tuple[List[Tuple[int, int, int, int, float]], int]:
    """Arcs ``(src, dst, phone_id, word_id, score)`` of the lexicon FSA and its final state.

    Without silence: state 0 is both start and word-loop state. With silence (``sil_phone`` and
    ``0 < sil_prob < 1``): 0 = start, 1 = loop, 2 = "silence follows"; start -> loop (eps,
    log(1-sil_prob)), start -> 2 (eps, log sil_prob), 2 -> loop (silence [+ ``sil_disambig``]);
    the last phone of a word goes to loop (log(1-sil_prob)) or to 2 (log sil_prob).
    ``loop_disambig = (phone_sym, word_sym)`` adds that self-loop on the loop state.
    """
    arcs = []
    use_sil = sil_phone is not None and 0.0 < sil_prob < 1.0
    if use_sil:
        start, loop, sil_state = 0, 1, 2
        next_state = 3
        sil_score, no_sil_score = math.log(sil_prob), math.log(1.0 - sil_prob)
        arcs.append((start, loop, 0, 0, no_sil_score))
        arcs.append((start, sil_state, 0, 0, sil_score))
        if sil_disambig is None:
            arcs.append((sil_state, loop, phone2id[sil_phone], 0, 0.0))
        else:
            arcs.append((sil_state, next_state, phone2id[sil_phone], 0, 0.0))
            arcs.append((next_state, loop, phone2id[sil_disambig], 0, 0.0))
            next_state += 1
    else:
        start = loop = 0
        next_state = 1
    for word, phones in lexicon:
        if not phones:
            raise ValueError(f"word {word!r} has an empty pronunciation; every word needs phones")
        wid = word2id[word]
        ids = [phone2id[p] for p in phones]
        cur = loop
        for i, pid in enumerate(ids[:-1]):
            arcs.append((cur, next_state, pid, wid if i == 0 else 0, 0.0))
            cur = next_state
            next_state += 1
        w = wid if len(ids) == 1 else 0
        if use_sil:
            arcs.append((cur, loop, ids[-1], w, no_sil_score))
            arcs.append((cur, sil_state, ids[-1], w, sil_score))
        else:
            arcs.append((cur, loop, ids[-1], w, 0.0))
    if loop_disambig is not None:
        arcs.append((loop, loop, phone2id[loop_disambig[0]], word2id[loop_disambig[1]], 0.0))
    final = next_state
    arcs.append((loop, final, -1, -1, 0.0))
    return arcs, final


def arcs_to_fsa(arcs, final_state: int):
    """k2 FSA (labels, aux_labels) from ``(src, dst, label, aux, score)`` arcs."""
    k2 = import_k2()
    arcs = sorted(arcs, key=lambda a: a[0])
    lines = [f"{s} {d} {l} {a} {sc:.10g}" for s, d, l, a, sc in arcs]
    lines.append(str(final_state))
    return k2.Fsa.from_str("\n".join(lines), num_aux_labels=1)


# ----------------------------------------------------------------------------- prepare_lang
def _dedup(lexicon: Lexicon) -> Lexicon:
    seen, out = set(), []
    for w, p in lexicon:
        key = (w, tuple(p))
        if key not in seen:
            seen.add(key)
            out.append((w, list(p)))
    return out


def prepare_lang(
    lexicon: Union[PathLike, Lexicon],
    lang_dir: PathLike,
    *,
    topo: str = "chain",
    position_marks: bool = False,
    sil_phone: Optional[str] = None,
    sil_prob: float = 0.5,
    oov_word: str = "<UNK>",
    oov_phone: str = "SPN",
    silence_phones: Sequence[str] = (),
    extra_lexicon: Optional[Lexicon] = None,
) -> Path:
    """Write an icefall-style lang dir (see the module docstring) and return its path.

    Args:
      lexicon: a lexicon file (:func:`read_lexicon`) or a list of ``(word, [phones])``.
      lang_dir: output directory (created).
      topo: ``"chain"`` (2 pdfs per phone, ``num_pdfs = 2P+1``) or ``"ctc"`` (``P+1``).
      position_marks: expand non-silence phones with Kaldi's ``_B _E _I _S`` marks.
      sil_phone: optional silence phone (e.g. ``"SIL"``); enables optional silence in L with
        probability ``sil_prob`` (before the first word and after every word).
      oov_word: the OOV word; added with pronunciation ``[oov_phone]`` if the lexicon lacks it.
      oov_phone: garbage/spoken-noise phone used for the OOV word when it must be created.
      silence_phones: further phones that take no position marks (noise, laughter, ...).
      extra_lexicon: extra ``(word, phones)`` entries appended to the lexicon.

    Caution:
      Words may not be ``<eps> #0 <s> </s>``; phones may not start with ``#`` or be ``<eps>``.
    """
    if topo not in TOPOLOGIES:
        raise ValueError(f"topo must be one of {TOPOLOGIES}, got {topo!r}")
    if not 0.0 <= sil_prob < 1.0:
        raise ValueError(f"sil_prob must be in [0, 1), got {sil_prob}")
    lang_dir = Path(lang_dir)
    entries = read_lexicon(lexicon) if isinstance(lexicon, (str, os.PathLike)) else list(lexicon)
    entries = _dedup(list(entries) + list(extra_lexicon or []))
    if not entries:
        raise ValueError("the lexicon is empty; expected lines 'word phone [phone ...]'")
    for w, p in entries:
        if w in RESERVED_WORDS:
            raise ValueError(f"word {w!r} is reserved ({RESERVED_WORDS}); rename it in the lexicon")
        for ph in p:
            if ph.startswith("#") or ph == "<eps>":
                raise ValueError(
                    f"phone {ph!r} of word {w!r} is reserved (disambiguation symbols start with "
                    "'#', '<eps>' is epsilon); rename it in the lexicon"
                )
    words_in_lex = {w for w, _ in entries}
    if oov_word not in words_in_lex:
        entries.append((oov_word, [oov_phone]))
    oov_prons = [p for w, p in entries if w == oov_word]
    sil_set = set(silence_phones)
    if sil_phone is not None:
        sil_set.add(sil_phone)
    for p in oov_prons:
        if len(p) == 1:
            sil_set.add(p[0])

    if position_marks:
        for w, p in entries:
            for ph in p:
                if ph not in sil_set and ph.endswith(POSITION_SUFFIXES):
                    raise ValueError(
                        f"phone {ph!r} (word {w!r}) already ends with a position mark; give a "
                        "lexicon without marks or use position_marks=False"
                    )
        entries = [(w, add_position_marks(p, sil_set)) for w, p in entries]

    # phone inventory: silence-like phones first (silence phone leading), then the rest sorted
    used = []
    for _, p in entries:
        used.extend(p)
    base_nonsil = sorted({ph for ph in used if ph not in sil_set})
    if position_marks:
        base_nonsil = sorted({ph[:-2] for ph in base_nonsil})
        nonsil = [b + s for b in base_nonsil for s in POSITION_SUFFIXES]
    else:
        nonsil = base_nonsil
    sil_list = ([sil_phone] if sil_phone is not None else []) + sorted(sil_set - {sil_phone})
    phones = sil_list + nonsil

    lex_disambig, max_disambig = add_disambig_symbols(entries)
    sil_disambig = None
    num_disambig = max_disambig + 1  # #0 .. #max_disambig
    if sil_phone is not None and sil_prob > 0:
        sil_disambig = f"#{max_disambig + 1}"
        num_disambig += 1
    disambig = [f"#{i}" for i in range(num_disambig)]

    phone_table = SymbolTable.from_symbols(["<eps>"] + phones + disambig)
    words = sorted(words_in_lex | {oov_word})
    word_table = SymbolTable.from_symbols(["<eps>"] + words + ["#0", "<s>", "</s>"])
    token_table = SymbolTable.from_symbols(token_symbols(topo, phones))

    lang_dir.mkdir(parents=True, exist_ok=True)
    phone_table.write(lang_dir / "phones.txt")
    word_table.write(lang_dir / "words.txt")
    token_table.write(lang_dir / "tokens.txt")
    write_lexicon(lang_dir / "lexicon.txt", entries)
    write_lexicon(lang_dir / "lexicon_disambig.txt", lex_disambig)

    p2i = {s: phone_table[s] for s in phone_table.symbols}
    w2i = {s: word_table[s] for s in word_table.symbols}
    arcs, final = lexicon_to_arcs(entries, p2i, w2i, sil_phone=sil_phone, sil_prob=sil_prob)
    atomic_torch_save(arcs_to_fsa(arcs, final).as_dict(), lang_dir / "L.pt")
    arcs, final = lexicon_to_arcs(
        lex_disambig, p2i, w2i, sil_phone=sil_phone, sil_prob=sil_prob,
        sil_disambig=sil_disambig, loop_disambig=("#0", "#0"),
    )
    atomic_torch_save(arcs_to_fsa(arcs, final).as_dict(), lang_dir / "L_disambig.pt")

    num_phones = len(phones)
    config = {
        "topo": topo,
        "num_phones": num_phones,
        "num_pdfs": num_pdfs_for(topo, num_phones),
        "pdf_convention": (
            "phone p (1-based) -> pdf 2p-1 (first frame) and 2p (self-loop); column 0 unused"
            if topo == "chain" else "blank = column 0, phone p -> column p"
        ),
        "position_marks": position_marks,
        "oov": oov_word,
        "sil_phone": sil_phone,
        "sil_prob": sil_prob if sil_phone is not None else 0.0,
        "silence_phones": sil_list,
        "first_disambig_phone_id": num_phones + 1,
        "num_disambig": num_disambig,
    }
    atomic_write_json(lang_dir / "lang.json", config)
    logger.info(
        "prepare_lang: %d words, %d phones, %d disambig symbols, topo=%s (num_pdfs=%d) -> %s",
        len(words), num_phones, num_disambig, topo, config["num_pdfs"], lang_dir,
    )
    return lang_dir


# ----------------------------------------------------------------------------- Lang
class Lang:
    """A prepared lang dir (see :func:`prepare_lang`).

    Attributes:
      phones, words, tokens: :class:`SymbolTable` of ``phones.txt``, ``words.txt``, ``tokens.txt``.
      config: the ``lang.json`` dict. ``topo_kind``, ``num_phones``, ``num_pdfs``, ``oov``.
      lexicon: ``{word: [[phone, ...], ...]}`` from ``lexicon.txt`` (file order).
    """

    def __init__(self, lang_dir: PathLike):
        self.lang_dir = Path(lang_dir)
        cfg_path = self.lang_dir / "lang.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{cfg_path} not found: expected a lang dir written by k2quant.lang.prepare_lang "
                "(run 'k2quant prepare-lang --lexicon LEXICON --lang-dir DIR')"
            )
        with open(cfg_path, encoding="utf-8") as f:
            self.config = json.load(f)
        self.phones = SymbolTable.from_file(self.lang_dir / "phones.txt")
        self.words = SymbolTable.from_file(self.lang_dir / "words.txt")
        self.tokens = SymbolTable.from_file(self.lang_dir / "tokens.txt")
        self.lexicon: Dict[str, List[List[str]]] = OrderedDict()
        for w, p in read_lexicon(self.lang_dir / "lexicon.txt"):
            self.lexicon.setdefault(w, []).append(p)
        if self.oov not in self.words:
            raise ValueError(f"OOV word {self.oov!r} of lang.json is missing from words.txt")

    topo_kind = property(lambda self: self.config["topo"])
    num_phones = property(lambda self: int(self.config["num_phones"]))
    num_pdfs = property(lambda self: int(self.config["num_pdfs"]))
    oov = property(lambda self: self.config["oov"])
    oov_id = property(lambda self: self.words[self.oov])
    sil_phone = property(lambda self: self.config.get("sil_phone"))
    sil_prob = property(lambda self: float(self.config.get("sil_prob", 0.0)))

    @property
    def phone_ids(self) -> List[int]:
        """Real phone ids ``1..P`` (no epsilon, no disambiguation symbols)."""
        return list(range(1, self.num_phones + 1))

    @property
    def disambig_phone_ids(self) -> List[int]:
        return [i for s, i in zip(self.phones.symbols, self.phones.ids) if s.startswith("#")]

    def words_to_ids(
        self, words: Sequence[str], oov: Optional[str] = None
    ) -> Tuple[List[int], int]:
        """Word ids of ``words``; unknown words map to ``oov`` (default: the lang's OOV word).

        Returns ``(ids, num_oov)``.
        """
        oov_id = self.words[oov or self.oov]
        ids, n = [], 0
        for w in words:
            i = self.words.get(w)
            if i is None or w in RESERVED_WORDS:
                i, n = oov_id, n + 1
            ids.append(i)
        return ids, n

    def words_to_phones(
        self, words: Sequence[str], oov: Optional[str] = None
    ) -> Tuple[List[str], int]:
        """Phones of the first pronunciation of each word (OOVs -> the OOV word's).

        Returns ``(phones, num_oov)``.
        """
        oov = oov or self.oov
        out, n = [], 0
        for w in words:
            prons = self.lexicon.get(w)
            if prons is None:
                prons, n = self.lexicon[oov], n + 1
            out.extend(prons[0])
        return out, n

    def _load_fsa(self, name: str, device=None):
        k2 = import_k2()
        path = self.lang_dir / name
        fsa = k2.Fsa.from_dict(load_trusted(path))
        return fsa.to(device) if device is not None else fsa

    def L(self, device=None):
        """The lexicon FSA (labels = phone ids, aux_labels = word ids)."""
        return self._load_fsa("L.pt", device)

    def L_disambig(self, device=None):
        """L with disambiguation symbols (for HLG); labels/aux as :meth:`L`."""
        return self._load_fsa("L_disambig.pt", device)

    def topo(self, device=None):
        """The HMM topology FSA (labels = pdf ids/network columns, aux_labels = phone ids)."""
        return build_topo(self.topo_kind, self.num_phones, device)

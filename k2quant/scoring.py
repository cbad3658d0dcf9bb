"""Word error rate scoring with kaldialign, and the per-utterance files other tools read.

This module needs no k2 (it runs on the core torch-2 environment too).

Text files use the Kaldi ``text`` format: one utterance per line, ``<utt_id> w1 w2 ...``;
a line holding only the id is an empty transcript.

Conventions:

- The reference set defines the test set. A reference utterance without a hypothesis is
  scored as all deletions (``ref_len`` errors), listed in :attr:`WerResult.missing`, logged
  as a warning and flagged in the error report.
- A hypothesis without a reference is an error (``ValueError`` naming the ids), because
  it almost always means the wrong reference file; pass ``allow_extra_hyps=True`` to
  ignore such hypotheses with a warning instead.
- ``wer_percent`` is ``100 * (ins + del + sub) / ref_words``; with no reference words it is
  0.0 when there are no errors and ``inf`` otherwise.

Per-utterance error file (read by the significance tests, e.g. MAPSSWE / paired bootstrap):
a TSV with the header line ``utt_id\\tref_words\\terrors\\tins\\tdel\\tsub`` and one row per
reference utterance in reference order, all counts integers.
"""
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from k2quant.utils.io import PathLike, atomic_write_text

log = logging.getLogger(__name__)

EPS = "*"  # marks the empty side of an insertion or deletion in printed alignments
PER_UTT_HEADER = ("utt_id", "ref_words", "errors", "ins", "del", "sub")

Alignment = List[Tuple[Optional[str], Optional[str]]]  # (ref, hyp); None = epsilon


@dataclass
class UttErrors:
    """Error counts of one utterance. ``dels`` is the number of deletions (``del`` in files)."""

    utt_id: str
    ref_len: int
    ins: int
    dels: int
    sub: int
    alignment: Alignment = field(default_factory=list, repr=False, compare=False)
    missing_hyp: bool = False

    @property
    def errors(self) -> int:
        return self.ins + self.dels + self.sub


@dataclass
class WerResult:
    """Per-utterance and total error counts. ``utts`` is in reference order."""

    utts: Dict[str, UttErrors]
    missing: List[str] = field(default_factory=list)
    ignored_hyps: List[str] = field(default_factory=list)

    @property
    def num_utts(self) -> int:
        return len(self.utts)

    @property
    def ref_words(self) -> int:
        return sum(u.ref_len for u in self.utts.values())

    @property
    def ins(self) -> int:
        return sum(u.ins for u in self.utts.values())

    @property
    def dels(self) -> int:
        return sum(u.dels for u in self.utts.values())

    @property
    def sub(self) -> int:
        return sum(u.sub for u in self.utts.values())

    @property
    def errors(self) -> int:
        return self.ins + self.dels + self.sub

    @property
    def wer_percent(self) -> float:
        return _wer(self.errors, self.ref_words)

    @property
    def num_utts_with_errors(self) -> int:
        return sum(1 for u in self.utts.values() if u.errors > 0)

    def summary(self) -> str:
        """Kaldi-style one-liner: ``%WER 66.67 [ 2 / 3, 1 ins, 0 del, 1 sub ]``."""
        s = (
            f"%WER {self.wer_percent:.2f} [ {self.errors} / {self.ref_words}, {self.ins} ins, "
            f"{self.dels} del, {self.sub} sub ] over {self.num_utts} utterances"
        )
        if self.missing:
            s += f" ({len(self.missing)} without hypothesis, scored as deletions)"
        return s

    def to_dict(self) -> dict:
        """JSON-able totals (no per-utterance detail)."""
        return {
            "wer": self.wer_percent if math.isfinite(self.wer_percent) else None,
            "errors": self.errors,
            "ins": self.ins,
            "del": self.dels,
            "sub": self.sub,
            "ref_words": self.ref_words,
            "num_utts": self.num_utts,
            "num_utts_with_errors": self.num_utts_with_errors,
            "missing_hyps": list(self.missing),
            "ignored_hyps": list(self.ignored_hyps),
        }


def _wer(errors: int, ref_words: int) -> float:
    if ref_words == 0:
        return 0.0 if errors == 0 else math.inf
    return 100.0 * errors / ref_words


def align_words(ref: Sequence[str], hyp: Sequence[str]) -> Alignment:
    """Minimum-edit-distance alignment (kaldialign) as (ref, hyp) pairs, ``None`` = epsilon.

    Words are mapped to integers before calling kaldialign so that no word can collide with
    the epsilon symbol.
    """
    import kaldialign

    vocab: Dict[str, int] = {}
    r = [vocab.setdefault(w, len(vocab)) for w in ref]
    h = [vocab.setdefault(w, len(vocab)) for w in hyp]
    if not r and not h:
        return []
    inv = {i: w for w, i in vocab.items()}
    pairs = kaldialign.align(r, h, -1)
    return [(inv.get(a), inv.get(b)) for a, b in pairs]


#: sclite's default alignment weights (``sclite -w`` unset): substitution, insertion, deletion.
NIST_SUB, NIST_INS, NIST_DEL = 4, 3, 3


def align_words_nist(ref: Sequence[str], hyp: Sequence[str]) -> Alignment:
    """Minimum-cost alignment as NIST ``sclite`` makes it, as (ref, hyp) pairs (None = epsilon).

    Costs: correct 0, substitution 4, insertion 3, deletion 3 (sclite's defaults). Among
    alignments of equal cost sclite's is the one whose backtrace from the end prefers a
    correct/substituted pair, then an insertion, then a deletion; so does this one (checked
    against sclite 2.10 on random word strings). Because a substitution costs less than an
    insertion plus a deletion but more than either, the weighted optimum can have an error
    more than the Levenshtein alignment of :func:`align_words` (rarely; sclite's WER shows
    the same), and errors can sit at other places, which matters for NIST's MAPSSWE segments
    (:func:`k2quant.significance.mapsswe_nist`).
    Words are compared exactly (sclite ignores case by default: normalise case first).
    """
    n, m = len(ref), len(hyp)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        cost[i][0] = i * NIST_DEL
    for j in range(1, m + 1):
        cost[0][j] = j * NIST_INS
    for i in range(1, n + 1):
        row, prev, r = cost[i], cost[i - 1], ref[i - 1]
        for j in range(1, m + 1):
            row[j] = min(
                prev[j - 1] + (0 if r == hyp[j - 1] else NIST_SUB),
                prev[j] + NIST_DEL,
                row[j - 1] + NIST_INS,
            )
    out: Alignment = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and cost[i][j] == cost[i - 1][j - 1] + (
            0 if ref[i - 1] == hyp[j - 1] else NIST_SUB
        ):
            out.append((ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif j > 0 and cost[i][j] == cost[i][j - 1] + NIST_INS:
            out.append((None, hyp[j - 1]))
            j -= 1
        else:
            out.append((ref[i - 1], None))
            i -= 1
    return out[::-1]


def score_utterance(utt_id: str, ref: Sequence[str], hyp: Optional[Sequence[str]]) -> UttErrors:
    """Counts for one utterance; ``hyp=None`` means a missing hypothesis (all deletions)."""
    missing = hyp is None
    ali = align_words(ref, [] if hyp is None else hyp)
    ins = sum(1 for a, b in ali if a is None)
    dels = sum(1 for a, b in ali if b is None)
    sub = sum(1 for a, b in ali if a is not None and b is not None and a != b)
    return UttErrors(utt_id, len(ref), ins, dels, sub, alignment=ali, missing_hyp=missing)


def compute_wer(
    refs: Dict[str, Sequence[str]],
    hyps: Dict[str, Sequence[str]],
    *,
    allow_extra_hyps: bool = False,
) -> WerResult:
    """Score ``hyps`` against ``refs`` (both: utt_id -> list of words).

    Args:
      refs: reference transcripts; they define the test set and the utterance order.
      hyps: hypotheses. Utterances missing here count as all deletions.
      allow_extra_hyps: if False (default) a hypothesis whose id is not in ``refs`` raises
        ``ValueError``; if True it is ignored with a warning.
    Returns:
      A :class:`WerResult`.
    """
    for name, d in (("refs", refs), ("hyps", hyps)):
        for k, v in d.items():
            if isinstance(v, str):
                raise TypeError(
                    f"compute_wer: {name}[{k!r}] must be a list of words, got the string "
                    f"{v!r}; split it first (e.g. text.split())"
                )
    extra = [u for u in hyps if u not in refs]
    if extra:
        msg = (
            f"{len(extra)} hypothesis utterance(s) have no reference, e.g. {extra[:5]}; "
            f"check that --ref and --hyp belong to the same test set"
        )
        if not allow_extra_hyps:
            raise ValueError(msg + " (or pass allow_extra_hyps=True / --allow-extra-hyps "
                             "to ignore them)")
        log.warning(msg + "; ignoring them")
    utts: Dict[str, UttErrors] = {}
    missing: List[str] = []
    for utt_id, ref in refs.items():
        hyp = hyps.get(utt_id)
        if hyp is None:
            missing.append(utt_id)
        utts[utt_id] = score_utterance(utt_id, list(ref), None if hyp is None else list(hyp))
    if missing:
        log.warning(
            "%d reference utterance(s) have no hypothesis and are scored as all deletions, "
            "e.g. %s", len(missing), missing[:5],
        )
    return WerResult(utts=utts, missing=missing, ignored_hyps=extra)


# ----------------------------------------------------------------------------- text files


def read_text(path: PathLike) -> Dict[str, List[str]]:
    """Read a Kaldi ``text`` file (``utt w1 w2 ...``) into utt_id -> words (file order).

    Blank lines are skipped; a duplicate utterance id raises ``ValueError``.
    """
    out: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            utt, words = fields[0], fields[1:]
            if utt in out:
                raise ValueError(
                    f"{path}:{lineno}: duplicate utterance id {utt!r}; each id must appear "
                    f"once in a Kaldi text file"
                )
            out[utt] = words
    return out


def write_hyps(hyps: Dict[str, Sequence[str]], path: PathLike, *, sort: bool = True) -> None:
    """Write utt_id -> words as a Kaldi ``text`` file (sorted by id unless ``sort=False``)."""
    keys = sorted(hyps) if sort else list(hyps)
    lines = []
    for k in keys:
        if any(c.isspace() for c in k):
            raise ValueError(f"write_hyps: utterance id {k!r} contains whitespace")
        lines.append(" ".join([k, *hyps[k]]) + "\n")
    atomic_write_text(path, "".join(lines))


# ------------------------------------------------------------------- per-utterance errors


def write_per_utt_errors(result: WerResult, path: PathLike) -> None:
    """Write the per-utterance TSV (header ``utt_id ref_words errors ins del sub``)."""
    rows = ["\t".join(PER_UTT_HEADER)]
    for u in result.utts.values():
        rows.append(f"{u.utt_id}\t{u.ref_len}\t{u.errors}\t{u.ins}\t{u.dels}\t{u.sub}")
    atomic_write_text(path, "\n".join(rows) + "\n")


def read_per_utt_errors(path: PathLike) -> WerResult:
    """Read a file written by :func:`write_per_utt_errors` (alignments are not stored)."""
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    if not lines or tuple(lines[0].split("\t")) != PER_UTT_HEADER:
        got = lines[0] if lines else "<empty file>"
        raise ValueError(
            f"{path}: expected the header {chr(9).join(PER_UTT_HEADER)!r}, got {got!r}; "
            f"is this a file written by k2quant.scoring.write_per_utt_errors?"
        )
    utts: Dict[str, UttErrors] = {}
    for lineno, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != len(PER_UTT_HEADER):
            raise ValueError(
                f"{path}:{lineno}: expected {len(PER_UTT_HEADER)} tab-separated fields, got "
                f"{len(parts)}: {line!r}"
            )
        utt, ref_len, errors, ins, dels, sub = parts[0], *map(int, parts[1:])
        if errors != ins + dels + sub:
            raise ValueError(
                f"{path}:{lineno}: errors={errors} but ins+del+sub={ins + dels + sub}"
            )
        if utt in utts:
            raise ValueError(f"{path}:{lineno}: duplicate utterance id {utt!r}")
        utts[utt] = UttErrors(utt, ref_len, ins, dels, sub)
    return WerResult(utts=utts)


# --------------------------------------------------------------------------- error report


def _fmt_pair(r: Optional[str], h: Optional[str]) -> str:
    if r == h:
        return str(r)
    return f"({EPS if r is None else r}->{EPS if h is None else h})"


def write_error_report(
    result: WerResult,
    refs: Dict[str, Sequence[str]],
    hyps: Dict[str, Sequence[str]],
    path: PathLike,
    *,
    top: int = 20,
) -> None:
    """Write a human-readable report in the spirit of icefall's ``errs-*.txt``.

    Sections: the ``%WER`` line and totals, ``PER-UTT DETAILS`` (each utterance's alignment,
    correct words plain, errors as ``(ref->hyp)`` with ``*`` for the empty side),
    ``SUBSTITUTIONS``, ``DELETIONS``, ``INSERTIONS`` (the ``top`` most frequent of each) and
    ``PER-WORD STATS``. ``refs``/``hyps`` are used for utterances whose alignment is not in
    ``result`` (e.g. one read back from a per-utterance file).
    """
    subs: Counter = Counter()
    dels: Counter = Counter()
    ins: Counter = Counter()
    # word -> [correct, errors (as ref or hyp side), count in ref, count in hyp]
    words: Dict[str, List[int]] = {}

    def stat(w: str) -> List[int]:
        return words.setdefault(w, [0, 0, 0, 0])

    lines_utt = []
    for u in result.utts.values():
        ali = u.alignment
        if not ali and (refs.get(u.utt_id) or hyps.get(u.utt_id)):
            ali = align_words(refs.get(u.utt_id, []), hyps.get(u.utt_id, []))
        for r, h in ali:
            if r is not None:
                stat(r)[2] += 1
            if h is not None:
                stat(h)[3] += 1
            if r == h:
                stat(r)[0] += 1
            elif r is None:
                ins[h] += 1
                stat(h)[1] += 1
            elif h is None:
                dels[r] += 1
                stat(r)[1] += 1
            else:
                subs[(r, h)] += 1
                stat(r)[1] += 1
                stat(h)[1] += 1
        tag = "  [NO HYPOTHESIS]" if u.missing_hyp or u.utt_id in result.missing else ""
        lines_utt.append(f"{u.utt_id}:\t" + " ".join(_fmt_pair(r, h) for r, h in ali) + tag)

    corr = result.ref_words - result.dels - result.sub
    out = [
        f"%WER = {result.wer_percent:.2f}",
        f"Errors: {result.ins} insertions, {result.dels} deletions, {result.sub} "
        f"substitutions, over {result.ref_words} reference words ({corr} correct)",
        f"Utterances: {result.num_utts}, with errors: {result.num_utts_with_errors}",
    ]
    if result.missing:
        out.append(
            f"Missing hypotheses (scored as all deletions): {len(result.missing)}: "
            + " ".join(result.missing)
        )
    if result.ignored_hyps:
        out.append(
            f"Hypotheses without reference (ignored): {len(result.ignored_hyps)}: "
            + " ".join(result.ignored_hyps)
        )
    out += [
        "Search below for sections starting with PER-UTT DETAILS:, SUBSTITUTIONS:, "
        "DELETIONS:, INSERTIONS:, PER-WORD STATS:",
        "",
        "PER-UTT DETAILS: corr or (ref->hyp)",
        *lines_utt,
        "",
        "SUBSTITUTIONS: count ref -> hyp",
        *(f"{c}   {r} -> {h}" for (r, h), c in _most_common(subs, top)),
        "",
        "DELETIONS: count ref",
        *(f"{c}   {w}" for w, c in _most_common(dels, top)),
        "",
        "INSERTIONS: count hyp",
        *(f"{c}   {w}" for w, c in _most_common(ins, top)),
        "",
        "PER-WORD STATS: word  corr tot_errs count_in_ref count_in_hyp",
        *(
            f"{w}   {s[0]} {s[1]} {s[2]} {s[3]}"
            for w, s in sorted(words.items(), key=lambda kv: (-kv[1][1], kv[0]))
        ),
    ]
    atomic_write_text(path, "\n".join(out) + "\n")


def _most_common(c: Counter, n: int) -> Iterable:
    # Deterministic order: count descending, then key.
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def score_files(
    ref_path: PathLike,
    hyp_path: PathLike,
    out_dir: Optional[PathLike] = None,
    *,
    name: Optional[str] = None,
    allow_extra_hyps: bool = False,
) -> WerResult:
    """Score a Kaldi hyp text file against a ref text file; optionally write result files.

    With ``out_dir``: ``errs-<name>.txt`` (report), ``per_utt-<name>.tsv`` (per-utterance
    errors) and ``wer-<name>.json`` (totals), ``name`` defaulting to the hyp file's stem.
    """
    from k2quant.utils.io import atomic_write_json

    refs, hyps = read_text(ref_path), read_text(hyp_path)
    result = compute_wer(refs, hyps, allow_extra_hyps=allow_extra_hyps)
    if out_dir is not None:
        out_dir = Path(out_dir)
        name = name or Path(hyp_path).stem
        write_error_report(result, refs, hyps, out_dir / f"errs-{name}.txt")
        write_per_utt_errors(result, out_dir / f"per_utt-{name}.tsv")
        atomic_write_json(out_dir / f"wer-{name}.json", result.to_dict())
    return result


__all__ = [
    "UttErrors",
    "WerResult",
    "align_words",
    "align_words_nist",
    "score_utterance",
    "compute_wer",
    "read_text",
    "write_hyps",
    "write_per_utt_errors",
    "read_per_utt_errors",
    "write_error_report",
    "score_files",
]

"""Significance tests for a word error rate change between two systems.

Both tests are *paired*: they compare the per-utterance error counts of a baseline system A
(usually fp32) and a candidate B (the compressed one) on the same utterances, as written by
:func:`k2quant.scoring.write_per_utt_errors`.

- :func:`mapsswe` -- NIST's Matched-Pairs Sentence-Segment Word Error test (Gillick & Cox 1989;
  NIST ``sc_stats``), with each utterance as one segment: ``Z_i = e_B,i - e_A,i``,
  ``W = mean(Z) / (std(Z) / sqrt(n))`` which is approximately N(0, 1) under H0 (equal expected
  errors). The segment of NIST's full version (stretches bounded by words both systems got
  right) is finer; utterance segments are the common choice for short utterances.
- :func:`mapsswe_nist` -- the same test with NIST's segmentation, as ``sc_stats -t mapsswe``
  of SCTK (the standard, e.g. in Kaldi's and NIST's evaluations): within each utterance,
  segments are stretches that contain errors of either system, bounded by ``min_good = 2``
  consecutive reference words that *both* systems recognised correctly (the boundary words are
  part of the segment; an utterance's start and end also bound segments); segments where
  neither system errs are dropped. ``Z_i`` are the per-segment error differences, the variance
  divides by ``n - 1``, and the p-value is two-sided by default (as sc_stats reports). It
  follows sc_stats in two details: insertions that start an utterance or follow a correct
  word move to the error state, and the last segment of an utterance runs to the end of both
  alignments (trailing insertions included). The p-value is the exact normal one; sc_stats prints a
  table-lookup value instead (the normal CDF at the lower 0.01 step of ``|Z|``, up to 0.008
  larger): :func:`sctk_table_p_value` reproduces it.
- :func:`paired_bootstrap` -- Bisani & Ney (2004): resample utterances with replacement and look
  at the distribution of ``WER_B - WER_A``.

Measured on AN4 dev (104 utterances, 639 words; a 7-epoch TDNN-F at LM scale 1.0 against
scales 0.3, 0.6, 1.5 and against epoch 4): the two-sided p-values of :func:`mapsswe_nist` and of
``sc_stats`` (SCTK 2.10) differ by at most 3.2e-4 (sc_stats prints Z with 3 decimals), with the
same number of segments. With utterance segments (:func:`mapsswe`) the p-value differed by up
to 1.0e-2 (0.506 vs 0.496). kaldialign's alignment instead of sclite's made no difference on
AN4 but moved Z by 0.03 on random word strings with many ties (tests/test_sctk.py).

Segments of :func:`mapsswe` are whole utterances (it needs only per-utterance error counts);
on short utterances (AN4) the two segmentations are close, on long conversational ones
(eval2000) NIST's finer segments give more, smaller ``Z_i``.

"Lossless" in k2quant means the candidate's WER *increase* is not significant:
``p_value(alternative="greater") >= alpha`` (alpha = 0.05). The one-sided test is the stricter
choice for this claim (its p-value is half the two-sided one when B is worse).
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

ALTERNATIVES = ("greater", "less", "two-sided")


@dataclass
class SignificanceResult:
    """Outcome of a paired test of system B against baseline A."""

    test: str
    num_utts: int
    errors_a: int
    errors_b: int
    ref_words: int
    wer_a_percent: float
    wer_b_percent: float
    statistic: float
    p_value: float
    alternative: str
    num_segments: Optional[int] = None

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha

    def as_dict(self) -> dict:
        return asdict(self)


def _normal_sf(z: float) -> float:
    """Survival function of N(0,1): P(Z > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def pair_errors(
    errors_a: Mapping[str, Tuple[int, int]],
    errors_b: Mapping[str, Tuple[int, int]],
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Align two per-utterance error tables on utterance id.

    Args:
      errors_a, errors_b: ``{utt_id: (num_errors, num_ref_words)}``.
    Returns:
      ``(e_a, e_b, n_ref, utt_ids)``: int64 arrays of shape (U,) in sorted utt-id order.
    Raises:
      ValueError if the utterance sets differ (names a few ids on each side) or the reference
      lengths disagree (the two systems were scored against different references).
    """
    ids_a, ids_b = set(errors_a), set(errors_b)
    if ids_a != ids_b:
        only_a = sorted(ids_a - ids_b)[:5]
        only_b = sorted(ids_b - ids_a)[:5]
        raise ValueError(
            "paired test needs the same utterances in both systems: "
            f"{len(ids_a - ids_b)} only in A (e.g. {only_a}), "
            f"{len(ids_b - ids_a)} only in B (e.g. {only_b})"
        )
    if not ids_a:
        raise ValueError("paired test needs at least one utterance, got none")
    utts = sorted(ids_a)
    e_a = np.array([int(errors_a[u][0]) for u in utts], dtype=np.int64)
    e_b = np.array([int(errors_b[u][0]) for u in utts], dtype=np.int64)
    n_a = np.array([int(errors_a[u][1]) for u in utts], dtype=np.int64)
    n_b = np.array([int(errors_b[u][1]) for u in utts], dtype=np.int64)
    bad = np.nonzero(n_a != n_b)[0]
    if len(bad):
        u = utts[bad[0]]
        raise ValueError(
            f"utterance {u!r} has {n_a[bad[0]]} reference words in A but {n_b[bad[0]]} in B: "
            "both systems must be scored against the same references"
        )
    if (e_a < 0).any() or (e_b < 0).any():
        raise ValueError("error counts must be >= 0")
    return e_a, e_b, n_a, utts


def mapsswe(
    errors_a: Mapping[str, Tuple[int, int]],
    errors_b: Mapping[str, Tuple[int, int]],
    alternative: str = "greater",
) -> SignificanceResult:
    """Matched-pairs sentence-segment word error test of B against A.

    Args:
      errors_a, errors_b: ``{utt_id: (num_errors, num_ref_words)}`` for the same utterances.
      alternative: ``"greater"`` tests H1 "B makes more errors than A" (use this for a
        lossless verdict), ``"less"`` the opposite, ``"two-sided"`` either.
    Returns:
      :class:`SignificanceResult` with ``statistic = W``. When every ``Z_i`` is equal the
      variance is 0: W is 0 (p = 1, or 0.5 one-sided) if they are all 0, else +-inf.
    """
    _check_alternative(alternative)
    e_a, e_b, n_ref, _ = pair_errors(errors_a, errors_b)
    z = (e_b - e_a).astype(np.float64)
    n = len(z)
    mu = float(z.mean())
    var = float(z.var(ddof=1)) if n > 1 else 0.0
    if var > 0:
        w = mu / math.sqrt(var / n)
    else:
        w = 0.0 if mu == 0 else math.copysign(math.inf, mu)
    if alternative == "greater":
        p = _normal_sf(w)
    elif alternative == "less":
        p = _normal_sf(-w)
    else:
        p = min(1.0, 2.0 * _normal_sf(abs(w)))
    return _result("mapsswe", e_a, e_b, n_ref, w, p, alternative)


CORR, SUB, DEL, INS = "C", "S", "D", "I"


def _evals(alignment: Sequence[Tuple[Optional[str], Optional[str]]]) -> List[str]:
    """(ref, hyp) pairs (None = epsilon) -> C/S/D/I per alignment position."""
    out = []
    for r, h in alignment:
        if r is None:
            out.append(INS)
        elif h is None:
            out.append(DEL)
        else:
            out.append(CORR if r == h else SUB)
    return out


def _seg_counts(ev: Sequence[str], beg: int, end: int) -> Tuple[int, int]:
    beg = max(beg, 0)
    part = ev[beg:end + 1]
    return sum(e != CORR for e in part), sum(e != INS for e in part)


def nist_segments(
    alignment_a: Sequence[Tuple[Optional[str], Optional[str]]],
    alignment_b: Sequence[Tuple[Optional[str], Optional[str]]],
    min_good: int = 2,
) -> List[Tuple[int, int, int]]:
    """MAPSSWE segments of one utterance as ``sc_stats`` finds them (module docstring).

    Args:
      alignment_a, alignment_b: the two systems' alignments of the utterance, lists of
        ``(ref_word, hyp_word)`` with None for epsilon (:func:`k2quant.scoring.align_words`);
        their reference words must be the same.
      min_good: correct words (of both systems) that end a segment.

    Returns:
      ``[(ref_words, errors_a, errors_b)]`` per segment with at least one error.
    """
    if min_good < 1:
        raise ValueError(f"min_good must be >= 1, got {min_good}")
    refs_a = [r for r, _ in alignment_a if r is not None]
    refs_b = [r for r, _ in alignment_b if r is not None]
    if refs_a != refs_b:
        raise ValueError("the two alignments have different reference words")
    e1, e2 = _evals(alignment_a), _evals(alignment_b)
    n1, n2 = len(e1), len(e2)
    segs: List[Tuple[int, int, int]] = []

    def store(b1, b2, t1, t2):
        err1, ref1 = _seg_counts(e1, b1, t1)
        err2, ref2 = _seg_counts(e2, b2, t2)
        if err1 or err2:
            segs.append(((ref1 + ref2) // 2, err1, err2))

    i1 = i2 = eog1 = eog2 = num_good = 0
    state = "b"
    while i1 < n1:
        while i1 < n1 and e1[i1] == INS:
            i1, state = i1 + 1, "e"
        while i2 < n2 and e2[i2] == INS:
            i2, state = i2 + 1, "e"
        both = i1 < n1 and i2 < n2 and e1[i1] == CORR and e2[i2] == CORR
        if state == "b":
            if both:
                eog1, eog2 = i1, i2
            else:
                state = "e"
        elif state == "e":
            if both:
                num_good = 1
                if num_good == min_good:
                    store(eog1 - (min_good - 1), eog2 - (min_good - 1), i1, i2)
                    eog1, eog2, state = i1, i2, "b"
                else:
                    state = "g"
        else:  # "g": counting correct words after an error
            if both:
                num_good += 1
                if num_good == min_good:
                    store(eog1 - (min_good - 1), eog2 - (min_good - 1), i1, i2)
                    eog1, eog2, state = i1, i2, "b"
            else:
                state = "e"
        if i1 < n1:
            i1 += 1
        if i2 < n2:
            i2 += 1
    if state != "b" or i2 < n2:  # trailing errors, or B's trailing insertions
        store(eog1 - (min_good - 1), eog2 - (min_good - 1), n1 - 1, n2 - 1)
    return segs


def sctk_table_p_value(z: float) -> float:
    """The two-sided p-value sc_stats prints: the normal CDF at ``floor(100 |z|) / 100``."""
    zq = math.floor(100 * abs(z) + 1e-9) / 100
    return min(1.0, 2.0 * _normal_sf(zq))


def mapsswe_nist(
    alignments_a: Mapping[str, Sequence[Tuple[Optional[str], Optional[str]]]],
    alignments_b: Mapping[str, Sequence[Tuple[Optional[str], Optional[str]]]],
    alternative: str = "two-sided",
    min_good: int = 2,
) -> SignificanceResult:
    """MAPSSWE of B against A with NIST's sentence segments (see the module docstring).

    Args:
      alignments_a, alignments_b: ``{utt_id: alignment}`` of the same utterances
        (``WerResult.utts[u].alignment`` of :func:`k2quant.scoring.compute_wer`).
      alternative: ``"two-sided"`` (sc_stats), ``"greater"`` (B worse) or ``"less"``.
      min_good: boundary of correct words (sc_stats: 2).

    Returns:
      :class:`SignificanceResult` with ``statistic = W = mean(e_B - e_A) / se`` over the
      segments (sc_stats prints ``-W``: it subtracts the second system), ``num_segments``, and
      word counts and WERs of the whole utterances.
    """
    _check_alternative(alternative)
    ids_a, ids_b = set(alignments_a), set(alignments_b)
    if ids_a != ids_b:
        raise ValueError(
            f"paired test needs the same utterances in both systems: {len(ids_a - ids_b)} only "
            f"in A (e.g. {sorted(ids_a - ids_b)[:5]}), {len(ids_b - ids_a)} only in B "
            f"(e.g. {sorted(ids_b - ids_a)[:5]})"
        )
    if not ids_a:
        raise ValueError("paired test needs at least one utterance, got none")
    diffs: List[int] = []
    e_a, e_b, n_ref = [], [], []
    for u in sorted(ids_a):
        try:
            segs = nist_segments(alignments_a[u], alignments_b[u], min_good)
        except ValueError as e:
            raise ValueError(f"utterance {u!r}: {e}") from e
        diffs.extend(eb - ea for _, ea, eb in segs)
        ev_a, ev_b = _evals(alignments_a[u]), _evals(alignments_b[u])
        e_a.append(sum(x != CORR for x in ev_a))
        e_b.append(sum(x != CORR for x in ev_b))
        n_ref.append(sum(x != INS for x in ev_a))
    z = np.asarray(diffs, dtype=np.float64)
    n = len(z)
    var = float(z.var(ddof=1)) if n > 1 else 0.0
    w = float(z.mean()) / math.sqrt(var / n) if var > 0 else 0.0  # sc_stats: Z = 0 if var = 0
    if alternative == "greater":
        p = _normal_sf(w)
    elif alternative == "less":
        p = _normal_sf(-w)
    else:
        p = min(1.0, 2.0 * _normal_sf(abs(w)))
    res = _result("mapsswe_nist", np.asarray(e_a), np.asarray(e_b), np.asarray(n_ref), w, p,
                  alternative)
    res.num_segments = n
    return res


def paired_bootstrap(
    errors_a: Mapping[str, Tuple[int, int]],
    errors_b: Mapping[str, Tuple[int, int]],
    num_samples: int = 10000,
    seed: int = 0,
    alternative: str = "greater",
) -> SignificanceResult:
    """Paired bootstrap over utterances (Bisani & Ney 2004).

    Each of ``num_samples`` resamples draws U utterances with replacement and computes
    ``delta* = WER_B* - WER_A*``. The one-sided p-value for "B is worse" is the fraction of
    resamples with ``delta* <= 0``; for "B is better" the fraction with ``delta* >= 0``;
    two-sided is twice the smaller of the two (capped at 1).

    Returns:
      :class:`SignificanceResult` with ``statistic`` = the observed absolute WER difference in
      percent (B - A).
    """
    _check_alternative(alternative)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    e_a, e_b, n_ref, _ = pair_errors(errors_a, errors_b)
    rng = np.random.default_rng(seed)
    u = len(e_a)
    diff = e_b - e_a
    p_le = p_ge = 0
    chunk = max(1, min(num_samples, 2_000_000 // max(u, 1)))
    done = 0
    while done < num_samples:
        m = min(chunk, num_samples - done)
        idx = rng.integers(0, u, size=(m, u))
        d = diff[idx].sum(axis=1)
        # The sign of delta* equals the sign of the summed error difference (same ref words).
        p_le += int((d <= 0).sum())
        p_ge += int((d >= 0).sum())
        done += m
    p_le /= num_samples
    p_ge /= num_samples
    if alternative == "greater":
        p = p_le
    elif alternative == "less":
        p = p_ge
    else:
        p = min(1.0, 2.0 * min(p_le, p_ge))
    total = int(n_ref.sum())
    stat = 100.0 * float(diff.sum()) / total if total else 0.0
    return _result("paired_bootstrap", e_a, e_b, n_ref, stat, p, alternative)


def _result(test, e_a, e_b, n_ref, stat, p, alternative) -> SignificanceResult:
    total = int(n_ref.sum())
    return SignificanceResult(
        test=test,
        num_utts=len(e_a),
        errors_a=int(e_a.sum()),
        errors_b=int(e_b.sum()),
        ref_words=total,
        wer_a_percent=100.0 * int(e_a.sum()) / total if total else 0.0,
        wer_b_percent=100.0 * int(e_b.sum()) / total if total else 0.0,
        statistic=float(stat),
        p_value=float(p),
        alternative=alternative,
    )


def lossless_verdict(
    errors_a: Mapping[str, Tuple[int, int]],
    errors_b: Mapping[str, Tuple[int, int]],
    alpha: float = 0.05,
    num_samples: int = 10000,
    seed: int = 0,
) -> Dict[str, object]:
    """Both tests for "B's WER increase over A is significant", and the verdict.

    "Lossless" = neither MAPSSWE nor the paired bootstrap rejects H0 at level ``alpha``
    (one-sided, B worse), i.e. both p-values are >= alpha.

    Returns:
      ``{"lossless": bool, "p_value": min of the two, "mapsswe": {...}, "bootstrap": {...}}``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    m = mapsswe(errors_a, errors_b, "greater")
    b = paired_bootstrap(errors_a, errors_b, num_samples=num_samples, seed=seed)
    p = min(m.p_value, b.p_value)
    return {"lossless": bool(p >= alpha), "p_value": p, "alpha": alpha,
            "mapsswe": m.as_dict(), "bootstrap": b.as_dict()}


def compare_systems(
    refs: Mapping[str, Sequence[str]],
    hyps_a: Mapping[str, Sequence[str]],
    hyps_b: Mapping[str, Sequence[str]],
    num_samples: int = 10000,
    seed: int = 0,
) -> Dict[str, object]:
    """Every paired test of B against A on Kaldi-style texts (``utt -> words``).

    Utterances without a hypothesis count as all deletions. Alignments are sclite's
    (:func:`k2quant.scoring.align_words_nist`).

    Returns:
      ``{"mapsswe_nist": two-sided NIST MAPSSWE (as sc_stats), "mapsswe_nist_greater":
      one-sided (B worse), "sctk_table_p": the p-value sc_stats prints,
      "mapsswe_utterance": one-sided MAPSSWE with utterance segments, "bootstrap": one-sided
      paired bootstrap}``, each a :meth:`SignificanceResult.as_dict`.
    """
    from k2quant.scoring import align_words_nist

    extra = sorted((set(hyps_a) | set(hyps_b)) - set(refs))
    if extra:
        raise ValueError(f"{len(extra)} hypotheses have no reference, e.g. {extra[:3]}")
    ali_a = {u: align_words_nist(list(r), list(hyps_a.get(u, []))) for u, r in refs.items()}
    ali_b = {u: align_words_nist(list(r), list(hyps_b.get(u, []))) for u, r in refs.items()}
    two = mapsswe_nist(ali_a, ali_b, "two-sided")
    one = mapsswe_nist(ali_a, ali_b, "greater")

    def errs(ali):
        return {u: (sum(1 for r, h in a if r != h), sum(1 for r, _ in a if r is not None))
                for u, a in ali.items()}

    ea, eb = errs(ali_a), errs(ali_b)
    return {
        "mapsswe_nist": two.as_dict(),
        "mapsswe_nist_greater": one.as_dict(),
        "sctk_table_p": sctk_table_p_value(two.statistic),
        "mapsswe_utterance": mapsswe(ea, eb, "greater").as_dict(),
        "bootstrap": paired_bootstrap(ea, eb, num_samples=num_samples, seed=seed).as_dict(),
    }


def errors_from_table(rows: Sequence[Tuple[str, int, int]]) -> Dict[str, Tuple[int, int]]:
    """``[(utt_id, num_errors, num_ref_words), ...]`` -> ``{utt_id: (errors, ref_words)}``.

    Raises ValueError on a repeated utterance id.
    """
    out: Dict[str, Tuple[int, int]] = {}
    for utt, err, n in rows:
        if utt in out:
            raise ValueError(f"utterance id {utt!r} appears twice")
        out[utt] = (int(err), int(n))
    return out


def load_errors(path) -> Dict[str, Tuple[int, int]]:
    """Read a per-utterance error file written by ``k2quant.scoring.write_per_utt_errors``.

    Returns ``{utt_id: (num_errors, num_ref_words)}`` for :func:`mapsswe` and friends.
    """
    from k2quant.scoring import read_per_utt_errors

    result = read_per_utt_errors(path)
    return {u: (e.errors, e.ref_len) for u, e in result.utts.items()}


__all__ = [
    "SignificanceResult",
    "mapsswe",
    "mapsswe_nist",
    "nist_segments",
    "compare_systems",
    "sctk_table_p_value",
    "paired_bootstrap",
    "lossless_verdict",
    "pair_errors",
    "errors_from_table",
    "load_errors",
]


"""Significance tests for a word error rate change between two systems.

Both tests are *paired*: they compare the per-utterance error counts of a baseline system A
(usually fp32) and a candidate B (the compressed one) on the same utterances, as written by
:func:`k2quant.scoring.write_per_utt_errors`.

- :func:`mapsswe` -- NIST's Matched-Pairs Sentence-Segment Word Error test (Gillick & Cox 1989;
  NIST ``sc_stats``), with each utterance as one segment: ``Z_i = e_B,i - e_A,i``,
  ``W = mean(Z) / (std(Z) / sqrt(n))`` which is approximately N(0, 1) under H0 (equal expected
  errors). The segment of NIST's full version (stretches bounded by words both systems got
  right) is finer; utterance segments are the common choice for short utterances.
- :func:`paired_bootstrap` -- Bisani & Ney (2004): resample utterances with replacement and look
  at the distribution of ``WER_B - WER_A``.

"Lossless" in k2quant means the candidate's WER *increase* is not significant:
``p_value(alternative="greater") >= alpha`` (alpha = 0.05). The one-sided test is the stricter
choice for this claim (its p-value is half the two-sided one when B is worse).
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Sequence, Tuple

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
    "paired_bootstrap",
    "lossless_verdict",
    "pair_errors",
    "errors_from_table",
    "load_errors",
]


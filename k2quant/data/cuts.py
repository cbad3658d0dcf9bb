"""Cut hygiene before training and decoding: filtering, OOV mapping, feature checks.

- :func:`filter_cuts` drops cuts that LF-MMI cannot use (empty transcripts, durations outside
  ``[min_duration, max_duration]``, fewer output frames after subsampling than phones in the
  transcript) and returns counts of what it dropped.
- :func:`map_oov` / :func:`map_oov_cuts` replace words absent from the lexicon by ``<UNK>`` and
  count them (with a warning), never failing.
- :func:`check_features` raises a ``ValueError`` naming the cut when its features contain NaN or
  Inf; the training dataset calls it on every batch item.
"""

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Set, Tuple, Union

from k2quant.data.lexicon import UNK_WORD, Lexicon, min_pron_lengths, read_lexicon

log = logging.getLogger(__name__)


def map_oov(
    text: str, words: Union[Set[str], Mapping[str, Any]], oov: str = UNK_WORD
) -> Tuple[str, int]:
    """Replace each word of ``text`` not in ``words`` by ``oov``; returns (text, count replaced)."""
    out, n = [], 0
    for w in text.split():
        if w in words:
            out.append(w)
        else:
            out.append(oov)
            n += 1
    return " ".join(out), n


def map_oov_cuts(cuts, words: Union[Set[str], Mapping[str, Any]], oov: str = UNK_WORD):
    """Map out-of-vocabulary words of every supervision of ``cuts`` to ``oov``.

    Returns:
      ``(cuts, counter)``: an eager CutSet with the mapped texts, and a Counter of the original
      OOV words. A warning with the total and the most frequent OOV words is logged if any.
    """
    from lhotse.utils import fastcopy

    counts: Counter = Counter()

    def fix(sup):
        if sup.text is None:
            return sup
        for w in sup.text.split():
            if w not in words:
                counts[w] += 1
        text, n = map_oov(sup.text, words, oov)
        return fastcopy(sup, text=text) if n else sup

    mapped = cuts.map_supervisions(fix).to_eager()
    if counts:
        log.warning(
            "mapped %d out-of-vocabulary word tokens (%d types) to %s; most frequent: %s",
            sum(counts.values()),
            len(counts),
            oov,
            counts.most_common(10),
        )
    return mapped, counts


@dataclass
class FilterStats:
    """What :func:`filter_cuts` kept and dropped (counts of cuts, durations in seconds)."""

    total: int = 0
    kept: int = 0
    empty_text: int = 0
    too_short: int = 0
    too_long: int = 0
    too_few_frames: int = 0
    oov_tokens: int = 0
    kept_seconds: float = 0.0
    dropped_ids: Dict[str, list] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.total - self.kept

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("dropped_ids")
        d["dropped"] = self.dropped
        return d


def _num_frames(cut, frame_shift: float) -> int:
    if cut.has_features:
        return cut.num_frames
    from lhotse.utils import compute_num_frames

    return compute_num_frames(cut.duration, frame_shift, cut.sampling_rate)


def filter_cuts(
    cuts,
    *,
    min_duration: float = 0.3,
    max_duration: float = 20.0,
    lexicon: Optional[Union[Lexicon, Mapping[str, Any], Set[str], str, os.PathLike]] = None,
    subsampling_factor: int = 3,
    frame_shift: float = 0.01,
    map_oov_to: Optional[str] = UNK_WORD,
):
    """Drop cuts unusable for LF-MMI training; returns ``(cuts, FilterStats)``.

    A cut is dropped, in this order of reasons, when
      1. its transcript (all supervisions' text joined) is empty  -> ``empty_text``;
      2. ``duration < min_duration``                              -> ``too_short``;
      3. ``duration > max_duration``                              -> ``too_long``;
      4. ``num_frames // subsampling_factor`` is smaller than the number of phones of its
         transcript (shortest pronunciation of each word; 1 for a word missing from the lexicon,
         or 1 per word when no lexicon is given)                    -> ``too_few_frames``.

    ``num_frames`` is the cut's feature frame count, or computed from its duration with
    ``frame_shift`` when it has no features; ``floor(T / subsampling_factor)`` is a lower bound on
    the output length of the acoustic models.

    Args:
      cuts: a lhotse CutSet.
      lexicon: Kaldi lexicon as ``[(word, phones)]`` or a lexicon file (gives phone counts and
        the vocabulary), or a set/dict of words (vocabulary only). None: no phone counts and no
        OOV mapping.
      map_oov_to: when a vocabulary is known, words outside it are mapped to this word (counted
        in ``oov_tokens``); None keeps them.

    Returns:
      ``(CutSet, FilterStats)``; the stats are also logged. ``stats.dropped_ids`` maps each reason
      to the first 20 dropped cut ids.
    """
    from lhotse import CutSet

    if subsampling_factor < 1:
        raise ValueError(f"subsampling_factor must be >= 1, got {subsampling_factor}")
    pron_len: Dict[str, int] = {}
    vocab: Optional[Set[str]] = None
    if isinstance(lexicon, (str, os.PathLike)):
        lexicon = read_lexicon(lexicon)
    if lexicon is not None:
        if isinstance(lexicon, (set, frozenset)) or isinstance(lexicon, Mapping):
            vocab = set(lexicon)
        else:
            pron_len = min_pron_lengths(list(lexicon))
            vocab = set(pron_len)
    stats = FilterStats()
    if vocab is not None and map_oov_to is not None:
        cuts, oov = map_oov_cuts(cuts, vocab, map_oov_to)
        stats.oov_tokens = sum(oov.values())

    kept = []
    for cut in cuts:
        stats.total += 1
        text = " ".join(s.text or "" for s in cut.supervisions).split()
        reason = None
        if not text:
            reason = "empty_text"
        elif cut.duration < min_duration:
            reason = "too_short"
        elif cut.duration > max_duration:
            reason = "too_long"
        else:
            num_phones = sum(pron_len.get(w, 1) for w in text)
            if _num_frames(cut, frame_shift) // subsampling_factor < num_phones:
                reason = "too_few_frames"
        if reason is None:
            kept.append(cut)
            stats.kept += 1
            stats.kept_seconds += cut.duration
        else:
            setattr(stats, reason, getattr(stats, reason) + 1)
            ids = stats.dropped_ids.setdefault(reason, [])
            if len(ids) < 20:
                ids.append(cut.id)
    stats.kept_seconds = round(stats.kept_seconds, 3)
    log.info(
        "filter_cuts: kept %d of %d cuts (%.2f h); dropped: %d empty, %d < %.2fs, %d > %.2fs, "
        "%d with fewer frames/%d than phones; %d OOV tokens mapped",
        stats.kept,
        stats.total,
        stats.kept_seconds / 3600,
        stats.empty_text,
        stats.too_short,
        min_duration,
        stats.too_long,
        max_duration,
        stats.too_few_frames,
        subsampling_factor,
        stats.oov_tokens,
    )
    return CutSet.from_cuts(kept), stats


def check_features(cut: Any, feats: Any) -> None:
    """Raise ``ValueError`` naming the cut if ``feats`` contains NaN or Inf.

    Args:
      cut: a lhotse Cut (its ``id`` is reported) or a cut id string.
      feats: 2-D array (numpy or torch) of shape (T, C).

    Caution:
      ``feats`` must be 2-D and non-empty; that is checked too (``ValueError``).
    """
    import numpy as np

    cut_id = cut if isinstance(cut, str) else getattr(cut, "id", repr(cut))
    if hasattr(feats, "detach"):  # torch.Tensor
        feats = feats.detach().cpu().float().numpy()
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(
            f"cut {cut_id}: expected features of shape (T, C) with T > 0, got shape {feats.shape}"
        )
    finite = np.isfinite(feats)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"cut {cut_id}: features contain {int(np.isnan(feats).sum())} NaN and "
            f"{int(np.isinf(feats).sum())} Inf values (first bad frames {bad_rows[:5].tolist()} of "
            f"{feats.shape[0]}); recompute its features (k2quant compute-fbank) or drop the cut"
        )


def summarize(cuts: Iterable) -> Dict[str, Any]:
    """Counts for logs/reports: cuts, speakers, hours."""
    n, secs, speakers = 0, 0.0, set()
    for c in cuts:
        n += 1
        secs += c.duration
        speakers.update(s.speaker for s in c.supervisions if s.speaker)
    return {"cuts": n, "speakers": len(speakers), "hours": round(secs / 3600, 4)}

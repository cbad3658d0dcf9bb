"""lhotse glue: CutSets -> batches for LF-MMI training and decoding.

A batch is a dict (the layout of lhotse's ``K2SpeechRecognitionDataset``, which icefall uses)::

    {
      "inputs": 3-D float32 tensor (N, T, C): features of the N cuts, longest first,
                shorter ones padded at the end by repeating their last frame (as Kaldi does
                at utterance edges), so padding never pulls BatchNorm statistics off;
      "duration": float, total duration of the cuts in seconds;
      "supervisions": {
          "sequence_idx": int64 (S,)  index of the cut in "inputs",
          "start_frame":  int64 (S,)  first feature frame of the supervision,
          "num_frames":   int64 (S,)  its length in feature frames,
          "text":         List[str] of length S,
          "cut_id":       List[str] of length S,
      },
    }

Cuts are sorted by decreasing duration, so supervision ``i`` of a one-supervision-per-cut
corpus is in row ``i``. :func:`supervision_segments` turns a batch into the
``[seq_idx, start_frame, num_frames]`` int32 segments (divided by the subsampling factor,
sorted by decreasing length) that ``k2.DenseFsaVec`` wants.

Samplers: :func:`make_train_sampler` is a lhotse ``DynamicBucketingSampler`` (shuffled with
``seed + epoch``, so an epoch's batches depend only on the seed and the epoch number, which is
what makes resuming bit-exact); :func:`make_eval_sampler` keeps the manifest order.
"""
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from k2quant.utils.deps import optional_import

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


def load_cuts(path: PathLike, lazy: bool = True):
    """Open a lhotse CutSet manifest (``cuts_*.jsonl.gz``), lazily by default.

    The first item is read to check that the file is a cut manifest (not, e.g., the
    supervisions or recordings manifest of the same split).

    Raises:
      FileNotFoundError: naming the file and the stage that writes it.
      ValueError: the file is not a readable lhotse manifest, or holds something else than cuts.
    """
    lhotse = optional_import("lhotse")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"cut manifest {path} not found; it is written by the feature stage "
            f"('k2quant compute-fbank'). Run the recipe's earlier stages first."
        )
    try:
        if lazy and str(path).endswith((".jsonl", ".jsonl.gz")):
            cuts = lhotse.CutSet.from_jsonl_lazy(path)
        else:
            cuts = lhotse.CutSet.from_file(path)
        first = next(iter(cuts), None)
    except (ValueError, KeyError, TypeError, AttributeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cut manifest {path} is not a readable lhotse manifest "
                         f"({type(e).__name__}: {msg})") from e
    from lhotse.cut import Cut

    if first is not None and not isinstance(first, Cut):
        raise ValueError(
            f"{path} holds {type(first).__name__} items, not cuts (a supervisions or "
            f"recordings manifest?); pass a CutSet with features, e.g. "
            f"data/fbank/cuts_<split>.jsonl.gz from 'k2quant compute-fbank'"
        )
    return cuts


def total_duration(cuts) -> float:
    """Sum of cut durations in seconds (one pass over a lazy manifest)."""
    return float(sum(c.duration for c in cuts))


class NonFiniteFeaturesError(ValueError):
    """Features of a cut contain NaN or Inf."""


class SpecAugment:
    """SpecAugment (Park et al. 2019) without time warping, on one (T, C) feature matrix.

    ``num_freq_masks`` bands of up to ``max_freq_width`` channels and ``num_time_masks`` spans of
    up to ``max_time_width`` frames (and at most ``max_time_fraction`` of the utterance each) are
    set to 0, the utterance mean after ``utt_cmn``. Randomness comes from torch's global RNG
    (in the training process, so a resumed run replays it exactly).
    """

    def __init__(self, num_freq_masks: int = 2, max_freq_width: int = 15,
                 num_time_masks: int = 2, max_time_width: int = 20,
                 max_time_fraction: float = 0.15):
        self.num_freq_masks = num_freq_masks
        self.max_freq_width = max_freq_width
        self.num_time_masks = num_time_masks
        self.max_time_width = max_time_width
        self.max_time_fraction = max_time_fraction

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        f = f.clone()
        t, c = f.shape
        for _ in range(self.num_freq_masks):
            w = int(torch.randint(0, self.max_freq_width + 1, ()).item())
            if 0 < w < c:
                s = int(torch.randint(0, c - w + 1, ()).item())
                f[:, s:s + w] = 0.0
        tmax = min(self.max_time_width, int(self.max_time_fraction * t))
        for _ in range(self.num_time_masks):
            w = int(torch.randint(0, tmax + 1, ()).item()) if tmax > 0 else 0
            if 0 < w < t:
                s = int(torch.randint(0, t - w + 1, ()).item())
                f[s:s + w, :] = 0.0
        return f


class AsrDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by a lhotse ``CutSet`` (the sampler's mini-batch).

    Args:
      utt_cmn: subtract each utterance's mean feature vector (cepstral-mean-style
        normalisation of fbank). Must be the same in training and decoding; the training loop
        stores it in the checkpoint's config and the decoder reads it from there.
      check_finite: raise :class:`NonFiniteFeaturesError` naming the cut when its features
        contain NaN/Inf (a cheap check; catching it here beats a NaN loss later).
      spec_augment: a :class:`SpecAugment` applied to each utterance (training only).
      max_frame_shift: drop a random number (0..max_frame_shift) of leading frames of each
        cut (training only), Kaldi's frame-shift augmentation of chain egs: with
        ``subsampling_factor - 1`` every phase of the subsampled output grid is seen.
        Supervisions starting at frame 0 keep starting there and lose those frames.
    """

    def __init__(self, utt_cmn: bool = True, check_finite: bool = True,
                 spec_augment: Optional[SpecAugment] = None, max_frame_shift: int = 0):
        super().__init__()
        self.utt_cmn = utt_cmn
        self.check_finite = check_finite
        self.spec_augment = spec_augment
        self.max_frame_shift = int(max_frame_shift)

    def __getitem__(self, cuts) -> Dict[str, Any]:
        cuts = cuts.sort_by_duration(ascending=False)
        feats: List[torch.Tensor] = []
        shifts: List[int] = []
        for cut in cuts:
            if not cut.has_features:
                raise ValueError(
                    f"cut {cut.id} has no features; compute them first "
                    f"('k2quant compute-fbank') and pass the cuts_*.jsonl.gz it writes"
                )
            f = torch.from_numpy(cut.load_features()).float()
            if self.check_finite and not torch.isfinite(f).all():
                bad = (~torch.isfinite(f)).any(dim=1).nonzero().flatten()
                raise NonFiniteFeaturesError(
                    f"cut {cut.id}: features contain NaN/Inf at {len(bad)} frame(s) "
                    f"(first at frame {int(bad[0])}); recompute its features or drop the cut "
                    f"from the manifest"
                )
            shift = 0
            if self.max_frame_shift > 0 and f.shape[0] > self.max_frame_shift + 1:
                shift = int(torch.randint(0, self.max_frame_shift + 1, ()).item())
                f = f[shift:]
            shifts.append(shift)
            if self.utt_cmn:
                f = f - f.mean(dim=0, keepdim=True)
            if self.spec_augment is not None:
                f = self.spec_augment(f)
            feats.append(f)
        max_t = max(f.shape[0] for f in feats)
        inputs = torch.stack(
            [
                f if f.shape[0] == max_t else torch.cat([f, f[-1:].expand(max_t - f.shape[0], -1)])
                for f in feats
            ]
        )
        seq_idx, start, num, text, ids = [], [], [], [], []
        for i, cut in enumerate(cuts):
            fs = cut.frame_shift
            for sup in cut.supervisions:
                s0 = max(0, int(round(sup.start / fs)))
                s = max(0, s0 - shifts[i])
                n = min(int(round(sup.duration / fs)) - (s - (s0 - shifts[i])),
                        feats[i].shape[0] - s)
                seq_idx.append(i)
                start.append(s)
                num.append(n)
                text.append(sup.text or "")
                ids.append(cut.id)
        return {
            "inputs": inputs,
            "duration": float(sum(c.duration for c in cuts)),
            "supervisions": {
                "sequence_idx": torch.tensor(seq_idx, dtype=torch.int64),
                "start_frame": torch.tensor(start, dtype=torch.int64),
                "num_frames": torch.tensor(num, dtype=torch.int64),
                "text": text,
                "cut_id": ids,
            },
        }


def supervision_segments(
    supervisions: Dict[str, Any], subsampling_factor: int
) -> Tuple[torch.Tensor, List[str], List[int]]:
    """Segments for ``k2.DenseFsaVec`` from a batch's ``supervisions``.

    Returns:
      ``(segments, texts, order)``: ``segments`` is a 2-D int32 CPU tensor (S, 3) of
      ``[sequence_idx, start_frame // sf, num_frames // sf]`` sorted by decreasing
      ``num_frames``; ``texts`` and the supervision indices ``order`` follow that order.
    """
    sf = int(subsampling_factor)
    seg = torch.stack(
        [
            supervisions["sequence_idx"],
            supervisions["start_frame"] // sf,
            supervisions["num_frames"] // sf,
        ],
        dim=1,
    ).to(torch.int32)
    order = torch.argsort(seg[:, 2], descending=True, stable=True) if _has_stable_argsort() else (
        torch.argsort(seg[:, 2], descending=True)
    )
    seg = seg[order]
    texts = [supervisions["text"][int(i)] for i in order]
    return seg, texts, [int(i) for i in order]


def _has_stable_argsort() -> bool:
    try:
        torch.argsort(torch.zeros(1), stable=True)
        return True
    except TypeError:  # pragma: no cover - torch < 1.13
        return False


def _compat_sampler_class(cls):
    """``cls`` usable with torch 1.13, whose ``Sampler.__init__`` requires ``data_source``.

    lhotse's ``CutSampler.__init__`` calls ``super().__init__()`` without arguments (fine on
    torch >= 2.0). A subclass that also derives from a ``Sampler`` subclass with an optional
    ``data_source`` puts that shim between ``CutSampler`` and ``Sampler`` in the MRO; nothing
    is patched globally.
    """
    import inspect

    p = inspect.signature(torch.utils.data.Sampler.__init__).parameters.get("data_source")
    if p is None or p.default is not inspect.Parameter.empty:
        return cls
    if cls not in _COMPAT:
        class _Shim(torch.utils.data.Sampler):
            def __init__(self, data_source=None):
                pass

        _COMPAT[cls] = type(cls.__name__, (cls, _Shim), {"__module__": __name__})
    return _COMPAT[cls]


_COMPAT: Dict[type, type] = {}


def make_train_sampler(
    cuts,
    max_duration: float,
    *,
    seed: int = 0,
    num_buckets: int = 10,
    shuffle: bool = True,
    world_size: int = 1,
    rank: int = 0,
    drop_last: bool = False,
):
    """A ``DynamicBucketingSampler`` over ``cuts`` (batches of similar-length cuts).

    Its shuffling uses ``random.Random(seed + epoch)``; call ``sampler.set_epoch(epoch)`` before
    each epoch. With ``world_size > 1`` each rank gets its share of the batches.
    """
    sampling = optional_import("lhotse.dataset.sampling")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
        return _compat_sampler_class(sampling.DynamicBucketingSampler)(
            cuts,
            max_duration=max_duration,
            num_buckets=num_buckets,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            world_size=world_size,
            rank=rank,
        )


def make_eval_sampler(cuts, max_duration: float, world_size: int = 1, rank: int = 0):
    """A ``SimpleCutSampler`` in manifest order (validation and decoding)."""
    sampling = optional_import("lhotse.dataset.sampling")
    return _compat_sampler_class(sampling.SimpleCutSampler)(
        cuts, max_duration=max_duration, shuffle=False, world_size=world_size, rank=rank
    )


def make_dataloader(dataset: torch.utils.data.Dataset, sampler, num_workers: int = 0):
    """``DataLoader(dataset, sampler=sampler, batch_size=None)`` as lhotse expects.

    ``num_workers=0`` (the default) reads features in the training process, which keeps the
    batch order and all RNG use in one process (needed for bit-exact resume).
    """
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
    )

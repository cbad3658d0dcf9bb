"""Log-mel filterbank features with lhotse, stored lilcom-compressed (icefall style).

:func:`compute_fbank` turns the manifests ``{prefix}_recordings_{split}.jsonl.gz`` +
``{prefix}_supervisions_{split}.jsonl.gz`` of a manifest directory into
``{output_dir}/cuts_{split}.jsonl.gz``: a lhotse CutSet whose cuts reference features in
``{output_dir}/feats_{split}.lca`` (``LilcomChunkyWriter``), computed by lhotse's ``Fbank``
(Kaldi-compatible, 25 ms window, 10 ms shift, ``num_mel_bins`` bins, no dither). Without the
``lilcom`` package (``storage="auto"``) features are stored uncompressed as ``.npy`` files under
``{output_dir}/feats_{split}/`` (``NumpyFilesWriter``) and a warning says so.

With ``speed_perturb=True`` the train split is tripled with 0.9x and 1.1x speed-perturbed copies
(cut ids get the suffixes ``_sp0.9``/``_sp1.1``), as in icefall recipes. Splits whose cuts file
exists are skipped (the step is a no-op on re-runs); delete ``cuts_{split}.jsonl.gz`` to redo one.
"""

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from k2quant.data.cuts import check_features, summarize
from k2quant.data.manifests import cuts_path, recordings_path, save_manifest, supervisions_path
from k2quant.utils.deps import optional_import
from k2quant.utils.io import PathLike

log = logging.getLogger(__name__)

SPEED_FACTORS = (0.9, 1.1)
CUTS_PER_JOB = 500


def available_splits(manifest_dir: PathLike, prefix: str) -> List[str]:
    """Splits with both manifests in ``manifest_dir``, in the order train, dev, test, others."""
    found = []
    for p in sorted(Path(manifest_dir).glob(f"{prefix}_recordings_*.jsonl.gz")):
        split = p.name[len(f"{prefix}_recordings_") : -len(".jsonl.gz")]
        if supervisions_path(manifest_dir, prefix, split).is_file():
            found.append(split)
    order = {"train": 0, "dev": 1, "test": 2}
    return sorted(found, key=lambda s: (order.get(s, 3), s))


_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _init_worker() -> None:
    """Feature workers compute one cut at a time: one intra-op and one inter-op torch thread."""
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work happened before); harmless
        pass


@contextmanager
def _worker_pool(num_jobs: int):
    """A ``spawn`` process pool whose workers run single-threaded (see :func:`compute_fbank`).

    ``OMP_NUM_THREADS`` & co. are 1 while the pool exists (workers are started lazily and inherit
    the environment at spawn), so OpenMP/MKL in a worker never starts a bigger thread pool; the
    initializer also calls ``torch.set_num_threads(1)``. On exit the pool is shut down (waiting
    for its workers) and the parent's environment is restored.
    """
    saved = {k: os.environ.get(k) for k in _THREAD_ENV}
    os.environ.update({k: "1" for k in _THREAD_ENV})
    try:
        with ProcessPoolExecutor(
            num_jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
        ) as executor:
            yield executor
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _storage_writer(storage: str):
    from lhotse import LilcomChunkyWriter, NumpyFilesWriter
    from k2quant.utils.deps import have

    if storage not in ("auto", "lilcom", "numpy"):
        raise ValueError(f"storage must be 'auto', 'lilcom' or 'numpy', got {storage!r}")
    if storage == "auto":
        if have("lilcom"):
            return LilcomChunkyWriter
        log.warning(
            "lilcom is not installed: storing features uncompressed (NumpyFilesWriter, ~4x "
            "larger); 'pip install lilcom' for icefall's lilcom storage"
        )
        return NumpyFilesWriter
    if storage == "lilcom":
        if not have("lilcom"):
            raise ImportError("storage='lilcom' needs the lilcom package: pip install lilcom")
        return LilcomChunkyWriter
    return NumpyFilesWriter


def compute_fbank(
    manifest_dir: PathLike,
    prefix: str,
    output_dir: PathLike,
    *,
    splits: Optional[Sequence[str]] = None,
    num_mel_bins: int = 80,
    num_jobs: int = 1,
    speed_perturb: bool = False,
    validate: bool = True,
    storage: str = "auto",
) -> Dict[str, object]:
    """Compute fbank features for ``splits`` and write ``cuts_{split}.jsonl.gz`` to ``output_dir``.

    Args:
      manifest_dir: directory with ``{prefix}_recordings_{split}.jsonl.gz`` and
        ``{prefix}_supervisions_{split}.jsonl.gz``.
      prefix: corpus name (``an4``, ``mini``).
      output_dir: where cuts and feature archives go.
      splits: splits to process; None = every split whose manifests exist. A requested split
        without manifests is an error.
      num_mel_bins: feature dimension C.
      num_jobs: worker processes for feature extraction; at most one per
        :data:`CUTS_PER_JOB` cuts are used (starting a worker costs seconds, more than it saves
        on a small split; the log says when fewer workers than asked are used). Workers are
        started with the ``spawn`` method (never ``fork``, which can deadlock a child that
        inherits a locked OpenMP/torch thread pool) and run with one torch/OpenMP thread each,
        so ``num_jobs`` workers use ``num_jobs`` cores. A script that calls this with
        ``num_jobs > 1`` needs an ``if __name__ == "__main__":`` guard (spawned workers
        re-import the main module).
      speed_perturb: add 0.9x/1.1x copies of the ``train`` split.
      validate: load every feature matrix once and :func:`check_features` it.
      storage: ``"lilcom"`` (``LilcomChunkyWriter``, needs the lilcom package), ``"numpy"``
        (``NumpyFilesWriter``, no extra dependency) or ``"auto"`` (lilcom when installed).

    Returns:
      ``{split: CutSet}``; features of a cut load as float32 arrays of shape (T, num_mel_bins).
    """
    lhotse = optional_import("lhotse")
    import torch

    manifest_dir, output_dir = Path(manifest_dir), Path(output_dir)
    if not manifest_dir.is_dir():
        raise FileNotFoundError(
            f"manifest directory {manifest_dir} does not exist; "
            f"run 'k2quant prepare-{prefix}' first"
        )
    found = available_splits(manifest_dir, prefix)
    if splits is None:
        splits = found
        if not splits:
            raise FileNotFoundError(
                f"no manifests {prefix}_recordings_<split>.jsonl.gz + {prefix}_supervisions_<split>"
                f".jsonl.gz in {manifest_dir}; run 'k2quant prepare-{prefix}' first"
            )
    missing = [s for s in splits if s not in found]
    if missing:
        raise FileNotFoundError(
            f"no manifests for split(s) {missing} with prefix {prefix!r} in {manifest_dir} "
            f"(expected {recordings_path(manifest_dir, prefix, missing[0]).name} and "
            f"{supervisions_path(manifest_dir, prefix, missing[0]).name}); available: {found}"
        )
    if num_mel_bins < 1:
        raise ValueError(f"num_mel_bins must be >= 1, got {num_mel_bins}")
    writer = _storage_writer(storage)
    output_dir.mkdir(parents=True, exist_ok=True)
    extractor = lhotse.Fbank(lhotse.FbankConfig(num_mel_bins=num_mel_bins))
    out: Dict[str, object] = {}
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # icefall: feature extraction does not profit from intra-op threads
    try:
        for split in splits:
            target = cuts_path(output_dir, split)
            if target.is_file():
                log.info("%s exists; skipping fbank for %s", target, split)
                out[split] = lhotse.load_manifest(target)
                continue
            cuts = lhotse.CutSet.from_manifests(
                recordings=lhotse.load_manifest(recordings_path(manifest_dir, prefix, split)),
                supervisions=lhotse.load_manifest(supervisions_path(manifest_dir, prefix, split)),
            )
            # one cut per utterance, with the utterance's id
            cuts = cuts.trim_to_supervisions(keep_overlapping=False)
            if speed_perturb and split == "train":
                cuts = lhotse.combine(cuts, *[cuts.perturb_speed(f) for f in SPEED_FACTORS])
            log.info(
                "computing %d-bin fbank for %s %s: %s", num_mel_bins, prefix, split, summarize(cuts)
            )
            cuts = cuts.to_eager()
            jobs = max(1, min(num_jobs, -(-len(cuts) // CUTS_PER_JOB)))
            if jobs < num_jobs:
                log.info(
                    "%s: %d cut(s), so %d worker process(es) instead of %d (one per %d cuts)",
                    split,
                    len(cuts),
                    jobs,
                    num_jobs,
                    CUTS_PER_JOB,
                )
            if jobs == 1:
                cuts = cuts.compute_and_store_features(
                    extractor=extractor,
                    storage_path=output_dir / f"feats_{split}",
                    num_jobs=1,
                    storage_type=writer,
                    progress_bar=False,
                )
            else:
                with _worker_pool(jobs) as executor:
                    cuts = cuts.compute_and_store_features(
                        extractor=extractor,
                        storage_path=output_dir / f"feats_{split}",
                        num_jobs=jobs,
                        executor=executor,
                        storage_type=writer,
                        progress_bar=False,
                    )
            if validate:
                for cut in cuts:
                    check_features(cut, cut.load_features())
            save_manifest(cuts, target)
            out[split] = cuts
    finally:
        torch.set_num_threads(num_threads)
    return out

"""Log-mel filterbank features with lhotse, stored lilcom-compressed (icefall style).

:func:`compute_fbank` turns the manifests ``{prefix}_recordings_{split}.jsonl.gz`` +
``{prefix}_supervisions_{split}.jsonl.gz`` of a manifest directory into
``{output_dir}/cuts_{split}.jsonl.gz``: a lhotse CutSet whose cuts reference features in
``{output_dir}/feats_{split}.lca`` (``LilcomChunkyWriter``), computed by lhotse's ``Fbank``
(Kaldi-compatible, 25 ms window, 10 ms shift, no dither) at the corpus's sample rate. Without the
``lilcom`` package (``storage="auto"``) features are stored uncompressed as ``.npy`` files under
``{output_dir}/feats_{split}/`` (``NumpyFilesWriter``) and a warning says so.

Sample rate and filterbank (:func:`fbank_settings`): the extractor runs at the sample rate of the
recordings (every recording of every split must have the same one; a mismatch names the
recording). The number of mel bins and the frequency range follow the band of the audio unless
given (``num_mel_bins`` / ``low_freq`` / ``high_freq``):

- telephone speech (sample rate <= 8 kHz): 40 bins from 20 to 3700 Hz. The channel carries
  300-3400 Hz and the anti-aliasing roll-off starts near 3.8 kHz, so higher bins see only noise;
  Kaldi's swbd/fisher recipes likewise use 40 bins at 8 kHz (``conf/mfcc_hires.conf``: 40-3800 Hz).
- wideband speech (> 8 kHz): 80 bins from 20 Hz to 400 Hz below Nyquist (7600 Hz at 16 kHz), the
  icefall / lhotse defaults.

The settings actually used are written to ``{output_dir}/fbank.json``; computing another split
into the same directory with different settings is an error (features of train and test must
match).

Audio readers: lhotse reads ``.sph`` files through the ``sph2pipe`` binary (LDC's
shorten-compressed SPHERE needs it) and other files with libsndfile. ``audio_reader="libsndfile"``
reads everything (uncompressed or mu-law SPHERE, WAV, FLAC) with libsndfile instead. Before any
feature is computed, the first recording of every split is read once; a missing or failing reader
(``sph2pipe`` not on ``PATH``, a Kaldi-style ``sox ... |`` / ``sph2pipe ... |`` pipe command that
fails) raises :class:`AudioReadError` with the command and its stderr. lhotse skips cuts whose
audio cannot be read (with a warning only); here a split that loses any cut is an error naming the
cut and its audio, and its cuts file is not written.

With ``speed_perturb=True`` the train split is tripled with 0.9x and 1.1x speed-perturbed copies
(cut ids get the suffixes ``_sp0.9``/``_sp1.1``), as in icefall recipes. Splits whose cuts file
exists are skipped (the step is a no-op on re-runs); delete ``cuts_{split}.jsonl.gz`` to redo one.
"""

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from k2quant.data.cuts import check_features, summarize
from k2quant.data.manifests import cuts_path, recordings_path, save_manifest, supervisions_path
from k2quant.utils.deps import optional_import
from k2quant.utils.io import PathLike, atomic_write_json

log = logging.getLogger(__name__)

SPEED_FACTORS = (0.9, 1.1)
CUTS_PER_JOB = 500
#: Highest sample rate treated as telephone speech (narrowband defaults of :func:`fbank_settings`).
TELEPHONE_MAX_RATE = 8000
AUDIO_READERS = ("auto", "libsndfile")
SETTINGS_FILE = "fbank.json"
_PROBE_SECONDS = 0.1


class AudioReadError(RuntimeError):
    """Audio of a recording could not be read (missing or failing reader); names the command."""


@dataclass(frozen=True)
class FbankSettings:
    """What the features of a directory were computed with (``fbank.json``).

    ``low_freq`` and ``high_freq`` are absolute frequencies in Hz.
    """

    sampling_rate: int
    num_mel_bins: int
    low_freq: float
    high_freq: float

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def lhotse_config(self):
        from lhotse import FbankConfig

        return FbankConfig(
            sampling_rate=self.sampling_rate,
            num_mel_bins=self.num_mel_bins,
            low_freq=self.low_freq,
            high_freq=self.high_freq,
        )


def fbank_settings(
    sampling_rate: int,
    num_mel_bins: Optional[int] = None,
    low_freq: Optional[float] = None,
    high_freq: Optional[float] = None,
) -> FbankSettings:
    """The filterbank for audio at ``sampling_rate`` Hz (defaults: see the module docstring).

    Args:
      sampling_rate: sample rate of the recordings in Hz.
      num_mel_bins: None = 40 for telephone speech (<= 8 kHz), else 80.
      low_freq: lowest filter edge in Hz; None = 20.
      high_freq: highest filter edge in Hz; None = 3700 for telephone speech, else
        ``sampling_rate / 2 - 400``.

    Raises:
      ValueError: a rate <= 0, fewer than 1 bin, or a range outside ``(0, sampling_rate / 2]``.
    """
    if sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be > 0 Hz, got {sampling_rate}")
    telephone = sampling_rate <= TELEPHONE_MAX_RATE
    nyquist = sampling_rate / 2
    bins = num_mel_bins if num_mel_bins is not None else (40 if telephone else 80)
    lo = 20.0 if low_freq is None else float(low_freq)
    hi = (3700.0 if telephone else nyquist - 400.0) if high_freq is None else float(high_freq)
    if bins < 1:
        raise ValueError(f"num_mel_bins must be >= 1, got {bins}")
    if not 0 <= lo < hi <= nyquist:
        raise ValueError(
            f"the filterbank range must satisfy 0 <= low_freq < high_freq <= {nyquist:g} Hz (half "
            f"the {sampling_rate} Hz sample rate), got low_freq={lo:g}, high_freq={hi:g}"
        )
    return FbankSettings(int(sampling_rate), int(bins), lo, hi)


def split_sampling_rate(recordings, split: str) -> int:
    """The one sample rate of ``recordings`` (a RecordingSet); ValueError naming any outlier."""
    first: Dict[int, str] = {}
    for r in recordings:
        first.setdefault(int(r.sampling_rate), r.id)
    if not first:
        raise ValueError(f"split {split!r} has no recordings")
    if len(first) > 1:
        rates = ", ".join(f"{sr} Hz (e.g. recording {rid})" for sr, rid in sorted(first.items()))
        raise ValueError(
            f"split {split!r} mixes sample rates: {rates}; resample the audio to one rate "
            "(e.g. with sox) before computing features"
        )
    return next(iter(first))


@contextmanager
def audio_reader_context(audio_reader: str):
    """Make lhotse read audio with ``audio_reader`` here and in spawned feature workers.

    ``"auto"``: lhotse's default (``sph2pipe`` for ``.sph``, libsndfile and others for the rest);
    ``"libsndfile"``: libsndfile for everything (``LHOTSE_AUDIO_BACKEND`` is set while the
    context is active, so spawned workers inherit it; the previous state is restored).
    """
    if audio_reader not in AUDIO_READERS:
        raise ValueError(f"audio_reader must be one of {AUDIO_READERS}, got {audio_reader!r}")
    if audio_reader == "auto":
        yield
        return
    from lhotse.audio.backend import get_current_audio_backend, set_current_audio_backend

    previous = get_current_audio_backend()  # before the variable below changes what it returns
    saved = os.environ.get("LHOTSE_AUDIO_BACKEND")
    os.environ["LHOTSE_AUDIO_BACKEND"] = "LibsndfileBackend"
    set_current_audio_backend("LibsndfileBackend")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LHOTSE_AUDIO_BACKEND", None)
        else:
            os.environ["LHOTSE_AUDIO_BACKEND"] = saved
        set_current_audio_backend(previous)


def _run_reader(recording_id: str, cmd, shell: bool) -> None:
    shown = cmd if isinstance(cmd, str) else " ".join(cmd)
    try:
        p = subprocess.run(cmd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=600)
    except OSError as e:
        raise AudioReadError(f"recording {recording_id}: cannot run `{shown}`: {e}") from e
    err = p.stderr.decode("utf-8", "replace").strip()[-2000:]
    if p.returncode != 0 or not p.stdout:
        raise AudioReadError(
            f"recording {recording_id}: the audio reader failed: `{shown}` exited with "
            f"{p.returncode}" + (" and wrote no audio" if not p.stdout else "")
            + (f"; its stderr: {err}" if err else "; it wrote nothing to stderr")
        )


def check_audio_reader(recording, audio_reader: str = "auto") -> None:
    """Read the first 0.1 s of ``recording`` once, as feature extraction will.

    A pipe source (``type == "command"``, Kaldi-style ``sox ... |``) is run as given; a ``.sph``
    file under ``audio_reader="auto"`` is read with ``sph2pipe`` as lhotse does. Then lhotse
    itself loads the piece.

    Raises:
      AudioReadError: the reader is missing (e.g. ``sph2pipe`` not on ``PATH``) or fails; the
        message has the recording, the command and its stderr.
    """
    for src in recording.sources:
        if src.type == "command":
            _run_reader(recording.id, src.source, shell=True)
        elif src.type == "file" and str(src.source).lower().endswith(".sph") and (
            audio_reader == "auto"
        ):
            exe = shutil.which("sph2pipe")
            if exe is None:
                raise AudioReadError(
                    f"recording {recording.id}: reading {src.source} needs the sph2pipe binary, "
                    "which is not on PATH (LDC's shorten-compressed SPHERE is only decoded by "
                    "sph2pipe: build it from Kaldi's tools/ or run 'lhotse install-sph2pipe', "
                    "then put it on PATH); uncompressed SPHERE can be read with "
                    "--audio-reader libsndfile"
                )
            _run_reader(recording.id, [exe, "-f", "wav", "-p", "-t", f"0:{_PROBE_SECONDS}",
                                       str(src.source)], shell=False)
    try:
        with audio_reader_context(audio_reader):
            recording.load_audio(duration=min(_PROBE_SECONDS, recording.duration))
    except Exception as e:  # lhotse raises AudioLoadingError, soundfile RuntimeError, ...
        srcs = ", ".join(str(s.source) for s in recording.sources)
        raise AudioReadError(
            f"recording {recording.id}: cannot read its audio ({srcs}) with the {audio_reader} "
            f"reader: {type(e).__name__}: {e}"
        ) from e


def _check_settings_file(output_dir: Path, settings: FbankSettings) -> None:
    path = output_dir / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable ({e}); delete it and {output_dir}") from e
        if old != settings.to_dict():
            raise ValueError(
                f"{output_dir} holds features computed with {old} ({path}), but these would be "
                f"computed with {settings.to_dict()}; train and test features must match: use "
                f"the same --num-mel-bins/--low-freq/--high-freq or another --output-dir"
            )
    else:
        atomic_write_json(path, settings.to_dict())


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
    num_mel_bins: Optional[int] = None,
    low_freq: Optional[float] = None,
    high_freq: Optional[float] = None,
    num_jobs: int = 1,
    speed_perturb: bool = False,
    validate: bool = True,
    storage: str = "auto",
    audio_reader: str = "auto",
) -> Dict[str, object]:
    """Compute fbank features for ``splits`` and write ``cuts_{split}.jsonl.gz`` to ``output_dir``.

    Args:
      manifest_dir: directory with ``{prefix}_recordings_{split}.jsonl.gz`` and
        ``{prefix}_supervisions_{split}.jsonl.gz``.
      prefix: corpus name (``an4``, ``mini``).
      output_dir: where cuts and feature archives go.
      splits: splits to process; None = every split whose manifests exist. A requested split
        without manifests is an error.
      num_mel_bins, low_freq, high_freq: the filterbank (feature dimension C = num_mel_bins);
        None = the defaults for the corpus's sample rate (:func:`fbank_settings`).
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
      audio_reader: ``"auto"`` (lhotse's: sph2pipe for ``.sph``) or ``"libsndfile"``.

    Returns:
      ``{split: CutSet}``; features of a cut load as float32 arrays of shape (T, num_mel_bins).

    Raises:
      AudioReadError: the audio reader is missing or fails (checked on the first recording of
        each split before any feature is computed), or some cut's audio could not be read.
      ValueError: sample rates differ between recordings or splits, or from the settings of
        features already in ``output_dir``.
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
    if audio_reader not in AUDIO_READERS:
        raise ValueError(f"audio_reader must be one of {AUDIO_READERS}, got {audio_reader!r}")
    writer = _storage_writer(storage)
    todo = [s for s in splits if not cuts_path(output_dir, s).is_file()]
    recordings = {
        s: lhotse.load_manifest(recordings_path(manifest_dir, prefix, s)) for s in todo
    }
    rates = {s: split_sampling_rate(recs, s) for s, recs in recordings.items()}
    if len(set(rates.values())) > 1:
        raise ValueError(
            f"splits of {prefix} have different sample rates ({rates}); features of all splits "
            "must be computed at one rate"
        )
    out: Dict[str, object] = {}
    if not todo:
        for split in splits:
            log.info("%s exists; skipping fbank for %s", cuts_path(output_dir, split), split)
            out[split] = lhotse.load_manifest(cuts_path(output_dir, split))
        return out
    settings = fbank_settings(next(iter(rates.values())), num_mel_bins, low_freq, high_freq)
    for split, recs in recordings.items():  # fail before computing anything
        check_audio_reader(next(iter(recs)), audio_reader)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_settings_file(output_dir, settings)
    extractor = lhotse.Fbank(settings.lhotse_config())
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
                recordings=recordings[split],
                supervisions=lhotse.load_manifest(supervisions_path(manifest_dir, prefix, split)),
            )
            # one cut per utterance, with the utterance's id
            cuts = cuts.trim_to_supervisions(keep_overlapping=False)
            if speed_perturb and split == "train":
                cuts = lhotse.combine(cuts, *[cuts.perturb_speed(f) for f in SPEED_FACTORS])
            log.info(
                "computing %d-bin fbank (%d Hz, %g-%g Hz) for %s %s: %s",
                settings.num_mel_bins,
                settings.sampling_rate,
                settings.low_freq,
                settings.high_freq,
                prefix,
                split,
                summarize(cuts),
            )
            cuts = cuts.to_eager()
            if len(cuts) == 0:
                raise ValueError(f"{prefix} {split}: no cuts (no supervisions in the manifests)")
            wanted = cuts
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
            storage_path = output_dir / f"feats_{split}"
            try:
                with audio_reader_context(audio_reader):
                    cuts = _extract(cuts, extractor, storage_path, jobs, writer)
            except Exception as e:  # lhotse re-raises reader errors in odd ways (see below)
                _remove_archive(storage_path)
                raise _unreadable(wanted, split, audio_reader, e) from e
            _check_complete(wanted, cuts, split, storage_path, audio_reader)
            if validate:
                for cut in cuts:
                    check_features(cut, cut.load_features())
            save_manifest(cuts, target)
            out[split] = cuts
    finally:
        torch.set_num_threads(num_threads)
    return out


def _extract(cuts, extractor, storage_path: Path, jobs: int, writer):
    if jobs == 1:
        return cuts.compute_and_store_features(
            extractor=extractor,
            storage_path=storage_path,
            num_jobs=1,
            storage_type=writer,
            progress_bar=False,
        )
    with _worker_pool(jobs) as executor:
        return cuts.compute_and_store_features(
            extractor=extractor,
            storage_path=storage_path,
            num_jobs=jobs,
            executor=executor,
            storage_type=writer,
            progress_bar=False,
        )


def _check_complete(wanted, got, split: str, storage_path: Path, audio_reader: str) -> None:
    """lhotse drops cuts whose audio fails to load (a warning only): make that an error."""
    have = {c.id for c in got}
    missing = [c for c in wanted if c.id not in have]
    if not missing:
        return
    _remove_archive(storage_path)
    cut = missing[0]
    why = "no error when read again (a transient failure?)"
    try:
        if cut.has_recording:
            check_audio_reader(cut.recording, audio_reader)  # the reader's own stderr
        with audio_reader_context(audio_reader):
            cut.load_audio()
    except Exception as e:
        why = _describe(e)
    srcs = _sources(cut)
    raise AudioReadError(
        f"{split}: the audio of {len(missing)} of {len(wanted)} cuts could not be read (lhotse "
        f"skipped them), e.g. cut {cut.id} of recording {cut.recording_id} ({srcs}): {why}. "
        f"Nothing was written for {split}; fix the audio reader and rerun."
    )


def _remove_archive(storage_path: Path) -> None:
    for p in (storage_path, storage_path.with_suffix(".lca")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:  # e.g. a soundfile error rebuilt by lhotse without its error code
        return f"{type(e).__name__}: {e.args!r}"


def _sources(cut) -> str:
    if not cut.has_recording:
        return "no recording"
    return ", ".join(str(s.source) for s in cut.recording.sources)


def _unreadable(cuts, split: str, audio_reader: str, error: BaseException) -> AudioReadError:
    """Find the first cut whose audio cannot be read (extraction stopped with ``error``)."""
    seen = set()
    with audio_reader_context(audio_reader):
        for cut in cuts:
            if cut.recording_id in seen:
                continue
            seen.add(cut.recording_id)
            try:
                cut.load_audio()
            except Exception as e:
                return AudioReadError(
                    f"{split}: cannot read the audio of cut {cut.id} of recording "
                    f"{cut.recording_id} ({_sources(cut)}) with the {audio_reader} reader: "
                    f"{_describe(e)}. Nothing was written for {split}."
                )
    return AudioReadError(f"{split}: feature extraction failed: {_describe(error)}")

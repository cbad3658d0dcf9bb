"""``compute_fbank`` with worker processes (``num_jobs=2``) finishes and matches ``num_jobs=1``.

Regression test for a reported hang of ``k2quant compute-fbank --num-jobs 2``. The work runs in a
child process killed after a timeout, so a hang fails the test instead of blocking the suite.
"""

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

lhotse = pytest.importorskip("lhotse")
sf = pytest.importorskip("soundfile")

TIMEOUT = 180  # seconds; the work itself takes a few seconds on 2 shared cores


def _make_corpus(root: Path, num_utts: int = 6) -> Path:
    """Tiny ``tiny_{recordings,supervisions}_train.jsonl.gz`` with 0.4 s 16 kHz tones."""
    from k2quant.data.manifests import recordings_path, save_manifest, supervisions_path

    recs, sups = [], []
    for i in range(num_utts):
        wav = root / "wav" / f"u{i}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(6400)
        x = (2000 * np.sin(2 * np.pi * (200 + 50 * i) * t / 16000)).astype(np.int16)
        sf.write(str(wav), x, 16000, subtype="PCM_16")
        rec = lhotse.Recording.from_file(wav, recording_id=f"u{i}")
        recs.append(rec)
        sups.append(
            lhotse.SupervisionSegment(
                id=f"u{i}", recording_id=f"u{i}", start=0.0, duration=rec.duration, text="A"
            )
        )
    save_manifest(lhotse.RecordingSet.from_recordings(recs), recordings_path(root, "tiny", "train"))
    save_manifest(
        lhotse.SupervisionSet.from_segments(sups), supervisions_path(root, "tiny", "train")
    )
    return root


# Run in a fresh interpreter: the child is exactly what the CLI does (a __main__ guarded call),
# and a hang is ended by subprocess's timeout.
_SCRIPT = textwrap.dedent(
    """
    import sys
    import k2quant.data.features as F

    if __name__ == "__main__":
        F.CUTS_PER_JOB = 1  # force worker processes even for 6 cuts
        cuts = F.compute_fbank(sys.argv[1], "tiny", sys.argv[2], num_jobs=int(sys.argv[3]),
                               num_mel_bins=23)
        print("NUM_CUTS", len(cuts["train"]))
    """
)


def _run(manifest_dir: Path, out_dir: Path, num_jobs: int, tmp_path: Path) -> str:
    script = tmp_path / "run_fbank.py"
    script.write_text(_SCRIPT)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(manifest_dir), str(out_dir), str(num_jobs)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"compute_fbank(num_jobs={num_jobs}) did not finish in {TIMEOUT} s: {e}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_compute_fbank_two_jobs_finishes_and_matches_one_job(tmp_path):
    manifests = _make_corpus(tmp_path / "manifests")
    out2 = _run(manifests, tmp_path / "fbank2", 2, tmp_path)
    out1 = _run(manifests, tmp_path / "fbank1", 1, tmp_path)
    assert "NUM_CUTS 6" in out2 and "NUM_CUTS 6" in out1
    c2 = lhotse.load_manifest(tmp_path / "fbank2" / "cuts_train.jsonl.gz")
    c1 = lhotse.load_manifest(tmp_path / "fbank1" / "cuts_train.jsonl.gz")
    assert sorted(c.id for c in c2) == sorted(c.id for c in c1) == [f"u{i}" for i in range(6)]
    f1 = {c.id: c.load_features() for c in c1}
    for c in c2:
        feats = c.load_features()
        assert feats.shape == f1[c.id].shape and feats.shape[1] == 23
        np.testing.assert_allclose(feats, f1[c.id], atol=0.1)  # lilcom is lossy per archive


def test_compute_fbank_two_jobs_in_process(tmp_path, monkeypatch):
    """Same, called from the test process itself (pytest as ``__main__``)."""
    import k2quant.data.features as F

    manifests = _make_corpus(tmp_path / "manifests")
    monkeypatch.setattr(F, "CUTS_PER_JOB", 1)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_in_child, args=(str(manifests), str(tmp_path / "fb"), q))
    p.start()
    p.join(TIMEOUT)
    if p.is_alive():
        p.kill()
        pytest.fail(f"compute_fbank(num_jobs=2) did not finish in {TIMEOUT} s")
    assert p.exitcode == 0 and q.get(timeout=5) == 6


def _in_child(manifest_dir, out_dir, q):
    import k2quant.data.features as F

    F.CUTS_PER_JOB = 1
    q.put(len(F.compute_fbank(manifest_dir, "tiny", out_dir, num_jobs=2)["train"]))


def _worker_threads():
    import os

    import torch

    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def test_worker_pool_is_single_threaded_and_restores_env(monkeypatch):
    """Workers get one torch/OpenMP thread (2 workers x N threads oversubscribe the cores, which
    lhotse warns can make extraction never end); the parent's environment is left as it was."""
    from k2quant.data.features import _worker_pool

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with _worker_pool(2) as pool:
        futures = [pool.submit(_worker_threads) for _ in range(2)]
        results = [f.result(timeout=TIMEOUT) for f in futures]
    assert results == [(1, "1"), (1, "1")]
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ
